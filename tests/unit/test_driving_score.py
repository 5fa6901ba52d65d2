"""Leaderboard-style driving score: hand-computed penalties, event counting, per-km rates, means."""
from __future__ import annotations

import pytest

from stages.metrics.driving_score import (MIN_KM, PENALTY_COEFFICIENTS, collision_counts, count_events,
                                          infraction_penalty, score_route, summarise, total_infractions)


def test_coefficients_are_the_leaderboards():
    assert dict(PENALTY_COEFFICIENTS) == {"collision_pedestrian": 0.50, "collision_vehicle": 0.60,
                                          "collision_static": 0.65, "red_light": 0.70, "stop_sign": 0.80}


def test_clean_route_scores_its_completion():
    s = score_route(0.8, {"collision": 0, "lane_invasion": 3, "speeding": 12})
    assert s.infraction_penalty == 1.0          # lane changes and speeding are not penalised
    assert s.driving_score == pytest.approx(0.8)


def test_penalties_multiply_per_infraction():
    # 1 pedestrian, 2 vehicles, 1 static, 1 red light, 1 stop sign:
    # 0.5 * 0.6^2 * 0.65 * 0.7 * 0.8 = 0.065520
    events = {"collision_pedestrian": 1, "collision_vehicle": 2, "collision_static": 1, "red_light": 1,
              "stop_sign": 1}
    assert infraction_penalty(events) == pytest.approx(0.06552)
    s = score_route(0.5, events)
    assert s.driving_score == pytest.approx(0.5 * 0.06552)


def test_untyped_collision_counts_as_a_vehicle_only_without_typed_keys():
    assert infraction_penalty({"collision": 1}) == pytest.approx(0.6)
    assert infraction_penalty({"collision": 2}) == pytest.approx(0.36)
    # A backend that types its collisions also reports the total: the total must not count again.
    typed = {"collision": 2, "collision_pedestrian": 1, "collision_static": 1}
    assert infraction_penalty(typed) == pytest.approx(0.5 * 0.65)
    assert collision_counts(typed) == {"collision_pedestrian": 1, "collision_vehicle": 0, "collision_static": 1}
    # Lane invasions and speeding are not leaderboard infractions; off-road and wrong-way are.
    assert total_infractions({**typed, "lane_invasion": 3, "speeding": 4, "off_road": 1, "wrong_way": 1}) == 4


def test_outside_lanes_share_scales_the_penalty():
    # A vehicle collision and 10 % of the route driven off-road: 0.6 * 0.9.
    assert infraction_penalty({"collision": 1}, outside_lanes_fraction=0.1) == pytest.approx(0.54)
    assert score_route(0.4, {}, outside_lanes_fraction=0.25).driving_score == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [{"route_completion": 1.5}, {"route_completion": -0.1},
                                 {"outside_lanes_fraction": 2.0}])
def test_out_of_range_inputs_are_refused(bad):
    args = {"route_completion": 0.5, "events": {}, "outside_lanes_fraction": 0.0, **bad}
    with pytest.raises(ValueError):
        score_route(**args)


def test_negative_counts_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        infraction_penalty({"red_light": -1})


def test_events_are_runs_of_rising_counters():
    counters = [
        {"collision": 0, "off_road": 0, "lane_invasion": 0},
        {"collision": 0, "off_road": 1, "lane_invasion": 1},   # off-road run 1 starts; invasion 1
        {"collision": 0, "off_road": 2, "lane_invasion": 1},   # same off-road run
        {"collision": 0, "off_road": 2, "lane_invasion": 2},   # back on the road; invasion 2
        {"collision": 1, "off_road": 3, "lane_invasion": 2},   # off-road run 2; a collision
        {"collision": 1, "off_road": 3, "lane_invasion": 2},   # a 0/1 collision state that stays up
    ]
    assert count_events(counters) == {"collision": 1, "off_road": 2, "lane_invasion": 2}


def test_carla_style_collision_counter_counts_contacts_not_frames():
    # The collision sensor fires on 3 consecutive frames of one contact, then on a second contact.
    counts = [0, 1, 2, 3, 3, 3, 4]
    assert count_events([{"collision": c} for c in counts]) == {"collision": 2}


def _episode(rc, events, distance_m, seconds, outside=0.0, reason="time_limit"):
    return {"route_completion": rc, "infraction_events": events, "distance_m": distance_m, "seconds": seconds,
            "outside_lanes_completion": outside, "done_reason": reason}


def test_summary_means_and_per_km_rates():
    episodes = [
        _episode(1.0, {"collision": 0, "lane_invasion": 1}, 600.0, 30.0, reason="route_completed"),
        _episode(0.5, {"collision": 1, "lane_invasion": 0}, 200.0, 10.0, reason="collision"),
        _episode(0.2, {"collision": 0, "off_road": 1}, 200.0, 20.0, outside=0.1, reason="off_road"),
    ]
    s = summarise(episodes)
    # DS_i = 1.0 * 1, 0.5 * 0.6, 0.2 * 0.9
    assert s["driving_score"] == pytest.approx((1.0 + 0.3 + 0.18) / 3)
    assert s["route_completion"] == pytest.approx(1.7 / 3)
    assert s["infraction_penalty"] == pytest.approx((1.0 + 0.6 + 0.9) / 3)
    assert s["km_driven"] == pytest.approx(1.0)
    assert s["collisions_per_km"] == pytest.approx(1.0)
    assert s["infractions_per_km"] == pytest.approx(2.0)          # the collision and the off-road
    assert s["infractions_per_km_by_type"] == {"collision": 1.0, "lane_invasion": 1.0, "off_road": 1.0}
    assert s["mean_speed"] == pytest.approx(1000.0 / 60.0)
    assert s["done_reasons"] == {"collision": 1, "off_road": 1, "route_completed": 1}
    assert s["episodes"] == 3


def test_per_km_floor_for_a_car_that_never_moved():
    s = summarise([_episode(0.0, {"collision": 1}, 0.0, 0.0, reason="collision")])
    assert s["collisions_per_km"] == pytest.approx(1 / MIN_KM)
    assert s["mean_speed"] == 0.0 and s["driving_score"] == 0.0


def test_summary_needs_episodes():
    with pytest.raises(ValueError):
        summarise([])
