"""`SimulatorConfig`: the seed's CARLA settings (connection, rendering, physics, camera) plus the episode.

Time stepping. CARLA documents two knobs for a fixed time-step (docs "Synchrony and time-step",
"Physics substepping"): ``fixed_delta_seconds`` is the simulated time of one ``world.tick()`` (one
rendered frame, one sensor reading), and with ``substepping`` on, the server splits every tick into
physics sub-steps of at most ``max_substep_delta_time`` (at most ``max_substeps`` of them, which CARLA
caps at 16; it requires ``fixed_delta_seconds <= max_substep_delta_time * max_substeps``).

The bridge uses exactly that: ``fixed_delta_seconds = control_dt`` and ``max_substep_delta_time =
physics_dt`` with ``max_substeps = control_dt / physics_dt``. The alternative — ``fixed_delta_seconds =
physics_dt`` and ``control_dt / physics_dt`` client ticks per action — would render every camera frame
and make one round trip per physics step, i.e. pay the rendering cost (what limits a server to ~20 FPS
with a camera) twice per control step at the seed's 60 Hz physics / 30 Hz control, for images nobody
reads. With sub-stepping, one tick = one control step = one camera frame, and physics still runs at
``physics_dt``. Hence the validation: ``control_dt`` a whole multiple (<= 16) of ``physics_dt``.

``fps`` is the seed's "frames per second" of the simulation, i.e. ``1 / control_dt``; giving only one
of ``fps`` / ``control_dt`` sets the other, giving both requires them to agree.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.envs.carla_bridge.endpoints import slot_endpoint
from stages.envs.config import EnvConfig, RewardConfig, ScenarioName, resolve_reward
from stages.envs.scenarios import get_scenario

# CARLA caps the number of physics sub-steps per tick at 16 (WorldSettings.max_substeps).
MAX_SUBSTEPS = 16
_TOWN_PATTERN = re.compile(r"^Town\d{2}(HD)?(_Opt)?$")
_DT_TOLERANCE = 1e-6


class SimulatorConfig(BaseModel):
    """One CARLA environment: server, town, time-step, camera, scenario, episode, reward."""

    model_config = ConfigDict(extra="forbid")

    # Connection (the seed's fields)
    carla_host: str = "localhost"
    carla_port: int = Field(2000, ge=1, le=65535, description="the server's RPC port")
    carla_town: str = Field("Town01", description="town to load; a scenario with its own town "
                                                  "(highway: Town06) wins unless this is set explicitly")
    server_slot: int | None = Field(None, ge=0, description="entry of the CARLA resource's endpoint list this "
                                                            "env uses (stages.envs.slots); reconnecting reads "
                                                            "it again. None: carla_host/carla_port as given")

    # Rendering
    render: bool = Field(True, description="False: no_rendering_mode, no camera (black images)")
    headless: bool = Field(False, description="False: the server's spectator follows the ego")
    fps: int = Field(30, ge=1, le=200, description="simulation frames per simulated second = 1/control_dt")

    # Physics
    physics_dt: float = Field(1.0 / 60.0, gt=0, le=0.1, description="physics sub-step, s")
    control_dt: float = Field(1.0 / 30.0, gt=0, le=1.0, description="one env step = one world tick, s")

    # Camera
    image_width: int = Field(224, ge=16, le=4096, description="camera resolution, px")
    image_height: int = Field(224, ge=16, le=4096, description="camera resolution, px")
    image_size: int | None = Field(None, ge=16, le=512,
                                   description="side of the square observation image; None: the camera's "
                                               "(which must then be square)")
    camera_fov: float = Field(90.0, gt=10, lt=180, description="horizontal field of view, degrees")

    # Server-side services
    traffic_manager_port: int | None = Field(None, ge=1, le=65535,
                                             description="None: carla_port + 6000 (8000 for the default 2000)")
    timeout_s: float = Field(60.0, gt=0, description="client RPC timeout (Roach uses 60 s)")
    sensor_timeout_s: float = Field(10.0, gt=0, description="wait for a tick's camera frame before giving up")
    connect_retries: int = Field(3, ge=1, description="connection attempts in reconnect()")
    retry_delay_s: float = Field(5.0, ge=0, description="pause between connection attempts")

    # Scenario and traffic
    scenario: ScenarioName = "urban"
    num_vehicles: int | None = Field(None, ge=0, le=500, description="NPC vehicles; None: the scenario's")
    num_walkers: int | None = Field(None, ge=0, le=500, description="NPC walkers; None: the scenario's")
    ego_blueprint: str = "vehicle.lincoln.mkz_2020"

    # Episode
    max_episode_steps: int = Field(1000, ge=1)
    route_length_m: float = Field(300.0, gt=10, description="length of the random route of an episode")
    off_route_distance_m: float = Field(15.0, gt=0, description="terminate when this far from the route")
    command_lookahead_m: float = Field(30.0, gt=0, description="announce a turn this far before it")
    terminate_on_collision: bool = True
    settle_ticks: int = Field(3, ge=1, description="ticks after spawning before the first observation")
    seed: int = Field(0, ge=0)
    reward: RewardConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _fps_and_control_dt(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        has_fps, has_dt = data.get("fps") is not None, data.get("control_dt") is not None
        if has_fps and not has_dt:
            data["control_dt"] = 1.0 / float(data["fps"])
        elif has_dt and not has_fps:
            data["fps"] = max(1, round(1.0 / float(data["control_dt"])))
        elif has_fps and has_dt and abs(float(data["fps"]) * float(data["control_dt"]) - 1.0) > 1e-3:
            raise ValueError(f"fps={data['fps']} and control_dt={data['control_dt']} disagree: one world "
                             "tick is one control step, so fps must be 1/control_dt (give only one of them)")
        return data

    @model_validator(mode="after")
    def _check(self) -> SimulatorConfig:
        ratio = self.control_dt / self.physics_dt
        if abs(ratio - round(ratio)) > _DT_TOLERANCE * max(1.0, ratio) or round(ratio) < 1:
            raise ValueError(f"control_dt={self.control_dt} must be a whole multiple of physics_dt="
                             f"{self.physics_dt} (each tick runs control_dt/physics_dt physics sub-steps)")
        if round(ratio) > MAX_SUBSTEPS:
            raise ValueError(f"control_dt/physics_dt={round(ratio)} sub-steps per tick; CARLA allows at most "
                             f"{MAX_SUBSTEPS} (raise physics_dt or lower control_dt)")
        if self.image_size is None and self.image_width != self.image_height:
            raise ValueError(f"image_width={self.image_width} != image_height={self.image_height}: the "
                             "observation image is square, so set image_size (the camera frame is resized)")
        if not _TOWN_PATTERN.match(self.carla_town):
            raise ValueError(f"carla_town={self.carla_town!r} is not a CARLA town name like 'Town01' or "
                             "'Town10HD_Opt'")
        if self.tm_port > 65535:
            raise ValueError(f"carla_port={self.carla_port}: the derived traffic manager port "
                             f"{self.tm_port} is out of range; set traffic_manager_port")
        if self.tm_port in (self.carla_port, self.carla_port + 1, self.carla_port + 2):
            raise ValueError(f"traffic_manager_port={self.tm_port} collides with the server's ports "
                             f"{self.carla_port}..{self.carla_port + 2} (rpc, streaming, secondary)")
        return self

    # -- derived values --------------------------------------------------------------------------
    @property
    def substeps(self) -> int:
        """Physics sub-steps per world tick."""
        return int(round(self.control_dt / self.physics_dt))

    @property
    def tm_port(self) -> int:
        return self.traffic_manager_port if self.traffic_manager_port is not None else self.carla_port + 6000

    @property
    def obs_size(self) -> int:
        return self.image_size if self.image_size is not None else self.image_width

    @property
    def policy_frequency(self) -> float:
        return 1.0 / self.control_dt

    @property
    def town(self) -> str:
        """The town the episode runs in: an explicit ``carla_town``, else the scenario's, else Town01."""
        if "carla_town" in self.model_fields_set:
            return self.carla_town
        return get_scenario(self.scenario).carla.town or self.carla_town

    @property
    def weather(self) -> str:
        """The `carla.WeatherParameters` preset: the scenario's (night, rain) or ClearNoon.

        Weather persists on the server across clients, so a scenario without its own weather still
        sets one: the previous user's ClearNight must not leak into an urban run.
        """
        return get_scenario(self.scenario).carla.weather or "ClearNoon"

    @property
    def vehicles(self) -> int:
        return get_scenario(self.scenario).carla.vehicles if self.num_vehicles is None else self.num_vehicles

    @property
    def walkers(self) -> int:
        return get_scenario(self.scenario).carla.pedestrians if self.num_walkers is None else self.num_walkers

    def resolved_reward(self) -> RewardConfig:
        """The reward weights in force; an unset target speed is the scenario's (as `EnvConfig`)."""
        return resolve_reward(self.reward, self.scenario)

    @classmethod
    def from_env_config(cls, cfg: EnvConfig, slot: int = 0, **overrides: Any) -> SimulatorConfig:
        """The CARLA settings for a backend-neutral `EnvConfig`, for env slot ``slot``.

        The server: entry ``slot`` of the endpoint list the CARLA resource publishes
        (``DRIVEVLA_CARLA_SERVERS_FILE``, else ``DRIVEVLA_CARLA_SERVERS``: `endpoints.slot_endpoint`);
        without a list, ``CARLA_HOST`` / ``CARLA_PORT`` (and ``CARLA_TM_PORT``) when set, else the
        seed's defaults — for slot 0 only, since one synchronous server takes one client. A host or
        port in ``overrides`` wins and unbinds the env from the list; other ``overrides`` win as
        well. The control step is the env's ``policy_frequency``; physics keeps the seed's 60 Hz
        where that divides the step, else the nearest finer rate that does.
        """
        control_dt = 1.0 / cfg.policy_frequency
        physics_dt = control_dt / max(1, math.ceil(control_dt * 60.0 - 1e-9))
        explicit = bool({"carla_host", "carla_port", "traffic_manager_port"} & overrides.keys())
        endpoint = None if explicit else slot_endpoint(slot)
        values: dict[str, Any] = {
            "carla_host": os.environ.get("CARLA_HOST", "localhost"),
            "carla_port": int(os.environ.get("CARLA_PORT", "2000")),
            "scenario": cfg.scenario,
            "control_dt": control_dt,
            "physics_dt": physics_dt,
            "image_width": cfg.image_size,
            "image_height": cfg.image_size,
            "image_size": cfg.image_size,
            "max_episode_steps": cfg.max_episode_steps,
            # As the embedded backend: a route the target speed covers in 80 % of an episode.
            "route_length_m": max(50.0, 0.8 * cfg.resolved_reward().target_speed * cfg.episode_seconds),
            "num_vehicles": cfg.vehicles_count,
            "seed": cfg.seed,
            "reward": cfg.resolved_reward(),
        }
        if endpoint is not None:
            values.update(carla_host=endpoint.host, carla_port=endpoint.port, traffic_manager_port=endpoint.tm_port)
        elif os.environ.get("CARLA_TM_PORT"):
            values["traffic_manager_port"] = int(os.environ["CARLA_TM_PORT"])
        if not explicit:
            values["server_slot"] = slot
        values.update(overrides)
        return cls.model_validate(values)

