"""Files written whole or not at all: a pid-tagged temporary beside the target, flushed, then renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP = ".tmp"


def temporary(path: Path) -> Path:
    """This process's temporary name for `path` (pid-tagged: two processes never share one)."""
    return path.with_name(f"{path.name}{TMP}-{os.getpid()}")


@contextlib.contextmanager
def writing(path: Path, replace: bool = True) -> Iterator[Path]:
    """`with writing(path) as tmp:` write `tmp`; it is renamed to `path` on success, removed on any failure, and an
    OSError (disk full, permission) names `path`. `replace=False` never replaces an existing `path` (a hard link
    takes the place of the rename: it fails if another process created `path` meanwhile)."""
    tmp = temporary(path)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{path} already exists (written by another process meanwhile); it was not replaced") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` unless `path` exists (FileExistsError); where hard links are not supported, a check then
    a rename."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def save_synced(image: Any, path: Path, format: str) -> None:
    """Encode `image` into `path` and flush it to disk (before the commit that lists it, so a power cut never leaves
    a committed chunk pointing at an empty file)."""
    with open(path, "wb") as f:
        image.save(f, format=format)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed into place (readers see all of it or nothing)."""
    with writing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
