"""The model registry: promotion thresholds, GTO versions and stages on the git repository, and the
published copies of each version on S3 with a ``prod`` pointer.

Layout on S3 (``ModelStore``)::

    s3://<bucket>/<model>/<version>/<every file of exports/>, registry.json, registry.md
    s3://<bucket>/<model>/<version>/manifest.json   written after every file of the version (sha256 + size)
    s3://<bucket>/<model>/prod                      {"version": ..., "history": [...]} moved last

A reader follows ``prod`` → ``manifest.json`` → files, so it never sees a half-published version: until
the pointer moves, production is the old version, whatever was uploaded. One ``put_object`` of the
pointer is atomic in S3. Rollback moves the pointer to the version before and records it in GTO.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from infra.files import sha256_file
from infra.s3 import S3Error, s3_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL = "driving-policy"
PROD_STAGE = "prod"
POINTER_NAME = "prod"
MANIFEST_NAME = "manifest.json"
# The promotion record (metrics compared, decision, lineage). Not "model_card.json": the export stage
# writes its own model card into exports/, which is published as it is.
CARD_NAME = "registry.json"
README_NAME = "registry.md"


class RegistryError(RuntimeError):
    """A registry operation cannot go ahead; the message says why and what to do."""


# ---------------------------------------------------------------- thresholds and the decision


class PromotionThresholds(BaseModel):
    """When a candidate may replace production. Proposed as the ``promote:`` section of the config."""

    model_config = ConfigDict(extra="forbid")

    score_metric: str = Field("driving_score", description="the metric that must improve")
    min_driving_score_delta: float = Field(
        0.01, description="candidate score − production score must be at least this (>0: strictly better)")
    # Guard metrics: each may get worse by at most the given amount.
    max_drop: dict[str, float] = Field({"route_completion": 0.05},
                                       description="higher-is-better metric -> largest allowed drop")
    max_rise: dict[str, float] = Field({"collisions_per_km": 0.5},
                                       description="lower-is-better metric -> largest allowed rise")
    parity_metric: str = "onnx_max_abs_error"
    max_parity_error: float = Field(1e-4, gt=0, description="largest ONNX-vs-PyTorch abs error allowed")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    accepted: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.accepted:
            return "accepted: " + "; ".join(c.detail for c in self.checks)
        return "rejected: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _num(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def judge(candidate: dict[str, Any], production: dict[str, Any] | None,
          thresholds: PromotionThresholds | None = None) -> Decision:
    """Compare the candidate's metrics with production's. ``production=None``: nothing to beat yet."""
    t = thresholds or PromotionThresholds()
    checks: list[Check] = []

    parity = _num(candidate, t.parity_metric)
    if parity is None:
        checks.append(Check("parity", False, f"candidate has no {t.parity_metric}: run the export stage"))
    else:
        ok = parity <= t.max_parity_error
        checks.append(Check("parity", ok, f"{t.parity_metric} {parity:.2e} {'<=' if ok else '>'} "
                                         f"max_parity_error {t.max_parity_error:.0e}"))

    score = _num(candidate, t.score_metric)
    if score is None:
        checks.append(Check(t.score_metric, False,
                            f"candidate has no {t.score_metric}: run the evaluate stage (metrics/evaluate.json)"))
    elif production is None:
        checks.append(Check(t.score_metric, True, f"{t.score_metric} {score:.4f}; no production model yet"))
    else:
        prod = _num(production, t.score_metric)
        if prod is None:
            checks.append(Check(t.score_metric, True,
                                f"{t.score_metric} {score:.4f}; production has none recorded"))
        else:
            delta = score - prod
            ok = delta >= t.min_driving_score_delta
            checks.append(Check(t.score_metric, ok,
                                f"{t.score_metric} {score:.4f} vs production {prod:.4f} (delta {delta:+.4f} "
                                f"{'>=' if ok else '<'} min_driving_score_delta {t.min_driving_score_delta})"))

    if production is not None:
        # Guard metrics: how far each may move the wrong way (down for max_drop, up for max_rise).
        for limits, sign, verb in ((t.max_drop, -1.0, "drops"), (t.max_rise, 1.0, "rises")):
            for name, allowed in limits.items():
                c, p = _num(candidate, name), _num(production, name)
                if c is not None and p is not None:
                    ok = sign * (c - p) <= allowed
                    checks.append(Check(name, ok, f"{name} {c:.4f} vs production {p:.4f} "
                                                  f"({'within' if ok else verb + ' more than'} {allowed})"))
    return Decision(all(c.passed for c in checks), checks)


# ---------------------------------------------------------------- git + GTO


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.rstrip()


def git_commit(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD")


# What a promotion commits: the record of how the candidate was made. Anything else that is
# modified must be committed by the user first, so the tag names the code that produced the model.
LINEAGE_FILES = ("dvc.lock", "dvc.yaml", "params.yaml")


def stage_outputs_in_git(repo: Path) -> set[str]:
    """Stage outputs DVC leaves to git (``cache: false``: metrics, plots): they belong with dvc.lock."""
    path = Path(repo) / "dvc.yaml"
    spec = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    paths: set[str] = set()
    for stage in (spec.get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind) or []:
                if isinstance(item, dict):
                    for path, opts in item.items():
                        if kind != "outs" or (opts or {}).get("cache") is False:
                            paths.add(path)
                elif kind != "outs":
                    paths.add(item)
    return paths


def _is_lineage(path: str, outputs: set[str]) -> bool:
    return (path in LINEAGE_FILES or path.startswith("metrics/") or path.endswith(".gitignore")
            or path in outputs or any(path.startswith(o.rstrip("/") + "/") for o in outputs))


def commit_lineage(repo: Path, message: str) -> str:
    """Commit ``dvc.lock``, ``params.yaml``, ``dvc.yaml``, the stages' git-tracked outputs (metrics,
    plots) and DVC's ``.gitignore`` entries; refuse when other tracked files are modified. Returns
    the commit the version will name."""
    repo = Path(repo)
    if not (repo / "dvc.lock").exists():
        raise RegistryError(f"{repo}/dvc.lock not found: run the pipeline before promoting")
    outputs = stage_outputs_in_git(repo)
    dirty = [line[3:] for line in _git(repo, "status", "--porcelain", "--untracked-files=no").splitlines()
             if not _is_lineage(line[3:], outputs)]
    if dirty:
        raise RegistryError(f"uncommitted changes in {', '.join(dirty[:5])}: commit them first, so the "
                            "registered version names the code that produced the model")
    paths = [p for p in LINEAGE_FILES if (repo / p).exists()]
    untracked = _git(repo, "ls-files", "--others", "--exclude-standard").splitlines()
    paths += [p for p in untracked if _is_lineage(p, outputs)]
    paths += [p for p in _git(repo, "ls-files", "--modified").splitlines() if _is_lineage(p, outputs)]
    _git(repo, "add", "--", *sorted(set(paths)))
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode != 0:
        _git(repo, "commit", "-q", "-m", message)
    return git_commit(repo)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.lstrip("v").split("."))


def registered_versions(repo: Path, name: str) -> dict[str, str]:
    """version -> commit of every registration tag ``name@vX.Y.Z``."""
    out = {}
    for line in _git(repo, "tag", "--list", f"{name}@v*", "--format=%(refname:short) %(*objectname)%(objectname)").splitlines():
        tag, _, sha = line.partition(" ")
        out[tag.split("@", 1)[1]] = sha[:40] if len(sha) == 40 else _git(repo, "rev-list", "-n", "1", tag)
    return out


def register_version(repo: Path, name: str = DEFAULT_MODEL, ref: str = "HEAD", message: str | None = None) -> str:
    """Register ``ref`` as the next minor version of ``name`` (GTO tag ``name@vX.Y.Z``).

    Idempotent: a commit that is already registered keeps its version, so retrying a promotion that
    failed half-way does not mint a second version for the same model.
    """
    import gto.api

    commit = _git(repo, "rev-parse", f"{ref}^{{commit}}")
    for version, sha in sorted(registered_versions(repo, name).items(), key=lambda kv: _version_key(kv[0])):
        if sha == commit:
            log.info("registry: %s@%s already registered at %s", name, version, commit[:8])
            return version
    existing = registered_versions(repo, name)
    kwargs: dict[str, Any] = {"bump_minor": True} if existing else {"version": "v0.1.0"}
    tag = gto.api.register(repo=str(repo), name=name, ref=commit, message=message or f"register {name}", **kwargs)
    return tag.version if hasattr(tag, "version") else str(tag).split("@", 1)[-1]


def assign_stage(repo: Path, name: str, version: str, stage: str = PROD_STAGE, message: str | None = None) -> None:
    """Assign ``stage`` to ``name@version`` (GTO tag ``name#stage#N``)."""
    import gto.api

    gto.api.assign(repo=str(repo), name=name, stage=stage, version=version,
                   message=message or f"assign {stage} to {name}@{version}", force=True)


def stage_version(repo: Path, name: str = DEFAULT_MODEL, stage: str = PROD_STAGE) -> str | None:
    """The version of ``name`` currently in ``stage``: the one its latest assignment tag names.

    GTO numbers the assignment tags of an artifact (``name#stage#N``); the highest N is the latest
    event. GTO's own "latest" compares tag timestamps, which tie within a second (a rollback right
    after a promotion), so the number decides here.
    """
    latest: tuple[int, str] | None = None
    for tag in _git(repo, "tag", "--list", f"{name}#{stage}#*").splitlines():
        try:
            number = int(tag.rsplit("#", 1)[1])
        except ValueError:
            continue
        if latest is None or number > latest[0]:
            latest = (number, tag)
    if latest is None:
        return None
    commit = _git(repo, "rev-list", "-n", "1", latest[1])
    by_commit = {sha: version for version, sha in registered_versions(repo, name).items()}
    return by_commit.get(commit)


# ---------------------------------------------------------------- S3 publishing


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

    def _get_json(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with s3_errors(self.where, self.bucket, "read"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise
        return json.loads(body)

    def _put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        with s3_errors(self.where, self.bucket, "write"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    # -- versions

    def upload_version(self, version: str, files: dict[str, Path], card: dict[str, Any],
                       readme: str | None = None) -> dict[str, Any]:
        """Upload the files, the model card, then the manifest (last: a version without a manifest is
        incomplete). Safe to repeat: keys are per version, so a retry overwrites its own attempt."""
        entries = {}
        for name, path in files.items():
            with s3_errors(self.where, self.bucket, "upload to"):
                self.client.upload_file(str(path), self.bucket, self.key(version, name))
            entries[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        card_body = json.dumps(card, indent=2, sort_keys=True, default=str).encode()
        self._put(self.key(version, CARD_NAME), card_body, "application/json")
        entries[CARD_NAME] = {"sha256": hashlib.sha256(card_body).hexdigest(), "size": len(card_body)}
        if readme is not None:
            self._put(self.key(version, README_NAME), readme.encode(), "text/markdown")
            entries[README_NAME] = {"sha256": hashlib.sha256(readme.encode()).hexdigest(), "size": len(readme.encode())}
        manifest = {"model": self.model, "version": version, "files": entries, "created_at": time.time()}
        self._put(self.key(version, MANIFEST_NAME), json.dumps(manifest, indent=2).encode(), "application/json")
        log.info("registry: uploaded %d files to %s", len(entries), self.url(version))
        return manifest

    def manifest(self, version: str) -> dict[str, Any] | None:
        return self._get_json(self.key(version, MANIFEST_NAME))

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
        return self._get_json(self.key(version, CARD_NAME))

    def download(self, version: str, dest: Path, prefix: str = "") -> list[Path]:
        """Download the version's files under ``prefix`` into ``dest``, checking each sha256."""
        manifest = self.verify_version(version)
        out = []
        for name, entry in manifest["files"].items():
            if not name.startswith(prefix):
                continue
            target = Path(dest) / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with s3_errors(self.where, self.bucket, "download from"):
                self.client.download_file(self.bucket, self.key(version, name), str(target))
            if sha256_file(target) != entry["sha256"]:
                raise RegistryError(f"{self.url(version, name)}: sha256 differs from the manifest")
            out.append(target)
        return out

    # -- the pointer

    def pointer(self) -> Pointer | None:
        data = self._get_json(self.pointer_key)
        return Pointer(**data) if data else None

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
    """A short human-readable card published beside ``model_card.json``."""
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


__all__ = ["PromotionThresholds", "Decision", "Check", "judge", "RegistryError", "ModelStore", "Pointer",
           "register_version", "assign_stage", "stage_version", "commit_lineage", "collect_files",
           "git_commit", "model_card_markdown", "S3Error"]
