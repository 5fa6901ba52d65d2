"""`CARLABridge`: the driving env on a live CARLA 0.9.16 server, with the embedded backend's interface.

Observation, action, reward and ``info`` are those of `stages.envs.highway_backend.DrivingEnv`
(docs/contracts.md): ``image`` uint8 (S, S, 3) from an RGB camera on the ego, ``state`` float32 in
``STATE_FIELDS`` order, ``command`` text from the route; action ``[throttle, steer, brake]``; reward
`compute_driving_reward`; terminated on a collision or leaving the road (and, CARLA-only, on
straying ``off_route_distance_m`` from the route); truncated at the route's end or
``max_episode_steps``; ``info["done_reason"]`` says which.

How it talks to the server:
- synchronous mode, ``fixed_delta_seconds = control_dt`` with physics sub-steps of ``physics_dt``
  (why: `stages.envs.carla_bridge.config`); one ``step`` = one ``world.tick()`` = one camera frame;
- the camera feeds a queue; ``step`` reads it until the image of the frame ``world.tick()`` returned
  (older frames are dropped: they were rendered by ticks the bridge made while spawning);
- collision and lane-invasion sensors feed event buffers read after each tick;
- the traffic manager runs in synchronous mode on its own port (``traffic_manager_port``), so
  parallel servers do not fight over the default 8000;
- every actor the bridge spawns is tracked and destroyed (sensors stopped first) on reset and close;
  close restores the world settings found on connecting, in asynchronous mode;
- a client time-out or a lost connection becomes `CarlaConnectionError`; the next ``reset()``
  reconnects with a new client (``reconnect()`` is public for a server supervisor). A bridge bound
  to an env slot (``SimulatorConfig.server_slot``) reads its slot's endpoint again from the CARLA
  resource's list before every connection attempt, so it follows a server the supervisor restarted
  on other ports or another host (`stages.envs.carla_bridge.endpoints`). Actors of the
  lost episode are destroyed after reconnecting when the server is still in that episode
  (``carla.World.id``): actor ids are unique only within an episode, so a restarted or reloaded
  server may use them for other actors, and ids of a lost episode are never destroyed there.

`expert_action()` is a privileged route follower (pure pursuit + speed control) for data collection;
the highway backend's `ExpertDriver` reads highway-env internals and does not drive this env.

Frames: CARLA is left-handed (x forward, y right, yaw clockwise seen from above, degrees). The
``state`` and the signed quantities of ``info`` (lateral offset, heading error: positive to the right)
are frame-free; ``info["ego_pose"]`` and ``info["velocity"]`` are converted to drivevla's right-handed
world frame: ``y = -carla_y``, ``vy = -carla_vy``, ``yaw = -radians(carla_yaw)`` (counter-clockwise).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from stages.envs import captions
from stages.envs.carla_bridge.config import SimulatorConfig
from stages.envs.carla_bridge.endpoints import CarlaServerError, slot_endpoint
from stages.envs.carla_bridge.errors import CarlaConnectionError, is_connection_error, load_carla
from stages.envs.carla_bridge.routing import Route, RoutePlanner, RouteTracker
from stages.envs.config import EnvConfig
from stages.envs.rewards import compute_driving_reward
from stages.envs.scenarios import CARLA_TOWNS, get_scenario
from stages.envs.slots import EnvSlotError
from stages.envs.spaces import (
    FRONT_DISTANCE_MAX, action_space, clip_action, make_state, observation_space, sanitize_command)

log = logging.getLogger(__name__)

# Camera on the roof above the windscreen (CARLA's examples mount a forward camera at x=1.5, z=2.4).
CAMERA_MOUNT = (1.5, 0.0, 2.4)
ROUTE_RESOLUTION_M = 2.0           # spacing of route waypoints
MIN_ROUTE_M = 20.0                 # shorter random routes (dead ends) are re-drawn from another spawn point
NPC_CLEARANCE_M = 10.0             # no NPC vehicle spawns this close to the ego
CAPTION_RANGE_M = 50.0             # neighbours further away are not in the caption
# Traffic manager settings persist per TM on the server, so every setup sets them, not only the
# scenarios that change them. "fast" traffic drives 20 % above the speed limit; otherwise the TM's
# own default (30 % below the limit) applies.
FAST_SPEED_DIFFERENCE = -20.0
DEFAULT_SPEED_DIFFERENCE = 30.0
DEFAULT_LEADING_DISTANCE_M = 2.5
WALKER_SPEED_FALLBACK = 1.4        # m/s when a walker blueprint has no recommended speeds
# expert_action: pure pursuit + proportional speed control. CARLA's sedans steer their front wheels
# up to about 70 degrees at steer = 1 (e.g. the Lincoln MKZ's physics control); wheelbase ~2.9 m.
EXPERT_WHEELBASE_M = 2.9
EXPERT_MAX_WHEEL_ANGLE = math.radians(70.0)
EXPERT_MIN_LOOKAHEAD_M = 5.0
EXPERT_LOOKAHEAD_S = 0.8
EXPERT_SPEED_GAIN = 0.5
EXPERT_JUNCTION_SPEED = 6.0        # m/s through junctions
EXPERT_JUNCTION_SLOWDOWN_M = 15.0
EXPERT_STANDSTILL_GAP_M = 5.0
EXPERT_TIME_GAP_S = 1.5


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _town_name(map_name: str) -> str:
    """``"Carla/Maps/Town01"`` (or ``"/Game/Carla/Maps/Town01"``) -> ``"Town01"``."""
    return str(map_name).rstrip("/").rsplit("/", 1)[-1]


def image_to_rgb(image: Any) -> np.ndarray:
    """A `carla.Image` (BGRA bytes, row-major) as an RGB uint8 array (H, W, 3)."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(int(image.height), int(image.width), 4)
    return np.ascontiguousarray(bgra[:, :, 2::-1])


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    import cv2

    shrink = rgb.shape[0] > size or rgb.shape[1] > size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def server_version(host: str = "localhost", port: int = 2000, timeout: float = 10.0,
                   carla_module: Any = None) -> str:
    """The server's version string (readiness probe): raises `CarlaConnectionError` when unreachable."""
    carla = load_carla(carla_module)
    try:
        client = carla.Client(host, int(port))
        client.set_timeout(float(timeout))
        return str(client.get_server_version())
    except RuntimeError as error:
        if is_connection_error(error):
            raise CarlaConnectionError(f"CARLA at {host}:{port} is not ready: {error}") from error
        raise


@dataclass
class _SensorEvents:
    """Collision and lane-invasion events, appended from CARLA's sensor threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    collisions: list[tuple[int, str]] = field(default_factory=list)      # (frame, other actor type)
    invasions: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)  # (frame, marking types)

    def on_collision(self, event: Any) -> None:
        other = getattr(event, "other_actor", None)
        with self.lock:
            self.collisions.append((int(event.frame), str(getattr(other, "type_id", "unknown"))))

    def on_lane_invasion(self, event: Any) -> None:
        kinds = tuple(str(getattr(m.type, "name", m.type)) for m in event.crossed_lane_markings)
        with self.lock:
            self.invasions.append((int(event.frame), kinds))

    def take(self, frame: int) -> tuple[list[tuple[int, str]], list[tuple[int, tuple[str, ...]]]]:
        """Events up to ``frame`` (later ones stay for the next step)."""
        with self.lock:
            col = [e for e in self.collisions if e[0] <= frame]
            inv = [e for e in self.invasions if e[0] <= frame]
            self.collisions = [e for e in self.collisions if e[0] > frame]
            self.invasions = [e for e in self.invasions if e[0] > frame]
        return col, inv

    def clear(self) -> None:
        with self.lock:
            self.collisions.clear()
            self.invasions.clear()


@dataclass
class _Spawned:
    """Every actor this bridge spawned in the current episode, in destruction order."""

    sensors: list[Any] = field(default_factory=list)
    controllers: list[Any] = field(default_factory=list)
    vehicles: list[Any] = field(default_factory=list)
    walkers: list[Any] = field(default_factory=list)
    ego: Any = None
    # Ids whose actor object was never fetched (a batch spawn that failed half-way): still ours.
    loose_ids: list[int] = field(default_factory=list)
    world_id: int | None = None      # the server episode (carla.World.id) these ids belong to

    def ids(self) -> list[int]:
        # Sensors and controllers first: they are attached to / drive the actors destroyed after them.
        actors = [*self.sensors, *self.controllers, *self.vehicles, *self.walkers]
        if self.ego is not None:
            actors.append(self.ego)
        ids = [int(a.id) for a in actors]
        return ids + [i for i in self.loose_ids if i not in ids]


class CARLABridge(gym.Env):
    """The CARLA backend of the driving env (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, config: SimulatorConfig | None = None, carla_module: Any = None,
                 seed: int | None = None, render_mode: str | None = None) -> None:
        super().__init__()
        self.config = config or SimulatorConfig()
        self.carla = load_carla(carla_module)
        self.render_mode = render_mode
        self.scenario = self.config.scenario
        self.spec_ = get_scenario(self.scenario)
        self.reward_config = self.config.resolved_reward()
        self.target_speed = self.reward_config.target_speed
        self.policy_frequency = self.config.policy_frequency
        self.metadata = {**self.metadata, "render_fps": self.config.fps}
        self.observation_space = observation_space(self.config.obs_size)
        self.action_space = action_space()
        self._default_seed = self.config.seed if seed is None else seed
        self._seeded = False
        self.episode_id = 0

        # Server-side handles
        self._client: Any = None
        self._world: Any = None
        self._map: Any = None
        self._tm: Any = None
        self._blueprints: Any = None
        self._planner: RoutePlanner | None = None
        self._planner_town: str | None = None
        self._original_settings: Any = None
        # Actors of an episode lost with the connection: (server episode id, actor ids), destroyed
        # after the next successful connection if the server is still in that episode.
        self._orphans: tuple[int | None, list[int]] | None = None
        self._broken = False             # a connection error happened: the next reset reconnects
        self._episode_ready = False      # an episode is spawned and may be stepped
        self._fresh = False              # built by initialize() and not stepped yet: reset may reuse it

        # Episode
        self._spawned = _Spawned()
        self._images: queue.Queue[Any] = queue.Queue()
        self._events = _SensorEvents()
        self._tracker: RouteTracker | None = None
        self._frame_id = 0
        self._steps = 0
        self._last_action = np.zeros(3, dtype=np.float32)
        self._infractions = self._zero_infractions()
        self._command = captions.FOLLOW_LANE
        self._rgb: np.ndarray | None = None
        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._on_road = True
        self._front_gap = FRONT_DISTANCE_MAX
        self.dropped_frames = 0          # stale camera frames skipped by frame matching (diagnostics)
        if not self.config.render:
            log.warning("render=False: CARLA runs in no_rendering_mode and the observation image is black")

    # ------------------------------------------------------------------------------------------
    # The seed's API
    # ------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Connect, load the town, apply synchronous settings, set up the traffic manager and
        weather, and spawn the first episode (ego, sensors, NPCs). `reset()` calls it when needed."""
        self.reset()
        self._fresh = True

    def reconnect(self, host: str | None = None, port: int | None = None,
                  traffic_manager_port: int | None = None) -> None:
        """Drop the client and connect anew (optionally to a restarted server on other ports).

        Without arguments, a bridge bound to an env slot (``config.server_slot``) connects to its
        slot's endpoint as the CARLA resource lists it now (a server the supervisor restarted may
        have moved); given arguments win. The episode is gone afterwards: the next `reset()` builds
        one. Actors of the old episode are destroyed through the new client when the server
        survived (a restarted server has none).
        """
        explicit = host is not None or port is not None or traffic_manager_port is not None
        if explicit:
            self._set_endpoint(host, port, traffic_manager_port)
        log.warning("reconnecting to CARLA at %s:%s", self.config.carla_host, self.config.carla_port)
        self._forget_episode()
        self._client = self._world = self._map = self._tm = self._blueprints = None
        self._connect_with_retries(follow_slot=not explicit)
        self._setup_world()
        self._broken = False

    # ------------------------------------------------------------------------------------------
    # gymnasium API
    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None and self._fresh and not options and not self._broken:
            # initialize() built this episode and nothing has stepped it: it is the episode this
            # reset would build (same seed), so do not spawn everything twice.
            self._fresh = False
            assert self._obs is not None
            return self._copy_obs(), dict(self._info)
        if seed is None and not self._seeded:
            seed = self._default_seed
        super().reset(seed=seed)
        self._seeded = True
        self._fresh = False
        if self._broken:
            self.reconnect()
        elif self._client is None:
            self._connect_with_retries()
            self._setup_world()
        self._build_episode(options or {})
        assert self._obs is not None
        return self._copy_obs(), dict(self._info)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self._broken:
            raise CarlaConnectionError("the connection to CARLA was lost; call reset() to reconnect")
        if not self._episode_ready:
            raise RuntimeError("call reset() before step()")
        self._fresh = False
        a = clip_action(action)
        carla = self.carla
        with self._guard("step"):
            ego = self._spawned.ego
            ego.apply_control(carla.VehicleControl(throttle=float(a[0]), steer=float(a[1]), brake=float(a[2])))
            frame = int(self._world.tick(self.config.timeout_s))
            self._receive_image(frame)
            self._follow_with_spectator()
        self._frame_id = frame
        self._steps += 1
        self._last_action = a
        collisions, invasions = self._events.take(frame)
        info = self._measure(collisions, invasions)
        done_reason = ""
        terminated = truncated = False
        if info["collision"] and self.config.terminate_on_collision:
            terminated, done_reason = True, "collision"
        elif not self._on_road:
            terminated, done_reason = True, "off_road"
        elif self._tracker is not None and self._tracker.distance > self.config.off_route_distance_m:
            terminated, done_reason = True, "off_route"
        elif self._tracker is not None and self._tracker.finished:
            truncated, done_reason = True, "route_completed"
        elif self._steps >= self.config.max_episode_steps:
            truncated, done_reason = True, "time_limit"
        info["done_reason"] = done_reason
        self._info = info
        reward = compute_driving_reward(self, a, info, self.reward_config)
        self._obs = self._observe()
        return self._copy_obs(), reward, terminated, truncated, dict(info)

    def render(self) -> np.ndarray | None:
        return None if self._rgb is None else self._rgb.copy()

    def close(self) -> None:
        """Destroy every spawned actor and give the server back in asynchronous mode."""
        if self._client is not None and not self._broken:
            try:
                with self._guard("close"):
                    self._destroy_spawned()
                    self._restore_settings()
            except CarlaConnectionError as error:
                log.warning("CARLA unreachable while closing; its actors go with the server: %s", error)
            except RuntimeError as error:
                log.warning("CARLA cleanup on close failed: %s", error)
        elif self._client is not None:
            log.warning("CARLA connection lost: skipping cleanup on the server (its restart clears it)")
        self._forget_episode()
        self._client = self._world = self._map = self._tm = self._blueprints = None
        super().close()

    # ------------------------------------------------------------------------------------------
    # Views shared with the embedded backend (expert, captions, evaluation)
    # ------------------------------------------------------------------------------------------
    @property
    def route_completion(self) -> float:
        return self._tracker.completion if self._tracker is not None else 0.0

    @property
    def command(self) -> str:
        return self._command

    @property
    def route(self) -> Route | None:
        return self._tracker.route if self._tracker is not None else None

    @property
    def ego(self) -> Any:
        return self._spawned.ego

    @property
    def world(self) -> Any:
        return self._world

    @property
    def client(self) -> Any:
        return self._client

    @property
    def traffic_manager(self) -> Any:
        return self._tm

    @property
    def spawned_actor_ids(self) -> list[int]:
        return self._spawned.ids()

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._broken

    def caption(self) -> str:
        return str(self._info.get("caption", ""))

    def expert_action(self, target_speed: float | None = None) -> np.ndarray:
        """A privileged route-following action (data collection, baselines; not the policy's input).

        Pure pursuit towards the route point a speed-dependent distance ahead, and a proportional
        speed controller towards ``target_speed`` (default: the reward's), capped by the speed
        limit, slowed for junctions ahead and for the gap to whatever is ahead on the route.
        """
        if not self._episode_ready or self._tracker is None:
            raise RuntimeError("call reset() before expert_action()")
        tracker, ego = self._tracker, self._spawned.ego
        r = tracker.route
        t = ego.get_transform()
        v = ego.get_velocity()
        yaw = math.radians(t.rotation.yaw)
        speed = float(v.x * math.cos(yaw) + v.y * math.sin(yaw))
        lookahead = max(EXPERT_MIN_LOOKAHEAD_M, EXPERT_LOOKAHEAD_S * speed)
        k = min(int(np.searchsorted(r.s, tracker.progress + lookahead)), len(r) - 1)
        d = r.xy[k] - np.array([t.location.x, t.location.y])
        fwd = d[0] * math.cos(yaw) + d[1] * math.sin(yaw)
        right = -d[0] * math.sin(yaw) + d[1] * math.cos(yaw)
        alpha = math.atan2(right, max(fwd, 1e-3))
        wheel_angle = math.atan2(2.0 * EXPERT_WHEELBASE_M * math.sin(alpha), max(math.hypot(fwd, right), 1.0))
        steer = float(np.clip(wheel_angle / EXPERT_MAX_WHEEL_ANGLE, -1.0, 1.0))

        target = self.target_speed if target_speed is None else float(target_speed)
        limit = float(ego.get_speed_limit()) / 3.6
        if limit > 0:
            target = min(target, limit)
        ahead = slice(tracker.index, int(np.searchsorted(r.s, tracker.progress + EXPERT_JUNCTION_SLOWDOWN_M)))
        if r.junction[ahead].any():
            target = min(target, EXPERT_JUNCTION_SPEED)
        gap = self._front_gap
        if gap < FRONT_DISTANCE_MAX:
            target = min(target, max(0.0, (gap - EXPERT_STANDSTILL_GAP_M) / EXPERT_TIME_GAP_S))
        error = target - speed
        throttle = float(np.clip(EXPERT_SPEED_GAIN * error, 0.0, 0.75))
        brake = float(np.clip(-EXPERT_SPEED_GAIN * error, 0.0, 1.0)) if error < -0.5 or target == 0.0 else 0.0
        if brake > 0:
            throttle = 0.0
        return np.array([throttle, steer, brake], dtype=np.float32)

    # ------------------------------------------------------------------------------------------
    # Connection and world setup
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn the client's connection errors into `CarlaConnectionError` and remember the breakage."""
        try:
            yield
        except CarlaConnectionError:
            self._broken = True
            self._episode_ready = False
            raise
        except RuntimeError as error:
            if not is_connection_error(error):
                raise
            self._broken = True
            self._episode_ready = False
            raise CarlaConnectionError(
                f"CARLA at {self.config.carla_host}:{self.config.carla_port} failed during {what}: {error}"
            ) from error

    def _set_endpoint(self, host: str | None, port: int | None, traffic_manager_port: int | None) -> None:
        updates: dict[str, Any] = {}
        if host is not None:
            updates["carla_host"] = host
        if port is not None:
            updates["carla_port"] = int(port)
        if traffic_manager_port is not None:
            updates["traffic_manager_port"] = int(traffic_manager_port)
        if updates:
            data = self.config.model_dump(exclude_unset=True)
            data.update(updates)
            self.config = SimulatorConfig.model_validate(data)

    def _follow_slot(self) -> None:
        """Point the config at this slot's endpoint as the CARLA resource lists it now."""
        slot = self.config.server_slot
        if slot is None:
            return
        try:
            endpoint = slot_endpoint(slot)
        except (EnvSlotError, CarlaServerError, OSError) as error:  # keep the endpoint this bridge knows
            log.warning("env slot %d: could not read the CARLA endpoint list (%s); staying on %s:%s",
                        slot, error, self.config.carla_host, self.config.carla_port)
            return
        cfg = self.config
        if endpoint is None or (endpoint.host, endpoint.port, endpoint.tm_port) == (
                cfg.carla_host, cfg.carla_port, cfg.tm_port):
            return
        log.warning("env slot %d: CARLA server %s moved from %s:%s (traffic manager %s) to %s:%s (traffic "
                    "manager %s, generation %d)", slot, endpoint.name or endpoint.index, cfg.carla_host,
                    cfg.carla_port, cfg.tm_port, endpoint.host, endpoint.port, endpoint.tm_port, endpoint.generation)
        self._set_endpoint(endpoint.host, endpoint.port, endpoint.tm_port)

    def _connect_with_retries(self, follow_slot: bool = True) -> None:
        cfg = self.config
        last: CarlaConnectionError | None = None
        for attempt in range(1, self.config.connect_retries + 1):
            if follow_slot:
                # Between attempts the supervisor may finish a restart and publish the new endpoint.
                self._follow_slot()
            cfg = self.config
            try:
                with self._guard("connect"):
                    self._connect()
                    self._destroy_orphans()
                self._broken = False
                return
            except CarlaConnectionError as error:
                last = error
                log.warning("CARLA connection attempt %d/%d failed: %s", attempt, cfg.connect_retries, error)
                if attempt < cfg.connect_retries:
                    time.sleep(cfg.retry_delay_s)
        raise CarlaConnectionError(f"could not connect to CARLA at {cfg.carla_host}:{cfg.carla_port} after "
                                   f"{cfg.connect_retries} attempts: {last}") from last

    def _connect(self) -> None:
        cfg, carla = self.config, self.carla
        client = carla.Client(cfg.carla_host, cfg.carla_port)
        client.set_timeout(cfg.timeout_s)
        server = str(client.get_server_version())
        local = str(client.get_client_version())
        if server != local:
            log.warning("CARLA server %s and client %s differ; the RPC protocol may not match", server, local)
        world = client.get_world()
        if self._original_settings is None:
            # The settings of the server as found, restored on close (first connection only: after a
            # reconnect the server may still be in the synchronous mode this bridge set).
            self._original_settings = world.get_settings()
        self._client, self._world = client, world
        log.info("connected to CARLA %s at %s:%s", server, cfg.carla_host, cfg.carla_port)

    def _destroy_orphans(self) -> None:
        if self._orphans is None:
            return
        world_id, ids = self._orphans
        self._orphans = None
        if world_id is None or int(self._world.id) != world_id:
            # A restarted (or reloaded) server is in a new episode: our actors went with the old
            # one, and actor ids are unique only within an episode. Never destroy by stale id.
            log.info("CARLA is in a new episode; the %d actors of the lost one are gone with it", len(ids))
            return
        log.info("destroying %d actors left by the lost connection", len(ids))
        try:
            self._destroy_ids(ids)
        except RuntimeError as error:
            if is_connection_error(error):
                raise
            log.warning("actors of the lost episode not destroyed: %s", error)

    def _setup_world(self) -> None:
        cfg, carla = self.config, self.carla
        spec = self.spec_.carla
        with self._guard("world setup"):
            world = self._world
            town = cfg.town
            # get_map() downloads and parses the town's OpenDRIVE: once per setup, not per query.
            world_map = world.get_map()
            if _town_name(world_map.name) != town:
                log.info("loading %s (was %s)", town, _town_name(world_map.name))
                current = world.get_settings()
                if current.synchronous_mode:
                    # A server left in synchronous mode (by this bridge before a reconnect, or a
                    # crashed client) only advances when ticked; let it load the town on its own.
                    current.synchronous_mode = False
                    world.apply_settings(current)
                world = self._client.load_world(town)
                self._world = world
                world_map = world.get_map()
            self._map = world_map
            if self._planner is None or self._planner_town != town:
                self._planner = RoutePlanner(self._map, ROUTE_RESOLUTION_M, carla)
                self._planner_town = town

            settings = world.get_settings()
            settings.synchronous_mode = True
            settings.fixed_delta_seconds = cfg.control_dt
            settings.substepping = True
            # control_dt / substeps (== physics_dt up to rounding) keeps
            # fixed_delta_seconds <= max_substep_delta_time * max_substeps exact in floating point.
            settings.max_substep_delta_time = cfg.control_dt / cfg.substeps
            settings.max_substeps = cfg.substeps
            settings.no_rendering_mode = not cfg.render
            world.apply_settings(settings)

            tm = self._client.get_trafficmanager(cfg.tm_port)
            tm.set_synchronous_mode(True)
            tm.set_hybrid_physics_mode(False)
            tm.set_global_distance_to_leading_vehicle(
                spec.distance_to_leading_vehicle if spec.distance_to_leading_vehicle is not None
                else DEFAULT_LEADING_DISTANCE_M)
            tm.global_percentage_speed_difference(
                FAST_SPEED_DIFFERENCE if spec.vehicle_type == "fast" else DEFAULT_SPEED_DIFFERENCE)
            self._tm = tm

            weather = getattr(carla.WeatherParameters, cfg.weather, None)
            if weather is None:
                raise ValueError(f"carla.WeatherParameters has no preset {cfg.weather!r}")
            world.set_weather(weather)
            self._blueprints = world.get_blueprint_library()
        log.info("CARLA %s: synchronous, dt=%.4f s (%d physics sub-steps), TM port %d, weather %s",
                 town, cfg.control_dt, cfg.substeps, cfg.tm_port, cfg.weather)

    def _restore_settings(self) -> None:
        if self._tm is not None:
            self._tm.set_synchronous_mode(False)
        if self._world is not None and self._original_settings is not None:
            settings = self._original_settings
            if settings.synchronous_mode:
                # Left in synchronous mode with nobody ticking, the server would freeze for its
                # next client (what a crashed client does to it): give it back asynchronous.
                log.info("the server was in synchronous mode when found; restoring it asynchronous")
                settings.synchronous_mode = False
            self._world.apply_settings(settings)

    # ------------------------------------------------------------------------------------------
    # Episodes: spawning and destruction
    # ------------------------------------------------------------------------------------------
    def _build_episode(self, options: dict[str, Any]) -> None:
        cfg = self.config
        self._destroy_spawned()
        self._spawned.world_id = int(self._world.id)
        rng = self.np_random
        episode_seed = int(rng.integers(2**31 - 1))
        self.episode_id += 1
        self._events = _SensorEvents()
        self._images = queue.Queue()
        with self._guard("reset"):
            self._tm.set_random_device_seed(episode_seed)
            self._world.set_pedestrians_seed(episode_seed)
            spawn_points = list(self._map.get_spawn_points())
            ego_index, route = self._spawn_ego(spawn_points, rng, options)
            self._spawn_sensors()
            self._spawn_vehicles(spawn_points, ego_index, rng)
            self._spawn_walkers(rng)
            frame = 0
            for _ in range(cfg.settle_ticks):
                # Hold the ego still while it settles on its wheels (spawns are a little above ground).
                self._spawned.ego.apply_control(self.carla.VehicleControl(brake=1.0))
                frame = int(self._world.tick(cfg.timeout_s))
            self._receive_image(frame)
            self._follow_with_spectator()
        # Contacts while things dropped onto the road are not the policy's doing.
        self._events.clear()
        self._frame_id = frame
        self._tracker = RouteTracker(route)
        start = self._spawned.ego.get_location()
        self._tracker.begin(np.array([start.x, start.y]))
        self._steps = 0
        self._last_action = np.zeros(3, dtype=np.float32)
        self._infractions = self._zero_infractions()
        self._episode_ready = True
        info = self._measure([], [])
        info["done_reason"] = ""
        self._info = info
        self._obs = self._observe()
        log.debug("episode %d: %s, route %.0f m, %d vehicles, %d walkers", self.episode_id, cfg.town,
                  route.length, len(self._spawned.vehicles), len(self._spawned.walkers))

    def _ego_blueprint(self) -> Any:
        found = list(self._blueprints.filter(self.config.ego_blueprint))
        if not found:
            cars = self._vehicle_blueprints(cars_only=True)
            if not cars:
                raise ValueError(f"no blueprint matches ego_blueprint={self.config.ego_blueprint!r} and the "
                                 "library has no cars")
            log.warning("no blueprint %r on this server; the ego is a %s", self.config.ego_blueprint, cars[0].id)
            found = cars
        bp = found[0]
        if bp.has_attribute("role_name"):
            bp.set_attribute("role_name", "hero")   # CARLA's name for the ego (TM, rendering, recorder)
        return bp

    def _vehicle_blueprints(self, cars_only: bool) -> list[Any]:
        """Four-wheeled vehicles (the TM drives two-wheelers badly); ``cars_only`` for fast traffic."""
        out = []
        for bp in self._blueprints.filter("vehicle.*"):
            if bp.has_attribute("number_of_wheels") and bp.get_attribute("number_of_wheels").as_int() != 4:
                continue
            if cars_only and bp.has_attribute("base_type") and bp.get_attribute("base_type").as_str() != "car":
                continue
            out.append(bp)
        return sorted(out, key=lambda b: b.id)   # a stable order: the episode seed picks from it

    def _spawn_ego(self, spawn_points: list[Any], rng: np.random.Generator, options: dict[str, Any]
                   ) -> tuple[int, Route]:
        if not spawn_points:
            raise RuntimeError(f"{self.config.town} has no spawn points")
        planner = self._planner
        assert planner is not None
        bp = self._ego_blueprint()
        if "spawn_index" in options:
            order = [int(options["spawn_index"]) % len(spawn_points)]
        else:
            order = [int(i) for i in rng.permutation(len(spawn_points))]
        destination = options.get("destination")
        for index in order:
            transform = spawn_points[index]
            try:
                if destination is not None:
                    trace = planner.trace_route(transform.location, destination)
                else:
                    trace = planner.random_route(transform.location, self.config.route_length_m, rng)
                route = Route.from_trace(trace)
            except ValueError as error:
                log.debug("spawn point %d has no route: %s", index, error)
                continue
            if route.length < min(MIN_ROUTE_M, self.config.route_length_m) and len(order) > 1:
                continue
            ego = self._world.try_spawn_actor(bp, transform)
            if ego is None:
                continue
            self._spawned.ego = ego
            return index, route
        raise RuntimeError(f"could not spawn the ego in {self.config.town}: every tried spawn point is "
                           "occupied or has no route")

    def _spawn_sensors(self) -> None:
        cfg, carla, ego = self.config, self.carla, self._spawned.ego
        lib, world = self._blueprints, self._world
        if cfg.render:
            bp = lib.find("sensor.camera.rgb")
            bp.set_attribute("image_size_x", str(cfg.image_width))
            bp.set_attribute("image_size_y", str(cfg.image_height))
            bp.set_attribute("fov", str(cfg.camera_fov))
            bp.set_attribute("sensor_tick", "0.0")   # every tick: one frame per step, matched by frame id
            x, y, z = CAMERA_MOUNT
            camera = world.spawn_actor(bp, carla.Transform(carla.Location(x=x, y=y, z=z)), attach_to=ego)
            self._spawned.sensors.append(camera)
            camera.listen(self._images.put)
        collision = world.spawn_actor(lib.find("sensor.other.collision"), carla.Transform(), attach_to=ego)
        self._spawned.sensors.append(collision)
        collision.listen(self._events.on_collision)
        invasion = world.spawn_actor(lib.find("sensor.other.lane_invasion"), carla.Transform(), attach_to=ego)
        self._spawned.sensors.append(invasion)
        invasion.listen(self._events.on_lane_invasion)

    def _spawn_vehicles(self, spawn_points: list[Any], ego_index: int, rng: np.random.Generator) -> None:
        count = self.config.vehicles
        if count <= 0:
            return
        carla = self.carla
        blueprints = self._vehicle_blueprints(cars_only=self.spec_.carla.vehicle_type == "fast")
        if not blueprints:
            log.warning("no vehicle blueprints: no traffic")
            return
        ego_loc = spawn_points[ego_index].location
        free = [sp for i, sp in enumerate(spawn_points)
                if i != ego_index and sp.location.distance(ego_loc) > NPC_CLEARANCE_M]
        if count > len(free):
            log.info("%d vehicles asked, %d free spawn points in %s", count, len(free), self.config.town)
        chosen = [free[int(i)] for i in rng.permutation(len(free))[:count]]
        batch = []
        for transform in chosen:
            bp = blueprints[int(rng.integers(len(blueprints)))]
            if bp.has_attribute("color"):
                colours = list(bp.get_attribute("color").recommended_values)
                if colours:
                    bp.set_attribute("color", colours[int(rng.integers(len(colours)))])
            if bp.has_attribute("role_name"):
                bp.set_attribute("role_name", "autopilot")
            batch.append(carla.command.SpawnActor(bp, transform).then(
                carla.command.SetAutopilot(carla.command.FutureActor, True, self.config.tm_port)))
        ids = self._apply_spawn_batch(batch, "vehicle")
        self._spawned.vehicles = list(self._world.get_actors(ids)) if ids else []
        self._spawned.loose_ids = [i for i in self._spawned.loose_ids if i not in ids]

    def _spawn_walkers(self, rng: np.random.Generator) -> None:
        count = self.config.walkers
        if count <= 0:
            return
        carla, world, lib = self.carla, self._world, self._blueprints
        blueprints = sorted(lib.filter("walker.pedestrian.*"), key=lambda b: b.id)
        if not blueprints:
            log.warning("no walker blueprints: no pedestrians")
            return
        batch, speeds = [], []
        for _ in range(count):
            location = world.get_random_location_from_navigation()
            if location is None:
                continue
            bp = blueprints[int(rng.integers(len(blueprints)))]
            if bp.has_attribute("is_invincible"):
                bp.set_attribute("is_invincible", "false")
            speed = WALKER_SPEED_FALLBACK
            if bp.has_attribute("speed"):
                values = list(bp.get_attribute("speed").recommended_values)
                if len(values) > 1:
                    speed = float(values[1])   # [idle?, walk, run] in CARLA's walker blueprints: walk
            batch.append(carla.command.SpawnActor(bp, carla.Transform(location)))
            speeds.append(speed)
        walker_ids = self._apply_spawn_batch(batch, "walker")
        if not walker_ids:
            return
        self._spawned.walkers = list(world.get_actors(walker_ids))
        controller_bp = lib.find("controller.ai.walker")
        controller_ids = self._apply_spawn_batch(
            [carla.command.SpawnActor(controller_bp, carla.Transform(), wid) for wid in walker_ids], "walker controller")
        self._spawned.controllers = list(world.get_actors(controller_ids)) if controller_ids else []
        self._spawned.loose_ids = [i for i in self._spawned.loose_ids if i not in walker_ids + controller_ids]
        # A controller must have been through one tick before it can start (CARLA's generate_traffic).
        world.tick(self.config.timeout_s)
        for controller, speed in zip(self._spawned.controllers, speeds):
            controller.start()
            target = world.get_random_location_from_navigation()
            if target is not None:
                controller.go_to_location(target)
            controller.set_max_speed(speed)

    def _apply_spawn_batch(self, batch: list[Any], what: str) -> list[int]:
        if not batch:
            return []
        responses = self._client.apply_batch_sync(batch, False)
        ids, errors = [], []
        for response in responses:
            if response.error:
                errors.append(str(response.error))
            else:
                ids.append(int(response.actor_id))
        # Tracked before anything else can fail, so that cleanup finds them.
        self._spawned.loose_ids.extend(ids)
        if errors:
            log.debug("%d of %d %s spawns failed (e.g. %s)", len(errors), len(batch), what, errors[0])
        return ids

    def _destroy_spawned(self) -> None:
        """Stop the sensors and controllers, then destroy every actor of the episode in one batch."""
        spawned = self._spawned
        ids = spawned.ids()
        self._episode_ready = False
        if not ids:
            return
        with self._guard("destroy actors"):
            # Stopped first: a sensor destroyed while listening keeps its stream (and the server's
            # memory, carla #2781); a controller destroyed while walking leaves its walker stuck.
            for actor in [*spawned.sensors, *spawned.controllers]:
                try:
                    actor.stop()
                except RuntimeError as error:
                    if is_connection_error(error):
                        raise
                    log.debug("actor %s did not stop: %s", actor.id, error)
            self._destroy_ids(ids)
        self._spawned = _Spawned()

    def _destroy_ids(self, ids: list[int]) -> None:
        # apply_batch_sync rather than apply_batch: the spawn that follows (reset) must find the
        # spawn points free, and the responses say whether anything survived.
        responses = self._client.apply_batch_sync([self.carla.command.DestroyActor(i) for i in ids], False)
        failed = [str(r.error) for r in responses if r.error]
        if failed:
            log.warning("%d of %d actors were not destroyed (e.g. %s)", len(failed), len(ids), failed[0])
        log.debug("destroyed %d actors", len(ids) - len(failed))

    def _forget_episode(self) -> None:
        """Drop the episode locally, remembering its actors as orphans for the next connection.

        Sensors are stopped only over a working connection: after a lost one, a call could block for
        the whole time-out, and the old client's streams go with it."""
        ids = self._spawned.ids()
        if ids:
            self._orphans = (self._spawned.world_id, ids)
        if not self._broken:
            for sensor in self._spawned.sensors:
                try:
                    sensor.stop()
                except Exception as error:  # noqa: BLE001 - best effort before dropping the client
                    log.debug("sensor %s did not stop: %s", getattr(sensor, "id", "?"), error)
        self._spawned = _Spawned()
        self._episode_ready = False
        self._fresh = False

    # ------------------------------------------------------------------------------------------
    # Sensors and measurements
    # ------------------------------------------------------------------------------------------
    def _receive_image(self, frame: int) -> None:
        """The camera image of ``frame``: older frames in the queue are dropped."""
        size = self.config.obs_size
        if not self.config.render:
            self._rgb = np.zeros((size, size, 3), dtype=np.uint8)
            return
        deadline = time.monotonic() + self.config.sensor_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise queue.Empty
                image = self._images.get(timeout=remaining)
            except queue.Empty:
                self._broken = True
                self._episode_ready = False
                raise CarlaConnectionError(
                    f"no camera image for frame {frame} within {self.config.sensor_timeout_s} s "
                    f"(CARLA at {self.config.carla_host}:{self.config.carla_port})") from None
            if int(image.frame) < frame:
                self.dropped_frames += 1
                continue
            if int(image.frame) > frame:
                log.warning("camera frame %d is newer than the tick's frame %d", image.frame, frame)
            self._rgb = resize_rgb(image_to_rgb(image), size)
            return

    def _follow_with_spectator(self) -> None:
        """Without ``headless``, the server's window shows the ego from behind."""
        if self.config.headless or not self.config.render or self._spawned.ego is None:
            return
        carla = self.carla
        t = self._spawned.ego.get_transform()
        yaw = math.radians(t.rotation.yaw)
        loc = carla.Location(x=t.location.x - 6.0 * math.cos(yaw), y=t.location.y - 6.0 * math.sin(yaw),
                             z=t.location.z + 3.0)
        self._world.get_spectator().set_transform(carla.Transform(loc, carla.Rotation(pitch=-15.0, yaw=t.rotation.yaw)))

    @staticmethod
    def _zero_infractions() -> dict[str, int]:
        # The embedded backend's keys, so that evaluation summaries compare across backends.
        return {"collision": 0, "off_road": 0, "lane_invasion": 0, "wrong_way": 0, "speeding": 0}

    def _lane_reference(self, location: Any, xy: np.ndarray) -> tuple[float, float, Any]:
        """(lateral offset m, positive right; lane heading rad; lane waypoint or None)."""
        wp = self._map.get_waypoint(location, project_to_road=True, lane_type=self.carla.LaneType.Driving)
        if wp is None or wp.is_junction:
            # Junction lanes overlap: the nearest one may be any of them, so the route says which.
            assert self._tracker is not None
            lateral, heading = self._tracker.reference(xy)
            return lateral, heading, wp
        w = wp.transform
        heading = math.radians(w.rotation.yaw)
        right = np.array([-math.sin(heading), math.cos(heading)])
        lateral = float(np.dot(xy - np.array([w.location.x, w.location.y]), right))
        return lateral, heading, wp

    def _lanes_around(self, wp: Any) -> tuple[int | None, int | None]:
        """(lane number from the left, 1-based; lanes in the ego's direction) of a waypoint."""
        if wp is None or wp.is_junction:
            return None, None
        driving = self.carla.LaneType.Driving

        def count(step: str) -> int:
            n, cur = 0, wp
            for _ in range(8):
                cur = getattr(cur, step)()
                if cur is None or cur.lane_type != driving or (cur.lane_id > 0) != (wp.lane_id > 0):
                    break
                n += 1
            return n

        left, right = count("get_left_lane"), count("get_right_lane")
        return left + 1, left + right + 1

    def _measure(self, collisions: list[tuple[int, str]], invasions: list[tuple[int, tuple[str, ...]]]
                 ) -> dict[str, Any]:
        ego, tracker, carla = self._spawned.ego, self._tracker, self.carla
        assert ego is not None and tracker is not None
        t = ego.get_transform()
        v = ego.get_velocity()
        loc = t.location
        yaw = math.radians(t.rotation.yaw)
        xy = np.array([loc.x, loc.y], dtype=np.float64)
        speed = float(v.x * math.cos(yaw) + v.y * math.sin(yaw))   # along the heading
        tracker.update(xy)
        lateral, lane_heading, lane_wp = self._lane_reference(loc, xy)
        heading_error = _wrap(yaw - lane_heading)
        self._on_road = self._map.get_waypoint(loc, project_to_road=False,
                                               lane_type=carla.LaneType.Driving) is not None

        inf = self._infractions
        inf["collision"] += len(collisions)
        inf["lane_invasion"] += len(invasions)
        if not self._on_road:
            inf["off_road"] += 1
        if abs(heading_error) > math.pi / 2:
            inf["wrong_way"] += 1
        limit = float(ego.get_speed_limit()) / 3.6    # km/h -> m/s
        if limit > 0 and speed > 1.1 * max(limit, self.target_speed):
            inf["speeding"] += 1

        self._command = tracker.command(self.config.command_lookahead_m) if not tracker.finished \
            else captions.FOLLOW_LANE
        lane_number, lanes_count = self._lanes_around(lane_wp)
        collided = bool(collisions)
        self._front_gap = self._front_distance(xy)
        return {
            "velocity": np.array([v.x, -v.y, v.z], dtype=np.float32),
            "speed": speed,
            "lane_deviation": float(lateral),
            "heading_error": float(heading_error),
            "collision": collided,
            "route_completion": tracker.completion,
            "infractions": dict(inf),
            "ego_pose": np.array([loc.x, -loc.y, _wrap(-yaw)], dtype=np.float32),
            "command": self._command,
            "caption": self._caption(speed, lateral, lane_number, lanes_count, yaw, xy, lane_wp, collided),
            "scenario": self.scenario,
            "lane_index": int(lane_number - 1) if lane_number is not None else 0,
            "done_reason": "",
            "town": self.config.town,
            "frame": int(self._frame_id),
        }

    def _others(self) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for actor in self._spawned.vehicles:
            kind = "car"
            attrs = getattr(actor, "attributes", {}) or {}
            if attrs.get("base_type") in ("truck", "van", "motorcycle", "bicycle", "bus"):
                kind = str(attrs["base_type"])
            out.append((actor, kind))
        out.extend((actor, "pedestrian") for actor in self._spawned.walkers)
        return out

    def _front_distance(self, xy: np.ndarray) -> float:
        """Bumper gap to the nearest vehicle or walker on the route ahead, capped at FRONT_DISTANCE_MAX."""
        tracker, ego = self._tracker, self._spawned.ego
        assert tracker is not None
        r = tracker.route
        i = tracker.index
        end = int(np.searchsorted(r.s, tracker.progress + FRONT_DISTANCE_MAX + 10.0, side="right"))
        pts, s, width = r.xy[i:max(end, i + 1)], r.s[i:max(end, i + 1)], r.width[i:max(end, i + 1)]
        ego_half = float(ego.bounding_box.extent.x)
        best = FRONT_DISTANCE_MAX
        for actor, _ in self._others():
            loc = actor.get_location()
            p = np.array([loc.x, loc.y])
            if float(np.sum((p - xy) ** 2)) > (FRONT_DISTANCE_MAX + 15.0) ** 2:
                continue
            d2 = np.sum((pts - p) ** 2, axis=1)
            k = int(np.argmin(d2))
            if math.sqrt(float(d2[k])) > width[k] / 2 + 0.5:
                continue
            ahead = float(s[k] - tracker.progress)
            if ahead <= 0:
                continue
            gap = ahead - ego_half - float(actor.bounding_box.extent.x)
            best = min(best, max(gap, 0.0))
        return best

    def _caption(self, speed: float, lateral: float, lane_number: int | None, lanes_count: int | None,
                 yaw: float, xy: np.ndarray, lane_wp: Any, collided: bool) -> str:
        half_fov = math.radians(self.config.camera_fov) / 2
        c, s = math.cos(yaw), math.sin(yaw)
        neighbours = []
        for actor, kind in self._others():
            t = actor.get_transform()
            d = np.array([t.location.x, t.location.y]) - xy
            fwd, right = float(d[0] * c + d[1] * s), float(-d[0] * s + d[1] * c)
            if fwd <= 0 or fwd * fwd + right * right > CAPTION_RANGE_M ** 2 or abs(math.atan2(right, fwd)) > half_fov:
                continue   # only what the camera can show
            offset = None
            if kind != "pedestrian" and lane_wp is not None:
                other = self._map.get_waypoint(t.location)
                if other is not None and other.road_id == lane_wp.road_id and \
                        (other.lane_id > 0) == (lane_wp.lane_id > 0):
                    offset = abs(int(other.lane_id)) - abs(int(lane_wp.lane_id))
            neighbours.append(captions.Neighbour(
                forward=fwd, right=right, lane_offset=offset,
                relative_heading=_wrap(math.radians(t.rotation.yaw) - yaw), kind=kind))
        return captions.describe_scene(captions.SceneSnapshot(
            place=self._place(), speed=max(speed, 0.0), command=self._command, lane_number=lane_number,
            lanes_count=lanes_count, lateral_offset=lateral, neighbours=tuple(neighbours),
            appearance=self._appearance(), collided=collided, off_road=not self._on_road))

    def _place(self) -> str:
        town = self.config.town
        base = town.split("_")[0].replace("HD", "")
        for row in CARLA_TOWNS:
            if row["town"] == base:
                return f"a road in {town}, a {row['description'][0].lower()}{row['description'][1:]}"
        return f"a road in {town}"

    def _appearance(self) -> str:
        weather = self.config.weather
        if "Night" in weather:
            return "night"
        if "Rain" in weather or "Wet" in weather:
            return "rain"
        return "day"

    def _observe(self) -> dict[str, Any]:
        a = self._last_action
        tracker = self._tracker
        assert tracker is not None and self._rgb is not None
        info = self._info
        state = make_state({
            "speed": info["speed"], "lateral_offset": info["lane_deviation"],
            "heading_error": info["heading_error"], "last_throttle": a[0], "last_steer": a[1],
            "last_brake": a[2], "front_distance": min(self._front_gap, FRONT_DISTANCE_MAX),
            "route_completion": tracker.completion,
        })
        return {"image": self._rgb, "state": state, "command": sanitize_command(self._command)}

    def _copy_obs(self) -> dict[str, Any]:
        assert self._obs is not None
        return {"image": self._obs["image"].copy(), "state": self._obs["state"].copy(),
                "command": self._obs["command"]}


def make_carla_env(cfg: EnvConfig, seed: int | None = None, carla_module: Any = None, slot: int = 0,
                   **overrides: Any) -> CARLABridge:
    """The CARLA env of env slot ``slot`` for an `EnvConfig` (what `stages.envs.make_env` calls for
    ``backend='carla'``): it connects to server ``slot`` of the CARLA resource's list
    (`SimulatorConfig.from_env_config`)."""
    if cfg.backend != "carla":
        raise ValueError(f"make_carla_env needs backend='carla', got {cfg.backend!r}")
    return CARLABridge(SimulatorConfig.from_env_config(cfg, slot=slot, **overrides), carla_module=carla_module,
                       seed=seed)
