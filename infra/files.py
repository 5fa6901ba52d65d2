"""Files written whole or not at all, and their hashes: the project's one home for both.

Every writer of a file another process may read (metrics, checkpoints, endpoint lists, manifests)
goes through :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary sibling, fsync, one
``os.replace``. A reader sees the old file or the new one, never half of one, and a crash mid-write
leaves the old file in place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "replace_dir", "sha256_file", "sha256_bytes"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(new: str | Path, dest: str | Path) -> None:
    """Put the finished folder ``new`` at ``dest`` (a sibling of it): an existing ``dest`` is renamed
    aside first and removed after, so a reader finds the old folder or the new one, never a mix."""
    new, dest = Path(new), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, length: int = 64) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks; ``length`` keeps a prefix."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def sha256_bytes(data: bytes, length: int = 64) -> str:
    return hashlib.sha256(data).hexdigest()[:length]
