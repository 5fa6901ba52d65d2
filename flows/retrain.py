"""Scheduled retraining: pull the latest data version, retrain from the production checkpoint,
evaluate, and ask for promotion.

1. ``git pull --ff-only`` when the workspace has an ``origin`` (the latest ``dvc.lock`` and params),
   then ``dvc pull`` (the data and checkpoints that lock names; missing ones are rebuilt by repro).
2. Download production's PyTorch checkpoint from S3 to ``checkpoints/production/<version>/``
   (sha256-checked) and start the online stage from it — through ``online.init_from`` when the
   config has that field; the path names the version, so DVC reruns online when production changes.
3. Run the pipeline flow (cached stages skip), whose ``evaluate`` stage (when ``dvc.yaml`` has one)
   writes ``metrics/evaluate.json``.
4. Optionally ``dvc push`` the outputs, then run the promotion flow.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import SimBackend, pipeline
from flows.promote import promote
from stages.config import OnlineParams, PresetName
from tasks.dvc_tasks import dvc_pull, dvc_push
from tasks.registry_tasks import DEFAULT_MODEL, PromotionThresholds, download_production

PRODUCTION_CHECKPOINTS = Path("checkpoints") / "production"
# The config field the online stage would start from (proposed; see docs/orchestration.md).
INIT_FIELD = "init_from"


def _git_pull(root: Path) -> str | None:
    remotes = subprocess.run(["git", "remote"], cwd=root, capture_output=True, text=True).stdout.split()
    if "origin" not in remotes:
        return None
    proc = subprocess.run(["git", "pull", "--ff-only", "-q"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git pull --ff-only failed in {root}: {proc.stderr.strip()}; "
                           "resolve the divergence by hand before retraining")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


@flow(name="drivevla-retrain", log_prints=True)
def retrain(workdir: str = ".", preset: PresetName | None = None, overrides: list[str] | None = None,
            sim_backend: SimBackend | None = None, model: str = DEFAULT_MODEL, bucket: str | None = None,
            endpoint_url: str | None = None, dvc_remote: str | None = None, pull: bool = True,
            warm_start: bool = True, push: bool = False, thresholds: PromotionThresholds | None = None,
            stage_timeouts: dict[str, float] | None = None) -> dict[str, Any]:
    """Retrain on the latest data from the production checkpoint, evaluate and ask for promotion.

    dvc_remote: the DVC remote to pull from / push to (default: the default remote). pull: fetch the
    latest git + DVC state first. warm_start: start online RL from production. push: ``dvc push``
    the new outputs before promotion, so the registered ``dvc.lock`` can be pulled anywhere.
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    out: dict[str, Any] = {"git_pulled": None, "warm_start": None}
    if pull:
        out["git_pulled"] = _git_pull(root)
        dvc_pull(str(root), remote=dvc_remote, allow_missing=True)
    if warm_start:
        prod = download_production(str(root / PRODUCTION_CHECKPOINTS), bucket, model, endpoint_url)
        if prod is None:
            logger.info("no production model yet: training from the offline checkpoint")
        elif INIT_FIELD in OnlineParams.model_fields:
            rel = Path(prod["path"]).relative_to(root).as_posix()
            overrides.append(f"online.{INIT_FIELD}={rel}")
            out["warm_start"] = prod["version"]
            logger.info("online stage starts from production %s (%s)", prod["version"], rel)
        else:
            logger.warning("production %s downloaded to %s, but this config has no online.%s field: "
                           "the online stage starts from the offline checkpoint", prod["version"], prod["path"],
                           INIT_FIELD)
            out["warm_start_downloaded"] = prod["version"]
    out["pipeline"] = pipeline(preset=preset, overrides=overrides, workdir=str(root), sim_backend=sim_backend,
                               stage_timeouts=stage_timeouts)
    if push:
        dvc_push(str(root), remote=dvc_remote)
    out["promotion"] = promote(workdir=str(root), model=model, bucket=bucket, thresholds=thresholds,
                               endpoint_url=endpoint_url)
    return out
