"""Prefect tasks that run a pipeline stage: through DVC (``dvc repro --single-item``) when the workspace
is a DVC repository, so outputs are versioned; else by calling the stage's ``run`` directly. Both paths
end in the same ``stages.<name>.run``.

Caching. Prefect's default cache key includes the run id, so nothing would be reused across runs.
Here the key is DVC's view of the stage (:func:`tasks.dvc_tasks.stage_view_key`): its command, the
hashes DVC computes for its deps and the values of its params — for an up-to-date stage, exactly its
``dvc.lock`` entry — plus the workspace path. A stage whose inputs did not change is therefore a
Prefect cache hit and does not even start DVC; a stage DVC sees as changed (an input differs from
``dvc.lock``, an output is missing or modified) refreshes its cache entry by running.

Timeouts. ``timeout_seconds`` cannot interrupt a synchronous task on the thread-pool runner, so the
time limit is given to the ``dvc repro`` subprocess, whose process group is killed when it runs over
(:class:`StageTimeout`).
"""
from __future__ import annotations

import base64
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from stages.config import load_config
from tasks.dvc_project import stage_spec
from tasks.dvc_tasks import (DvcError, DvcTimeout, cache_object_url, dvc, inputs_key, lock_entry, remote_url,
                             stage_check, stage_view_key, subprocess_env)

__all__ = ["StageFailed", "StageTimeout", "DvcStageView", "run_stage", "stage_state", "stage_view", "stage_module",
           "subprocess_env", "stage_report_markdown", "publish_stage_artifacts", "DEFAULT_STAGE_TIMEOUT_S"]

# Generous defaults (the `carla` preset trains for hours); flows pass tighter ones per run.
DEFAULT_STAGE_TIMEOUT_S = 12 * 3600.0


class StageFailed(RuntimeError):
    """A stage's command exited non-zero."""


class StageTimeout(StageFailed):
    """A stage ran past its time limit and was stopped."""


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}.stage" if name == "data" else f"stages.{name}")


@dataclass
class DvcStageView(CachePolicy):
    """Cache key = DVC's view of the stage's inputs (see the module docstring); None without DVC.

    The key does not look at the outputs: call the task with ``refresh_cache=True`` when
    :func:`stage_state` says the stage is not up to date (the pipeline flow does).
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if not inputs.get("use_dvc", True):
            return None
        if inputs.get("view_key"):  # computed by the flow a moment ago (stage_view): no second DVC pass
            return inputs["view_key"]
        return stage_view_key(inputs.get("workdir", "."), inputs["name"])


def stage_view(workdir: str, name: str) -> dict[str, Any]:
    """Whether DVC sees stage ``name`` as up to date — its inputs equal its ``dvc.lock`` entry and its
    outputs are present and unmodified — and its cache key (:class:`DvcStageView`), from one DVC pass."""
    inputs, outs_ok = stage_check(workdir, name)
    locked = lock_entry(workdir, name)
    recorded = {k: locked.get(k) for k in ("cmd", "deps", "params")} if locked else None
    clean = outs_ok and inputs is not None and recorded is not None and \
        json.dumps(inputs, sort_keys=True, default=str) == json.dumps(recorded, sort_keys=True, default=str)
    return {"stage": name, "up_to_date": clean, "key": inputs_key(workdir, name, inputs)}


def stage_state(workdir: str, name: str) -> dict[str, Any]:
    """Whether DVC sees stage ``name`` as up to date (see :func:`stage_view`)."""
    view = stage_view(workdir, name)
    return {"stage": name, "up_to_date": view["up_to_date"]}


def _metrics(cwd: Path, name: str) -> dict[str, Any]:
    cfg = load_config(cwd / "params.yaml")
    metrics_file = cwd / cfg.metrics_dir / f"{name}.json"
    return json.loads(metrics_file.read_text()) if metrics_file.exists() else {}


@task(name="run-stage", task_run_name="stage-{name}", cache_policy=DvcStageView(), persist_result=True)
def run_stage(name: str, workdir: str = ".", use_dvc: bool = True, overrides: list[str] | None = None,
              timeout_s: float | None = DEFAULT_STAGE_TIMEOUT_S, view_key: str | None = None) -> dict[str, Any]:
    """Run one stage and return its metrics. ``view_key``: the stage's cache key if the caller has it."""
    logger = get_run_logger()
    cwd = Path(workdir).resolve()
    if use_dvc:
        logger.info("stage %s: dvc repro (limit %s s)", name, timeout_s)
        try:
            dvc(["repro", "--single-item", name], cwd, timeout_s, logger)
        except DvcTimeout as exc:
            raise StageTimeout(f"stage {name}: {exc}") from None
        except DvcError as exc:
            raise StageFailed(f"stage {name}: {exc}") from None
        return _metrics(cwd, name)
    cfg = load_config(cwd / "params.yaml", overrides=overrides or [])
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return stage_module(name).run(cfg)["metrics"]
    finally:
        os.chdir(previous)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)[:80]}`"
    return str(value)


def stage_report_markdown(workdir: str, name: str, metrics: dict[str, Any], cached: bool) -> str:
    """The Prefect artifact of one stage: a metrics table, its plots' last points and links to its
    DVC-tracked outputs (the path, its md5 in ``dvc.lock`` and where the default remote keeps it)."""
    root = Path(workdir)
    lines = [f"## stage `{name}` — {'skipped (unchanged for DVC)' if cached else 'ran'}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())] or ["| (none) | |"]
    for plot in stage_spec(root, name).plots:
        path = root / plot
        if path.exists() and path.suffix == ".json":
            try:
                rows = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                keys = list(rows[0])[:6]
                lines += ["", f"### plot `{plot}` (last {min(len(rows), 10)} of {len(rows)} points; "
                              "`dvc plots show` draws it)", "",
                          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows[-10:]]
    outs = lock_entry(root, name).get("outs", [])
    base = remote_url(root)
    if outs:
        lines += ["", "### DVC outputs", "", "| path | md5 | remote object |", "|---|---|---|"]
        for o in outs:
            md5 = o.get("md5", "")
            link = cache_object_url(base, md5) if base and md5 else "-"
            lines.append(f"| `{o['path']}` | `{md5}` | {link} |")
    return "\n".join(lines) + "\n"


# A plot larger than this is linked by path only: the artifact travels through the API and its database.
MAX_INLINE_IMAGE_BYTES = 2 * 1024 * 1024
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def plot_images(workdir: str, name: str) -> dict[str, str]:
    """``{plot path: data URI}`` of the image plots (PNG …) stage ``name`` declares and has written."""
    images: dict[str, str] = {}
    for plot in stage_spec(workdir, name).plots:
        path = Path(workdir) / plot
        mime = IMAGE_SUFFIXES.get(path.suffix.lower())
        if mime and path.is_file() and path.stat().st_size <= MAX_INLINE_IMAGE_BYTES:
            images[plot] = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return images


def publish_stage_artifacts(workdir: str, name: str, metrics: dict[str, Any], cached: bool) -> None:
    """What the Prefect UI shows for a stage: the report (markdown), its metrics as a table artifact
    and each image plot it wrote as an image artifact (embedded as a data URI: the UI needs no
    access to the workspace)."""
    create_markdown_artifact(key=artifact_key("stage", name), markdown=stage_report_markdown(workdir, name, metrics, cached),
                             description=f"drivevla stage {name}: metrics and DVC outputs")
    rows = [{"metric": k, "value": _fmt(v).strip("`")} for k, v in sorted(metrics.items())]
    create_table_artifact(key=artifact_key("stage", name, "metrics"), table=rows or [{"metric": "(none)", "value": ""}],
                          description=f"drivevla stage {name}: metrics ({'cached' if cached else 'this run'})")
    for plot, uri in plot_images(workdir, name).items():
        create_image_artifact(image_url=uri, key=artifact_key("stage", name, Path(plot).stem),
                              description=f"drivevla stage {name}: `{plot}`")
