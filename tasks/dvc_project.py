"""The one module that reads ``dvc.yaml``: the stages it declares, in order, and for each its deps,
outputs (``outs``, ``metrics``, ``plots``) and tracked params; and ``dvc.lock``, what DVC recorded.

Everything else (the pipeline flow, the stage tasks, the lineage) asks here instead of parsing the
file, so a change of its layout has one place to follow. DVC itself parses it again when it runs;
this view is only what the flow needs to plan and report.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common import StageInputError
from stages.config import ConfigError

DVC_YAML = "dvc.yaml"
DVC_LOCK = "dvc.lock"
# libyaml when present: a no-change pipeline re-run reads these files dozens of times, and the pure
# Python parser spent more time on them than everything else the re-run does.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PARSED: dict[str, tuple[tuple[int, int], Any]] = {}


class MissingStageInput(StageInputError):
    """A stage's dep does not exist and no stage of this run will make it."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str = ""
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def all_outs(self) -> tuple[str, ...]:
        """Every path the stage writes that DVC tracks (outputs, metrics and plots files)."""
        return self.outs + self.metrics + self.plots


def _paths(items: Any) -> tuple[str, ...]:
    """``["a", {"b": {cache: false}}]`` → ``("a", "b")``."""
    out: list[str] = []
    for item in items or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out += [str(k) for k in item]
    return tuple(out)


def _param_names(items: Any) -> tuple[str, ...]:
    """Tracked params: ``"section"`` or ``{"file.yaml": [keys]}``."""
    out: list[str] = []
    for item in items or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out += [str(k) for v in item.values() for k in (v or [])]
    return tuple(out)


def _read_yaml(path: Path) -> Any:
    """``path`` parsed, from memory while the file is unchanged (same mtime and size); a copy, so a
    caller may modify it."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    hit = _PARSED.get(str(path))
    if hit is None or hit[0] != stamp:
        hit = (stamp, yaml.load(path.read_text(), Loader=_LOADER))  # noqa: S506 - a safe loader
        _PARSED[str(path)] = hit
    return copy.deepcopy(hit[1])


def load_dvc_lock(root: str | Path) -> dict[str, Any]:
    """``{stage: its dvc.lock entry}`` (empty when nothing has run)."""
    path = Path(root) / DVC_LOCK
    if not path.exists():
        return {}
    return (_read_yaml(path) or {}).get("stages") or {}


def load_dvc_yaml(root: str | Path) -> dict[str, Any]:
    """The parsed ``dvc.yaml`` of ``root`` (empty when there is none)."""
    path = Path(root) / DVC_YAML
    if not path.exists():
        return {}
    try:
        data = _read_yaml(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); restore it from git") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a `stages:` section, got a {type(data).__name__}")
    return data


def stage_specs(root: str | Path) -> dict[str, StageSpec]:
    """Every stage of ``dvc.yaml``, in file order."""
    specs: dict[str, StageSpec] = {}
    for name, raw in (load_dvc_yaml(root).get("stages") or {}).items():
        raw = raw or {}
        specs[name] = StageSpec(name=name, cmd=str(raw.get("cmd", "")), deps=_paths(raw.get("deps")),
                                outs=_paths(raw.get("outs")), metrics=_paths(raw.get("metrics")),
                                plots=_paths(raw.get("plots")), params=_param_names(raw.get("params")), raw=raw)
    return specs


def stage_names(root: str | Path) -> list[str]:
    return list(stage_specs(root))


def stage_spec(root: str | Path, name: str) -> StageSpec:
    """The stage's entry; an empty spec when the workspace has no such stage (a run without DVC)."""
    return stage_specs(root).get(name) or StageSpec(name=name)


def tracked_params(root: str | Path) -> list[str]:
    """The top-level params.yaml keys that the stages track (DVC refuses one missing from the file)."""
    keys: list[str] = []
    for spec in stage_specs(root).values():
        keys += [p.split(".")[0] for p in spec.params if p.split(".")[0] not in keys]
    return keys


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
