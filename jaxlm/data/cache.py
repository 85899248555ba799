"""The data cache directory: entries named by a hash of what produced them, published atomically.

Several processes (the hosts of a multi-host job on a shared disk, or a test and a trainer) may
build the same entry at once. Each writes into a private temporary path and renames it into
place; a rename is atomic, so readers see either nothing or a complete entry, and the loser of a
race simply keeps the winner's identical result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any


def default_cache_dir() -> str:
    """The cache of runs and tools that have no directory of their own: ~/.cache/jaxlm."""
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxlm")


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, used in cache entry names."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and a rename.
    The file gets the mode an ordinary `open(path, "w")` would (0666 less the umask), not the
    0600 of the private temporary file, so it reads like the files written beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def build_dir_once(final_dir: str, build: Callable[[str], None]) -> str:
    """Returns `final_dir`, first calling `build(tmp_dir)` and renaming it there if absent.

    `build` fills a fresh private directory. A directory that already exists at `final_dir` is
    trusted: it was published by a complete build.
    """
    if os.path.isdir(final_dir):
        return final_dir
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(final_dir))
    try:
        build(tmp)
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not os.path.isdir(final_dir):  # not a lost race: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir
