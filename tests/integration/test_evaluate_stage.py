"""The evaluate stage on the smoke preset: a tiny random DrivingVLA driven on the embedded simulator.

Also the rollout's bookkeeping (odometry, outside-lanes share, events, the blocked test, frames) on a
scripted env whose every number is known.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.common import StageInputError
from stages.envs import captions
from stages.config import build_config
from stages.evaluate import DEFAULT_SEED_OFFSET, EvaluateParams, run
from stages.rl.evaluation import evaluate_policy, rollout_policy

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"driving_score", "route_completion", "infraction_penalty", "collisions_per_km",
                "infractions_per_km", "infractions_per_km_by_type", "mean_speed", "km_driven", "done_reasons",
                "episodes"}


@pytest.fixture(scope="module")
def cfg():
    return build_config(preset="smoke")


@pytest.fixture(scope="module")
def checkpoint(cfg, tmp_path_factory) -> Path:
    from models import DrivingVLA
    from stages.training import model_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "online"
    DrivingVLA(model_config(cfg)).save_pretrained(path)
    return path


def params(checkpoint: Path, **extra) -> EvaluateParams:
    base = {"checkpoint": str(checkpoint), "scenarios": ["highway", "urban"], "episodes": 1,
            "strip_frames": 6, "gif_max_frames": 30, "command_episodes": 1}
    return EvaluateParams.model_validate({**base, **extra})


def test_evaluate_writes_metrics_plots_and_an_episode(cfg, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(cfg, params(checkpoint))
    m = result["metrics"]

    assert SUMMARY_KEYS <= set(m) and set(m["scenarios"]) == {"highway", "urban"}
    assert m["episodes"] == 2 and all(s["episodes"] == 1 for s in m["scenarios"].values())
    assert 0.0 <= m["driving_score"] <= m["route_completion"] <= 1.0
    assert 0.0 < m["infraction_penalty"] <= 1.0
    assert m["km_driven"] > 0 and 0.0 < m["mean_speed"] < 40.0
    assert m["collisions_per_km"] >= 0 and m["infractions_per_km"] >= m["collisions_per_km"]
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text())["driving_score"] == m["driving_score"]

    report = json.loads((tmp_path / "reports/evaluate/episodes.json").read_text())
    assert [e["scenario"] for e in report["episodes"]] == ["highway", "urban"]
    # Held-out seeds: seed + offset, the same episode index in every scenario.
    assert report["seeds"] == [cfg.seed + DEFAULT_SEED_OFFSET]
    assert {e["seed"] for e in report["episodes"]} == {cfg.seed + DEFAULT_SEED_OFFSET}
    assert all(e["steps"] <= cfg.env.max_episode_steps and e["done_reason"] for e in report["episodes"])

    scores = Image.open(tmp_path / "plots/evaluate_scores.png")
    strip = Image.open(tmp_path / "plots/evaluate_strip.png")
    assert scores.width > 400 and strip.width > strip.height
    gif = Image.open(tmp_path / "reports/evaluate/episode.gif")
    assert gif.format == "GIF" and 2 <= gif.n_frames <= 30
    assert not (tmp_path / "runs/evaluate/resume.pt").exists(), "a finished run leaves no resume state"

    # Command following: every command of highway and urban, on the policy and on the expert.
    commands = [captions.CHANGE_LEFT, captions.CHANGE_RIGHT, captions.FOLLOW_LANE,
                captions.TURN_LEFT, captions.GO_STRAIGHT, captions.TURN_RIGHT]
    for who in ("", "_expert"):
        assert 0.0 <= m[f"command_following{who}_rate"] <= 1.0 and 0.0 <= m[f"counterfactual{who}_rate"] <= 1.0
        assert {f"command_following{who}/{c}" for c in commands} <= set(m)
    # One seed per scenario, three commands each: three same-seed pairs per scenario.
    assert m["command_episodes"] == 6 and m["commands"]["policy"]["pairs"] == 6
    driven = report["command_episodes"]["policy"]
    assert sorted((e["scenario"], e["command"]) for e in driven) == sorted(
        [("highway", c) for c in commands[:3]] + [("urban", c) for c in commands[3:]])
    assert {e["seed"] for e in driven} == {cfg.seed + DEFAULT_SEED_OFFSET}


def test_a_killed_evaluation_resumes_and_matches_a_fresh_one(cfg, checkpoint, tmp_path, monkeypatch):
    import stages.evaluate as evaluation  # the stage's own name for the rollout is what to patch

    p = params(checkpoint, scenarios=["highway"], episodes=2, gif=False, command_episodes=0)
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    monkeypatch.chdir(fresh_dir)
    fresh = run(cfg, p)["metrics"]

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    monkeypatch.chdir(killed_dir)
    real, calls = evaluation.rollout_policy, []

    def dies_on_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "rollout_policy", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, p)
    assert (killed_dir / "runs/evaluate/resume.pt").exists()
    assert not (killed_dir / "metrics/evaluate.json").exists(), "a killed run writes no metrics"

    calls.clear()

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "rollout_policy", counted)
    resumed = run(cfg, p)["metrics"]
    assert calls == [cfg.seed + DEFAULT_SEED_OFFSET + 1], "only the episode not yet driven is driven again"
    for key in ("driving_score", "route_completion", "km_driven", "collisions_per_km", "mean_speed"):
        assert resumed[key] == pytest.approx(fresh[key]), key


def test_a_run_killed_while_following_commands_resumes_without_driving_them_again(cfg, checkpoint, tmp_path,
                                                                               monkeypatch):
    import stages.evaluate_commands as harness

    monkeypatch.chdir(tmp_path)
    p = params(checkpoint, scenarios=["highway"], gif=False, command_expert=False)
    real, calls = harness.drive_commanded, []

    def dies_on_third(env, driver, seed, command, goal, blocked_seconds):
        calls.append(command)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(env, driver, seed, command, goal, blocked_seconds)

    monkeypatch.setattr(harness, "drive_commanded", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, p)
    assert not (tmp_path / "metrics/evaluate.json").exists()
    calls.clear()
    monkeypatch.setattr(harness, "drive_commanded", lambda *a: calls.append(a[3]) or real(*a))
    m = run(cfg, p)["metrics"]
    assert calls == [captions.FOLLOW_LANE], "only the command not yet driven is driven again"
    assert m["command_episodes"] == 3


def test_command_scenarios_without_a_command_are_refused_before_driving(cfg, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageInputError, match="racetrack"):
        run(cfg, params(checkpoint, command_scenarios=["racetrack"]))
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "reports").exists()


def test_missing_checkpoint_is_a_clear_error_and_writes_nothing(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageInputError, match="run the online stage first"):
        run(cfg, params(tmp_path / "nowhere"))
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "reports").exists()


def test_checkpoint_for_another_image_size_is_refused(cfg, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = cfg.model_copy(update={"env": cfg.env.model_copy(update={"image_size": 48})})
    with pytest.raises(StageInputError, match="env.image_size=48"):
        run(other, params(checkpoint))


def test_params_refuse_bad_values():
    with pytest.raises(ValueError, match="twice"):
        EvaluateParams(scenarios=["urban", "urban"])
    with pytest.raises(ValueError):
        EvaluateParams(scenarios=["moon"])
    with pytest.raises(ValueError):
        EvaluateParams(episodes=0)
    with pytest.raises(ValueError, match="command_scenarios"):
        EvaluateParams(command_scenarios=["urban", "urban"])


def test_command_line_overrides_and_errors(checkpoint, tmp_path):
    env = {"SDL_VIDEODRIVER": "dummy", "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    bad = subprocess.run([sys.executable, "-m", "stages.evaluate", "--preset", "smoke", "--params", "none.yaml",
                          "--set", "evaluate.episodes=0"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "evaluate.episodes" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "stages.evaluate", "--preset", "smoke", "--params", "none.yaml",
                         "--set", f"evaluate.checkpoint={checkpoint}", "--set", "evaluate.scenarios=[rain]",
                         "--set", "evaluate.gif=false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert list(metrics["scenarios"]) == ["rain"] and metrics["episodes"] == 1
    assert not (tmp_path / "reports/evaluate/episode.gif").exists()


# -- rollout bookkeeping on a scripted env -----------------------------------------------------------

class ScriptedEnv:
    """Plays back a list of step infos; the observation is a constant frame."""

    policy_frequency = 10

    def __init__(self, steps: list[dict], end: str = "time_limit"):
        self.steps, self.end, self.t = steps, end, 0

    @property
    def unwrapped(self):
        return self

    def _obs(self):
        return {"image": np.full((8, 8, 3), self.t, np.uint8), "state": np.zeros(8, np.float32),
                "command": "follow the lane"}

    def reset(self, seed=None):
        self.t = 0
        return self._obs(), {"speed": 5.0, "route_completion": 0.0, "ego_pose": np.zeros(3),
                             "infractions": {"collision": 0, "off_road": 0}}

    def step(self, action):
        info = dict(self.steps[self.t])
        self.t += 1
        last = self.t == len(self.steps)
        info["done_reason"] = self.end if last else ""
        return self._obs(), 1.0, last and self.end != "time_limit", last and self.end == "time_limit", info


class ConstantPolicy(torch.nn.Module):
    def tokenize(self, texts):
        return torch.ones(len(texts), 4, dtype=torch.long)

    def act(self, image, state, tokens, deterministic=False):
        return torch.zeros(len(image), 3), torch.zeros(len(image)), torch.zeros(len(image))


def step(x, rc, off_road=0, collision=0, speed=10.0):
    return {"speed": speed, "route_completion": rc, "ego_pose": np.array([x, 0.0, 0.0]),
            "infractions": {"collision": collision, "off_road": off_road}}


def test_rollout_measures_distance_outside_share_and_events():
    env = ScriptedEnv([step(1.0, 0.1), step(2.0, 0.2, off_road=1), step(3.0, 0.35, off_road=2),
                       step(4.0, 0.4, off_road=2, collision=1)], end="collision")
    r = rollout_policy(ConstantPolicy(), env, seed=7, keep_frames=True)
    assert r["steps"] == 4 and r["seconds"] == pytest.approx(0.4)
    assert r["distance_m"] == pytest.approx(4.0) and r["mean_speed"] == pytest.approx(10.0)
    # Route share gained on the two off-road steps: 0.1 + 0.15.
    assert r["outside_lanes_completion"] == pytest.approx(0.25)
    assert r["infraction_events"] == {"collision": 1, "off_road": 1}
    assert r["collision"] and r["done_reason"] == "collision" and r["seed"] == 7
    assert len(r["frames"]) == 5 and [f["t"] for f in r["frame_info"]] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert r["frame_info"][0]["speed"] == 5.0 and r["frame_info"][0]["command"] == "follow the lane"


def test_rollout_ends_a_blocked_episode():
    env = ScriptedEnv([step(1.0, 0.1)] + [step(1.0, 0.1, speed=0.0)] * 10)
    r = rollout_policy(ConstantPolicy(), env, seed=0, max_blocked_steps=3)
    assert r["done_reason"] == "agent_blocked" and r["steps"] == 4
    assert rollout_policy(ConstantPolicy(), env, seed=0)["steps"] == 11


def test_evaluate_policy_keeps_the_online_stage_keys():
    env = ScriptedEnv([step(1.0, 0.5), step(2.0, 1.0)], end="route_completed")
    out = evaluate_policy(ConstantPolicy(), env, episodes=2, seed=0)
    assert {"episode_return", "route_completion", "collision_rate", "episode_steps", "episodes"} <= set(out)
    assert out["route_completion"] == 1.0 and out["driving_score"] == 1.0 and out["episodes"] == 2
