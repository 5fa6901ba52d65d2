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
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from infra.carla.config import CarlaServerConfig
from infra.promotion import PromotionThresholds as PromoteParams  # the one thresholds type (promotion owns it)
from stages.config_model import StrictModel
from stages.envs.config import EnvConfig, ScenarioName
from stages.envs.spaces import STATE_FIELDS
from stages.rl.configs import PPOConfig, SACConfig

PresetName = Literal["smoke", "demo", "carla"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


_Strict = StrictModel   # every section: unknown keys and NaN / infinity refused (stages/config_model.py)


class ModelParams(_Strict):
    size: Literal["tiny", "small", "base"] = "tiny"
    image_size: int = Field(64, ge=16)
    num_cameras: int = Field(1, ge=1)
    trajectory_length: int = Field(10, ge=1)
    policy: Literal["squashed_gaussian", "beta"] = "squashed_gaussian"
    # Byte-level tokens: long enough for a whole ground-truth caption (~100–200 bytes), since a
    # caption cut to its boilerplate opening tells the contrastive loss nothing.
    max_text_length: int = Field(192, ge=8, le=1024)
    state_skip: bool = Field(False, description="the ego state reaches every head through a linear skip beside "
                                                "the fusion transformer (models/config.py); it fits the expert "
                                                "better open-loop but drove worse alone (docs/data-and-offline.md)")
    ignore_state: list[str] = Field([], description="ego-state fields the policy reads as zero, from "
                                                    f"{', '.join(STATE_FIELDS)}")

    @model_validator(mode="after")
    def _known_state_fields(self):
        unknown = sorted(set(self.ignore_state) - set(STATE_FIELDS))
        if unknown:
            raise ValueError(f"ignore_state: unknown state fields {unknown}; expected some of {list(STATE_FIELDS)}")
        return self


class DataParams(_Strict):
    out: str = "data/sim"
    episodes: int = Field(40, ge=2)
    perturbed_fraction: float = Field(0.25, ge=0, le=1, description="episodes driven by a noisy expert")
    expert_noise: float = Field(0.3, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    waypoint_stride: int = Field(3, ge=1, description="env steps between future waypoints (3 at 10 Hz: "
                                                      "10 waypoints cover 3 s)")
    sources: list[Literal["sim", "nuscenes"]] = Field(["sim", "nuscenes"], min_length=1,
                                                      description="what the training dataset is built from")
    nuscenes_root: str | None = Field(None, description="a nuScenes folder to read; None: the recorded "
                                                        "drives written as nuScenes at nuscenes_out")
    nuscenes_version: str = Field("v1.0-trainval", pattern=r"^v1\.0-(mini|trainval|test)$")
    nuscenes_out: str = "data/nuscenes-sim"
    nuscenes_strict: bool = Field(False, description="reject the whole nuScenes folder when a keyframe lacks "
                                                     "a camera keyframe (False: skip such samples, counted in "
                                                     "the metric nuscenes_skipped_samples)")
    built: str = Field("data/train", description="the sharded training dataset")
    shard_size: int = Field(1024, ge=16, description="samples per shard (whole episodes per shard)")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes")


class _Accumulates(_Strict):
    """What every gradient-descent stage (pretrain, offline) shares: compilation and accumulation."""

    compile: bool | None = Field(None, description="torch.compile the train step's forward and backward; "
                                                   "None: on for CUDA, off on CPU (compile time dwarfs a small run)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step: batch_size is split "
                                                       "into this many, so a large batch fits in GPU memory")

    @model_validator(mode="after")
    def _accumulation_divides(self):
        batch, steps = getattr(self, "batch_size"), getattr(self, "grad_accum_steps")
        if batch % steps:
            raise ValueError(f"batch_size ({batch}) must be a multiple of grad_accum_steps ({steps})")
        return self


class PretrainParams(_Accumulates):
    out: str = "checkpoints/pretrain"
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    caption_sources: list[Literal["sim", "nuscenes"]] = Field(["sim", "nuscenes"], min_length=1,
                                                              description="whose captions to align")


class OfflineParams(_Accumulates):
    out: str = "checkpoints/offline"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    control_weight: float = Field(1.0, ge=0)
    trajectory_weight: float = Field(1.0, ge=0)
    trajectory_loss: Literal["l1", "l2"] = "l2"
    bc_weight: float = Field(1.0, ge=0, description="weight of behaviour cloning in the policy loss")
    iql_weight: float = Field(1.0, ge=0, description="weight of IQL (value, Q and advantage-weighted policy)")
    iql_gamma: float = Field(0.99, ge=0, le=1, description="discount of the IQL critic; must equal "
                                                          "online.ppo.gamma (stage 3 starts from this critic)")
    iql_expectile: float = Field(0.7, gt=0, lt=1)
    iql_temperature: float = Field(3.0, ge=0, description="beta of exp(beta * advantage)")
    iql_max_weight: float = Field(100.0, gt=0)
    iql_tau: float = Field(0.005, gt=0, le=1, description="Polyak rate of the target Q heads")
    iql_value_weight: float = Field(1.0, ge=0, description="weight of the value and Q losses")
    reward_scale: float = Field(0.1, gt=0, description="the critic's errors are measured in reward_scale x "
                                                          "reward units; V itself stays in reward units")
    ego_mlp_epochs: int = Field(60, ge=1, description="epochs of the ego-status MLP baseline")
    min_log_std: float = Field(-2.0, ge=-5, le=0, description="floor of the policy's log-std in the "
                                                              "offline log-likelihoods (squashed Gaussian)")
    dagger_rounds: int = Field(0, ge=0, description="DAgger rounds: the policy drives, the expert labels the "
                                                    "states it visits, training goes on with them (stages/data/dagger.py)")
    dagger_episodes: int = Field(16, ge=1, description="episodes the policy drives per DAgger round")
    dagger_start_epoch: int = Field(4, ge=1, description="epochs of training before the first DAgger round")
    dagger_every: int = Field(2, ge=1, description="epochs between DAgger rounds")
    dagger_beta: float = Field(0.0, ge=0, le=1, description="share of a round's episodes the expert drives")
    dagger_out: str = Field("data/dagger", description="where the DAgger rounds are recorded")
    select_episodes: int = Field(0, ge=0, description="validation episodes the policy drives after each epoch "
                                                      "from select_from_epoch on; the best-driving weights are "
                                                      "kept (0: keep the last epoch's)")
    select_from_epoch: int = Field(1, ge=1, description="first epoch after which the closed-loop keeper drives")
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads while training on a CPU "
                                                          "(a fixed count gives one reduction order, so the "
                                                          "same weights, on machines of different core counts); "
                                                          "None: torch's default (the core count)")
    encoder_lr_scale: float = Field(0.3, ge=0, description="learning rate of the pretrained encoders, "
                                                          "relative to learning_rate")


# The online stage's own defaults for its learners, where they differ from the learners' class
# defaults (which follow the papers and Stable-Baselines3).
PPO_STAGE_DEFAULTS: dict[str, Any] = {"num_steps": 512, "batch_size": 64, "num_epochs": 4, "learning_rate": 1e-4}
SAC_STAGE_DEFAULTS: dict[str, Any] = {"buffer_size": 50_000, "batch_size": 64, "learning_starts": 256,
                                      "utd_ratio": 0.25, "random_warmup": False}


class OnlineParams(_Strict):
    out: str = "checkpoints/online"
    algo: Literal["ppo", "sac"] = "ppo"
    total_timesteps: int = Field(4096, ge=1)
    eval_episodes: int = Field(4, ge=1)
    ppo: PPOConfig = PPOConfig(**PPO_STAGE_DEFAULTS)
    sac: SACConfig = SACConfig(**SAC_STAGE_DEFAULTS)
    select_best: bool = Field(True, description="end with the weights that drove best on validation seeds "
                                                "(scored before training and after every validate_every-th "
                                                "update), not the last update's")
    val_episodes: int = Field(10, ge=1, description="validation episodes per score (seeds disjoint from the "
                                                    "held-out eval seeds)")
    validate_every: int = Field(1, ge=1, description="score every this many PPO updates / SAC log intervals")
    init_from: str | None = Field(None, description="start from this checkpoint instead of offline.out "
                                                    "(scheduled retraining starts from production)")

    @model_validator(mode="before")
    @classmethod
    def _learner_defaults(cls, data: Any) -> Any:
        # A partial `ppo` / `sac` section (a preset's, params.yaml's or a --set's) keeps the stage's
        # defaults for the keys it leaves out; without this, setting one key would silently bring back
        # the class defaults of all the others (e.g. a 1M-step replay buffer and random warm-up).
        if isinstance(data, dict):
            data = dict(data)
            for key, defaults in (("ppo", PPO_STAGE_DEFAULTS), ("sac", SAC_STAGE_DEFAULTS)):
                if isinstance(data.get(key), dict):
                    data[key] = {**defaults, **data[key]}
        return data


class ExportParams(_Strict):
    out: str = "exports"
    atol: float = Field(1e-4, gt=0)
    parity_batch_sizes: list[int] = [1, 7, 32]
    heldout_samples: int = Field(32, ge=1, description="val samples in the parity check")
    latency_batch_sizes: list[int] = [1, 32]
    latency_iters: int = Field(200, ge=1, description="timed calls per runtime and batch size")
    latency_warmup: int = Field(20, ge=0)
    latency_threads: int = Field(0, ge=0, description="intra-op threads for every runtime; 0 = torch's default")
    model_version: str | None = None


class EvaluateParams(_Strict):
    """Closed-loop evaluation of a checkpoint (stages/evaluate.py)."""

    checkpoint: str = Field("checkpoints/online", description="a DrivingVLA checkpoint folder (save_pretrained)")
    scenarios: list[ScenarioName] | None = Field(None, min_length=1, description="None: [env.scenario]")
    episodes: int = Field(2, ge=1, le=10_000, description="episodes per scenario")
    seed_offset: int = Field(2_000_000, ge=0, description="episode i runs seed + seed_offset + i")
    deterministic: bool = Field(True, description="drive the policy's mode (False: sample actions)")
    blocked_seconds: float | None = Field(10.0, gt=0, description="end an episode after standing still this "
                                                                  "long (the leaderboard's blocked test); None: never")
    out: str = Field("reports/evaluate", description="episode records and the animated episode")
    plots_dir: str = Field("plots", description="where evaluate_scores.png and evaluate_strip.png go")
    strip_frames: int = Field(8, ge=2, le=32, description="frames in the image strip")
    gif: bool = Field(True, description="write the strip's episode as an animated GIF")
    gif_max_frames: int = Field(120, ge=2, le=2000, description="frames kept for the GIF (evenly spaced)")
    cpu_threads: int | None = Field(1, ge=1, description="torch CPU threads while driving (one observation at "
                                                         "a time); None: torch's default")
    command_episodes: int = Field(2, ge=0, le=10_000, description="command following: seeds per scenario, each "
                                                                  "driven once per command; 0: not measured")
    command_scenarios: list[ScenarioName] | None = Field(
        None, description="scenarios whose command is chosen; None: those of `scenarios` that have one")
    command_expert: bool = Field(True, description="drive the scripted expert on the same seeds and commands "
                                                   "(the ceiling of the rates)")

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateParams":
        for key in ("scenarios", "command_scenarios"):
            names = getattr(self, key)
            if names is not None and len(set(names)) != len(names):
                raise ValueError(f"{key}={names} lists a scenario twice")
        if self.gif_max_frames < self.strip_frames:
            raise ValueError(f"gif_max_frames={self.gif_max_frames} must be >= strip_frames={self.strip_frames} "
                             "(the strip is drawn from the kept frames)")
        return self


# When a candidate may replace the production model (flows/promote.py). One type for the config and the
# promotion flow: infra owns it (stages may import infra; infra may not import stages).


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
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()
    carla: CarlaServerConfig = CarlaServerConfig()

    @model_validator(mode="after")
    def _one_discount(self) -> "PipelineConfig":
        # The offline critic is what online RL starts from: both must discount alike. Kept as two
        # keys so the offline stage tracks only its own section (DVC reruns exactly what changed).
        if self.offline.iql_gamma != self.online.ppo.gamma:
            raise ValueError(f"offline.iql_gamma={self.offline.iql_gamma} differs from online.ppo.gamma="
                             f"{self.online.ppo.gamma}: set both to the same discount")
        return self


# Presets hold only what differs from the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": {"size": "tiny", "image_size": 32},
        "env": {"image_size": 32, "max_episode_steps": 30},
        # 30-step episodes: waypoints 0.1 s apart (1 s ahead), so every episode has full horizons.
        "data": {"episodes": 4, "num_workers": 0, "shard_size": 64, "waypoint_stride": 1},
        "pretrain": {"epochs": 1, "batch_size": 16},
        "offline": {"epochs": 1, "batch_size": 16, "ego_mlp_epochs": 2},
        "online": {"total_timesteps": 64, "eval_episodes": 1,
                   "ppo": {"num_steps": 32, "batch_size": 16, "num_epochs": 1},
                   "sac": {"batch_size": 8, "learning_starts": 16, "buffer_size": 256}},
        "export": {"parity_batch_sizes": [1, 7, 32], "latency_iters": 5, "latency_warmup": 1},
        "evaluate": {"scenarios": ["highway", "urban"], "episodes": 1, "strip_frames": 6, "gif_max_frames": 30,
                     "command_episodes": 1},
    },
    "demo": {"evaluate": {"scenarios": ["highway", "urban", "night", "rain"], "episodes": 2,
                          "command_scenarios": ["highway", "urban"]},
             # Stage 2 that keeps the road (docs/data-and-offline.md §5; held-out route completion 0.70 /
             # 0.78 / 0.81 on seeds 0-2 against 0.29 / 0.74 / 0.41 before): the offset to the lane the route
             # wants, the state straight into the features, three DAgger rounds, and the epoch that drives
             # best on 16 validation episodes kept.
             "env": {"offset_reference": "route"},
             "model": {"state_skip": True},
             "offline": {"dagger_rounds": 3, "dagger_start_epoch": 3, "select_episodes": 16, "select_from_epoch": 4},
             # PPO, about 6-7 min on 2 CPU cores and the same figures on every run: frozen encoders
             # (cheap updates), a critic warm-up (the stage-2 value head does not know the online
             # reward), 50 held-out episodes per side, the best of the validation scores kept.
             # The cloned policy's spread is cut to std 0.018 (init_log_std): with imitation's spread the
             # sampled driver crashes within ~25 steps at 25 m/s and PPO learns about the wrong policy.
             "online": {"total_timesteps": 49152, "eval_episodes": 50, "val_episodes": 10,
                        "ppo": {"num_envs": 4, "num_steps": 4096, "batch_size": 64, "num_epochs": 10,
                                "learning_rate": 3e-4, "freeze_encoders": True, "value_warmup_steps": 8192,
                                "target_kl": 0.03, "init_log_std": -4.0},
                        # With `online.algo=sac online.total_timesteps=4096`: larger gains on most runs,
                        # none on some (docs/online-rl.md). Random actions for the first 1,000 steps
                        # fill the buffer with the crashes the cloned driver rarely shows.
                        "sac": {"num_envs": 4, "freeze_encoders": True, "batch_size": 256, "utd_ratio": 1.0,
                                "learning_starts": 1000, "random_warmup": True, "buffer_size": 16384}}},
    "carla": {
        "model": {"size": "base", "image_size": 224},
        "env": {"backend": "carla", "scenario": "urban", "image_size": 224, "max_episode_steps": 1000},
        "data": {"episodes": 200},
        # No command can be chosen on the CARLA backend yet (its route planner picks the turns).
        "evaluate": {"scenarios": ["urban", "highway", "night", "rain"], "episodes": 10, "blocked_seconds": 180.0,
                     "command_episodes": 0},
        "pretrain": {"epochs": 20, "batch_size": 256},
        "offline": {"epochs": 30, "batch_size": 256},
        "online": {"total_timesteps": 1_000_000,
                   # One CARLA server per env worker; they keep stepping during updates. The behaviour
                   # policy infers on the learner's GPU (collector_device auto = the learner's device
                   # on CUDA), bf16 network / fp32 distribution (precision auto); minibatches of 256:
                   # 80 gradient steps per update instead of 320 at 64 (docs/gpu.md).
                   "ppo": {"num_steps": 2048, "batch_size": 256, "num_epochs": 10, "num_envs": 4,
                           "async_collection": True}},
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


def _non_finite(err: dict[str, Any]) -> bool:
    """NaN or ±infinity given for a number (an int field reports the text "inf" as unparsable)."""
    if err["type"] == "finite_number":
        return True
    given = err.get("input")
    if err["type"] in ("int_parsing", "float_parsing") and isinstance(given, str):
        try:
            return not math.isfinite(float(given))
        except ValueError:
            return False
    return False


def _describe(errors: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        given = err.get("input")
        if _non_finite(err):
            lines.append(f"  - {loc} = {given!r}: not a finite number (NaN and infinity are not allowed); "
                         "give a finite value")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (given {given!r}); check the spelling against `drivevla config show`")
        else:
            allowed = {k: v for k, v in err.get("ctx", {}).items() if k != "error"}
            hint = f" [{', '.join(f'{k}={v}' for k, v in allowed.items())}]" if allowed else ""
            if loc and isinstance(given, dict):  # a rule across a section's keys: its message names them
                lines.append(f"  - {loc}: {err['msg'].removeprefix('Value error, ')}")
            elif loc:
                lines.append(f"  - {loc} = {given!r}: {err['msg']}{hint}")
            else:  # a rule across several keys: its message names them
                lines.append(f"  - {err['msg'].removeprefix('Value error, ')}")
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


def read_params(params: str | Path) -> dict[str, Any]:
    """The sections written in a params file (empty when it does not exist).

    A file that is not YAML, or whose top level is not a mapping of sections, raises
    :class:`ConfigError` naming the file, the problem and where.
    """
    path = Path(params)
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the file or restore it from git"
                          ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (preset: ..., online: {{...}}), "
                          f"got a {type(raw).__name__}")
    return raw


def load_config(params: str | Path | None = "params.yaml", preset: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read ``params.yaml`` (if it exists) and build the validated config."""
    raw = read_params(params) if params is not None else {}
    return build_config(raw, preset=preset, overrides=overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
