"""Command following: the judge on hand-made trajectories, the rates, and choosing the command at reset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stages.envs import EnvConfig, captions, make_env
from stages.evaluate_commands import drive_commanded, goal_for
from stages.metrics.commands import (
    CHANGED_LEFT, CHANGED_RIGHT, KEPT_LANE, NOT_DONE, ExitGoal, LaneGoal, Trajectory, judge, summarise)

URBAN_EXITS = goal_for("urban", captions.TURN_LEFT).exits


def urban(roads: list[str], ended: bool = False) -> Trajectory:
    n = len(roads)
    return Trajectory([0.1 * i for i in range(n)], [0] * n, [0.0] * n, roads, ended)


def lanes(ids: list[int], lateral: list[float] | None = None, dt: float = 1.0, ended: bool = False) -> Trajectory:
    n = len(ids)
    return Trajectory([dt * i for i in range(n)], ids, lateral or [0.0] * n, ["0->1/0"] * n, ended)


# -- exits -----------------------------------------------------------------------------------------

def test_a_left_turn_is_judged_left():
    left_turn = urban(["o0->ir0/0"] * 5 + ["ir0->il1/0"] * 5 + ["il1->o1/0"])
    out = judge(ExitGoal("left", URBAN_EXITS), left_turn)
    assert out.observed == "left" and out.followed and out.decided and out.at == pytest.approx(1.0)
    asked_right = judge(ExitGoal("right", URBAN_EXITS), left_turn)
    assert asked_right.observed == "left" and not asked_right.followed and asked_right.decided


def test_the_first_exit_reached_is_the_manoeuvre_and_none_is_undecided_until_the_end():
    straight_then_wrong = urban(["o0->ir0/0", "ir0->il2/0", "il2->o2/0", "il3->o3/0"])
    assert judge(ExitGoal("straight", URBAN_EXITS), straight_then_wrong).observed == "straight"
    waiting = urban(["o0->ir0/0"] * 3)
    assert not judge(ExitGoal("left", URBAN_EXITS), waiting).decided
    crashed = judge(ExitGoal("left", URBAN_EXITS), urban(["o0->ir0/0", "ir0->il1/0"], ended=True))
    assert crashed.decided and crashed.observed == NOT_DONE and not crashed.followed


def test_an_exit_after_the_time_limit_does_not_count():
    late = Trajectory([0.0, 5.0, 40.0], [0, 0, 0], [0.0] * 3, ["o0->ir0/0", "ir0->il1/0", "il1->o1/0"])
    out = judge(ExitGoal("left", URBAN_EXITS, time_limit=30.0), late)
    assert out.decided and out.observed == NOT_DONE


def test_a_lane_specific_exit_needs_that_lane():
    goal = goal_for("merge", captions.MERGE)
    still_on_the_merge_lane = urban(["k->b/0", "b->c/2", "b->c/2"])
    assert judge(goal, still_on_the_merge_lane).observed == NOT_DONE
    assert judge(goal, urban(["k->b/0", "b->c/2", "b->c/1"])).followed


# -- lanes -----------------------------------------------------------------------------------------

def test_a_lane_change_is_done_once_settled_in_the_next_lane():
    goal = LaneGoal(-1, time_limit=8.0)
    half_way = lanes([1, 1, 0], lateral=[0.0, 1.5, -1.8])        # crossed the line, not settled
    assert not judge(goal, half_way).decided
    done = lanes([1, 1, 0, 0], lateral=[0.0, 1.5, -1.8, -0.4])
    out = judge(goal, done)
    assert out.observed == CHANGED_LEFT and out.followed and out.at == pytest.approx(3.0)


def test_a_lane_change_not_done_in_time_or_the_wrong_way_is_not_followed():
    too_late = lanes([1] * 10 + [0], dt=1.0)                     # settles at t = 10 s > 8 s
    out = judge(LaneGoal(-1, time_limit=8.0), too_late)
    assert out.decided and out.observed == KEPT_LANE and not out.followed
    wrong_way = judge(LaneGoal(-1), lanes([1, 2]))
    assert wrong_way.observed == CHANGED_RIGHT and not wrong_way.followed and wrong_way.decided


def test_keeping_the_lane_needs_the_whole_window_in_it():
    assert judge(LaneGoal(0, time_limit=8.0), lanes([1] * 10)).followed
    assert not judge(LaneGoal(0, time_limit=8.0), lanes([1] * 5)).decided           # still driving
    crashed = judge(LaneGoal(0, time_limit=8.0), lanes([1] * 5, ended=True))
    assert crashed.decided and not crashed.followed
    drifted = judge(LaneGoal(0, time_limit=8.0), lanes([1, 2, 1] + [1] * 8, lateral=[0.0, 1.9, 1.9] + [0.0] * 8))
    assert drifted.decided and drifted.observed == NOT_DONE and not drifted.followed


def test_bad_trajectories_and_goals_are_refused():
    with pytest.raises(ValueError, match="same number"):
        Trajectory([0.0, 0.1], [0], [0.0], ["a->b/0"])
    with pytest.raises(ValueError, match="offset"):
        LaneGoal(2)


# -- rates -----------------------------------------------------------------------------------------

def test_rates_per_command_and_counterfactual_pairs():
    def ep(seed, command, observed, followed, scenario="highway"):
        return {"scenario": scenario, "seed": seed, "command": command, "observed": observed, "followed": followed}

    episodes = [ep(1, "left", CHANGED_LEFT, True), ep(1, "right", CHANGED_RIGHT, True),
                ep(2, "left", KEPT_LANE, False), ep(2, "right", KEPT_LANE, False),
                ep(3, "left", CHANGED_LEFT, True), ep(3, "right", KEPT_LANE, False),
                ep(1, "left", "left", True, scenario="urban")]           # no partner: no pair
    s = summarise(episodes)
    assert s["episodes"] == 7 and s["pairs"] == 3
    assert s["command_following_rate"] == pytest.approx(4 / 7)
    assert s["by_command"]["right"] == pytest.approx(1 / 3)
    assert s["by_scenario"]["urban"] == {"left": 1.0}
    assert s["counterfactual_rate"] == pytest.approx(1 / 3)       # only seed 1 did both as asked
    assert s["counterfactual_differs"] == pytest.approx(2 / 3)    # seed 2 did the same thing twice
    assert summarise([])["command_following_rate"] is None


# -- choosing the command at reset -------------------------------------------------------------------

def test_reset_builds_the_route_of_the_chosen_command_from_the_same_start():
    env = make_env(EnvConfig(scenario="urban"), seed=0)
    try:
        starts, destinations = [], []
        for command in (captions.TURN_LEFT, captions.GO_STRAIGHT, captions.TURN_RIGHT):
            obs, info = env.reset(seed=7, options={"command": command})
            assert obs["command"] == command and info["command"] == command
            starts.append(np.asarray(info["ego_pose"]).copy())
            destinations.append(env.unwrapped.destination)
            others = sorted(tuple(np.round(v.position, 6)) for v in env.unwrapped.sim.road.vehicles[1:])
            if len(starts) == 1:
                traffic = others
            assert others == traffic, "every command of a seed has the same traffic"
        assert destinations == ["o1", "o2", "o3"]
        assert all(np.array_equal(s, starts[0]) for s in starts)
        with pytest.raises(ValueError, match="turn left at the next intersection"):
            env.reset(seed=7, options={"command": captions.CHANGE_LEFT})
    finally:
        env.close()


def test_a_chosen_lane_change_starts_in_the_middle_lane_and_asks_for_it():
    env = make_env(EnvConfig(scenario="highway"), seed=0)
    try:
        _, info = env.reset(seed=3, options={"command": captions.CHANGE_RIGHT})
        assert info["lane_index"] == 1 and info["command"] == captions.CHANGE_RIGHT
        assert env.unwrapped.route.desired_lane_id() == 2
        _, info = env.reset(seed=3, options={"command": captions.FOLLOW_LANE})
        assert info["lane_index"] == 1 and info["command"] == captions.FOLLOW_LANE
    finally:
        env.close()


def test_the_counterfactual_harness_drives_one_seed_with_two_commands():
    env = make_env(EnvConfig(scenario="highway"), seed=0)
    seen: list[tuple[int, str, np.ndarray]] = []

    def straight_ahead(obs, env_):
        seen.append((env_.unwrapped.episode_id, str(obs["command"]), env_.unwrapped.ego.position.copy()))
        return np.array([0.3, 0.0, 0.0], dtype=np.float32)

    try:
        left = drive_commanded(env, straight_ahead, 11, captions.CHANGE_LEFT, goal_for("highway", captions.CHANGE_LEFT))
        keep = drive_commanded(env, straight_ahead, 11, captions.FOLLOW_LANE, goal_for("highway", captions.FOLLOW_LANE))
    finally:
        env.close()
    assert (left["seed"], keep["seed"]) == (11, 11)
    first = [s for s in seen if s[0] == seen[0][0]]
    second = [s for s in seen if s[0] != seen[0][0]]
    assert {c for _, c, _ in first} >= {captions.CHANGE_LEFT} and {c for _, c, _ in second} == {captions.FOLLOW_LANE}
    assert np.array_equal(first[0][2], second[0][2]), "both commands start from the same place"
    # Driving straight on follows "follow the lane" and ignores "change to the left lane".
    assert keep["followed"] and keep["observed"] == KEPT_LANE
    assert not left["followed"] and left["observed"] == KEPT_LANE


def test_the_language_benchmark_writes_rates_and_the_ceiling(tmp_path):
    from benchmarks.language import main

    out = tmp_path / "language.json"
    results = main(["--seeds", "1", "--scenarios", "merge", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["drivers"]["expert"] == results["drivers"]["expert"]
    assert saved["drivers"]["expert"]["by_command"].keys() == {captions.MERGE}
    assert [e["command"] for e in saved["episodes"]["expert"]] == [captions.MERGE]
    assert saved["drivers"]["expert"]["pairs"] == 0 and saved["drivers"]["expert"]["counterfactual_rate"] is None


def test_a_candidate_that_follows_commands_worse_than_production_is_not_promoted():
    from infra.registry import PromotionThresholds, judge as promotion
    from stages.config import PromoteParams
    from stages.evaluate import command_metrics

    def metrics(followed: list[bool]) -> dict:
        records = {f"urban/1/{c}": {"scenario": "urban", "seed": 1, "command": c, "observed": "left", "followed": f}
                   for c, f in zip(("left", "straight", "right"), followed)}
        return {"driving_score": 0.8, "route_completion": 0.9, "collisions_per_km": 0.0, "onnx_max_abs_error": 1e-7,
                **command_metrics({"policy": records})}

    # The config's promote section (what flows/promote.py hands the registry) guards the rate.
    thresholds = PromotionThresholds(**PromoteParams().model_dump(include=set(PromotionThresholds.model_fields)))
    production = {**metrics([True, True, False]), "driving_score": 0.7}
    worse = promotion(metrics([True, False, False]), production, thresholds)
    assert not worse.accepted and any("command_following_rate" in r for r in worse.reasons)
    assert promotion(metrics([True, True, False]), production, thresholds).accepted
    assert promotion(metrics([True, False, False]), {"driving_score": 0.7}, thresholds).accepted, \
        "a production model without the metric does not block"
