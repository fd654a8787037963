"""Atomic checkpoint folders: a save is written beside its target and swapped in whole; readers see old or new.

Writer (`atomic_folder`): everything goes into a hidden temporary folder next to the target; files are flushed to disk,
the entries of the old folder that the save does not own are carried over (hard links), and only then is the
temporary swapped with the target. A failure before the swap removes the temporary and leaves the old folder
untouched; files the new save does not write (another variant, the other format, stale shards) do not survive.

A target that is a symbolic link to a folder is written through: the folder it points to is swapped, the link is
left as it is and so points at the new save.

Readers and writers of this process and others agree through `flock` on the folders themselves (no lock files):
a reader holds a shared lock on the folder it loads and on its parent for the whole load; a writer takes exclusive
locks on the same two folders only for the swap. A reader therefore never sees a mix of two saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _temp_name(target: Path, kind: str) -> Path:
    """`.name.kind-PID-RANDOM` beside the target: the pid tells a later save whether its writer can still finish."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, keep: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """`with atomic_folder(dir) as tmp:` write the whole save into `tmp`; on success it replaces `dir`.

    `keep(name)`: entries of the old folder the save does not own, carried into the new one unless it wrote them.
    """
    target = Path(target)
    if target.is_symlink():  # write through the link (as Diffusers does): the link stays, pointing at the new save
        target = Path(os.path.realpath(target))
    if target.is_file():
        raise ValueError(f"save_directory {str(target)!r} is a file, expected a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _check_removable(target)
    _remove_stale_temporaries(target)
    tmp = _temp_name(target, "saving")
    tmp.mkdir()
    try:
        yield tmp
        if target.is_dir():
            for entry in sorted(os.listdir(target)):
                if keep(entry) and not (tmp / entry).exists() and not os.path.lexists(tmp / entry):
                    _link_copy(target / entry, tmp / entry)
        _flush_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(target: Path) -> None:
    """Temporaries of earlier saves of `target` whose writing process is gone (killed mid-save): their names carry
    the writer's pid (`_temp_name`), and a pid that no longer exists on this machine cannot finish them."""
    for path in [*target.parent.glob(f".{target.name}.saving-*"), *target.parent.glob(f".{target.name}.old-*")]:
        pid = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 2 else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists (PermissionError: another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def read_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold shared locks on `folder` and its parent while loading from it, so no save is swapped in meanwhile (a
    symlinked folder: the folder it points to, which is what a save through the link swaps)."""
    folder = Path(os.path.realpath(folder))
    with contextlib.ExitStack() as stack:
        for path in (folder.parent, folder):
            stack.enter_context(_locked(path, fcntl.LOCK_SH))
        yield


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    """flock `path` (a folder); retried if the folder was swapped while we waited. No-op where locking is impossible."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # not there (yet) or not readable: nothing to protect
            yield
            return
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same:
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` under exclusive locks; the old tree is removed afterwards."""
    with _locked(target.parent, fcntl.LOCK_EX), _locked(target, fcntl.LOCK_EX):
        if not target.exists():
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return
        old = _temp_name(target, "old")
        if not _exchange(tmp, target):  # no renameat2: two renames, still invisible to locking readers
            os.rename(target, old)
            os.rename(tmp, target)
        else:
            os.rename(tmp, old)  # tmp now holds the old tree
        _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logger.warning("saved %s, but could not remove the previous version's files at %s", target, old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    libc = _libc()
    if libc is None:
        return False
    ret = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return ret == 0


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name, use_errno=True) if name else None
        _LIBC.append(lib if lib is not None and hasattr(lib, "renameat2") else None)
    return _LIBC[0]


def _check_removable(target: Path) -> None:
    """Fail before writing anything if the old folder could not be replaced (a read-only folder inside it)."""
    for dirpath, _dirs, _files in os.walk(target):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot replace {target}: folder {dirpath} is not writable; nothing was changed")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot replace {target}: its parent folder {target.parent} is not writable")


def _link_copy(src: Path, dst: Path) -> None:
    """Carry an entry of the old folder over without copying its bytes where the file system allows."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(str(src), str(dst))


def _flush_tree(root: Path) -> None:
    """fsync every file and folder written, so the swap never exposes data still in the page cache."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)
