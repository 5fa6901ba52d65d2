"""Command following, judged: did the manoeuvre a text command asks for happen in an episode?

Pure functions on what an episode leaves behind (`Trajectory`: per step the time, the lane id, the
lateral offset from that lane's centre and the road the car is on); nothing here drives a car (the
harness is `stages.evaluate_commands`). Two kinds of goal:

- `ExitGoal` (intersection turns, roundabout exits, a merge): the manoeuvre is the first road out
  of the junction the car reaches (``exits`` maps such roads to a label: "left", "exit 2", ...;
  a road is ``"from->to"``, or ``"from->to/lane"`` for one lane of it); the command is followed
  when that label is the ``expected`` one, within ``time_limit`` seconds;
- `LaneGoal` (open road): ``offset`` -1 / +1 asks the car to settle (within ``settle_m`` of the
  centre) in the lane to the left / right of its start lane within ``time_limit`` seconds; 0 asks it
  to keep its start lane for ``time_limit`` seconds: never leave it, and still be driving then.

`judge` says what was observed and whether it is what was asked; `decided` lets a harness stop an
episode as soon as the answer is known. `summarise` turns judged episodes into per-command rates and
the counterfactual rate: pairs of episodes with the same seed and start and two different commands,
counted when both were followed — the behaviour differs, as commanded.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NOT_DONE = "none"            # observed when no manoeuvre of the goal's kind happened (or not in time)
KEPT_LANE = "kept lane"
CHANGED_LEFT = "changed left"
CHANGED_RIGHT = "changed right"


@dataclass(frozen=True)
class Trajectory:
    """One episode, per step (the reset's state first): what the judge reads."""

    times: Sequence[float]                 # s since the reset
    lane_ids: Sequence[int]                # lane of the current road, 0 = leftmost
    lateral: Sequence[float]               # m from that lane's centre
    roads: Sequence[str]                   # the road and lane the car is on, e.g. "il1->o1/0"
    ended: bool = False                    # the episode is over (no later step will come)

    def __post_init__(self) -> None:
        n = len(self.times)
        if not n or any(len(x) != n for x in (self.lane_ids, self.lateral, self.roads)):
            raise ValueError(f"a trajectory needs the same number (> 0) of times, lane ids, offsets and roads; got "
                             f"{n}, {len(self.lane_ids)}, {len(self.lateral)}, {len(self.roads)}")


@dataclass(frozen=True)
class ExitGoal:
    expected: str                          # the label of the exit the command asks for
    exits: Mapping[str, str]               # road -> label of the exit it belongs to
    time_limit: float = 60.0               # s


@dataclass(frozen=True)
class LaneGoal:
    offset: int                            # -1 left, +1 right, 0 keep the lane
    time_limit: float = 8.0                # s
    settle_m: float = 1.0                  # m from the target lane's centre that counts as arrived

    def __post_init__(self) -> None:
        if self.offset not in (-1, 0, 1):
            raise ValueError(f"LaneGoal offset={self.offset}: -1 (left), 0 (keep) or +1 (right)")

    @property
    def expected(self) -> str:
        return {-1: CHANGED_LEFT, 0: KEPT_LANE, 1: CHANGED_RIGHT}[self.offset]


Goal = ExitGoal | LaneGoal


@dataclass(frozen=True)
class Outcome:
    observed: str                          # what the car did (a label of the goal's kind, or NOT_DONE)
    followed: bool                         # observed == the goal's expected label
    decided: bool                          # no later step can change the outcome
    at: float | None = None                # s: when the observed manoeuvre was complete


def judge(goal: Goal, traj: Trajectory) -> Outcome:
    """What the car did in ``traj`` and whether it is what ``goal`` asked (see the module docstring)."""
    if isinstance(goal, ExitGoal):
        return _judge_exit(goal, traj)
    return _judge_lane(goal, traj)


def decided(goal: Goal, traj: Trajectory) -> bool:
    return judge(goal, traj).decided


def _outcome(goal: Goal, observed: str, decided_: bool, at: float | None = None) -> Outcome:
    return Outcome(observed, observed == goal.expected, decided_, at)


def _judge_exit(goal: ExitGoal, traj: Trajectory) -> Outcome:
    for t, road in zip(traj.times, traj.roads):
        if t > goal.time_limit:
            return _outcome(goal, NOT_DONE, True)
        label = goal.exits.get(road, goal.exits.get(road.split("/")[0]))
        if label is not None:
            return _outcome(goal, label, True, float(t))
    return _outcome(goal, NOT_DONE, traj.ended)


def _judge_lane(goal: LaneGoal, traj: Trajectory) -> Outcome:
    start = traj.lane_ids[0]
    left_lane = False
    for t, lane, lat in zip(traj.times, traj.lane_ids, traj.lateral):
        if t > goal.time_limit:
            break
        if lane != start:
            left_lane = True
            if abs(lane - start) == 1 and abs(lat) <= goal.settle_m:
                return _outcome(goal, CHANGED_LEFT if lane < start else CHANGED_RIGHT, True, float(t))
    else:
        # The window is not over: the car may still change lanes, unless the episode ended first.
        return _outcome(goal, NOT_DONE, traj.ended)
    # The time limit passed: it kept its lane only if it never left it.
    return _outcome(goal, NOT_DONE if left_lane else KEPT_LANE, True, None if left_lane else goal.time_limit)


# ------------------------------------------------------------------------------------------------
# Rates
# ------------------------------------------------------------------------------------------------

@dataclass
class Judged:
    """One judged episode: which scenario, seed and command, and the outcome."""

    scenario: str
    seed: int
    command: str
    observed: str
    followed: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "seed": self.seed, "command": self.command, "observed": self.observed,
                "followed": self.followed, **self.extra}


def _rate(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def counterfactual_pairs(episodes: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Every pair of episodes with the same scenario and seed and different commands."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for e in episodes:
        groups.setdefault((e["scenario"], int(e["seed"])), []).append(e)
    return [(a, b) for group in groups.values() for a, b in itertools.combinations(group, 2)
            if a["command"] != b["command"]]


def summarise(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rates over judged episodes (dicts with ``scenario``, ``seed``, ``command``, ``observed``, ``followed``).

    ``command_following_rate`` (all episodes), ``by_command`` (command -> rate), ``by_scenario``
    (scenario -> command -> rate), ``counterfactual_rate`` (pairs both followed), ``counterfactual_differs``
    (pairs whose observed manoeuvres differ at all), ``pairs`` and ``episodes``. A rate over nothing is None.
    """
    by_command: dict[str, list[bool]] = {}
    by_scenario: dict[str, dict[str, list[bool]]] = {}
    for e in episodes:
        by_command.setdefault(e["command"], []).append(bool(e["followed"]))
        by_scenario.setdefault(e["scenario"], {}).setdefault(e["command"], []).append(bool(e["followed"]))
    pairs = counterfactual_pairs(episodes)
    return {
        "command_following_rate": _rate(bool(e["followed"]) for e in episodes),
        "by_command": {c: _rate(v) for c, v in by_command.items()},
        "by_scenario": {s: {c: _rate(v) for c, v in cs.items()} for s, cs in by_scenario.items()},
        "counterfactual_rate": _rate(bool(a["followed"] and b["followed"]) for a, b in pairs),
        "counterfactual_differs": _rate(a["observed"] != b["observed"] for a, b in pairs),
        "pairs": len(pairs),
        "episodes": len(episodes),
    }
