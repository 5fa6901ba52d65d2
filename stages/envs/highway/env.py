"""`DrivingEnv` on highway-env: the embedded backend of `stages.envs.base.DrivingEnvBase`.

What highway-env does not give, the modules beside this one add: a route per scenario
(`missions`, `route`) — from which come the lateral offset, heading error, route completion and the
text command — and the observation image (`camera`). The base class runs the episode: seeding,
counting, the episode ends (terminated on a collision or leaving the road, truncated at
``max_episode_steps`` or when the route is completed) and the reward, `compute_driving_reward`, as
on every backend.

Frame: highway-env's world, x right and y down in the rendered image; positive yaw / steer turn right
(as in CARLA). Poses and velocities leave in ``info`` in a right-handed frame, as the CARLA bridge
reports them.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from stages.envs import captions
from stages.envs.base import DrivingEnvBase
from stages.envs.config import EnvConfig
from stages.envs.geometry import wrap_angle
from stages.envs.highway.camera import Camera
from stages.envs.highway.missions import Mission, mission_for
from stages.envs.highway.route import LaneIndex, LaneRoute
from stages.envs.highway.sims import (
    MAX_ACCELERATION, MAX_BRAKING, class_path, highway_env_config, predict_constant_speed, sim_class)

log = logging.getLogger(__name__)

OFF_ROAD_MARGIN = 1.0            # m beyond a lane's edge before the car counts as off the road


class DrivingEnv(DrivingEnvBase):
    """The driving env on highway-env (see the module docstring)."""

    def __init__(self, cfg: EnvConfig | None = None, seed: int | None = None,
                 render_mode: str | None = None) -> None:
        cfg = cfg or EnvConfig()
        if cfg.backend != "highway":
            raise ValueError(f"DrivingEnv is the highway backend; got backend={cfg.backend!r}")
        super().__init__(scenario=cfg.scenario, image_size=cfg.image_size, policy_frequency=cfg.policy_frequency,
                         max_episode_steps=cfg.max_episode_steps, reward_config=cfg.resolved_reward(),
                         seed=cfg.seed if seed is None else seed, render_mode=render_mode)
        self.cfg = cfg
        self.camera = Camera(cfg, self.scenario_spec)
        self._mission_class = mission_for(cfg.scenario)
        self.mission: Mission | None = None
        self.sim: Any = None
        self.ego: Any = None
        self.route: LaneRoute | None = None
        self.route_length = 1.0
        self._prev_lane: LaneIndex | None = None

    def close(self) -> None:
        self.camera.close()
        self.sim = None
        super().close()

    # -- the backend's part of the contract -----------------------------------------------------
    def _begin_episode(self, options: dict[str, Any]) -> dict[str, Any]:
        # ``options["command"]``: the evaluation chooses the episode's command (see `missions`).
        command = options.get("command")
        start_config = self._mission_class.reset_config(command)    # refuses a command the scenario lacks
        sim_seed = int(self.np_random.integers(2**31 - 1))
        if self.sim is None:
            self.sim = self._make_sim()
        self.sim.config.update(start_config)
        self.sim.reset(seed=sim_seed)
        self.ego = self.sim.vehicle
        self.ego.MIN_SPEED = 0.0
        self.ego.predict_trajectory_constant_speed = functools.partial(predict_constant_speed, self.ego)
        self._plan_route(command)
        self._command = self.mission.command(self.route, self._time)
        self._frame = self.camera.render(self.sim, self.np_random)
        return self._info()

    def _advance(self, action: np.ndarray) -> None:
        dt = self.seconds_per_step
        accel = float(action[0]) * MAX_ACCELERATION - float(action[2]) * MAX_BRAKING
        accel = max(accel, -self.ego.speed / dt)   # no reverse gear: brake to a stop, not beyond
        self._prev_lane = self.route.lane_index
        self.sim.step(np.array([accel / MAX_BRAKING, float(action[1])], dtype=np.float32))
        if self.ego.speed < 1e-6:
            self.ego.speed = 0.0                   # braked to a stop (float residue of v - v/dt * dt)

    def _measure(self) -> dict[str, Any]:
        r, ego = self.route, self.ego
        r.update(ego.position)
        self._count_infractions(
            # highway-env's crashed flag stays set: a crash is one event.
            collisions=1 if ego.crashed and not self._infractions["collision"] else 0,
            lane_invasions=1 if self._prev_lane[:2] == r.road and self._prev_lane[2] != r.lane_id else 0,
            off_road=not self.on_road(), heading_error=r.heading_error(ego.heading), speed=ego.speed,
            speed_limit=getattr(r.lane, "speed_limit", None))
        self._command = self.mission.command(r, self._time)
        self._frame = self.camera.render(self.sim, self.np_random)
        return self._info()

    def _off_road(self) -> bool:
        return not self.on_road()

    def _tracking_error(self, info: dict[str, Any]) -> tuple[float, float]:
        # With ``offset_reference="route"``: during a lane change the nearest lane's offset flips sign as
        # the car crosses the marking; the offset to the lane the route wants keeps one sign until the
        # change is done, so the expert's steering follows from it (linear R² 0.30 against 0.06).
        r, ego = self.route, self.ego
        if self.cfg.offset_reference == "lane" or r.desired_lane_id() == r.lane_id:
            return float(info["lane_deviation"]), float(info["heading_error"])
        lane = r.path_lanes(1, desired=True)[0][0]
        s, lat = lane.local_coordinates(ego.position)
        return float(lat), float(wrap_angle(ego.heading - lane.heading_at(s)))

    def _front_gap(self) -> float:
        return self.leader()[0]

    # -- views used by the expert, captions and tests --------------------------------------------
    @property
    def route_completion(self) -> float:
        return float(np.clip(self.route.progress / self.route_length, 0.0, 1.0)) if self.route else 0.0

    @property
    def destination(self) -> str | None:
        """The exit node the route leads to (urban, roundabout), else None."""
        return self.mission.destination if self.mission else None

    @property
    def exit_number(self) -> int | None:
        """The roundabout exit (1..3) the route takes, else None."""
        return self.mission.exit_number if self.mission else None

    @property
    def yield_roads(self) -> frozenset[int]:
        """Route roads whose start is a yield line."""
        return self.mission.yield_roads if self.mission else frozenset()

    def on_road(self) -> bool:
        """Is some part of the car on a lane it may be on (highway-env's lane or the route's)?

        highway-env's own test (the centre inside the nearest lane) fails where its road network
        has gaps between connected lanes (the roundabout's entries are 4.5 m off the ring) and on
        some racetrack curves; a car is off the road when its centre is more than half a lane plus
        half a car width away from every lane around it.
        """
        pos = self.ego.position
        lanes = [self.ego.lane] + [lane for lane, _ in self.route.path_lanes(2, desired=False)]
        return any(lane.on_lane(pos, margin=OFF_ROAD_MARGIN) for lane in lanes)

    def leader(self, lateral_margin: float = 0.0, horizon: float = 80.0, desired: bool = False
               ) -> tuple[float, float, Any]:
        """The nearest vehicle (or obstacle) ahead on the route: (bumper gap m, its speed, it).

        A vehicle counts when its centre is within half a lane plus ``lateral_margin`` of the path;
        ``desired`` looks along the lane the route wants rather than the current one.
        """
        ego, best = self.ego, (math.inf, 0.0, None)
        lanes = self.route.path_lanes(3, desired)
        s_ego = self.route.s if not desired else lanes[0][0].local_coordinates(ego.position)[0]
        for other in list(self.sim.road.vehicles) + list(self.sim.road.objects):
            if other is ego or np.linalg.norm(other.position - ego.position) > horizon:
                continue
            for lane, offset in lanes:
                s, lat = lane.local_coordinates(other.position)
                if -2.0 <= s <= lane.length + 2.0 and abs(lat) <= lane.width_at(s) / 2 + lateral_margin:
                    ahead = offset + s - s_ego            # centre to centre, along the path
                    gap = ahead - (ego.LENGTH + other.LENGTH) / 2
                    if ahead > 0 and gap < best[0]:
                        along = other.speed * math.cos(wrap_angle(other.heading - lane.heading_at(s)))
                        best = (max(gap, 0.0), along, other)
                    break
        return best

    def caption(self) -> str:
        r = self.route
        n = r.lanes_count()
        return captions.describe_scene(captions.SceneSnapshot(
            place=self.scenario_spec.description, speed=float(self.ego.speed), command=self._command,
            lane_number=r.lane_id + 1 if n > 1 else None, lanes_count=n, lateral_offset=r.lat,
            neighbours=self._neighbours(), appearance=self.scenario_spec.appearance,
            collided=bool(self.ego.crashed), off_road=not self.on_road()))

    # -- internals -------------------------------------------------------------------------------
    def _make_sim(self) -> Any:
        mission = self._mission_class
        env_id, sim_cfg = highway_env_config(self.cfg)
        sim_cfg["other_vehicles_type"] = class_path(mission.traffic)
        sim_cfg.update(mission.sim_overrides(self.cfg))
        if (self.scenario_spec.vehicles_key is None and not mission.places_own_traffic
                and self.cfg.vehicles_count is not None):
            log.warning("%s has a fixed traffic layout in highway-env; vehicles_count=%s is ignored",
                        env_id, self.cfg.vehicles_count)
        return sim_class(mission.sim_mixin, env_id)(config=sim_cfg)

    def _plan_route(self, command: str | None = None) -> None:
        """Pick the mission (route, destination) of this episode, for ``command`` when one is chosen,
        and the route's length."""
        ego = self.ego
        self.mission = self._mission_class(self.np_random, command)
        episode_distance = 0.8 * self.target_speed * self.cfg.episode_seconds
        self.route, length = self.mission.plan(self.sim.road.network, ego, episode_distance)
        self.route.update(ego.position)
        self.route.progress = 0.0
        self.route_length = max(length, 1.0)
        if self.mission.destination is not None:
            log.debug("route %s -> %s, %.0f m", ego.lane_index, self.mission.destination, self.route_length)

    def _neighbours(self) -> tuple[captions.Neighbour, ...]:
        ego, r = self.ego, self.route
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        out = []
        for v in self.sim.road.vehicles:
            if v is ego:
                continue
            d = v.position - ego.position
            fwd, right = float(d[0] * c + d[1] * s), float(-d[0] * s + d[1] * c)
            if not self.camera.visible(fwd, right, ego.heading):
                continue
            same_road = tuple(v.lane_index[:2]) == r.road
            out.append(captions.Neighbour(
                forward=fwd, right=right, lane_offset=int(v.lane_index[2]) - r.lane_id if same_road else None,
                relative_heading=wrap_angle(v.heading - ego.heading)))
        return tuple(out)

    def _info(self) -> dict[str, Any]:
        ego, r = self.ego, self.route
        vx, vy = ego.velocity
        return {
            # Poses and velocities leave in a right-handed frame (x along the road, y to the left,
            # yaw counter-clockwise), as the CARLA bridge reports them: highway-env's y points down
            # the screen, i.e. to the driver's right.
            "velocity": np.array([vx, -vy, 0.0], dtype=np.float32),
            "speed": float(ego.speed),
            "lane_deviation": float(r.lat),
            "heading_error": float(r.heading_error(ego.heading)),
            "collision": bool(ego.crashed),
            "route_completion": self.route_completion,
            "infractions": dict(self._infractions),
            "ego_pose": np.array([ego.position[0], -ego.position[1], -ego.heading], dtype=np.float32),
            "command": self._command,
            "caption": self.caption(),
            "scenario": self.scenario,
            "lane_index": int(r.lane_id),
        }
