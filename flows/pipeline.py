"""The training pipeline as a Prefect flow: data → pretrain → offline → online → export (and any other
stage ``dvc.yaml`` declares, in its order, e.g. ``evaluate``).

Parameters given to the flow (a preset, a simulator backend, ``a.b=c`` overrides) are written into
``params.yaml`` before anything runs — like ``dvc exp run --set-param`` — so DVC records exactly what
produced each output. The whole config is validated first; a bad value fails the flow before any stage
starts, and so does a dep that is missing with no selected stage to make it. The run owns the
workspace from writing ``params.yaml`` to its last stage (one lock; a second run waits), and a run
that fails puts ``params.yaml`` back as it was.

Each stage is a cached Prefect task keyed on DVC's view of the stage (see ``tasks/stage_tasks.py``):
a re-run with nothing changed skips every stage in seconds, and a change reruns exactly the stages
DVC sees as affected. Every run leaves Prefect artifacts per stage (a report with links to the DVC
outputs, a metrics table, its PNG plots as images) and a lineage summary (git commit, ``dvc.lock`` hashes, params), and writes the same
summary to ``runs/pipeline/summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from stages import STAGE_ORDER
from stages.common import write_json
from stages.config import ConfigError, PresetName, build_config, deep_merge, parse_override, read_params
from tasks.dvc_project import DVC_YAML, check_deps, stage_names, tracked_params
from tasks.dvc_tasks import dvc_push, lineage, workspace_run, write_params
from tasks.stage_tasks import DEFAULT_STAGE_TIMEOUT_S, publish_stage_artifacts, run_stage, stage_view

SUMMARY_FILE = Path("runs") / "pipeline" / "summary.json"
SimBackend = Literal["highway", "carla"]


def apply_params(params_file: Path, preset: str | None, overrides: list[str],
                 required: Iterable[str] = ()) -> None:
    """Validate, then write the preset, the overrides and any ``required`` top-level key that is
    missing (a section as ``{}``, a value as its default) into ``params_file``.

    ``required`` are the params ``dvc.yaml`` tracks: DVC refuses a params key absent from the file.
    """
    raw = read_params(params_file)  # ConfigError naming the file when it is not a YAML mapping
    before = json.dumps(raw, sort_keys=True)
    if preset:
        raw["preset"] = preset
    for text in overrides:
        override = parse_override(text)
        for key, value in override.items():
            if isinstance(value, dict) and key in raw and not isinstance(raw[key], dict):
                raise ConfigError(f"{params_file}: `{key}` is a {type(raw[key]).__name__}, not a section, so "
                                  f"--set {text} cannot go into it; fix the file")
        raw = deep_merge(raw, override)
    cfg = build_config(dict(raw))  # raises ConfigError before anything is written
    defaults = cfg.model_dump(mode="json")
    for key in required:
        if key not in raw and key in defaults:
            raw[key] = {} if isinstance(getattr(cfg, key), BaseModel) else defaults[key]
    if json.dumps(raw, sort_keys=True) != before:
        write_params(params_file, yaml.safe_dump(raw, sort_keys=False))


def _reap_carla(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` / ``on_crashed``: remove CARLA containers this run started (if any)."""
    try:
        from tasks.carla_resource import reap_flow_run_servers
    except ImportError:
        return
    reap_flow_run_servers(flow, flow_run, state)


@flow(name="drivevla-pipeline", log_prints=True, on_cancellation=[_reap_carla], on_crashed=[_reap_carla])
def pipeline(preset: PresetName | None = None, overrides: list[str] | None = None,
             stages: list[str] | None = None, workdir: str = ".", use_dvc: bool | None = None,
             sim_backend: SimBackend | None = None, stage_timeouts: dict[str, float] | None = None,
             push_remote: str | None = None) -> dict[str, Any]:
    """Run the stages in order and return each stage's metrics.

    preset: smoke | demo | carla (default: params.yaml's). overrides: ``key.path=value`` strings.
    stages: run only these. sim_backend: highway | carla (sets ``env.backend``). stage_timeouts:
    seconds per stage name (default 12 h). push_remote: ``dvc push -r`` this remote after the run.
    """
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    if sim_backend:
        overrides.append(f"env.backend={sim_backend}")
    if use_dvc is None:
        use_dvc = (root / ".dvc").is_dir() and (root / DVC_YAML).exists()
    order = stage_names(root) if use_dvc else list(STAGE_ORDER)
    selected = list(stages or order)
    unknown = sorted(set(selected) - set(order))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {order}")
    if not use_dvc:
        if preset:
            overrides = [f"preset={preset}", *overrides]
        return _run_stages(root, order, selected, overrides, use_dvc, stage_timeouts, push_remote)
    # One run owns the workspace from writing params.yaml to its last stage; a failed run puts
    # params.yaml back as it was.
    with workspace_run(root):
        check_deps(root, selected)  # a missing input fails here, before DVC deletes any output
        apply_params(root / "params.yaml", preset, overrides, required=tracked_params(root))
        return _run_stages(root, order, selected, overrides, use_dvc, stage_timeouts, push_remote)


def _run_stages(root: Path, order: list[str], selected: list[str], overrides: list[str], use_dvc: bool,
                stage_timeouts: dict[str, float] | None, push_remote: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    timeouts = {name: DEFAULT_STAGE_TIMEOUT_S for name in order} | dict(stage_timeouts or {})
    results: dict[str, Any] = {}
    report: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in order:
        if name not in selected:
            continue
        t0 = time.perf_counter()
        view = stage_view(str(root), name) if use_dvc else None
        up_to_date = bool(view and view["up_to_date"])
        task = run_stage.with_options(refresh_cache=not up_to_date) if use_dvc else run_stage
        if name == "online" and _uses_carla(root, overrides) and not up_to_date:
            from tasks.carla_resource import run_stage_in_carla

            state = run_stage_in_carla(name, workdir=str(root), use_dvc=use_dvc, overrides=overrides,
                                       return_state=True)
        else:
            state = task(name, workdir=str(root), use_dvc=use_dvc, overrides=overrides,
                         timeout_s=timeouts[name], view_key=view["key"] if view else None, return_state=True)
        metrics = state.result()  # raises the stage's error when it failed
        cached = state.name == "Cached"
        results[name] = metrics
        report[name] = {"status": "skipped" if cached else "ran", "seconds": round(time.perf_counter() - t0, 2)}
        logger.info("stage %s %s in %.1f s: %s", name, report[name]["status"], report[name]["seconds"], metrics)
        publish_stage_artifacts(str(root), name, metrics, cached)

    if push_remote and use_dvc:
        dvc_push(str(root), remote=push_remote)
    summary = {"stages": report, "seconds": round(time.perf_counter() - t_start, 2),
               "lineage": lineage(root) if use_dvc else {}}
    write_json(root / SUMMARY_FILE, summary)
    create_markdown_artifact(key="lineage", markdown=lineage_markdown(summary),
                             description="drivevla pipeline lineage: git commit, dvc.lock hashes, params")
    return results


def _uses_carla(root: Path, overrides: list[str]) -> bool:
    try:
        from stages.config import load_config

        return load_config(root / "params.yaml", overrides=overrides).env.backend == "carla"
    except ConfigError:
        return False


def lineage_markdown(summary: dict[str, Any]) -> str:
    lin = summary.get("lineage", {})
    git = lin.get("git", {})
    lines = ["## drivevla pipeline run", "", f"- git commit: `{git.get('commit')}`"
             + (f" (uncommitted: {', '.join(git['dirty_files'])})" if git.get("dirty_files") else ""),
             f"- dvc.lock sha256: `{lin.get('dvc_lock_sha256')}`", f"- total: {summary.get('seconds')} s", "",
             "| stage | status | seconds | outputs (md5 in dvc.lock) |", "|---|---|---|---|"]
    for name, info in summary.get("stages", {}).items():
        outs = ", ".join(f"`{p}` `{h[:12]}`" for p, h in lin.get("outs", {}).get(name, {}).items())
        lines.append(f"| {name} | {info['status']} | {info['seconds']} | {outs} |")
    lines += ["", "### params.yaml", "", "```yaml", yaml.safe_dump(lin.get("params", {}), sort_keys=False).rstrip(),
              "```"]
    return "\n".join(lines) + "\n"
