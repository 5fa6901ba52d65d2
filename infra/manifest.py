"""Names that come from outside (an S3 manifest, the ``prod`` pointer, a remote) checked before any of
them is used as a file path, and the schema of a published version's manifest.

A manifest or pointer is data another party can write: an entry ``pytorch/../../../X`` or a version
``../x`` would otherwise make a download write outside its destination. Every name and version is
checked here, and a manifest with one bad entry is rejected whole, before anything is written.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["RegistryError", "UnsafeName", "VERSION_PATTERN", "check_version", "check_file_name",
           "path_inside", "parse_manifest"]

# GTO registers versions as vMAJOR.MINOR.PATCH; nothing else is ever published.
VERSION_PATTERN = re.compile(r"v\d{1,9}\.\d{1,9}\.\d{1,9}")
# One path component of a published file: letters, digits and . _ - + = @ (no spaces, no separators).
_COMPONENT = re.compile(r"[A-Za-z0-9._+=@-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(RuntimeError):
    """A registry operation cannot go ahead; the message says why and what to do."""


class UnsafeName(RegistryError):
    """A name or version read from a remote source cannot be used as a path."""


def check_version(version: Any, source: str = "the registry") -> str:
    """``version`` if it is ``vX.Y.Z``; :class:`UnsafeName` naming ``source`` otherwise."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise UnsafeName(f"{source} names version {version!r}, which is not of the form vX.Y.Z: refusing to use "
                         "it as a path; check who wrote it (the bucket may have been tampered with)")
    return version


def check_file_name(name: Any, source: str = "the manifest") -> str:
    """``name`` if it is a relative POSIX path of plain components (no ``..``, no absolute path)."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is not a non-empty string"
    elif name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        problem = "is an absolute path"
    else:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = "has an empty, '.' or '..' component"
        elif not all(_COMPONENT.fullmatch(p) for p in parts):
            problem = "has characters other than letters, digits and . _ - + = @"
    if problem:
        raise UnsafeName(f"{source} lists the file {name!r}, which {problem}: refusing to use it as a path; "
                         "check who wrote it (the bucket may have been tampered with)")
    return name


def path_inside(dest: Path, name: str, source: str = "the manifest") -> Path:
    """``dest / name`` after :func:`check_file_name`, checked to resolve inside ``dest`` (symlinks too)."""
    check_file_name(name, source)
    root = Path(dest).resolve()
    target = (root / PurePosixPath(name)).resolve()
    if target == root or root not in target.parents:
        raise UnsafeName(f"{source} lists the file {name!r}, which resolves to {target}, outside {root}: "
                         "refusing to write it")
    return target


def parse_manifest(data: Any, version: str, where: str) -> dict[str, Any]:
    """Check a downloaded manifest whole: its version, and every entry's name, sha256 and size."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise RegistryError(f"{where} is not a manifest (no 'files' mapping): republish the version")
    if data.get("version") != version:
        raise UnsafeName(f"{where} describes version {data.get('version')!r}, not {version!r}: refusing it")
    for name, entry in data["files"].items():
        check_file_name(name, where)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.fullmatch(entry["sha256"]) or not isinstance(entry.get("size"), int)
                or isinstance(entry.get("size"), bool) or entry["size"] < 0):
            raise RegistryError(f"{where}: the entry for {name!r} needs a sha256 (64 hex digits) and a size "
                                f"(bytes), got {entry!r}; republish the version")
    return data
