"""What ``dvc.yaml`` and ``dvc.lock`` say: the project's one reader of both files.

Stages, their deps, outputs, metrics, plots and tracked params (``dvc.yaml``), and what DVC recorded
for each stage (``dvc.lock``). The flows, the tasks, the registry and the model card all read them here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class DvcFileError(ValueError):
    """``dvc.yaml`` cannot be read as a pipeline; the message names the file."""


DVC_YAML = "dvc.yaml"
DVC_LOCK = "dvc.lock"
# libyaml when present: a no-change pipeline re-run reads these files dozens of times, and the pure
# Python parser spent more time on them than everything else the re-run does.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PARSED: dict[str, tuple[tuple[int, int], Any]] = {}


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


def _entries(items: Any, expand: Any) -> tuple[str, ...]:
    """A ``dvc.yaml`` list: a string stands for itself, a mapping for what ``expand`` makes of it."""
    out: list[str] = []
    for item in items or []:
        out += [item] if isinstance(item, str) else expand(item) if isinstance(item, dict) else []
    return tuple(out)


def _paths(items: Any) -> tuple[str, ...]:
    """``["a", {"b": {cache: false}}]`` → ``("a", "b")``."""
    return _entries(items, lambda d: [str(k) for k in d])


def _param_names(items: Any) -> tuple[str, ...]:
    """Tracked params: ``"section"`` or ``{"file.yaml": [keys]}``."""
    return _entries(items, lambda d: [str(k) for v in d.values() for k in (v or [])])


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


def load_dvc_lock(root: str | Path, name: str = DVC_LOCK) -> dict[str, Any]:
    """``{stage: its dvc.lock entry}`` (empty when nothing has run)."""
    path = Path(root) / name
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
        raise DvcFileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); restore it from git") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DvcFileError(f"{path}: expected a mapping with a `stages:` section, got a {type(data).__name__}")
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


def lock_outs(root: str | Path, name: str = DVC_LOCK) -> dict[str, str]:
    """``{out path: md5}`` of every stage output recorded in ``dvc.lock`` (empty when nothing has run)."""
    versions: dict[str, str] = {}
    for entry in load_dvc_lock(root, name).values():
        for out in entry.get("outs") or []:
            if isinstance(out, dict) and "path" in out:
                versions[str(out["path"]).rstrip("/")] = str(out.get("md5") or out.get("etag") or "")
    return versions
