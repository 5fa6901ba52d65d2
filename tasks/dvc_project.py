"""The pipeline as the flow plans it: what ``dvc.yaml`` declares (read by `infra.dvc_files`, the one
reader of that file and of ``dvc.lock``, re-exported here for the flows) and the check that every
input of the selected stages exists or is made by an earlier one, before DVC runs anything.
"""
from __future__ import annotations

from pathlib import Path

from infra.dvc_files import (DVC_LOCK, DVC_YAML, DvcFileError, StageSpec, load_dvc_lock, load_dvc_yaml, stage_names,
                             stage_spec, stage_specs, tracked_params)
from stages.common import StageInputError

__all__ = ["DVC_LOCK", "DVC_YAML", "DvcFileError", "MissingStageInput", "StageSpec", "check_deps", "load_dvc_lock",
           "load_dvc_yaml", "producer", "stage_names", "stage_spec", "stage_specs", "tracked_params"]


class MissingStageInput(StageInputError):
    """A stage's dep does not exist and no stage of this run will make it."""


def _covers(out: str, dep: str) -> bool:
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def producer(root: str | Path, path: str) -> str | None:
    """The stage whose outputs hold ``path``, if any."""
    for spec in stage_specs(root).values():
        if any(_covers(out, path) for out in spec.all_outs):
            return spec.name
    return None


def check_deps(root: str | Path, selected: list[str]) -> None:
    """Fail before any work when a selected stage depends on a path that does not exist and that no
    earlier selected stage will make — else DVC would run the stage anyway, first deleting its
    outputs, and only then fail on the missing input."""
    root = Path(root)
    specs = stage_specs(root)
    made: list[str] = []
    problems: list[str] = []
    for name in [s for s in specs if s in selected]:
        for dep in specs[name].deps:
            if (root / dep).exists() or any(_covers(out, dep) for out in made):
                continue
            maker = producer(root, dep)
            if maker:
                fix = (f"make it with `drivevla pipeline --stage {maker}` (or run the whole pipeline), "
                       f"or fetch it with `dvc pull {dep}`")
            else:
                fix = "restore it (`git checkout -- " + dep + "`)"
            problems.append(f"stage {name} needs `{dep}`, which does not exist: {fix}")
        made += specs[name].all_outs
    if problems:
        raise MissingStageInput("; ".join(problems) + ". Nothing was run or deleted.")
