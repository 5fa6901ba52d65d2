"""The training pipeline as a Prefect flow: data → pretrain → offline → online → export.

Parameters given to the flow (a preset, ``a.b=c`` overrides) are written into ``params.yaml`` before
anything runs — like ``dvc exp run --set-param`` — so DVC records exactly what produced each output.
The whole config is validated first; a bad value fails the flow before any stage starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from stages import STAGE_ORDER
from stages.config import ConfigError, build_config, deep_merge, parse_override
from tasks.stage_tasks import run_stage


def apply_params(params_file: Path, preset: str | None, overrides: list[str]) -> None:
    """Validate, then write the preset and overrides into ``params_file``."""
    raw = yaml.safe_load(params_file.read_text()) if params_file.exists() else {}
    raw = raw or {}
    if preset:
        raw["preset"] = preset
    for text in overrides:
        raw = deep_merge(raw, parse_override(text))
    build_config(dict(raw))  # raises ConfigError before anything is written
    if preset or overrides:
        params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


@flow(name="drivevla-pipeline", log_prints=True)
def pipeline(preset: str | None = None, overrides: list[str] | None = None,
             stages: list[str] | None = None, workdir: str = ".", use_dvc: bool | None = None) -> dict[str, Any]:
    """Run the stages in order and return each stage's metrics."""
    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    selected = list(stages or STAGE_ORDER)
    unknown = sorted(set(selected) - set(STAGE_ORDER))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {list(STAGE_ORDER)}")
    if use_dvc is None:
        use_dvc = (root / ".dvc").is_dir() and (root / "dvc.yaml").exists()
    if use_dvc:
        apply_params(root / "params.yaml", preset, overrides)
    elif preset:
        overrides = [f"preset={preset}", *overrides]
    results: dict[str, Any] = {}
    for name in STAGE_ORDER:
        if name in selected:
            results[name] = run_stage(name, workdir=str(root), use_dvc=use_dvc, overrides=overrides)
            logger.info("stage %s done: %s", name, results[name])
    return results
