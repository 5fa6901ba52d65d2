"""The bridge's connection to a CARLA server: the lifecycle, connecting (with retries, following the env
slot's endpoint), the world's synchronous settings, the traffic manager and weather, and giving the server
back as it was found.

The CARLA client reports every server problem as a bare ``RuntimeError``; `_guard` turns the ones that mean
"the server is gone" into `CarlaConnectionError` and moves the bridge to `Lifecycle.BROKEN`, from which the
next ``reset()`` reconnects (`stages.envs.carla_bridge.errors`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from stages.envs.carla_bridge.config import SimulatorConfig
from stages.envs.carla_bridge.state import BridgeState, Lifecycle
from stages.envs.carla_bridge.endpoints import CarlaServerError, slot_endpoint
from stages.envs.carla_bridge.errors import CarlaConnectionError, is_connection_error, load_carla
from stages.envs.carla_bridge.routing import RoutePlanner
from stages.envs.slots import EnvSlotError

log = logging.getLogger(__name__)

ROUTE_RESOLUTION_M = 2.0           # spacing of route waypoints
# Traffic manager settings persist per TM on the server, so every setup sets them, not only the
# scenarios that change them. "fast" traffic drives 20 % above the speed limit; otherwise the TM's
# own default (30 % below the limit) applies.
FAST_SPEED_DIFFERENCE = -20.0
DEFAULT_SPEED_DIFFERENCE = 30.0
DEFAULT_LEADING_DISTANCE_M = 2.5


def _town_name(map_name: str) -> str:
    """``"Carla/Maps/Town01"`` (or ``"/Game/Carla/Maps/Town01"``) -> ``"Town01"``."""
    return str(map_name).rstrip("/").rsplit("/", 1)[-1]


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


class SessionMixin(BridgeState):
    """Connection and world setup of `CARLABridge` (the state it uses is set in `CARLABridge.__init__`)."""

    if TYPE_CHECKING:
        def _destroy_orphans(self) -> None: ...   # ActorsMixin

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn the client's connection errors into `CarlaConnectionError` and remember the breakage."""
        try:
            yield
        except CarlaConnectionError:
            self._state = Lifecycle.BROKEN
            raise
        except RuntimeError as error:
            if not is_connection_error(error):
                raise
            self._state = Lifecycle.BROKEN
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
                self._state = Lifecycle.CONNECTED
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

    def _setup_world(self) -> None:
        cfg, carla = self.config, self.carla
        spec = self.scenario_spec.carla
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
