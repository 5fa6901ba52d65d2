"""The CARLA leaderboard's driving score, computed from our envs' ``info["infractions"]``.

The leaderboard (1.0, ``leaderboard/utils/statistics_manager.py``) scores a route ``i`` as

    DS_i = R_i * P_i        P_i = prod_j p_j ** n_ij  *  (1 - outside_lanes_fraction_i)

with ``R_i`` the fraction of the route completed, ``n_ij`` the number of infractions of kind ``j`` and
the penalty coefficients ``p_j`` below; the driving score of a run is the mean of ``DS_i`` over its
routes, and route completion and infraction penalty are averaged the same way. Values here are
fractions in 0..1 (the leaderboard prints percentages: multiply by 100).

How our infraction keys map onto the leaderboard's (both backends report the same keys):

============================  =====================================  ============================
our key                       leaderboard infraction                 effect
============================  =====================================  ============================
``collision_pedestrian``      collision with a pedestrian            x 0.50 each
``collision_vehicle``         collision with a vehicle               x 0.60 each
``collision_static``          collision with the layout (static)     x 0.65 each
``collision`` (untyped)       collision with a vehicle               x 0.60 each; only when no typed
                                                                     key is reported (highway-env's
                                                                     only collidable objects in our
                                                                     scenarios are vehicles)
``red_light``                 running a red light                    x 0.70 each
``stop_sign``                 running a stop sign                    x 0.80 each
``off_road``, ``wrong_way``   outside route lanes (off-road or in    x (1 - fraction of the route
                              the opposite lane)                     driven there)
``lane_invasion``             none (lane changes are legal)          counted, not penalised
``speeding``                  none                                   counted, not penalised
============================  =====================================  ============================

Route-ending events carry no penalty in the leaderboard; they end the route, so ``R_i`` is what was
completed before them. Ours: ``done_reason`` ``off_route`` (route deviation), ``agent_blocked``
(the evaluator's blocked test), ``time_limit`` (route timeout), and ``collision`` / ``off_road``
(our envs end the episode there; the leaderboard drives on, so our ``R_i`` can only be lower).

Counting: ``off_road``, ``wrong_way`` and ``speeding`` count *steps*, CARLA's collision sensor fires
on every frame of a contact, and highway-env's ``collision`` is a 0/1 state. `count_events` turns
any of these per-step counters into *events*: maximal runs of consecutive steps on which the counter
rose (the leaderboard similarly counts one collision per contact, not per frame).

Per-km rates divide event counts by the distance the car actually drove (odometry), floored at 1 m
as the leaderboard floors its kilometres at 0.001, so a car that crashes at the start scores badly
rather than dividing by zero. The leaderboard's distance is ``R_i`` times the route length instead,
which does not count driving off the route. ``infractions_per_km`` counts the leaderboard's kinds
(collisions, red lights, stop signs, outside-lanes events); lane invasions and speeding appear only
in the per-type rates.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

# The leaderboard's penalty coefficients (statistics_manager.py: PENALTY_*).
PENALTY_COEFFICIENTS: Mapping[str, float] = MappingProxyType({
    "collision_pedestrian": 0.50,
    "collision_vehicle": 0.60,
    "collision_static": 0.65,
    "red_light": 0.70,
    "stop_sign": 0.80,
})
TYPED_COLLISIONS: tuple[str, ...] = ("collision_pedestrian", "collision_vehicle", "collision_static")
UNTYPED_COLLISION = "collision"
# Our keys whose route share is the leaderboard's "outside route lanes" infraction.
OUTSIDE_LANES_KEYS: tuple[str, ...] = ("off_road", "wrong_way")
# The leaderboard's kilometre floor (0.001 km) for per-km rates.
MIN_KM = 0.001


@dataclass(frozen=True)
class RouteScore:
    """One route (episode): completion ``R``, penalty ``P`` and driving score ``R * P``, all in 0..1."""

    route_completion: float
    infraction_penalty: float
    driving_score: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def count_events(counters: Sequence[Mapping[str, float]]) -> dict[str, int]:
    """Events per key from a sequence of per-step cumulative counters (``info["infractions"]``).

    An event is a maximal run of consecutive steps on which the key's counter rose; a counter that
    stays up (highway-env's 0/1 ``collision``) or falls back is not counted again.
    """
    events: dict[str, int] = {}
    previous: Mapping[str, float] = {}
    rising: dict[str, bool] = {}
    for step in counters:
        for key, value in step.items():
            events.setdefault(key, 0)
            rose = float(value) > float(previous.get(key, 0))
            if rose and not rising.get(key, False):
                events[key] += 1
            rising[key] = rose
        previous = step
    return events


def collision_counts(events: Mapping[str, int]) -> dict[str, int]:
    """Collisions by leaderboard kind: the typed keys when the backend reports any, else the untyped
    ``collision`` counted as collisions with vehicles."""
    if any(k in events for k in TYPED_COLLISIONS):
        return {k: int(events.get(k, 0)) for k in TYPED_COLLISIONS}
    return {"collision_pedestrian": 0, "collision_vehicle": int(events.get(UNTYPED_COLLISION, 0)),
            "collision_static": 0}


def penalised_counts(events: Mapping[str, int]) -> dict[str, int]:
    """The counts the penalty multiplies in, keyed like `PENALTY_COEFFICIENTS`."""
    counts = collision_counts(events)
    counts["red_light"] = int(events.get("red_light", 0))
    counts["stop_sign"] = int(events.get("stop_sign", 0))
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad:
        raise ValueError(f"infraction counts must be >= 0, got {bad}")
    return counts


def infraction_penalty(events: Mapping[str, int], outside_lanes_fraction: float = 0.0) -> float:
    """``P = prod_j p_j ** n_j * (1 - outside_lanes_fraction)``: 1.0 for a clean route."""
    if not 0.0 <= outside_lanes_fraction <= 1.0 + 1e-9:
        raise ValueError(f"outside_lanes_fraction={outside_lanes_fraction} must lie in 0..1")
    penalty = 1.0
    for key, count in penalised_counts(events).items():
        penalty *= PENALTY_COEFFICIENTS[key] ** count
    return penalty * (1.0 - min(outside_lanes_fraction, 1.0))


def score_route(route_completion: float, events: Mapping[str, int],
                outside_lanes_fraction: float = 0.0) -> RouteScore:
    """`RouteScore` of one route from its completion (0..1), infraction events and the share of the
    route driven outside its lanes."""
    if not 0.0 <= route_completion <= 1.0 + 1e-9:
        raise ValueError(f"route_completion={route_completion} must lie in 0..1")
    r = min(float(route_completion), 1.0)
    p = infraction_penalty(events, outside_lanes_fraction)
    return RouteScore(route_completion=r, infraction_penalty=p, driving_score=max(r * p, 0.0))


def total_infractions(events: Mapping[str, int]) -> int:
    """The leaderboard's infractions: collisions (each contact once), red lights, stop signs and
    outside-lanes events. Lane invasions and speeding are not infractions there (a commanded lane
    change crosses a line); they stay in the per-type figures."""
    counts = penalised_counts(events)
    return int(sum(counts.values()) + sum(int(events.get(k, 0)) for k in OUTSIDE_LANES_KEYS))


def summarise(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate episode records into the run's figures.

    Each record needs ``route_completion`` (0..1), ``infraction_events`` (dict), ``distance_m``,
    ``seconds`` and optionally ``outside_lanes_completion`` (route share driven outside the lanes)
    and ``done_reason``. Returns the leaderboard means (``driving_score``, ``route_completion``,
    ``infraction_penalty``), ``km_driven``, ``collisions_per_km``, ``infractions_per_km`` (the
    leaderboard's kinds, see `total_infractions`), ``infractions_per_km_by_type`` (every key, lane
    invasions included), ``mean_speed`` (m/s: distance over time), ``done_reasons`` and ``episodes``.
    """
    if not episodes:
        raise ValueError("summarise() needs at least one episode")
    scores = [score_route(e["route_completion"], e["infraction_events"],
                          float(e.get("outside_lanes_completion", 0.0))) for e in episodes]
    n = len(scores)
    distance = sum(float(e["distance_m"]) for e in episodes)
    seconds = sum(float(e["seconds"]) for e in episodes)
    km = max(distance / 1000.0, MIN_KM)
    by_type: dict[str, int] = {}
    collisions = infractions = 0
    reasons: dict[str, int] = {}
    for e in episodes:
        ev = e["infraction_events"]
        for key, value in ev.items():
            by_type[key] = by_type.get(key, 0) + int(value)
        collisions += sum(collision_counts(ev).values())
        infractions += total_infractions(ev)
        reason = str(e.get("done_reason") or "unknown")
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "driving_score": sum(s.driving_score for s in scores) / n,
        "route_completion": sum(s.route_completion for s in scores) / n,
        "infraction_penalty": sum(s.infraction_penalty for s in scores) / n,
        "km_driven": distance / 1000.0,
        "collisions_per_km": collisions / km,
        "infractions_per_km": infractions / km,
        "infractions_per_km_by_type": {k: v / km for k, v in sorted(by_type.items())},
        "mean_speed": distance / seconds if seconds > 0 else 0.0,
        "done_reasons": dict(sorted(reasons.items())),
        "episodes": n,
    }

