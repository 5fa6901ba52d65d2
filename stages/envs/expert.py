"""`ExpertDriver`: a privileged scripted driver for the highway backend (data collection, baselines).

It reads the simulator state directly (`DrivingEnv.sim`, its `LaneRoute`), not the observation:
- lateral: pure pursuit towards a point on the route ahead (lookahead grows with speed); on a lane
  change (the command asks for one, or the lane ends) it aims at the target lane once the gap there
  is safe — MOBIL's safety test (the new follower need not brake harder than 3 m/s²) and room ahead;
- longitudinal: IDM towards the target speed, lowered ahead of bends (lateral acceleration bound),
  gap keeping to the vehicle ahead on the path, and yielding: other vehicles' predicted paths
  (along their routes) are checked against the ego's over the next seconds, and a predicted
  conflict is a stopped obstacle just before the conflict point — unless the ego is too close to
  stop comfortably, in which case it clears the conflict zone.

``noise > 0`` perturbs it with Ornstein-Uhlenbeck (temporally correlated) noise on the aimed lateral
offset, the target speed and the steering; the controller keeps running on the true state, so every
perturbation is followed by a recovery (what offline RL data needs for diversity). `act` returns the
action applied; `clean_action` holds the unperturbed expert action of the same step.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from highway_env import utils as hutils

from stages.envs.geometry import wrap_angle
from stages.envs.highway.env import DrivingEnv
from stages.envs.highway.sims import MAX_ACCELERATION, MAX_BRAKING, MAX_STEERING

# IDM parameters of the ego (highway-env's traffic uses similar ones).
ACC_MAX = 3.0          # m/s²
DECEL_COMFORT = 3.0    # m/s²
JAM_DISTANCE = 4.0     # m
TIME_HEADWAY = 1.2     # s
DELTA = 4.0
LAT_ACC_MAX = 2.5      # m/s², bound used to slow down ahead of bends
SAFE_DECEL = 3.0       # m/s², MOBIL safety criterion for lane changes
WHEELBASE = 5.0        # m, highway-env's bicycle model: heading rate ≈ v·δ / LENGTH
HORIZON = np.arange(0.5, 5.01, 0.5)   # s, prediction times of the conflict check


def idm_acceleration(v: float, v0: float, gap: float = math.inf, v_lead: float = 0.0) -> float:
    """IDM: free-road term towards ``v0`` and interaction term with a leader ``gap`` metres ahead."""
    v0 = max(v0, 0.1)
    acc = ACC_MAX * (1.0 - (max(v, 0.0) / v0) ** DELTA)
    if math.isfinite(gap):
        s_star = JAM_DISTANCE + max(0.0, v * TIME_HEADWAY + v * (v - v_lead) / (2 * math.sqrt(ACC_MAX * DECEL_COMFORT)))
        acc -= ACC_MAX * (s_star / max(gap, 0.1)) ** 2
    return acc


class ExpertDriver:
    """Scripted driver; ``act(env)`` returns ``[throttle, steer, brake]`` for the env's current state."""

    def __init__(self, noise: float = 0.0, rng: np.random.Generator | int | None = None) -> None:
        if noise < 0:
            raise ValueError(f"noise={noise} must be >= 0")
        self.noise = float(noise)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.clean_action = np.zeros(3, dtype=np.float32)
        self._episode: tuple[int, int] | None = None
        self._ou = np.zeros(3)          # lateral offset (m), speed factor, steer

    def reset(self) -> None:
        """Forget the noise state (done automatically when the env starts a new episode)."""
        self._ou[:] = 0.0

    # -- public --------------------------------------------------------------------------------
    def act(self, env: Any) -> np.ndarray:
        base = getattr(env, "unwrapped", env)
        if not isinstance(base, DrivingEnv):
            raise TypeError(f"ExpertDriver drives the highway backend's DrivingEnv, got {type(base).__name__}")
        episode = (id(base), base.episode_id)
        if episode != self._episode:
            self._episode = episode
            self.reset()
        dt = base.seconds_per_step
        if self.noise > 0:
            self._step_noise(dt)
        lat_offset, speed_factor, steer_noise = self._ou if self.noise > 0 else (0.0, 0.0, 0.0)

        target_lane_ok = self._lane_change_safe(base)
        steer = self._steer(base, use_desired=target_lane_ok, lateral=lat_offset)
        accel = self._acceleration(base, target_lane_ok, speed_factor)
        self.clean_action = self._to_action(self._steer(base, target_lane_ok, 0.0) if self.noise > 0 else steer,
                                            self._acceleration(base, target_lane_ok, 0.0) if self.noise > 0 else accel)
        # Steering noise shrinks with speed: the same wheel angle is a much harder swerve at 25 m/s.
        steer += steer_noise / (1.0 + (base.ego.speed / 8.0) ** 2)
        return self._to_action(steer, accel)

    # -- noise ---------------------------------------------------------------------------------
    def _step_noise(self, dt: float) -> None:
        theta = np.array([0.5, 0.3, 2.0])                       # 1/s: slow drift, quick steer jitter
        sigma = self.noise * np.array([1.2, 0.25, 0.6])          # stationary std ≈ sigma / sqrt(2 theta)
        self._ou += -theta * self._ou * dt + sigma * math.sqrt(dt) * self.rng.standard_normal(3)
        self._ou[0] = float(np.clip(self._ou[0], -1.5, 1.5))     # stay (mostly) inside the lane
        self._ou[1] = float(np.clip(self._ou[1], -0.5, 0.3))

    # -- lateral ---------------------------------------------------------------------------------
    @staticmethod
    def _steer(env: DrivingEnv, use_desired: bool, lateral: float) -> float:
        ego, route = env.ego, env.route
        v = max(ego.speed, 1.0)
        changing = use_desired and route.desired_lane_id() != route.lane_id
        lookahead = float(np.clip(0.9 * v, 6.0, 25.0)) * (1.3 if changing else 1.0)
        target, _ = route.point_ahead(lookahead, lateral=lateral, desired=use_desired)
        d = target - ego.position
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        x, y = d[0] * c + d[1] * s, -d[0] * s + d[1] * c     # forward, right
        alpha = math.atan2(y, x)
        delta = math.atan2(2.0 * WHEELBASE * math.sin(alpha), max(math.hypot(x, y), 1.0))
        return delta / MAX_STEERING

    # -- lane changes ----------------------------------------------------------------------------
    def _lane_change_safe(self, env: DrivingEnv) -> bool:
        """Is it safe to steer towards the lane the route wants (True when it is the current one)?"""
        route, ego = env.route, env.ego
        if route.desired_lane_id() == route.lane_id:
            return True
        target_lane = env.sim.road.network.get_lane((*route.road, route.desired_lane_id()))
        s_ego, _ = target_lane.local_coordinates(ego.position)
        front_gap, front_v, rear_gap, rear_v = math.inf, 0.0, math.inf, 0.0
        for other in env.sim.road.vehicles:
            if other is ego or np.abs(other.position - ego.position).max() > 80:
                continue
            s, lat = target_lane.local_coordinates(other.position)
            if abs(lat) > target_lane.width_at(s) / 2 + 0.5:
                continue
            ds = s - s_ego
            gap = abs(ds) - (ego.LENGTH + other.LENGTH) / 2
            if gap < 1.0:
                return False                                   # someone is right beside us
            if ds > 0 and gap < front_gap:
                front_gap, front_v = gap, other.speed
            elif ds <= 0 and gap < rear_gap:
                rear_gap, rear_v = gap, other.speed
        v = ego.speed
        # MOBIL's safety criterion for the new follower; for the ego, room ahead (half a second)
        # is enough since its own IDM then settles the gap.
        theirs = idm_acceleration(rear_v, max(rear_v, 1.0), rear_gap, v)
        return theirs >= -SAFE_DECEL and front_gap >= max(5.0, 0.5 * v) + max(0.0, v - front_v)

    # -- longitudinal ----------------------------------------------------------------------------
    def _acceleration(self, env: DrivingEnv, target_lane_ok: bool, speed_factor: float) -> float:
        ego, route = env.ego, env.route
        v = ego.speed
        v0 = min(env.target_speed * (1.0 + speed_factor), self._curve_speed(env))
        gap, v_lead, _ = env.leader(lateral_margin=0.6)
        if target_lane_ok and route.desired_lane_id() != route.lane_id:
            g2, v2, _ = env.leader(lateral_margin=0.6, desired=True)
            if g2 < gap:
                gap, v_lead = g2, v2
        g3, v3 = self._blocking_ahead(env)
        if g3 < gap:
            gap, v_lead = g3, v3
        acc = idm_acceleration(v, v0, gap, v_lead)
        conflict = self._conflict_distance(env, v0)
        if conflict is not None:
            acc = min(acc, idm_acceleration(v, v0, conflict, 0.0))
        return acc

    @staticmethod
    def _blocking_ahead(env: DrivingEnv, reach: float = 12.0) -> tuple[float, float]:
        """Bumper gap and speed of whatever sits right in front of the car, lanes or not.

        The lane-based leader misses vehicles off the lanes (crashed cars, the gaps highway-env's
        networks leave between connected lanes); this looks straight ahead over a short range.
        """
        ego = env.ego
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        best = (math.inf, 0.0)
        for other in [*env.sim.road.vehicles, *env.sim.road.objects]:
            if other is ego:
                continue
            rel = other.position - ego.position
            fwd, right = rel[0] * c + rel[1] * s, -rel[0] * s + rel[1] * c
            if 0.0 < fwd < reach + ego.LENGTH and abs(right) < 0.8 * (ego.WIDTH + other.WIDTH):
                gap = max(fwd - (ego.LENGTH + other.LENGTH) / 2, 0.0)
                if gap < best[0]:
                    best = (gap, other.speed * math.cos(other.heading - ego.heading))
        return best

    @staticmethod
    def _curve_speed(env: DrivingEnv) -> float:
        """Highest speed from which every bend in the next 40 m is taken within LAT_ACC_MAX."""
        route = env.route
        limit = math.inf
        _, h_prev = route.point_ahead(0.0)
        for d in (5.0, 10.0, 15.0, 20.0, 30.0, 40.0):
            _, h = route.point_ahead(d)
            step = 5.0 if d <= 20.0 else 10.0
            kappa = abs(wrap_angle(h - h_prev)) / step
            h_prev = h
            if kappa > 1e-3:
                v_bend = math.sqrt(LAT_ACC_MAX / kappa)
                limit = min(limit, math.sqrt(v_bend ** 2 + 2.0 * DECEL_COMFORT * max(d - step, 0.0)))
        return limit

    def _conflict_distance(self, env: DrivingEnv, v0: float) -> float | None:
        """Bumper gap to the yield line when the ego must give way there, else None.

        Yield lines are where the scenario says (`DrivingEnv.yield_roads`: the start of the junction
        road, of the roundabout ring): approaching one, the ego waits there while another vehicle's
        predicted path overlaps its own in space and time. Past it, it is committed — stopping inside
        a junction blocks the crossing traffic.
        """
        ego, route = env.ego, env.route
        if route.i + 1 not in env.yield_roads:
            return None
        lanes = route.path_lanes(2)
        line = lanes[1][1] - route.s - ego.LENGTH / 2 - 1.0   # gap to the yield line
        v = ego.speed
        if line < v * v / (2 * 4.0) or line > 60.0:
            return None          # too close to stop comfortably (go on), or far away
        t = HORIZON
        dist = self._go_profile(env, v0, t)
        ego_path = [route.point_ahead(float(d)) for d in dist]
        # Only the stretch the yield line guards: the next road (the junction itself).
        junction_end = line + lanes[1][0].length + ego.LENGTH
        beyond = (dist > line) & (dist < junction_end)
        for other in env.sim.road.vehicles:
            if other is ego or np.abs(other.position - ego.position).max() > 80:
                continue
            # Same-direction traffic is the leader's or the lane change's business, not yielding.
            if abs(wrap_angle(other.heading - ego.heading)) < 0.5:
                continue
            positions, headings = self._predict(other, t)
            for k in np.flatnonzero(beyond):
                p, h = ego_path[k]
                # Inflated footprints (as highway-env's own right-of-way check) at the same time.
                if np.abs(positions[k] - p).max() > 2 * ego.LENGTH:
                    continue
                if hutils.rotated_rectangles_intersect(
                        (p, 1.6 * ego.LENGTH, 1.3 * ego.WIDTH, h),
                        (positions[k], 1.6 * other.LENGTH, 1.3 * other.WIDTH, headings[k])):
                    return max(line, 0.0)
        return None

    @staticmethod
    def _go_profile(env: DrivingEnv, v0: float, times: np.ndarray, dt: float = 0.1) -> np.ndarray:
        """Distances the ego covers by ``times`` if it goes: accelerating to ``v0``, slowing for bends."""
        route, v, d = env.route, env.ego.speed, 0.0
        samples = np.arange(0.0, 61.0, 5.0)
        headings = np.array([route.point_ahead(float(x))[1] for x in samples])
        turn = np.abs(wrap_angle(np.diff(headings))) / 5.0   # curvature per 5 m
        v_bend = np.sqrt(LAT_ACC_MAX / np.maximum(turn, 1e-3))
        out, clock = [], 0.0
        for target_t in times:
            while clock < target_t - 1e-9:
                limit = min(v0, float(v_bend[min(int(d // 5.0), len(v_bend) - 1)]))
                v = min(v + ACC_MAX * dt, max(limit, 0.5)) if v < limit else max(limit, v - DECEL_COMFORT * dt)
                d += v * dt
                clock += dt
            out.append(d)
        return np.asarray(out)

    @staticmethod
    def _predict(vehicle: Any, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and headings at ``times``: along its route if it has one, else straight on."""
        if getattr(vehicle, "route", None) is not None and hasattr(vehicle, "target_lane_index"):
            try:
                positions, headings = vehicle.predict_trajectory_constant_speed(times)
                return np.asarray(positions), np.asarray(headings)
            except (KeyError, IndexError, ValueError):
                pass
        return vehicle.position + np.outer(times, vehicle.velocity), np.full(len(times), vehicle.heading)

    # -- output ----------------------------------------------------------------------------------
    @staticmethod
    def _to_action(steer: float, accel: float) -> np.ndarray:
        throttle = max(accel, 0.0) / MAX_ACCELERATION
        brake = max(-accel, 0.0) / MAX_BRAKING
        return np.clip(np.array([throttle, steer, brake], dtype=np.float32),
                       [0.0, -1.0, 0.0], [1.0, 1.0, 1.0]).astype(np.float32)
