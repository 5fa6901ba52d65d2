"""Open-loop metrics: L2 in both conventions, the collision check, the baselines and the plot."""
from __future__ import annotations

import numpy as np
import pytest

from stages.metrics.open_loop import (boxes_overlap, collisions, constant_velocity, evaluate_planner,
                                      fit_ego_status_mlp, format_table, interpolate_at, open_loop_report,
                                      plot_open_loop)

STEP = 0.3          # s between waypoints
T = 10              # 3 s


def straight(speed: float, n: int = 1, lateral: float = 0.0) -> np.ndarray:
    t = STEP * np.arange(1, T + 1)
    traj = np.zeros((n, T, 2))
    traj[:, :, 0] = speed * t
    traj[:, :, 1] = lateral * t
    return traj


def test_interpolation_hits_the_waypoints_and_the_origin():
    traj = straight(10.0)
    out = interpolate_at(traj, STEP, np.array([0.0, 0.15, 0.3, 1.0, 3.0]))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 1.5, 3.0, 10.0, 30.0])


def test_l2_at_time_and_averaged_up_to_time():
    # The error grows as 1 m per second (a lateral drift): at t it is t, averaged over 0.5 .. t it is the mean.
    r = evaluate_planner(straight(10.0, lateral=1.0), straight(10.0), np.zeros((0, 6)), np.zeros(2, np.int64),
                         STEP, (4.0, 2.0))
    assert r["l2_at_1s"] == pytest.approx(1.0) and r["l2_avg_1s"] == pytest.approx(0.75)
    assert r["l2_at_2s"] == pytest.approx(2.0) and r["l2_avg_2s"] == pytest.approx(1.25)
    assert r["l2_at_3s"] == pytest.approx(3.0) and r["l2_avg_3s"] == pytest.approx(1.75)
    assert r["collision_at_3s"] == 0.0 and r["times"] == pytest.approx([0.5, 1, 1.5, 2, 2.5, 3])


def test_oriented_box_overlap():
    a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0]] * 4)
    b = np.array([[3.9, 0.0, 0.0, 4.0, 2.0],            # bumpers touch
                  [4.1, 0.0, 0.0, 4.0, 2.0],            # 0.1 m apart
                  [3.0, 2.5, np.pi / 4, 4.0, 2.0],      # rotated corner reaching into a
                  [0.0, 2.1, 0.0, 4.0, 2.0]])           # the next lane, side by side
    assert boxes_overlap(a, b).tolist() == [True, False, True, False]


def test_collision_with_a_stopped_car_ahead_starts_when_the_plan_reaches_it():
    # A car stopped 20 m ahead (annotated every 0.5 s; boxes 4 m long): a plan at 10 m/s overlaps it only at
    # 2.0 s (ego at 20 m); at 1.5 s the ego's front is 1 m short of its rear, at 2.5 s 1 m past its front.
    times = 0.5 * np.arange(1, 7)
    boxes = np.column_stack([times, np.full(6, 20.0), np.zeros(6), np.zeros(6), np.full(6, 4.0), np.full(6, 2.0)])
    hits, _ = collisions(straight(10.0), boxes, np.array([0, 6]), STEP, 3.0, (4.0, 2.0))
    assert hits[0].tolist() == [False, False, False, True, False, False]
    lane_over, _ = collisions(straight(10.0), boxes + [0, 0, 3.5, 0, 0, 0], np.array([0, 6]), STEP, 3.0, (4.0, 2.0))
    assert not lane_over.any()
    r = evaluate_planner(straight(10.0), straight(10.0), boxes, np.array([0, 6]), STEP, (4.0, 2.0))
    assert r["collision_at_1s"] == 0.0 and r["collision_at_2s"] == 1.0 and r["collision_avg_2s"] == 0.25


def test_constant_velocity_is_exact_on_constant_speed():
    cv = constant_velocity(np.array([0.0, 12.0]), T, STEP)
    np.testing.assert_allclose(cv, np.concatenate([straight(0.0), straight(12.0)]))


def test_ego_status_mlp_learns_what_constant_velocity_cannot():
    # Trajectories depend on the state (speed and acceleration in state[3]) and the command (lateral drift).
    rng = np.random.default_rng(0)
    n = 1000
    states = np.zeros((n, 8), np.float32)
    states[:, 0] = rng.uniform(5, 25, n)
    states[:, 3] = rng.uniform(-1, 1, n)
    commands = rng.choice(["turn left", "go straight"], n)
    t = STEP * np.arange(1, T + 1)
    traj = np.zeros((n, T, 2), np.float32)
    traj[:, :, 0] = states[:, :1] * t + 0.5 * 2.0 * states[:, 3:4] * t ** 2
    traj[:, :, 1] = np.where(commands == "turn left", 1.0, 0.0)[:, None] * t ** 2
    mlp = fit_ego_status_mlp(states[:800], commands[:800], traj[:800], epochs=25)
    pred = mlp.predict(states[800:], commands[800:])
    cv = constant_velocity(states[800:, 0], T, STEP)
    report = open_loop_report({"ego_mlp": pred, "const_velocity": cv}, traj[800:], np.zeros((0, 6)),
                              np.zeros(201, np.int64), STEP, (4.0, 2.0))
    assert report["ego_mlp"]["l2_at_3s"] < 0.5 * report["const_velocity"]["l2_at_3s"]
    assert report["ground_truth"]["l2_at_3s"] == 0.0
    assert "ego_mlp" in format_table(report)


def test_plot_is_written(tmp_path):
    report = open_loop_report({"model": straight(9.0), "const_velocity": straight(10.0)}, straight(10.0),
                              np.zeros((0, 6)), np.zeros(2, np.int64), STEP, (4.0, 2.0))
    path = plot_open_loop({"sim": report, "nuscenes": report}, tmp_path / "plots" / "open_loop.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
