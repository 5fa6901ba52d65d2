"""`CARLABridge`: the driving env on a live CARLA 0.9.16 server, with the embedded backend's interface.

This module holds what the env contract sees (gymnasium's reset / step / render / close, the seed's
``initialize`` / ``reconnect``, the views shared with the embedded backend); the bridge's concerns live beside
it: `session` (connection, world settings, the `Lifecycle`), `actors` (spawning, destruction), `sensors`
(camera frames, collision and lane events), `measure` (``info``, the observation), `caption`, `expert`.

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

`expert_action()` is a privileged route follower (pure pursuit + speed control) for data collection
(`stages.envs.carla_bridge.expert`).

Frames: CARLA is left-handed (x forward, y right, yaw clockwise seen from above, degrees). The
``state`` and the signed quantities of ``info`` (lateral offset, heading error: positive to the right)
are frame-free; ``info["ego_pose"]`` and ``info["velocity"]`` are converted to drivevla's right-handed
world frame: ``y = -carla_y``, ``vy = -carla_vy``, ``yaw = -radians(carla_yaw)`` (counter-clockwise).
"""
from __future__ import annotations

import logging
import queue
from typing import Any

import gymnasium as gym
import numpy as np

from stages.envs import captions
from stages.envs.carla_bridge.actors import ActorsMixin, Spawned
from stages.envs.carla_bridge.caption import CaptionMixin
from stages.envs.carla_bridge.config import SimulatorConfig
from stages.envs.carla_bridge.errors import CarlaConnectionError, load_carla
from stages.envs.carla_bridge.expert import expert_action
from stages.envs.carla_bridge.measure import MeasureMixin
from stages.envs.carla_bridge.routing import Route, RoutePlanner, RouteTracker
from stages.envs.carla_bridge.sensors import SensorEvents, SensorsMixin
from stages.envs.carla_bridge.session import Lifecycle, SessionMixin
from stages.envs.config import EnvConfig
from stages.envs.rewards import compute_driving_reward
from stages.envs.scenarios import get_scenario
from stages.envs.spaces import FRONT_DISTANCE_MAX, action_space, clip_action, observation_space

log = logging.getLogger(__name__)


class CARLABridge(SessionMixin, ActorsMixin, SensorsMixin, MeasureMixin, CaptionMixin, gym.Env):
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
        # The seed of the first reset that names none; later resets continue the generator.
        self._first_seed = self.config.seed if seed is None else seed
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
        self._state = Lifecycle.DISCONNECTED

        # Episode
        self._spawned = Spawned()
        self._images: queue.Queue[Any] = queue.Queue()
        self._events = SensorEvents()
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
        self._state = Lifecycle.FRESH

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
        self._state = Lifecycle.CONNECTED

    # ------------------------------------------------------------------------------------------
    # gymnasium API
    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None and self._state is Lifecycle.FRESH and not options:
            # initialize() built this episode and nothing has stepped it: it is the episode this
            # reset would build (same seed), so do not spawn everything twice.
            self._state = Lifecycle.RUNNING
            assert self._obs is not None
            return self._copy_obs(), dict(self._info)
        if seed is None:
            seed = self._first_seed
        self._first_seed = None
        super().reset(seed=seed)
        if self._state is Lifecycle.FRESH:
            self._state = Lifecycle.RUNNING
        if self._state is Lifecycle.BROKEN:
            self.reconnect()
        elif self._client is None:
            self._connect_with_retries()
            self._setup_world()
        self._build_episode(options or {})
        assert self._obs is not None
        return self._copy_obs(), dict(self._info)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self._state is Lifecycle.BROKEN:
            raise CarlaConnectionError("the connection to CARLA was lost; call reset() to reconnect")
        if not self._state.in_episode:
            raise RuntimeError("call reset() before step()")
        self._state = Lifecycle.RUNNING
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
        if self._client is not None and self._state is not Lifecycle.BROKEN:
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
        if self._state is not Lifecycle.BROKEN:   # a broken one reconnects at its next reset
            self._state = Lifecycle.DISCONNECTED
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
    def lifecycle(self) -> Lifecycle:
        """Where the bridge is between its server and its episode."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._client is not None and self._state is not Lifecycle.BROKEN

    def caption(self) -> str:
        return str(self._info.get("caption", ""))

    def expert_action(self, target_speed: float | None = None) -> np.ndarray:
        """A privileged route-following action (data collection, baselines; not the policy's input) towards
        ``target_speed`` (default: the reward's); see `stages.envs.carla_bridge.expert`."""
        if not self._state.in_episode or self._tracker is None:
            raise RuntimeError("call reset() before expert_action()")
        return expert_action(self._tracker, self._spawned.ego,
                             self.target_speed if target_speed is None else float(target_speed), self._front_gap)

    # ------------------------------------------------------------------------------------------
    # Episodes
    # ------------------------------------------------------------------------------------------
    def _build_episode(self, options: dict[str, Any]) -> None:
        cfg = self.config
        self._destroy_spawned()
        self._spawned.world_id = int(self._world.id)
        rng = self.np_random
        episode_seed = int(rng.integers(2**31 - 1))
        self.episode_id += 1
        self._events = SensorEvents()
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
        self._state = Lifecycle.RUNNING
        info = self._measure([], [])
        info["done_reason"] = ""
        self._info = info
        self._obs = self._observe()
        log.debug("episode %d: %s, route %.0f m, %d vehicles, %d walkers", self.episode_id, cfg.town,
                  route.length, len(self._spawned.vehicles), len(self._spawned.walkers))


def make_carla_env(cfg: EnvConfig, seed: int | None = None, carla_module: Any = None, slot: int = 0,
                   **overrides: Any) -> CARLABridge:
    """The CARLA env of env slot ``slot`` for an `EnvConfig` (what `stages.envs.make_env` calls for
    ``backend='carla'``): it connects to server ``slot`` of the CARLA resource's list
    (`SimulatorConfig.from_env_config`)."""
    if cfg.backend != "carla":
        raise ValueError(f"make_carla_env needs backend='carla', got {cfg.backend!r}")
    return CARLABridge(SimulatorConfig.from_env_config(cfg, slot=slot, **overrides), carla_module=carla_module,
                       seed=seed)
