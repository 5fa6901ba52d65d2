"""Command following in closed loop: drive episodes whose command the evaluation chooses, and judge them.

For every scenario whose command decides the manoeuvre (urban: turn left / go straight / turn right;
highway, night, rain: change to the left / right lane, follow the lane; roundabout: the first /
second / third exit; merge), each held-out seed is driven once per command, the command chosen at
reset (``env.reset(seed=s, options={"command": c})``: the same start and traffic for every command
of a seed). An episode stops as soon as the judge (`stages.metrics.commands`) knows the answer, when
it ends, or when the car has stood still for ``blocked_seconds``. The same seeds driven with two
commands are the counterfactual pairs.

Drivers: `model_driver` (a DrivingVLA checkpoint, its mode by default) and `expert_driver` (the
scripted expert: the ceiling of the rates, since it reads the route the command built).
Only the highway backend lets the evaluation choose a command.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from stages.envs import captions, make_env
from stages.envs.config import EnvConfig
from stages.envs.scenarios import SCENARIOS
from stages.envs.highway.missions import (
    LANE_CHANGE_SECONDS, IntersectionMission, MergeMission, OpenRoadMission, RoundaboutMission, commands_for,
    mission_for)
from stages.metrics.commands import ExitGoal, Goal, LaneGoal, Trajectory, judge
from stages.rl.evaluation import BLOCKED_SPEED, step_seconds
from stages.training import TokenCache

log = logging.getLogger(__name__)

Driver = Callable[[dict[str, Any], Any], np.ndarray]     # (observation, env) -> [throttle, steer, brake]

TURN_SECONDS = 30.0           # s to reach an intersection's exit road (waiting to give way included)
ROUNDABOUT_SECONDS = 40.0     # s to reach the roundabout's exit road
MERGE_SECONDS = 20.0          # s to reach a main-road lane from the ramp
_TURN_LABELS = {captions.TURN_LEFT: "left", captions.GO_STRAIGHT: "straight", captions.TURN_RIGHT: "right"}


def _roads(pairs: dict[tuple[str, str], str]) -> dict[str, str]:
    return {f"{a}->{b}": label for (a, b), label in pairs.items()}


def goal_for(scenario: str, command: str) -> Goal:
    """What counts as ``command`` followed in ``scenario`` (ValueError for a command it cannot choose)."""
    mission = mission_for(scenario)
    mission.check_command(command)
    if issubclass(mission, IntersectionMission):
        return ExitGoal(_TURN_LABELS[command], _roads(mission.EXIT_ROADS), TURN_SECONDS)
    if issubclass(mission, RoundaboutMission):
        return ExitGoal(f"exit {mission.COMMANDS.index(command) + 1}", _roads(mission.EXIT_ROADS), ROUNDABOUT_SECONDS)
    if issubclass(mission, MergeMission):
        main = {f"{a}->{b}/{lane}": "merged" for a, b in mission.MAIN_ROAD for lane in (0, 1)}
        return ExitGoal("merged", main, MERGE_SECONDS)
    if issubclass(mission, OpenRoadMission):
        return LaneGoal(mission.LANE_STEP[command], LANE_CHANGE_SECONDS)
    raise ValueError(f"no goal for scenario={scenario!r}")


def command_scenarios(scenarios: Iterable[str]) -> list[str]:
    """Those of ``scenarios`` whose command the evaluation can choose."""
    return [s for s in scenarios if commands_for(s)]


# ------------------------------------------------------------------------------------------------
# Drivers
# ------------------------------------------------------------------------------------------------

def model_driver(model: torch.nn.Module, device: str | torch.device = "cpu", deterministic: bool = True) -> Driver:
    model.eval()
    tokens = TokenCache(model)

    @torch.no_grad()
    def act(obs: dict[str, Any], env: Any) -> np.ndarray:
        image = torch.as_tensor(obs["image"][None], device=device)
        state = torch.as_tensor(obs["state"][None], device=device)
        action, _, _ = model.act(image, state, tokens([str(obs["command"])], device), deterministic=deterministic)
        return action[0].cpu().numpy()

    return act


def expert_driver(noise: float = 0.0, seed: int = 0) -> Driver:
    from stages.envs import ExpertDriver

    expert = ExpertDriver(noise=noise, rng=seed)
    return lambda obs, env: expert.act(env)


# ------------------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------------------

def _road_of(env: Any) -> str:
    """The road and lane the car is on (highway-env's nearest lane, whatever the route planned)."""
    a, b, lane = env.unwrapped.ego.lane_index
    return f"{a}->{b}/{lane}"


def drive_commanded(env: Any, driver: Driver, seed: int, command: str, goal: Goal,
                    blocked_seconds: float | None = 10.0) -> dict[str, Any]:
    """One episode of ``seed`` with ``command`` chosen at reset, stopped once the judge has decided.

    Returns the record: ``seed``, ``command``, ``observed``, ``followed``, ``at`` (s, when the
    manoeuvre was complete, else None), ``steps``, ``seconds``, ``done_reason`` ("" when the judge
    stopped it, "agent_blocked" when the car stood still too long).
    """
    dt = step_seconds(env)
    blocked = None if blocked_seconds is None else max(1, round(blocked_seconds / dt))
    obs, info = env.reset(seed=seed, options={"command": command})
    times, lanes, lateral, roads = [0.0], [int(info["lane_index"])], [float(info["lane_deviation"])], [_road_of(env)]
    steps, still, done_reason = 0, 0, ""
    outcome = judge(goal, Trajectory(times, lanes, lateral, roads))
    while not outcome.decided:
        obs, _, terminated, truncated, info = env.step(driver(obs, env))
        steps += 1
        times.append(steps * dt)
        lanes.append(int(info["lane_index"]))
        lateral.append(float(info["lane_deviation"]))
        roads.append(_road_of(env))
        still = still + 1 if abs(float(info.get("speed", 0.0))) < BLOCKED_SPEED else 0
        ended = terminated or truncated or (blocked is not None and still >= blocked)
        if ended:
            done_reason = str(info.get("done_reason") or "") if terminated or truncated else "agent_blocked"
        outcome = judge(goal, Trajectory(times, lanes, lateral, roads, ended=ended))
    return {"seed": int(seed), "command": command, "observed": outcome.observed, "followed": outcome.followed,
            "at": outcome.at, "steps": steps, "seconds": round(steps * dt, 3), "done_reason": done_reason}


def drive_commands(env_cfg: EnvConfig, driver: Driver, scenarios: Sequence[str], seeds: Sequence[int],
                   blocked_seconds: float | None = 10.0, done: dict[str, dict[str, Any]] | None = None,
                   on_episode: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every (scenario, seed, command) of ``scenarios`` x ``seeds`` x the scenario's commands, keyed
    ``"<scenario>/<seed>/<command>"``. Keys already in ``done`` are not driven again; ``on_episode(key,
    record)`` is called after each new episode (to save progress)."""
    if env_cfg.backend != "highway":
        raise ValueError(f"command following is measured on the highway backend; env.backend={env_cfg.backend!r}")
    records = dict(done or {})
    for scenario in scenarios:
        commands = commands_for(scenario)
        if not commands:
            raise ValueError(f"scenario {scenario!r} has no command to choose; pick from those with one: "
                             f"{command_scenarios(SCENARIOS)}")
        todo = [(seed, c) for seed in seeds for c in commands if f"{scenario}/{seed}/{c}" not in records]
        if not todo:
            continue
        env = make_env(env_cfg.model_copy(update={"scenario": scenario}), seed=int(seeds[0]))
        try:
            for seed, command in todo:
                record = {"scenario": scenario, **drive_commanded(env, driver, seed, command,
                                                                    goal_for(scenario, command), blocked_seconds)}
                key = f"{scenario}/{seed}/{command}"
                records[key] = record
                log.info("command following %s seed %d %r: observed %s (%s)", scenario, seed, command,
                         record["observed"], "followed" if record["followed"] else "not followed")
                if on_episode is not None:
                    on_episode(key, record)
        finally:
            env.close()
    return records
