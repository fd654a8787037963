"""Content hashes of (large) files, computed once and cached by the file's identity.

`file_digest(path)` hashes the whole file (blake2b, 128 bits: any changed byte changes it, whatever the size), and
remembers the result in a small JSON cache keyed by the absolute path together with its size, mtime_ns, ctime_ns and
inode. A file rewritten in place gets a new mtime/ctime, so the cache never answers for content it did not hash;
an unchanged multi-GB checkpoint is hashed once per machine. The cache lives in $XDG_CACHE_HOME/rapiddiff (default
~/.cache/rapiddiff); where it cannot be written, hashes are simply not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_NAME = "file-hashes.json"
BLOCK = 8 * 2**20
MAX_ENTRIES = 10_000


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rapiddiff" / CACHE_NAME


def _key(path: Path) -> tuple[str, str]:
    st = path.stat()
    return str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _load(cache: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(cache: Path, data: dict[str, list[str]]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home: hashing still works, uncached
        logger.debug("could not write the file-hash cache %s: %s", cache, e)


def hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_digests(paths: list[Path]) -> dict[Path, str]:
    """`hash_file` of each path, through the cache (one read and at most one write of it)."""
    cache = cache_path()
    data = _load(cache)
    out: dict[Path, str] = {}
    changed = False
    for path in paths:
        name, identity = _key(path)
        entry = data.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == identity:
            out[path] = entry[1]
            continue
        out[path] = hash_file(path)
        if _key(path)[1] == identity:  # not rewritten while we read it
            data[name] = [identity, out[path]]
            changed = True
    if changed:
        if len(data) > MAX_ENTRIES:
            data = dict(list(data.items())[-MAX_ENTRIES:])
        _store(cache, data)
    return out
