"""Prefect tasks around the model registry (``infra/registry.py``): check the candidate's outputs
against ``dvc.lock``, read the candidate and production, register a version (GTO), upload it to S3,
move the ``prod`` pointer, assign the GTO stage, roll back.

Flows reach the registry through this module only (flows → tasks → infra): the names they need —
the thresholds, the decision, the errors — are re-exported here.

Retries are set on the S3 steps only: they are idempotent (per-version keys, one pointer object) and
fail for transient reasons. Git/GTO steps are local and deterministic, so a retry would only repeat
the same failure.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from infra.packages import MissingPackage
from infra.dvc_files import lock_outs
from infra.registry import (DEFAULT_MODEL, Decision, ModelStore, Pointer, PromotionThresholds, RegistryError,
                            assign_stage, collect_files, commit_lineage, judge, model_card_markdown,
                            register_version, stage_outputs_in_git, stage_version)
from infra.s3 import S3Error, S3Settings, S3Unreachable, bucket_from_env, check_bucket, make_client
from tasks.dvc_tasks import dvc_lock, lineage

__all__ = ["DEFAULT_MODEL", "PromotionThresholds", "Decision", "judge", "RegistryError", "S3Error",
           "MissingPackage", "ModifiedOutputs", "modified_outputs", "verify_outputs", "s3_preflight",
           "read_candidate", "read_production", "register_candidate", "upload_version", "move_prod_pointer",
           "restore_prod_pointer", "read_pointer", "assign_prod", "rollback_prod_pointer",
           "download_production", "build_card", "gto_prod_version"]

EVALUATE_METRICS = Path("metrics") / "evaluate.json"
EXPORT_METRICS = Path("metrics") / "export.json"


def open_store(bucket: str | None = None, model: str = DEFAULT_MODEL,
               endpoint_url: str | None = None) -> ModelStore:
    """A :class:`ModelStore` from the environment (endpoint, credentials) and ``bucket``."""
    settings = S3Settings.from_env(endpoint_url=endpoint_url)
    return ModelStore(make_client(settings), bucket_from_env(bucket), model)


def _unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a network failure; refused credentials or a missing bucket will not fix themselves."""
    try:
        state.result()
    except S3Unreachable:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(name="s3-preflight", retries=2, retry_delay_seconds=2, retry_condition_fn=_unreachable)
def s3_preflight(bucket: str | None = None, model: str = DEFAULT_MODEL, endpoint_url: str | None = None) -> str:
    """Fail early, before anything is registered, when S3 cannot be reached or refuses the credentials."""
    store = open_store(bucket, model, endpoint_url)
    check_bucket(store.client, store.bucket, store.where)
    return store.bucket


# ------------------------------------------------------------------ the candidate matches dvc.lock


class ModifiedOutputs(RegistryError):
    """A stage output differs from what ``dvc.lock`` recorded (edited by hand, or deleted)."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_in_dir_out(root: Path, out: str) -> list[str]:
    """The files of a directory output that differ from DVC's listing of it (the ``.dir`` object in the
    cache), to name them; the directory itself when the listing is not in the cache."""
    md5 = lock_outs(root).get(out.rstrip("/"), "")
    listing = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not md5.endswith(".dir") or not listing.is_file():
        return [out]
    recorded = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
    present = {p.relative_to(root / out).as_posix() for p in (root / out).rglob("*") if p.is_file()}
    changed = sorted(n for n in recorded.keys() | present
                     if n not in present or n not in recorded or _md5(root / out / n) != recorded[n])
    return [f"{out}/{n}" for n in changed] or [out]


def modified_outputs(workdir: str | Path) -> dict[str, str]:
    """``{path: "modified" | "deleted"}`` for every stage output whose hash differs from ``dvc.lock``,
    as DVC computes it (``dvc status``). Outputs only: a stale dependency is the pipeline's business."""
    from dvc.repo import Repo

    root = Path(workdir).resolve()
    if not (root / "dvc.lock").exists():
        raise RegistryError(f"{root}/dvc.lock not found: run the pipeline before promoting")
    with dvc_lock(root):
        with Repo(str(root)) as repo:
            status = repo.status()
    changed: dict[str, str] = {}
    for changes in status.values():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for out, state in (change.get("changed outs") or {}).items():
                if state in ("modified", "deleted"):
                    names = _files_in_dir_out(root, out) if (root / out).is_dir() else [out]
                    changed.update({name: state for name in names})
    return changed


@task(name="verify-outputs")
def verify_outputs(workdir: str) -> None:
    """Refuse to promote outputs (metrics, exports, checkpoints) that do not match ``dvc.lock``: what
    would be published would not be what the pipeline made."""
    changed = modified_outputs(workdir)
    if changed:
        in_git = stage_outputs_in_git(Path(workdir))
        listed = ", ".join(f"{path} ({state})" for path, state in sorted(changed.items())[:8])
        restore = [f"`git checkout -- {p}`" for p in sorted(changed) if p in in_git]
        restore += ["`dvc checkout`"] if any(p not in in_git for p in changed) else []
        raise ModifiedOutputs(f"{listed} in {workdir} differ from what dvc.lock recorded: promotion publishes only "
                              f"what the pipeline made. Restore them ({' and '.join(restore)}), or re-run the "
                              "pipeline (`dvc repro`) so dvc.lock records them, then promote again")


# ------------------------------------------------------------------ reading, registering, publishing


@task(name="read-candidate")
def read_candidate(workdir: str) -> dict[str, Any]:
    """The candidate's evaluation metrics merged with its export parity metrics."""
    root = Path(workdir)
    metrics: dict[str, Any] = {}
    for rel in (EVALUATE_METRICS, EXPORT_METRICS):
        path = root / rel
        if path.exists():
            metrics.update(json.loads(path.read_text()))
    return metrics


@task(name="read-production", retries=2, retry_delay_seconds=2)
def read_production(bucket: str | None, model: str = DEFAULT_MODEL,
                    endpoint_url: str | None = None) -> dict[str, Any] | None:
    """``{"version", "metrics", "card"}`` of the version the ``prod`` pointer names, or None."""
    store = open_store(bucket, model, endpoint_url)
    pointer = store.pointer()
    if pointer is None:
        return None
    card = store.card(pointer.version) or {}
    return {"version": pointer.version, "metrics": card.get("metrics", {}), "card": card,
            "history": pointer.history}


@task(name="register-version")
def register_candidate(workdir: str, model: str = DEFAULT_MODEL, message: str | None = None) -> dict[str, str]:
    """Commit the lineage (``dvc.lock``, params, metrics) and register that commit as a version."""
    commit = commit_lineage(Path(workdir), message or f"{model}: candidate for promotion")
    version = register_version(Path(workdir), model, ref=commit)
    get_run_logger().info("registered %s@%s at %s", model, version, commit[:8])
    return {"version": version, "commit": commit}


@task(name="upload-version", retries=2, retry_delay_seconds=[2, 10])
def upload_version(workdir: str, version: str, card: dict[str, Any], bucket: str | None,
                   model: str = DEFAULT_MODEL, endpoint_url: str | None = None,
                   exports_dir: str = "exports") -> dict[str, Any]:
    """Upload the exported files and the model card under ``<model>/<version>/`` (manifest last)."""
    store = open_store(bucket, model, endpoint_url)
    files = collect_files(Path(workdir) / exports_dir)
    return store.upload_version(version, files, card, readme=model_card_markdown(model, version, card))


@task(name="move-prod-pointer", retries=2, retry_delay_seconds=2)
def move_prod_pointer(version: str, bucket: str | None, model: str = DEFAULT_MODEL,
                      endpoint_url: str | None = None, git_commit: str | None = None) -> dict[str, Any]:
    """The last S3 write of a promotion: readers switch to ``version`` at once."""
    store = open_store(bucket, model, endpoint_url)
    return store.move_pointer(version, git_commit=git_commit).__dict__


@task(name="restore-prod-pointer", retries=2, retry_delay_seconds=2)
def restore_prod_pointer(pointer: dict[str, Any] | None, bucket: str | None, model: str = DEFAULT_MODEL,
                         endpoint_url: str | None = None) -> None:
    store = open_store(bucket, model, endpoint_url)
    store.restore_pointer(Pointer(**pointer) if pointer else None)


@task(name="read-pointer", retries=2, retry_delay_seconds=2)
def read_pointer(bucket: str | None, model: str = DEFAULT_MODEL, endpoint_url: str | None = None) -> dict[str, Any] | None:
    pointer = open_store(bucket, model, endpoint_url).pointer()
    return pointer.__dict__ if pointer else None


@task(name="assign-prod-stage")
def assign_prod(workdir: str, version: str, model: str = DEFAULT_MODEL, message: str | None = None) -> None:
    assign_stage(Path(workdir), model, version, message=message)


@task(name="rollback-prod-pointer", retries=2, retry_delay_seconds=2)
def rollback_prod_pointer(bucket: str | None, model: str = DEFAULT_MODEL,
                          endpoint_url: str | None = None) -> dict[str, Any]:
    store = open_store(bucket, model, endpoint_url)
    before = store.pointer()
    after = store.rollback_pointer()
    return {"from": before.version if before else None, "to": after.version, "pointer": after.__dict__}


@task(name="download-production", retries=2, retry_delay_seconds=[2, 10])
def download_production(dest: str, bucket: str | None, model: str = DEFAULT_MODEL,
                        endpoint_url: str | None = None, prefix: str = "pytorch/") -> dict[str, Any] | None:
    """Download the production version's files under ``prefix`` to ``dest/<version>/`` (sha256-checked);
    None when nothing is in production yet."""
    store = open_store(bucket, model, endpoint_url)
    pointer = store.pointer()
    if pointer is None:
        return None
    target = Path(dest) / pointer.version
    files = store.download(pointer.version, target, prefix=prefix)
    return {"version": pointer.version, "path": str(target), "files": [str(f) for f in files]}


def build_card(workdir: str, model: str, candidate: dict[str, Any], decision: dict[str, Any],
               production: dict[str, Any] | None) -> dict[str, Any]:
    """The model card published with a version: metrics, the decision and the lineage."""
    lin = lineage(workdir)
    return {
        "model": model,
        "description": "DrivingVLA deterministic policy: image + state + command -> controls, trajectory",
        "metrics": candidate,
        "promotion": decision,
        "replaces": production["version"] if production else None,
        "lineage": {"git_commit": lin["git"]["commit"], "dvc_lock_sha256": lin["dvc_lock_sha256"],
                    "outs": lin["outs"], "params": lin["params"]},
    }


def gto_prod_version(workdir: str, model: str = DEFAULT_MODEL) -> str | None:
    try:
        return stage_version(Path(workdir), model)
    except RegistryError:
        return None
