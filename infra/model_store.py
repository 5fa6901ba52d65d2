"""Published copies of each model version on S3, with the ``prod`` pointer.

Layout::

    s3://<bucket>/<model>/<version>/<every file of exports/>, registry.json, registry.md
    s3://<bucket>/<model>/<version>/manifest.json   written after every file of the version (sha256 + size)
    s3://<bucket>/<model>/prod                      {"version": ..., "history": [...]} moved last

A reader follows ``prod`` → ``manifest.json`` → files, so it never sees a half-published version: until
the pointer moves, production is the old version, whatever was uploaded. One ``put_object`` of the
pointer is atomic in S3. A published version (one with a manifest) is immutable: publishing it again
with other files or another record fails instead of rewriting it. Every name and version read back
from the bucket is checked (``infra/manifest.py``) before it becomes a local path.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.files import replace_dir, sha256_bytes, sha256_file
from infra.manifest import RegistryError, check_file_name, check_version, parse_manifest, path_inside
from infra.s3 import boto_exceptions, s3_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL = "driving-policy"
POINTER_NAME = "prod"
MANIFEST_NAME = "manifest.json"
# The promotion record (metrics compared, decision, lineage). Not "model_card.json": the export stage
# writes its own model card into exports/, which is published as it is.
CARD_NAME = "registry.json"
README_NAME = "registry.md"
# What must be equal for a re-publication of a version to be the same version (a retry).
_RECORD_KEYS = ("metrics", "lineage")

__all__ = ["DEFAULT_MODEL", "MANIFEST_NAME", "CARD_NAME", "README_NAME", "Pointer", "ModelStore",
           "collect_files", "model_card_markdown"]


def collect_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` by its relative POSIX name (hidden staging leftovers excluded)."""
    root = Path(root)
    if not root.is_dir():
        raise RegistryError(f"{root} not found: run the export stage first")
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


@dataclass
class Pointer:
    version: str
    history: list[str]
    updated_at: float
    git_commit: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Pointer":
        """The pointer read from ``where``, its versions checked (they become paths downstream)."""
        if not isinstance(data, dict) or not isinstance(data.get("history", []), list):
            raise RegistryError(f"{where} is not a pointer ({{'version', 'history', ...}}): got {data!r}")
        check_version(data.get("version"), where)
        for version in data.get("history", []):
            check_version(version, f"{where} (history)")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RegistryError(f"{where} is not a pointer: {exc}") from None


class ModelStore:
    """Published versions of one model in one bucket, with the ``prod`` pointer."""

    def __init__(self, client, bucket: str, model: str = DEFAULT_MODEL):
        self.client, self.bucket, self.model = client, bucket, model
        self.where = client.meta.endpoint_url

    def key(self, version: str, name: str = "") -> str:
        return f"{self.model}/{version}/{name}"

    @property
    def pointer_key(self) -> str:
        return f"{self.model}/{POINTER_NAME}"

    def url(self, version: str, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(version, name)}"

    def _get_json(self, key: str) -> Any:
        with s3_errors(self.where, self.bucket, "read"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except boto_exceptions().ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise
        try:
            return json.loads(body)
        except ValueError as exc:
            raise RegistryError(f"s3://{self.bucket}/{key} is not valid JSON ({exc})") from None

    def _put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        with s3_errors(self.where, self.bucket, "write"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    def _upload_file(self, path: Path, key: str) -> None:
        with s3_errors(self.where, self.bucket, "upload to"):
            self.client.upload_file(str(path), self.bucket, key)

    # -- versions

    def upload_version(self, version: str, files: dict[str, Path], card: dict[str, Any],
                       readme: str | None = None) -> dict[str, Any]:
        """Upload the files, the model card, then the manifest (last: a version without a manifest is
        incomplete). A retry after a failure overwrites its own incomplete attempt; a version that
        is already published is kept as it is when the same, and refused when different."""
        check_version(version, "the version to publish")
        entries = {check_file_name(name, "the files to publish"): {"sha256": sha256_file(path),
                                                                   "size": path.stat().st_size}
                   for name, path in files.items()}
        published = self.manifest(version)
        if published is not None:
            self._check_same_version(version, published, entries, card)
            log.info("registry: %s is already published with the same files and record; kept as it is",
                     self.url(version))
            return published
        for name, path in files.items():
            self._upload_file(path, self.key(version, name))
        card_body = json.dumps(card, indent=2, sort_keys=True, default=str).encode()
        self._put(self.key(version, CARD_NAME), card_body, "application/json")
        entries[CARD_NAME] = {"sha256": sha256_bytes(card_body), "size": len(card_body)}
        if readme is not None:
            self._put(self.key(version, README_NAME), readme.encode(), "text/markdown")
            entries[README_NAME] = {"sha256": sha256_bytes(readme.encode()), "size": len(readme.encode())}
        manifest = {"model": self.model, "version": version, "files": entries, "created_at": time.time()}
        self._put(self.key(version, MANIFEST_NAME), json.dumps(manifest, indent=2).encode(), "application/json")
        log.info("registry: uploaded %d files to %s", len(entries), self.url(version))
        return manifest

    def _check_same_version(self, version: str, published: dict[str, Any], entries: dict[str, Any],
                            card: dict[str, Any]) -> None:
        """Refuse to publish ``version`` again with other files or another record (metrics, lineage)."""
        old_files = {k: v for k, v in published["files"].items() if k not in (CARD_NAME, README_NAME)}
        differ = sorted(n for n in set(old_files) | set(entries) if old_files.get(n) != entries.get(n))
        old_card = self.card(version) or {}
        new_card = json.loads(json.dumps(card, default=str))
        differ += [f"{CARD_NAME}:{k}" for k in _RECORD_KEYS if old_card.get(k) != new_card.get(k)]
        if differ:
            raise RegistryError(
                f"{self.url(version)} is already published with different content ({', '.join(differ[:6])}): "
                "a published version is immutable and its record is never rewritten. If outputs were edited "
                "by hand, restore them with `dvc checkout`; otherwise re-run the pipeline and promote the "
                "new commit, which becomes a new version")

    def manifest(self, version: str) -> dict[str, Any] | None:
        check_version(version)
        data = self._get_json(self.key(version, MANIFEST_NAME))
        return None if data is None else parse_manifest(data, version, self.url(version, MANIFEST_NAME))

    def verify_version(self, version: str) -> dict[str, Any]:
        """Check that every file of the manifest is there with its size; return the manifest."""
        manifest = self.manifest(version)
        if manifest is None:
            raise RegistryError(f"{self.url(version)} has no {MANIFEST_NAME}: the version was never fully published")
        with s3_errors(self.where, self.bucket, "verify"):
            for name, entry in manifest["files"].items():
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(version, name))
                if head["ContentLength"] != entry["size"]:
                    raise RegistryError(f"{self.url(version, name)} has {head['ContentLength']} bytes, "
                                        f"the manifest says {entry['size']}")
        return manifest

    def card(self, version: str) -> dict[str, Any] | None:
        check_version(version)
        return self._get_json(self.key(version, CARD_NAME))

    def download(self, version: str, dest: Path, prefix: str = "") -> list[Path]:
        """Download the version's files under ``prefix`` into ``dest``, checking each sha256.

        Every name is checked before anything is written; the files go to a hidden sibling of
        ``dest`` first and replace ``dest`` only when all arrived whole, so a failure leaves ``dest``
        as it was.
        """
        manifest = self.verify_version(version)
        dest = Path(dest)
        source = self.url(version, MANIFEST_NAME)
        wanted = {name: entry for name, entry in manifest["files"].items() if name.startswith(prefix)}
        for name in wanted:  # all of them first: a bad entry rejects the manifest before any write
            path_inside(dest, name[len(prefix):], source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
        try:
            for name, entry in wanted.items():
                target = path_inside(staging, name[len(prefix):], source)
                target.parent.mkdir(parents=True, exist_ok=True)
                with s3_errors(self.where, self.bucket, "download from"):
                    self.client.download_file(self.bucket, self.key(version, name), str(target))
                if sha256_file(target) != entry["sha256"]:
                    raise RegistryError(f"{self.url(version, name)}: sha256 differs from the manifest")
            replace_dir(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return [dest / name[len(prefix):] for name in wanted]

    # -- the pointer

    def pointer(self) -> Pointer | None:
        data = self._get_json(self.pointer_key)
        return Pointer.from_json(data, f"s3://{self.bucket}/{self.pointer_key}") if data else None

    def production_version(self) -> str | None:
        p = self.pointer()
        return p.version if p else None

    def move_pointer(self, version: str, git_commit: str | None = None) -> Pointer:
        """Point ``prod`` at ``version`` (which must be fully published); the old one joins the history."""
        self.verify_version(version)
        old = self.pointer()
        history = list(old.history) if old else []
        if old and old.version != version:
            history.append(old.version)
        new = Pointer(version=version, history=history, updated_at=time.time(), git_commit=git_commit)
        self._put(self.pointer_key, new.to_json().encode(), "application/json")
        log.info("registry: %s now points at %s", self.pointer_key, version)
        return new

    def restore_pointer(self, pointer: Pointer | None) -> None:
        """Put back a pointer read earlier (undo of ``move_pointer``); None removes it."""
        if pointer is None:
            with s3_errors(self.where, self.bucket, "write"):
                self.client.delete_object(Bucket=self.bucket, Key=self.pointer_key)
        else:
            self._put(self.pointer_key, pointer.to_json().encode(), "application/json")

    def rollback_pointer(self) -> Pointer:
        """Point ``prod`` at the version before the current one."""
        old = self.pointer()
        if old is None:
            raise RegistryError(f"s3://{self.bucket}/{self.pointer_key} does not exist: nothing is in production")
        if not old.history:
            raise RegistryError(f"{self.model}: production {old.version} has no previous version to roll back to")
        previous = old.history[-1]
        self.verify_version(previous)
        new = Pointer(version=previous, history=old.history[:-1], updated_at=time.time(),
                      git_commit=(self.card(previous) or {}).get("lineage", {}).get("git_commit"))
        self._put(self.pointer_key, new.to_json().encode(), "application/json")
        log.info("registry: rolled %s back from %s to %s", self.pointer_key, old.version, previous)
        return new


def model_card_markdown(model: str, version: str, card: dict[str, Any]) -> str:
    """A short human-readable card published beside ``registry.json``."""
    lines = [f"# {model} {version}", "", card.get("description", ""), "", "## Metrics", "",
             "| metric | value |", "|---|---|"]
    for k, v in sorted(card.get("metrics", {}).items()):
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lineage = card.get("lineage", {})
    lines += ["", "## Lineage", "", f"- git commit: `{lineage.get('git_commit', '?')}`"]
    for stage, outs in lineage.get("outs", {}).items():
        for path, md5 in outs.items():
            lines.append(f"- {stage}: `{path}` md5 `{md5}`")
    return "\n".join(lines) + "\n"
