"""The pipeline's one configuration system.

A config is built in layers, later layers winning:

1. the defaults of the pydantic models below,
2. a named preset (``smoke`` for tests, ``demo`` for a laptop CPU, ``carla`` for the real thing),
3. the sections written in ``params.yaml`` (DVC tracks this file),
4. ``--set a.b=c`` overrides from the command line.

Validation happens once, on the merged result, before any work starts; a bad value raises
:class:`ConfigError` naming the key, the value given and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.envs.config import EnvConfig
from stages.rl.configs import PPOConfig, SACConfig

PresetName = Literal["smoke", "demo", "carla"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Strict):
    size: Literal["tiny", "small", "base"] = "tiny"
    image_size: int = Field(64, ge=16)
    num_cameras: int = Field(1, ge=1)
    trajectory_length: int = Field(10, ge=1)
    policy: Literal["squashed_gaussian", "beta"] = "squashed_gaussian"
    # Byte-level tokens: long enough for a whole ground-truth caption (~100–200 bytes), since a
    # caption cut to its boilerplate opening tells the contrastive loss nothing.
    max_text_length: int = Field(192, ge=8, le=1024)


class DataParams(_Strict):
    out: str = "data/sim"
    episodes: int = Field(40, ge=2)
    perturbed_fraction: float = Field(0.25, ge=0, le=1, description="episodes driven by a noisy expert")
    expert_noise: float = Field(0.3, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    waypoint_stride: int = Field(2, ge=1, description="env steps between future waypoints")


class PretrainParams(_Strict):
    out: str = "checkpoints/pretrain"
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)


class OfflineParams(_Strict):
    out: str = "checkpoints/offline"
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    control_weight: float = Field(1.0, ge=0)
    trajectory_weight: float = Field(1.0, ge=0)


class OnlineParams(_Strict):
    out: str = "checkpoints/online"
    algo: Literal["ppo", "sac"] = "ppo"
    total_timesteps: int = Field(4096, ge=1)
    eval_episodes: int = Field(4, ge=1)
    ppo: PPOConfig = PPOConfig(num_steps=512, batch_size=64, num_epochs=4, learning_rate=1e-4)
    sac: SACConfig = SACConfig()


class ExportParams(_Strict):
    out: str = "exports"
    atol: float = Field(1e-4, gt=0)
    parity_batch_sizes: list[int] = [1, 7, 32]


class PipelineConfig(_Strict):
    preset: PresetName = "demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    metrics_dir: str = "metrics"
    model: ModelParams = ModelParams()
    env: EnvConfig = EnvConfig()
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    offline: OfflineParams = OfflineParams()
    online: OnlineParams = OnlineParams()
    export: ExportParams = ExportParams()


# Presets hold only what differs from the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": {"size": "tiny", "image_size": 32},
        "env": {"image_size": 32, "max_episode_steps": 30},
        "data": {"episodes": 4},
        "pretrain": {"epochs": 1, "batch_size": 16},
        "offline": {"epochs": 1, "batch_size": 16},
        "online": {"total_timesteps": 64, "eval_episodes": 1,
                   "ppo": {"num_steps": 32, "batch_size": 16, "num_epochs": 1}},
        "export": {"parity_batch_sizes": [1, 3]},
    },
    "demo": {},
    "carla": {
        "model": {"size": "base", "image_size": 224},
        "env": {"backend": "carla", "scenario": "urban", "image_size": 224, "max_episode_steps": 1000},
        "data": {"episodes": 200},
        "pretrain": {"epochs": 20, "batch_size": 256},
        "offline": {"epochs": 30, "batch_size": 256},
        "online": {"total_timesteps": 1_000_000,
                   "ppo": {"num_steps": 2048, "batch_size": 64, "num_epochs": 10, "num_envs": 4}},
    },
}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``a.b=c`` into ``{"a": {"b": c}}``, the value parsed as YAML (``3`` → int, ``[1,2]`` → list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    tree: dict[str, Any] = {}
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _describe(errors: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (given {given!r}); check the spelling against `drivevla config show`")
        else:
            allowed = err.get("ctx", {})
            hint = f" [{', '.join(f'{k}={v}' for k, v in allowed.items() if k != 'error')}]" if allowed else ""
            lines.append(f"  - {loc or '(root)'} = {given!r}: {err['msg']}{hint}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(raw: dict[str, Any] | None = None, preset: str | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Merge preset, ``raw`` sections and overrides, then validate."""
    raw = dict(raw or {})
    over: dict[str, Any] = {}
    for text in overrides:
        over = deep_merge(over, parse_override(text))
    name = over.pop("preset", None) or preset or raw.pop("preset", None) or "demo"
    raw.pop("preset", None)
    if name not in PRESETS:
        raise ConfigError(f"invalid configuration:\n  - preset = {name!r}: allowed presets are {sorted(PRESETS)}")
    merged = deep_merge(deep_merge(PRESETS[name], raw), over)
    merged["preset"] = name
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(), merged)) from None


def load_config(params: str | Path | None = "params.yaml", preset: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read ``params.yaml`` (if it exists) and build the validated config."""
    raw: dict[str, Any] = {}
    if params is not None and Path(params).exists():
        try:
            raw = yaml.safe_load(Path(params).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{params}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{params}: expected a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, preset=preset, overrides=overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
