"""The git side of the model registry: GTO versions (``name@vX.Y.Z`` tags) and stages
(``name#prod#N`` tags) on the workspace's git repository, and the lineage commit a version names.

The rest of the registry has its own modules, re-exported here for callers that want one import:
``infra/promotion.py`` (thresholds and the decision), ``infra/model_store.py`` (the published copies on
S3 and the ``prod`` pointer), ``infra/manifest.py`` (checks on names read from the bucket).
"""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any


from infra.dvc_files import stage_specs
from infra.manifest import RegistryError, UnsafeName, check_version
from infra.model_store import (CARD_NAME, DEFAULT_MODEL, MANIFEST_NAME, POINTER_NAME, README_NAME, ModelStore,
                               Pointer, collect_files, model_card_markdown)
from infra.packages import require_package
from infra.promotion import Check, Decision, PromotionThresholds, judge
from infra.s3 import S3Error

log = logging.getLogger(__name__)

PROD_STAGE = "prod"


def _gto() -> ModuleType:
    return require_package("gto.api", "registry", "registering model versions and stages (GTO tags)")


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
    """Stage outputs DVC leaves to git (those marked ``cache: false``): they belong with dvc.lock."""
    paths: set[str] = set()
    for spec in stage_specs(repo).values():
        for kind in ("outs", "metrics", "plots"):
            for item in spec.raw.get(kind) or []:
                if isinstance(item, dict):
                    paths.update(p for p, opts in item.items() if (opts or {}).get("cache") is False)
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
    gto_api = _gto()
    commit = _git(repo, "rev-parse", f"{ref}^{{commit}}")
    for version, sha in sorted(registered_versions(repo, name).items(), key=lambda kv: _version_key(kv[0])):
        if sha == commit:
            log.info("registry: %s@%s already registered at %s", name, version, commit[:8])
            return version
    existing = registered_versions(repo, name)
    kwargs: dict[str, Any] = {"bump_minor": True} if existing else {"version": "v0.1.0"}
    tag = gto_api.register(repo=str(repo), name=name, ref=commit, message=message or f"register {name}", **kwargs)
    return tag.version if hasattr(tag, "version") else str(tag).split("@", 1)[-1]


def assign_stage(repo: Path, name: str, version: str, stage: str = PROD_STAGE, message: str | None = None) -> None:
    """Assign ``stage`` to ``name@version`` (GTO tag ``name#stage#N``)."""
    _gto().assign(repo=str(repo), name=name, stage=stage, version=version,
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


__all__ = ["PromotionThresholds", "Decision", "Check", "judge", "RegistryError", "UnsafeName", "ModelStore",
           "Pointer", "register_version", "registered_versions", "assign_stage", "stage_version",
           "commit_lineage", "collect_files", "git_commit", "model_card_markdown", "check_version", "S3Error",
           "DEFAULT_MODEL", "PROD_STAGE", "POINTER_NAME", "MANIFEST_NAME", "CARD_NAME", "README_NAME"]
