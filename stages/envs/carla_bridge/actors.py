"""The actors of an episode: the ego on a route, NPC vehicles under the traffic manager, walkers with their
AI controllers — every one tracked from the moment the server answers, and destroyed (sensors and
controllers stopped first) on reset and close. Actors of an episode lost with its connection are destroyed
after reconnecting only when the server is still in that episode (actor ids are unique only within one).
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.envs.carla_bridge.errors import is_connection_error
from stages.envs.carla_bridge.routing import Route
from stages.envs.carla_bridge.state import BridgeState, Lifecycle

log = logging.getLogger(__name__)

MIN_ROUTE_M = 20.0                 # shorter random routes (dead ends) are re-drawn from another spawn point
NPC_CLEARANCE_M = 10.0             # no NPC vehicle spawns this close to the ego
WALKER_SPEED_FALLBACK = 1.4        # m/s when a walker blueprint has no recommended speeds


@dataclass
class Spawned:
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


class ActorsMixin(BridgeState):
    """Spawning and destruction of `CARLABridge`'s actors (the state it uses is set in `CARLABridge.__init__`)."""

    if TYPE_CHECKING:
        def _guard(self, what: str) -> AbstractContextManager[None]: ...   # SessionMixin

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

    def _spawn_vehicles(self, spawn_points: list[Any], ego_index: int, rng: np.random.Generator) -> None:
        count = self.config.vehicles
        if count <= 0:
            return
        carla = self.carla
        blueprints = self._vehicle_blueprints(cars_only=self.scenario_spec.carla.vehicle_type == "fast")
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
        self._end_episode()
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
        self._spawned = Spawned()

    def _destroy_ids(self, ids: list[int]) -> None:
        # apply_batch_sync rather than apply_batch: the spawn that follows (reset) must find the
        # spawn points free, and the responses say whether anything survived.
        responses = self._client.apply_batch_sync([self.carla.command.DestroyActor(i) for i in ids], False)
        failed = [str(r.error) for r in responses if r.error]
        if failed:
            log.warning("%d of %d actors were not destroyed (e.g. %s)", len(failed), len(ids), failed[0])
        log.debug("destroyed %d actors", len(ids) - len(failed))

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

    def _forget_episode(self) -> None:
        """Drop the episode locally, remembering its actors as orphans for the next connection.

        Sensors are stopped only over a working connection: after a lost one, a call could block for
        the whole time-out, and the old client's streams go with it."""
        ids = self._spawned.ids()
        if ids:
            self._orphans = (self._spawned.world_id, ids)
        if self._state is not Lifecycle.BROKEN:
            for sensor in self._spawned.sensors:
                try:
                    sensor.stop()
                except Exception as error:  # noqa: BLE001 - best effort before dropping the client
                    log.debug("sensor %s did not stop: %s", getattr(sensor, "id", "?"), error)
        self._spawned = Spawned()
        self._end_episode()

    def _end_episode(self) -> None:
        """No episode to step any more (a broken connection stays broken)."""
        if self._state.in_episode:
            self._state = Lifecycle.CONNECTED
