"""Evaluate: closed-loop driving of a checkpoint on held-out seeds and scenarios.

The policy (its deterministic mode by default) drives ``evaluate.episodes`` whole episodes in each of
``evaluate.scenarios`` (default: ``env.scenario`` alone), seeded ``seed + evaluate.seed_offset + i``:
seeds no other stage uses (training uses ``seed + i``, the online stage's before/after figures
``seed + 1_000_000 + i``). Each episode is scored as the CARLA leaderboard scores a route (route
completion x infraction penalty, `stages.metrics.driving_score`), and the run reports

- ``metrics/evaluate.json``: ``driving_score``, ``route_completion``, ``infraction_penalty``,
  ``collisions_per_km``, ``infractions_per_km`` (+ by type), ``mean_speed`` (m/s), ``km_driven``,
  ``done_reasons``, ``episodes``, and the same per scenario under ``scenarios``;
- command following (`stages.evaluate_commands`): in the scenarios whose command decides the manoeuvre
  (``evaluate.command_scenarios``), ``evaluate.command_episodes`` held-out seeds each driven once per
  command, the command chosen at reset: ``command_following_rate``, ``command_following/<command>``,
  ``counterfactual_rate`` (same seed, two commands, both followed), ``counterfactual_differs`` and, with
  ``evaluate.command_expert``, the scripted expert's own figures (``command_following_expert_rate``,
  ``counterfactual_expert_rate``, ``command_following_expert/<command>``: the ceiling); details under
  ``commands``;
- ``<plots_dir>/evaluate_scores.png``: per-scenario bars of route completion, infraction penalty and
  driving score, of collisions and infractions per km, and the command-following rates per command;
- ``<plots_dir>/evaluate_strip.png``: frames of the first episode of the first scenario, with the
  time, speed and command under each;
- ``<out>/``: ``episodes.json`` (every episode's record, the config and the checkpoint's digest) and
  ``episode.gif`` (the same episode, animated).

A killed run resumes from ``runs/evaluate/`` and skips the episodes it has already driven.
"""
from __future__ import annotations

import hashlib
import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from infra.files import sha256_file
from models import DrivingVLA
from stages.common import (StageInputError, resolve_device, save_figure, seed_everything, stage_main, staged_dir,
                           torch_threads, write_json)
from stages.config import EvaluateParams
from stages.envs import make_env
from stages.envs.scenarios import SCENARIOS
from stages.evaluate_commands import command_scenarios, drive_commands, expert_driver, model_driver
from stages.metrics.commands import summarise as summarise_commands
from stages.metrics.driving_score import summarise
from stages.resume import ResumePoint, fingerprint
from stages.rl.evaluation import rollout_policy, step_seconds

log = logging.getLogger(__name__)

STAGE = "evaluate"
DEFAULT_SEED_OFFSET = 2_000_000
SCORES_PLOT = "evaluate_scores.png"
STRIP_PLOT = "evaluate_strip.png"
EPISODES_FILE = "episodes.json"
GIF_FILE = "episode.gif"
GIF_SIDE = 192            # px: frames are scaled up (nearest) to about this side in the GIF


def evaluate_params(cfg: Any) -> EvaluateParams:
    """The config's ``evaluate`` section."""
    return cfg.evaluate


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def run(cfg: Any, params: EvaluateParams | None = None) -> dict[str, Any]:
    p = params or evaluate_params(cfg)
    scenarios = list(p.scenarios or [cfg.env.scenario])
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    checkpoint = Path(p.checkpoint)
    model = _load_checkpoint(checkpoint, cfg.env.image_size, device)
    digest = checkpoint_digest(checkpoint)

    resume = ResumePoint(STAGE, fingerprint(p.model_copy(update={"out": "", "plots_dir": ""}), cfg.env,
                                            cfg.seed, digest))
    state = resume.load() or {"records": {}, "media": None}
    state.setdefault("commands", {"policy": {}, "expert": {}})
    records: dict[str, dict[str, Any]] = state["records"]
    media: dict[str, Any] | None = state["media"]
    seeds = [cfg.seed + p.seed_offset + i for i in range(p.episodes)]
    cmd_scenarios = _command_scenarios(cfg, p, scenarios)

    t0 = time.perf_counter()
    bar = tqdm(total=len(scenarios) * p.episodes, initial=len(records), desc="evaluate", unit="ep")
    threads = p.cpu_threads if str(device).startswith("cpu") else None
    for s_index, scenario in enumerate(scenarios):
        todo = [(i, seed) for i, seed in enumerate(seeds) if f"{scenario}/{i}" not in records]
        if not todo:
            continue
        env = make_env(cfg.env.model_copy(update={"scenario": scenario}), seed=seeds[0])
        try:
            dt = step_seconds(env)
            blocked = None if p.blocked_seconds is None else max(1, round(p.blocked_seconds / dt))
            for i, seed in todo:
                film = s_index == 0 and i == 0
                with torch_threads(threads):
                    r = rollout_policy(model, env, seed, deterministic=p.deterministic, device=device,
                                       keep_frames=film, max_blocked_steps=blocked)
                if film:
                    media = _keep_media(r, p.gif_max_frames, dt)
                record = {k: v for k, v in r.items() if k not in ("frames", "frame_info")}
                record.update(scenario=scenario, episode=i)
                records[f"{scenario}/{i}"] = record
                resume.save({"records": records, "media": media})
                bar.set_postfix(scenario=scenario, rc=f"{r['route_completion']:.2f}", end=r["done_reason"])
                bar.update(1)
                log.info("evaluate %s episode %d (seed %d): route completion %.3f, %s, %d steps", scenario, i,
                         seed, r["route_completion"], r["done_reason"], r["steps"])
        finally:
            env.close()
    bar.close()
    t_commands = time.perf_counter()
    commands = _command_following(cfg, p, cmd_scenarios, model, device, threads, state, resume)
    command_seconds = round(time.perf_counter() - t_commands, 2)

    ordered = [records[f"{s}/{i}"] for s in scenarios for i in range(p.episodes)]
    per_scenario = {s: summarise([r for r in ordered if r["scenario"] == s]) for s in scenarios}
    metrics = {**summarise(ordered), "scenarios": per_scenario, **command_metrics(commands),
               "seconds": round(time.perf_counter() - t0, 2)}
    if commands:
        metrics["command_seconds"] = command_seconds

    plots_dir = Path(p.plots_dir)
    scores_png = plot_scores(per_scenario, metrics, plots_dir / SCORES_PLOT,
                             title=f"{checkpoint} on held-out seeds ({p.episodes} per scenario)",
                             commands=metrics.get("commands"))
    strip_png = plot_strip(media, plots_dir / STRIP_PLOT, p.strip_frames) if media else None
    with staged_dir(p.out) as tmp:
        write_json(tmp / EPISODES_FILE, {
            "checkpoint": str(checkpoint), "checkpoint_sha256": digest, "seeds": seeds,
            "scenarios": scenarios, "params": p.model_dump(mode="json"), "env": cfg.env.model_dump(mode="json"),
            "episodes": ordered, "command_episodes": {k: list(v.values()) for k, v in commands.items()}})
        if p.gif and media:
            write_gif(media, tmp / GIF_FILE)
    write_json(Path(cfg.metrics_dir) / f"{STAGE}.json", metrics)
    resume.clear()
    log.info("evaluate: driving score %.3f, route completion %.3f over %d episodes", metrics["driving_score"],
             metrics["route_completion"], metrics["episodes"])
    paths = {"report": p.out, "metrics": str(Path(cfg.metrics_dir) / f"{STAGE}.json"), "scores_plot": str(scores_png)}
    if strip_png is not None:
        paths["strip"] = str(strip_png)
    if p.gif and media:
        paths["gif"] = str(Path(p.out) / GIF_FILE)
    return {"paths": paths, "metrics": metrics}


def _command_scenarios(cfg: Any, p: EvaluateParams, scenarios: list[str]) -> list[str]:
    """The scenarios whose command is chosen (checked before any driving)."""
    if p.command_episodes == 0:
        return []
    if cfg.env.backend != "highway":
        log.warning("command following is measured on the highway backend only; env.backend=%s: skipped",
                    cfg.env.backend)
        return []
    if p.command_scenarios is None:
        return command_scenarios(scenarios)
    lacking = [s for s in p.command_scenarios if s not in command_scenarios([s])]
    if lacking:
        raise StageInputError(f"evaluate.command_scenarios={p.command_scenarios}: {lacking} have no command to "
                              f"choose; pick from {command_scenarios(SCENARIOS)}")
    return list(p.command_scenarios)


def _command_following(cfg: Any, p: EvaluateParams, scenarios: list[str], model: Any, device: str,
                       threads: int | None, state: dict[str, Any], resume: ResumePoint) -> dict[str, dict[str, Any]]:
    """Drive every (scenario, seed, command) with the policy (and the expert); resumable per episode."""
    if not scenarios:
        return {}
    seeds = [cfg.seed + p.seed_offset + i for i in range(p.command_episodes)]
    drivers = {"policy": model_driver(model, device, p.deterministic)}
    if p.command_expert:
        drivers["expert"] = expert_driver()
    out = {}
    for name, driver in drivers.items():
        done = state["commands"][name]

        def save(key: str, record: dict[str, Any], done: dict[str, Any] = done) -> None:
            done[key] = record
            resume.save(state)

        with torch_threads(threads):
            out[name] = drive_commands(cfg.env, driver, scenarios, seeds, p.blocked_seconds, done, save)
    return out


def command_metrics(commands: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flat command-following keys (what promotion and the stage's artifact read) and the details."""
    if not commands:
        return {}
    out: dict[str, Any] = {}
    details = {}
    for name, records in commands.items():
        s = summarise_commands(list(records.values()))
        details[name] = s
        suffix = "" if name == "policy" else f"_{name}"
        out[f"command_following{suffix}_rate"] = s["command_following_rate"]
        out[f"counterfactual{suffix}_rate"] = s["counterfactual_rate"]
        out.update({f"command_following{suffix}/{c}": rate for c, rate in s["by_command"].items()})
    out["counterfactual_differs"] = details["policy"]["counterfactual_differs"]
    out["command_episodes"] = details["policy"]["episodes"]
    out["commands"] = details
    return out


def _load_checkpoint(path: Path, image_size: int, device: str) -> Any:
    if not (path / "config.json").is_file():
        raise StageInputError(f"checkpoint {path} not found (no config.json): run the online stage first, "
                              "or point --set evaluate.checkpoint=DIR at a folder written by save_pretrained")
    try:
        model = DrivingVLA.from_pretrained(path, map_location=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise StageInputError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    if model.config.image_size != image_size:
        raise StageInputError(f"checkpoint {path} expects {model.config.image_size}px images but env.image_size="
                              f"{image_size}: evaluate with --set env.image_size={model.config.image_size}")
    return model.eval()


def checkpoint_digest(path: Path) -> str:
    """sha256 over the checkpoint's files (a changed checkpoint restarts a resumed evaluation)."""
    h = hashlib.sha256()
    for f in sorted(q for q in path.iterdir() if q.is_file()):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _keep_media(r: dict[str, Any], max_frames: int, dt: float) -> dict[str, Any]:
    """At most ``max_frames`` evenly spaced frames (the last one included) with their captions."""
    n = len(r["frames"])
    idx = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    return {"frames": np.stack([r["frames"][i] for i in idx]), "frame_info": [r["frame_info"][i] for i in idx],
            "scenario": r["scenario"], "seed": r["seed"], "done_reason": r["done_reason"],
            "route_completion": r["route_completion"], "frame_seconds": dt * (n - 1) / max(len(idx) - 1, 1)}


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def plot_scores(per_scenario: dict[str, dict[str, Any]], overall: dict[str, Any], path: str | Path,
                title: str = "", commands: dict[str, dict[str, Any]] | None = None) -> Path:
    """Per-scenario (and overall) bars: route completion, infraction penalty, driving score; and
    collisions and infractions per km, with the mean speed under each scenario's name; with
    ``commands`` (`command_metrics`' details), a third panel of command-following rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {**per_scenario, "all": overall}
    names = list(groups)
    labels = [f"{n}\n{groups[n]['mean_speed']:.1f} m/s" for n in names]
    x = np.arange(len(names))
    width = max(8.0, 2.6 * len(names))
    if commands:
        fig, (left, right, third) = plt.subplots(1, 3, figsize=(width + 7.0, 4.2),
                                                 gridspec_kw={"width_ratios": [1, 1, 1.2]})
        plot_commands(third, commands)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(width, 4.2))
    for k, (key, label) in enumerate([("route_completion", "route completion"),
                                      ("infraction_penalty", "infraction penalty"),
                                      ("driving_score", "driving score")]):
        values = [groups[n][key] for n in names]
        bars = left.bar(x + (k - 1) * 0.26, values, 0.26, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_ylim(0, 1.3)
    left.set_ylabel("fraction (leaderboard x 100 = %)")
    for k, (key, label) in enumerate([("collisions_per_km", "collisions / km"),
                                      ("infractions_per_km", "infractions / km")]):
        bars = right.bar(x + (k - 0.5) * 0.36, [groups[n][key] for n in names], 0.36, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_ylabel("events per km driven")
    top = max([groups[n][k] for n in names for k in ("collisions_per_km", "infractions_per_km")] + [0.0])
    right.set_ylim(0, max(1.0, 1.25 * top))
    for ax in (left, right):
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_commands(ax: Any, commands: dict[str, dict[str, Any]]) -> None:
    """Bars of the command-following rate per command and of the counterfactual rate, per driver."""
    policy = commands["policy"]
    keys = list(policy["by_command"]) + ["counterfactual"]
    x = np.arange(len(keys))
    drivers = list(commands)
    w = 0.8 / len(drivers)
    for k, name in enumerate(drivers):
        s = commands[name]
        values = [s["by_command"].get(c) for c in keys[:-1]] + [s["counterfactual_rate"]]
        bars = ax.bar(x + (k - (len(drivers) - 1) / 2) * w, [0.0 if v is None else v for v in values], w,
                      label=name if name == "policy" else f"{name} (ceiling)")
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=6)
    ax.set_xticks(x, [textwrap.fill(k, 14) for k in keys], fontsize=6)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("command followed (fraction)")
    ax.set_title(f"command following ({policy['episodes']} episodes, {policy['pairs']} same-seed pairs)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)


def plot_strip(media: dict[str, Any], path: str | Path, count: int = 8) -> Path:
    """``count`` evenly spaced frames of the filmed episode, time, speed and command under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, info = media["frames"], media["frame_info"]
    idx = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    fig, axes = plt.subplots(1, len(idx), figsize=(1.9 * len(idx), 2.9), squeeze=False)
    for ax, i in zip(axes[0], idx):
        ax.imshow(frames[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        f = info[i]
        command = textwrap.fill(f["command"], 26)
        ax.set_xlabel(f"t={f['t']:.1f} s  {f['speed']:.1f} m/s\n{command}", fontsize=7)
    fig.suptitle(f"{media['scenario']} (seed {media['seed']}): ended by {media['done_reason'] or 'n/a'}, "
                 f"route completion {media['route_completion']:.2f}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def write_gif(media: dict[str, Any], path: str | Path) -> Path:
    """The filmed episode as an animated GIF (frames scaled up, a caption band under each)."""
    frames = media["frames"]
    side = frames.shape[1]
    scale = max(1, GIF_SIDE // side)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:                      # Pillow without FreeType sizing
        font = ImageFont.load_default()
    band = 30
    images = []
    for frame, f in zip(frames, media["frame_info"]):
        img = Image.fromarray(frame).resize((side * scale, side * scale), Image.NEAREST)
        canvas = Image.new("RGB", (img.width, img.height + band), (20, 20, 20))
        canvas.paste(img, (0, 0))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, img.height + 2), f"t={f['t']:.1f}s  {f['speed']:.1f} m/s", fill=(255, 255, 255), font=font)
        draw.text((4, img.height + 15), f["command"][:40], fill=(255, 220, 120), font=font)
        images.append(canvas.convert("P", palette=Image.ADAPTIVE))
    path = Path(path)
    duration = max(20, int(round(1000 * media["frame_seconds"])))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def main() -> None:
    stage_main(STAGE, run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
