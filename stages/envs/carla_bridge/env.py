"""`CARLABridge`: the driving env on a live CARLA 0.9.16 server, with the embedded backend's interface.

This module holds what the env contract sees (gymnasium's reset / step / render / close, the seed's
``initialize`` / ``reconnect``, the views shared with the embedded backend); the bridge's concerns live beside
it: `session` (connection, world settings, the `Lifecycle`), `actors` (spawning, destruction), `sensors`
(camera frames, collision and lane events), `measure` (``info``, the observation), `caption`, `expert`.

The env contract is `stages.envs.base.DrivingEnvBase`, which the highway backend (`stages.envs.highway`)
shares (docs/contracts.md): the base owns seeding, step counting, the infraction counters, the episode
ends and their order, the reward (`compute_driving_reward`) and the observation; this class supplies the
simulator side (`_begin_episode`, `_advance`, `_measure`, ...). ``image`` uint8 (S, S, 3) comes from an
RGB camera on the ego, ``command`` text from the route; terminated on a collision (unless
``terminate_on_collision`` is off), leaving the road or straying ``off_route_distance_m`` from the route;
truncated at the route's end or ``max_episode_steps``; ``info["done_reason"]`` says which.

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

import numpy as np

from stages.envs import captions
from stages.envs.base import DrivingEnvBase
from stages.envs.carla_bridge.actors import ActorsMixin, Spawned
from stages.envs.carla_bridge.caption import CaptionMixin
from stages.envs.carla_bridge.config import SimulatorConfig
from stages.envs.carla_bridge.errors import CarlaConnectionError, load_carla
from stages.envs.carla_bridge.expert import expert_action
from stages.envs.carla_bridge.measure import MeasureMixin
from stages.envs.carla_bridge.routing import Route, RoutePlanner, RouteTracker
from stages.envs.carla_bridge.sensors import SensorEvents, SensorsMixin
from stages.envs.carla_bridge.session import SessionMixin
from stages.envs.carla_bridge.state import Lifecycle
from stages.envs.config import EnvConfig
from stages.envs.spaces import FRONT_DISTANCE_MAX

log = logging.getLogger(__name__)


class CARLABridge(SessionMixin, ActorsMixin, SensorsMixin, MeasureMixin, CaptionMixin, DrivingEnvBase):
    """The CARLA backend of the driving env (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, config: SimulatorConfig | None = None, carla_module: Any = None,
                 seed: int | None = None, render_mode: str | None = None) -> None:
        config = config or SimulatorConfig()
        # ``seed``: the seed of the first reset that names none (default: the config's).
        super().__init__(scenario=config.scenario, image_size=config.obs_size,
                         policy_frequency=config.policy_frequency, max_episode_steps=config.max_episode_steps,
                         reward_config=config.resolved_reward(), seed=config.seed if seed is None else seed,
                         render_mode=render_mode, render_fps=config.fps)
        self.config = config
        self.carla = load_carla(carla_module)

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

        # Episode (the base holds the counters, infractions, command and frame)
        self._spawned = Spawned()
        self._images: queue.Queue[Any] = queue.Queue()
        self._events = SensorEvents()
        self._tracker: RouteTracker | None = None
        self._frame_id = 0
        self._command = captions.FOLLOW_LANE
        # The last observation and info, for the reset that reuses initialize()'s episode.
        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._on_road = True
        self._gap_ahead = FRONT_DISTANCE_MAX
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
    # gymnasium API (step and render are the base's)
    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None and self._state is Lifecycle.FRESH and not options:
            # initialize() built this episode and nothing has stepped it: it is the episode this
            # reset would build (same seed), so do not spawn everything twice.
            self._state = Lifecycle.RUNNING
            return self._copy_obs(), dict(self._info)
        return super().reset(seed=seed, options=options)

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
    # The backend's part of the env contract (`DrivingEnvBase`)
    # ------------------------------------------------------------------------------------------
    def _begin_episode(self, options: dict[str, Any]) -> dict[str, Any]:
        if self._state is Lifecycle.BROKEN:
            self.reconnect()
        elif self._client is None:
            self._connect_with_retries()
            self._setup_world()
        return self._build_episode(options)

    def _check_can_step(self) -> None:
        if self._state is Lifecycle.BROKEN:
            raise CarlaConnectionError("the connection to CARLA was lost; call reset() to reconnect")
        if not self._state.in_episode:   # e.g. after reconnect(), which ends the episode
            raise RuntimeError("call reset() before step()")
        super()._check_can_step()

    def _advance(self, action: np.ndarray) -> None:
        """One ``world.tick()`` under ``action``, and the camera frame it rendered."""
        self._state = Lifecycle.RUNNING
        with self._guard("step"):
            self._spawned.ego.apply_control(self.carla.VehicleControl(
                throttle=float(action[0]), steer=float(action[1]), brake=float(action[2])))
            frame = int(self._world.tick(self.config.timeout_s))
            self._receive_image(frame)
            self._follow_with_spectator()
        self._frame_id = frame

    def _measure(self) -> dict[str, Any]:
        return self._measure_events(*self._events.take(self._frame_id))

    def _observe(self, info: dict[str, Any]) -> dict[str, Any]:
        # Kept (with the info) for the reset that reuses initialize()'s episode; callers get copies.
        self._obs = super()._observe(info)
        self._info = dict(info)
        return self._copy_obs()

    def _off_road(self) -> bool:
        return not self._on_road

    def _front_gap(self) -> float:
        return self._gap_ahead

    def _collided(self, info: dict[str, Any]) -> bool:
        return bool(info["collision"]) and self.config.terminate_on_collision

    def _off_route(self) -> bool:
        return self._tracker is not None and self._tracker.distance > self.config.off_route_distance_m

    def _route_completed(self) -> bool:
        return self._tracker is not None and self._tracker.finished

    # ------------------------------------------------------------------------------------------
    # Views shared with the embedded backend (expert, captions, evaluation)
    # ------------------------------------------------------------------------------------------
    @property
    def route_completion(self) -> float:
        return self._tracker.completion if self._tracker is not None else 0.0

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
                             self.target_speed if target_speed is None else float(target_speed), self._gap_ahead)

    # ------------------------------------------------------------------------------------------
    # Episodes
    # ------------------------------------------------------------------------------------------
    def _build_episode(self, options: dict[str, Any]) -> dict[str, Any]:
        """Spawn an episode drawn from ``self.np_random``; its first info."""
        cfg = self.config
        self._destroy_spawned()
        self._spawned.world_id = int(self._world.id)
        rng = self.np_random
        episode_seed = int(rng.integers(2**31 - 1))
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
        # Contacts while things dropped onto the road are not the policy's doing (nor are those
        # of the settling ticks that the sensor threads deliver late).
        self._events.clear(through_frame=frame)
        self._frame_id = frame
        self._tracker = RouteTracker(route)
        start = self._spawned.ego.get_location()
        self._tracker.begin(np.array([start.x, start.y]))
        self._state = Lifecycle.RUNNING
        info = self._measure_events([], [])
        log.debug("episode %d: %s, route %.0f m, %d vehicles, %d walkers", self.episode_id, cfg.town,
                  route.length, len(self._spawned.vehicles), len(self._spawned.walkers))
        return info


def make_carla_env(cfg: EnvConfig, seed: int | None = None, carla_module: Any = None, slot: int = 0,
                   **overrides: Any) -> CARLABridge:
    """The CARLA env of env slot ``slot`` for an `EnvConfig` (what `stages.envs.make_env` calls for
    ``backend='carla'``): it connects to server ``slot`` of the CARLA resource's list
    (`SimulatorConfig.from_env_config`)."""
    if cfg.backend != "carla":
        raise ValueError(f"make_carla_env needs backend='carla', got {cfg.backend!r}")
    return CARLABridge(SimulatorConfig.from_env_config(cfg, slot=slot, **overrides), carla_module=carla_module,
                       seed=seed)
