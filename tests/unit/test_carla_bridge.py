"""The CARLA bridge against the fake client (tests/fakes/fake_carla.py): no server needed.

What is checked: the synchronous settings and traffic manager, observations inside the shared
spaces, frame matching, sensor events into ``info`` / termination / reward, lane deviation from the
map's waypoints, routes and their commands, scenarios, destruction of every spawned actor on reset
and close, restored settings, and a lost connection surfacing as `CarlaConnectionError` that the
next reset recovers from.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from stages.envs.carla_bridge import (
    CARLABridge, CARLARewardWrapper, CarlaConnectionError, Lifecycle, RoadOption, Route, RoutePlanner, SimulatorConfig,
    command_text, is_connection_error, load_carla, make_carla_env, server_version)
from stages.envs.config import EnvConfig, RewardConfig
from stages.envs.rewards import compute_driving_reward, reward_terms
from stages.envs.spaces import STATE_FIELDS, clip_action
from tests.fakes import fake_carla

# The info keys of the env contract (stages/envs/base.py, INFO_KEYS; the highway backend in stages/envs/highway/
# carries them too), which the bridge must carry.
HIGHWAY_INFO_KEYS = {"velocity", "speed", "lane_deviation", "heading_error", "collision", "route_completion",
                     "infractions", "ego_pose", "command", "caption", "scenario", "lane_index", "done_reason"}
INFRACTION_KEYS = {"collision", "off_road", "lane_invasion", "wrong_way", "speeding"}
STATE = {name: i for i, name in enumerate(STATE_FIELDS)}


@pytest.fixture
def fake():
    fake_carla.reset()
    yield fake_carla
    fake_carla.reset()


@pytest.fixture
def server(fake):
    return fake.start_server("localhost", 2000)


def make_bridge(fake_module, **overrides) -> CARLABridge:
    values = {"num_vehicles": 0, "num_walkers": 0, "retry_delay_s": 0.0, "sensor_timeout_s": 0.2,
              "route_length_m": 150.0, "headless": True, **overrides}
    return CARLABridge(SimulatorConfig(**values), carla_module=fake_module)


@pytest.fixture
def bridge(fake, server):
    b = make_bridge(fake)
    yield b
    b.close()


def teleport(bridge: CARLABridge, fake_module, x: float, y: float, yaw: float = 0.0) -> None:
    bridge.ego.set_transform(fake_module.Transform(fake_module.Location(x, y, 0.0), fake_module.Rotation(yaw=yaw)))


IDLE = np.array([0.0, 0.0, 1.0], dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Import and configuration
# ------------------------------------------------------------------------------------------------

def test_importing_the_bridge_does_not_import_carla(project_root):
    code = ("import sys; import stages.envs.carla_bridge as b; "
            "assert 'carla' not in sys.modules, 'carla imported at import time'; print(b.CARLABridge.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CARLABridge" in out.stdout


def test_the_bridge_reads_endpoints_without_the_docker_manager(project_root):
    """Layers (issue #13): the endpoint list comes from infra.carla.endpoints; neither the container
    manager nor the docker SDK loads with the bridge."""
    code = ("import sys; import stages.envs.carla_bridge\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('infra.carla.') or m == 'docker')\n"
            "print(' '.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["infra.carla.endpoints", "infra.carla.errors"]


def test_missing_carla_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)   # makes `import carla` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[carla\]"):
        load_carla()


def test_config_has_the_seeds_fields_and_defaults():
    cfg = SimulatorConfig()
    assert (cfg.carla_host, cfg.carla_port, cfg.carla_town) == ("localhost", 2000, "Town01")
    assert (cfg.render, cfg.headless, cfg.fps) == (True, False, 30)
    assert cfg.physics_dt == pytest.approx(1 / 60) and cfg.control_dt == pytest.approx(1 / 30)
    assert (cfg.image_width, cfg.image_height) == (224, 224)
    assert cfg.tm_port == 8000 and SimulatorConfig(carla_port=2005).tm_port == 8005
    assert cfg.timeout_s == 60.0 and cfg.substeps == 2


@pytest.mark.parametrize("bad, message", [
    ({"control_dt": 0.05, "physics_dt": 0.03}, "whole multiple"),
    ({"control_dt": 0.5, "physics_dt": 0.01}, "at most 16"),
    ({"fps": 20, "control_dt": 0.1}, "disagree"),
    ({"image_width": 320}, "image_size"),
    ({"carla_town": "Springfield"}, "CARLA town"),
    ({"traffic_manager_port": 2001}, "collides"),
    ({"scenario": "moon"}, "scenario"),
    ({"carla_hostname": "x"}, "Extra inputs"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        SimulatorConfig(**bad)


def test_fps_and_control_dt_follow_each_other():
    assert SimulatorConfig(fps=20).control_dt == pytest.approx(0.05)
    assert SimulatorConfig(control_dt=0.1).fps == 10


def test_config_from_env_config(monkeypatch):
    monkeypatch.delenv("DRIVEVLA_CARLA_SERVERS", raising=False)
    monkeypatch.delenv("DRIVEVLA_CARLA_SERVERS_FILE", raising=False)
    monkeypatch.setenv("CARLA_HOST", "carla-7")
    monkeypatch.setenv("CARLA_PORT", "2010")
    cfg = SimulatorConfig.from_env_config(EnvConfig(backend="carla", scenario="highway", image_size=96,
                                                    policy_frequency=10, vehicles_count=7))
    assert (cfg.carla_host, cfg.carla_port, cfg.tm_port) == ("carla-7", 2010, 8010)
    assert cfg.control_dt == pytest.approx(0.1) and cfg.substeps == 6
    assert cfg.obs_size == 96 and cfg.num_vehicles == 7 and cfg.town == "Town06"
    assert cfg.resolved_reward().target_speed == 25.0


# ------------------------------------------------------------------------------------------------
# Synchronous mode, traffic manager, observations
# ------------------------------------------------------------------------------------------------

def test_sync_settings_applied(fake, server):
    bridge = make_bridge(fake, traffic_manager_port=8123, control_dt=0.1, physics_dt=0.02)
    bridge.reset(seed=0)
    settings = server.world.get_settings()
    assert settings.synchronous_mode is True
    assert settings.fixed_delta_seconds == pytest.approx(0.1)
    assert settings.substepping is True
    assert settings.max_substeps == 5
    assert settings.max_substep_delta_time == pytest.approx(0.02)
    assert settings.fixed_delta_seconds <= settings.max_substep_delta_time * settings.max_substeps + 1e-12
    assert settings.no_rendering_mode is False
    tm = server.traffic_managers[8123]
    assert list(server.traffic_managers) == [8123]
    assert tm.get_port() == 8123 and tm.fake_synchronous_mode is True and tm.fake_seed is not None
    # One step is one tick.
    before = server.fake_frame
    bridge.step(IDLE)
    assert server.fake_frame == before + 1
    bridge.close()


def test_observation_matches_the_shared_space(bridge):
    obs, info = bridge.reset(seed=0)
    assert bridge.observation_space.contains(obs)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (224, 224, 3)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (len(STATE_FIELDS),)
    assert HIGHWAY_INFO_KEYS <= set(info) and set(info["infractions"]) == INFRACTION_KEYS
    for _ in range(3):
        obs, reward, terminated, truncated, info = bridge.step(bridge.action_space.sample())
        assert bridge.observation_space.contains(obs)
        assert isinstance(reward, float) and not terminated
    assert info["velocity"].shape == (3,) and info["ego_pose"].shape == (3,)
    assert obs["command"] == info["command"]


def test_camera_image_is_rgb_of_the_ticked_frame(bridge):
    obs, info = bridge.reset(seed=0)
    obs, *_, info = bridge.step(IDLE)
    # The fake camera writes BGRA = (200, 100, frame % 256, 255).
    assert (obs["image"][..., 0] == info["frame"] % 256).all()
    assert (obs["image"][..., 1] == 100).all() and (obs["image"][..., 2] == 200).all()


def test_camera_frame_resized_to_the_observation_size(fake, server):
    bridge = make_bridge(fake, image_width=320, image_height=240, image_size=64)
    obs, _ = bridge.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3)
    camera = server.world.fake_sensors_of(bridge.ego, "sensor.camera.rgb")[0]
    assert (camera.attributes["image_size_x"], camera.attributes["image_size_y"]) == ("320", "240")
    bridge.close()


def test_frame_matching_drops_stale_images(bridge, server):
    bridge.reset(seed=0)
    server.stale_images = 3
    dropped = bridge.dropped_frames
    obs, *_, info = bridge.step(IDLE)
    assert bridge.dropped_frames == dropped + 3
    assert (obs["image"][..., 0] == info["frame"] % 256).all()


def test_missing_camera_frame_is_a_connection_error(bridge, server):
    bridge.reset(seed=0)
    server.drop_images = True
    with pytest.raises(CarlaConnectionError, match="no camera image"):
        bridge.step(IDLE)


def test_render_off_means_no_camera_and_black_images(fake, server):
    bridge = make_bridge(fake, render=False)
    obs, _ = bridge.reset(seed=0)
    assert server.world.get_settings().no_rendering_mode is True
    assert not server.world.fake_sensors_of(bridge.ego, "sensor.camera.rgb")
    assert obs["image"].shape == (224, 224, 3) and not obs["image"].any()
    bridge.close()


def test_spectator_follows_the_ego_unless_headless(fake, server):
    bridge = make_bridge(fake, headless=False)
    bridge.reset(seed=0)
    bridge.step([1.0, 0.0, 0.0])
    spectator = server.world._spectator.get_transform()
    ego = bridge.ego.get_transform()
    assert spectator.location.x < ego.location.x and spectator.location.z > ego.location.z
    bridge.close()
    quiet = make_bridge(fake, headless=True)
    server.calls.clear()
    quiet.reset(seed=0)
    quiet.step(IDLE)
    assert "World.get_spectator" not in server.calls
    quiet.close()


def test_step_before_reset_is_an_error(fake, server):
    bridge = make_bridge(fake)
    with pytest.raises(RuntimeError, match="reset"):
        bridge.step(IDLE)


# ------------------------------------------------------------------------------------------------
# Sensor events, measurements, reward
# ------------------------------------------------------------------------------------------------

def test_collision_event_terminates_with_the_penalty(bridge, server):
    bridge.reset(seed=0)
    server.world.fake_inject_collision(bridge.ego)
    action = np.array([0.5, 0.0, 0.0], dtype=np.float32)
    obs, reward, terminated, truncated, info = bridge.step(action)
    assert info["collision"] is True and terminated and not truncated
    assert info["done_reason"] == "collision" and info["infractions"]["collision"] == 1
    terms = reward_terms(action, info, bridge.reward_config)
    assert terms["collision"] == -bridge.reward_config.collision_penalty == -10.0
    assert reward == pytest.approx(sum(terms.values()))
    no_crash = dict(info, collision=False)
    assert reward == pytest.approx(compute_driving_reward(bridge, action, no_crash) - 10.0)


def test_driving_into_a_parked_car_is_a_collision(bridge, server, fake):
    bridge.reset(seed=0, options={"spawn_index": 0})          # (5, 0), heading +x
    lib = server.world.get_blueprint_library()
    server.world.fake_spawn(lib.find("vehicle.audi.tt"), fake.Transform(fake.Location(20.0, 0.0, 0.0)), None)
    for _ in range(200):
        *_, terminated, truncated, info = bridge.step([1.0, 0.0, 0.0])
        if terminated or truncated:
            break
    assert info["done_reason"] == "collision" and info["collision"]


def test_late_sensor_events_of_the_settling_ticks_are_dropped():
    from types import SimpleNamespace

    from stages.envs.carla_bridge.sensors import SensorEvents

    events = SensorEvents()
    events.on_collision(SimpleNamespace(frame=4, other_actor=None))
    events.clear(through_frame=10)                             # the episode starts at frame 10
    marking = SimpleNamespace(type="Broken")
    for frame in (9, 10, 11):                                  # 9 and 10 arrive after the clear
        events.on_collision(SimpleNamespace(frame=frame, other_actor=None))
        events.on_lane_invasion(SimpleNamespace(frame=frame, crossed_lane_markings=[marking]))
    collisions, invasions = events.take(11)
    assert [f for f, _ in collisions] == [11] and invasions == [(11, ("Broken",))]


def test_collision_can_be_non_terminal(fake, server):
    bridge = make_bridge(fake, terminate_on_collision=False)
    bridge.reset(seed=0)
    server.world.fake_inject_collision(bridge.ego)
    _, reward, terminated, _, info = bridge.step(IDLE)
    assert info["collision"] and not terminated and reward < 0
    bridge.close()


def test_lane_invasion_is_counted_not_terminal(bridge, server):
    bridge.reset(seed=0)
    server.world.fake_inject_lane_invasion(bridge.ego)
    *_, terminated, _, info = bridge.step(IDLE)
    assert info["infractions"]["lane_invasion"] == 1 and not terminated


def test_lane_deviation_and_heading_error_from_waypoints(bridge, fake):
    bridge.reset(seed=0, options={"spawn_index": 0})          # lane centre y = 0, heading +x
    teleport(bridge, fake, 30.0, 0.8, yaw=10.0)               # CARLA: +y is to the right
    obs, _, terminated, _, info = bridge.step(IDLE)
    assert not terminated
    assert info["lane_deviation"] == pytest.approx(0.8, abs=1e-3)
    assert info["heading_error"] == pytest.approx(math.radians(10.0), abs=1e-3)
    assert obs["state"][STATE["lateral_offset"]] == pytest.approx(0.8, abs=1e-3)
    assert obs["state"][STATE["heading_error"]] == pytest.approx(math.radians(10.0), abs=1e-3)
    # ego_pose in the right-handed frame: y and yaw change sign.
    assert info["ego_pose"][1] == pytest.approx(-0.8, abs=1e-3)
    assert info["ego_pose"][2] == pytest.approx(-math.radians(10.0), abs=1e-3)


def test_lane_deviation_inside_a_junction_follows_the_route(bridge, fake):
    # Junction connectors overlap at their start, so the route (here: the left turn) is the reference.
    bridge.reset(seed=0, options={"spawn_index": 0, "destination": fake.Location(110.0, -60.0, 0.0)})
    for x in (20.0, 35.0, 50.0, 65.0, 80.0, 95.0):
        teleport(bridge, fake, x, 0.0)
        bridge.step(IDLE)
    x, y = 100 + 10 * math.sin(math.radians(30)), -10 + 10 * math.cos(math.radians(30))
    teleport(bridge, fake, x, y, yaw=-30.0)                   # on the left-turn arc, tangent heading
    *_, info = bridge.step(IDLE)
    assert abs(info["lane_deviation"]) < 0.2 and abs(info["heading_error"]) < math.radians(8)
    assert info["done_reason"] == ""


def test_steering_right_turns_clockwise_in_carla_and_negative_yaw_in_ego_pose(bridge):
    bridge.reset(seed=0, options={"spawn_index": 0})
    for _ in range(30):
        *_, info = bridge.step([0.6, 0.3, 0.0])
    assert info["heading_error"] > 0 and info["lane_deviation"] > 0
    assert info["ego_pose"][2] < 0 and info["ego_pose"][1] < 0
    assert info["velocity"][1] < 0 < info["speed"]


def test_leaving_the_road_terminates(bridge, fake):
    bridge.reset(seed=0, options={"spawn_index": 0})
    teleport(bridge, fake, 30.0, -5.0)
    *_, terminated, _, info = bridge.step(IDLE)
    assert terminated and info["done_reason"] == "off_road" and info["infractions"]["off_road"] == 1


def test_time_limit_truncates(fake, server):
    bridge = make_bridge(fake, max_episode_steps=3)
    bridge.reset(seed=0)
    results = [bridge.step(IDLE) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True] and results[-1][4]["done_reason"] == "time_limit"
    bridge.close()


def test_route_completion_grows_to_the_end(bridge, fake):
    _, info = bridge.reset(seed=0, options={"spawn_index": 0, "destination": fake.Location(90.0, 0.0, 0.0)})
    assert info["route_completion"] == pytest.approx(0.0, abs=1e-6)
    completions = []
    for x in (20.0, 35.0, 50.0, 65.0, 80.0, 90.0):
        teleport(bridge, fake, x, 0.0)
        *_, truncated, info = bridge.step(IDLE)
        completions.append(info["route_completion"])
    assert completions == sorted(completions) and completions[-1] > 0.95
    assert truncated and info["done_reason"] == "route_completed"


def test_front_distance_is_the_gap_to_the_car_ahead_on_the_route(fake, server):
    bridge = make_bridge(fake, num_vehicles=100)              # every free spawn point gets a car
    obs, _ = bridge.reset(seed=0, options={"spawn_index": 0})  # ego at x=5; next spawn point x=30
    assert obs["state"][STATE["front_distance"]] == pytest.approx(25.0 - 2 * 2.4, abs=0.3)
    bridge.close()


def test_reward_is_compute_driving_reward(bridge):
    bridge.reset(seed=0)
    action = np.array([0.7, -0.2, 0.1], dtype=np.float32)
    _, reward, _, _, info = bridge.step(action)
    assert reward == pytest.approx(compute_driving_reward(bridge, clip_action(action), info))


def test_reward_wrapper_weights(bridge):
    assert bridge.reward_config == RewardConfig(target_speed=8.33)   # the seed's weights, urban target
    wrapped = CARLARewardWrapper(bridge, {"collision_penalty": 50.0, "speed_weight": 2.0})
    assert (wrapped.speed_weight, wrapped.lane_weight, wrapped.collision_penalty, wrapped.target_speed) == \
        (2.0, 0.5, 50.0, 8.33)
    wrapped.reset(seed=0)
    action = np.array([0.5, 0.0, 0.0], dtype=np.float32)
    _, reward, _, _, info = wrapped.step(action)
    expected = compute_driving_reward(bridge, action, info, wrapped.reward_config)
    assert reward == pytest.approx(expected)
    assert info["env_reward"] == pytest.approx(compute_driving_reward(bridge, action, info))


# ------------------------------------------------------------------------------------------------
# Routes and commands
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def planner(fake):
    return RoutePlanner(fake.Map("Town01"), 2.0, fake)


@pytest.mark.parametrize("origin, destination, option, text", [
    ((5.0, 0.0), (110.0, -60.0), RoadOption.LEFT, "turn left at the next intersection"),
    ((5.0, 3.5), (110.0, 60.0), RoadOption.RIGHT, "turn right at the next intersection"),
    ((5.0, 0.0), (200.0, 0.0), RoadOption.STRAIGHT, "go straight at the next intersection"),
])
def test_route_options_at_the_junction(planner, fake, origin, destination, option, text):
    trace = planner.trace_route(fake.Location(*origin, 0.0), fake.Location(*destination, 0.0))
    options = [o for _, o in trace]
    junction = [o for w, o in trace if w.is_junction]
    assert junction and set(junction) == {option}
    assert options[0] == RoadOption.LANEFOLLOW and options[-1] == RoadOption.LANEFOLLOW
    end = trace[-1][0].transform.location
    assert math.hypot(end.x - destination[0], end.y - destination[1]) < 2.5
    assert command_text(option) == text


def test_lane_change_edges_come_from_the_map(planner, fake):
    trace = planner.trace_route(fake.Location(5.0, 0.0, 0.0), fake.Location(110.0, 60.0, 0.0))
    options = {o for _, o in trace}
    assert RoadOption.CHANGELANERIGHT in options and RoadOption.RIGHT in options
    assert command_text(RoadOption.CHANGELANERIGHT) == "change to the right lane"
    assert command_text(RoadOption.CHANGELANELEFT) == "change to the left lane"
    assert command_text(RoadOption.LANEFOLLOW) == command_text(RoadOption.VOID) == "follow the lane"


def test_random_routes_are_seeded_and_stop_at_dead_ends(planner, fake):
    start = fake.Location(5.0, 0.0, 0.0)
    a = planner.random_route(start, 150.0, np.random.default_rng(3))
    b = planner.random_route(start, 150.0, np.random.default_rng(3))
    assert [w.transform.location.x for w, _ in a] == [w.transform.location.x for w, _ in b]
    long = planner.random_route(start, 10_000.0, np.random.default_rng(0))
    assert not long[-1][0].next(2.0)                          # ended at a dead end, not at 10 km
    assert 200.0 < Route.from_trace(long).length < 500.0


def test_command_announces_the_turn_within_the_lookahead(bridge, fake):
    _, info = bridge.reset(seed=0, options={"spawn_index": 0, "destination": fake.Location(110.0, -60.0, 0.0)})
    assert info["command"] == "follow the lane"               # junction 95 m ahead
    for x in (20.0, 35.0, 50.0, 65.0, 75.0):
        teleport(bridge, fake, x, 0.0)
        obs, *_, info = bridge.step(IDLE)
    assert obs["command"] == info["command"] == "turn left at the next intersection"
    assert "turn left" in info["caption"]


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario, town, weather, vehicles, walkers", [
    ("urban", "Town01", "ClearNoon", 50, 30),
    ("highway", "Town06", "ClearNoon", 30, 0),
    ("night", "Town01", "ClearNight", 30, 0),
    ("rain", "Town01", "WetCloudySunset", 30, 0),
])
def test_scenarios_set_town_weather_and_traffic(fake, server, scenario, town, weather, vehicles, walkers):
    cfg = SimulatorConfig(scenario=scenario, retry_delay_s=0.0, headless=True)
    assert (cfg.town, cfg.weather, cfg.vehicles, cfg.walkers) == (town, weather, vehicles, walkers)
    bridge = CARLABridge(cfg, carla_module=fake)
    bridge.reset(seed=0)
    world = server.world
    assert world.get_map().name.endswith(town)
    assert server.loads == ([] if town == "Town01" else [town])
    assert fake.weather_name(world.get_weather()) == weather
    ego = bridge.ego.get_location()
    free = [sp for sp in fake.SPAWN_POINTS
            if math.hypot(sp.location.x - ego.x, sp.location.y - ego.y) > 10.0]   # NPCs keep 10 m away
    assert len(server.alive_actors("vehicle.")) - 1 == min(vehicles, len(free))
    assert len(server.alive_actors("walker.")) == walkers
    assert len(server.alive_actors("controller.ai.walker")) == walkers
    assert all(c.fake_started and c.fake_max_speed for c in server.alive_actors("controller.ai.walker"))
    tm = server.traffic_managers[cfg.tm_port]
    npcs = [v for v in server.alive_actors("vehicle.") if v.id != bridge.ego.id]
    assert all(v.fake_autopilot and v.fake_tm_port == cfg.tm_port for v in npcs)
    if scenario == "highway":
        assert tm.fake_speed_difference < 0 and all(v.attributes["base_type"] == "car" for v in npcs)
    if scenario == "urban":
        assert tm.fake_leading_distance == 2.0
    assert all(v.attributes["number_of_wheels"] == "4" for v in npcs)
    assert bridge.ego.attributes["role_name"] == "hero"
    bridge.close()
    assert not server.world.fake_actors


def test_explicit_town_wins_over_the_scenarios(fake, server):
    bridge = make_bridge(fake, scenario="highway", carla_town="Town04")
    bridge.reset(seed=0)
    assert server.loads == ["Town04"] and bridge.world.get_map().name.endswith("Town04")
    bridge.close()


def test_episodes_are_reproducible_from_the_seed(fake):
    positions = []
    for port in (2000, 2010):
        srv = fake.start_server("localhost", port)
        bridge = make_bridge(fake, carla_port=port, num_vehicles=6, num_walkers=3)
        bridge.reset(seed=7)
        ego = bridge.ego.get_location()
        others = sorted((round(a.get_location().x, 3), round(a.get_location().y, 3))
                        for a in srv.alive_actors("vehicle."))
        positions.append(((ego.x, ego.y), others, [w.transform.location.x for w in bridge.route.waypoints]))
        bridge.close()
    assert positions[0] == positions[1]


# ------------------------------------------------------------------------------------------------
# Cleanup
# ------------------------------------------------------------------------------------------------

def test_actors_destroyed_on_close(fake, server):
    bridge = make_bridge(fake, num_vehicles=8, num_walkers=5)
    bridge.reset(seed=0)
    spawned = set(bridge.spawned_actor_ids)
    sensors = [a for a in server.world.fake_actors.values() if a.type_id.startswith("sensor.")]
    controllers = server.alive_actors("controller.ai.walker")
    assert len(controllers) == 5 and all(c.fake_started for c in controllers)
    assert {s.type_id for s in sensors} == {"sensor.camera.rgb", "sensor.other.collision",
                                            "sensor.other.lane_invasion"}
    assert set(server.world.fake_actors) == spawned
    bridge.close()
    assert not server.world.fake_actors                        # nothing left on the server
    assert spawned <= set(server.fake_destroyed)
    assert all(not s.is_alive and not s.is_listening() for s in sensors)
    assert server.fake_destroyed_while_listening == []          # sensors were stopped first
    assert all(not c.fake_started for c in controllers)         # walkers were stopped first
    bridge.close()                                              # idempotent


def test_actors_destroyed_on_reset(fake, server):
    bridge = make_bridge(fake, num_vehicles=8, num_walkers=5)
    bridge.reset(seed=0)
    first = set(bridge.spawned_actor_ids)
    bridge.reset(seed=1)
    second = set(bridge.spawned_actor_ids)
    assert first.isdisjoint(second)
    assert first <= set(server.fake_destroyed)
    assert set(server.world.fake_actors) == second             # no orphans from episode one
    assert server.fake_destroyed_while_listening == []
    bridge.close()


def test_original_settings_restored_on_close(fake, server):
    original = fake.WorldSettings(no_rendering_mode=False, fixed_delta_seconds=0.05, max_substeps=7)
    server.world.apply_settings(original)
    bridge = make_bridge(fake)
    bridge.reset(seed=0)
    assert server.world.get_settings().synchronous_mode
    tm = server.traffic_managers[8000]
    bridge.close()
    assert server.world.get_settings() == original
    assert tm.fake_synchronous_mode is False


def test_a_server_found_in_sync_mode_is_given_back_async(fake, server):
    server.world.apply_settings(fake.WorldSettings(synchronous_mode=True, fixed_delta_seconds=0.1))
    bridge = make_bridge(fake)
    bridge.reset(seed=0)
    bridge.close()
    restored = server.world.get_settings()
    assert restored.synchronous_mode is False and restored.fixed_delta_seconds == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# Lost connections and recovery
# ------------------------------------------------------------------------------------------------

def test_lost_connection_is_the_recoverable_error(bridge, server):
    bridge.reset(seed=0)
    server.fail_next()
    with pytest.raises(CarlaConnectionError, match="time-out of .* while waiting for the simulator") as caught:
        bridge.step(IDLE)
    assert isinstance(caught.value, RuntimeError) and is_connection_error(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)
    calls = len(server.calls)
    with pytest.raises(CarlaConnectionError, match="reset"):
        bridge.step(IDLE)                                       # no server call until reset
    assert len(server.calls) == calls
    assert not bridge.connected


@pytest.mark.parametrize("message", [
    "rpc::rpc_error during call in function tick",
    "read: End of file",
    "trying to create rpc server for traffic manager; but the system failed to create because of bind error.",
])
def test_other_connection_messages_are_recoverable(message):
    assert is_connection_error(RuntimeError(message))


def test_other_runtime_errors_are_not_connection_errors(bridge, server):
    assert not is_connection_error(RuntimeError("Spawn failed because of collision at spawn position"))
    bridge.reset(seed=0)
    server.fail_next(message="blueprint 'vehicle.foo' not found")
    with pytest.raises(RuntimeError) as caught:
        bridge.step(IDLE)
    assert not isinstance(caught.value, CarlaConnectionError)


def test_reset_after_a_lost_connection_reconnects(bridge, server):
    bridge.reset(seed=0)
    old_client, old_ids = bridge.client, set(bridge.spawned_actor_ids)
    server.fail_next()
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)
    obs, info = bridge.reset()
    assert bridge.client is not old_client and bridge.connected
    assert bridge.observation_space.contains(obs)
    assert old_ids <= set(server.fake_destroyed)               # the server survived: old actors cleaned
    assert set(server.world.fake_actors) == set(bridge.spawned_actor_ids)
    assert server.world.get_settings().synchronous_mode
    bridge.step(IDLE)


def test_reset_after_a_server_restart(bridge, server):
    bridge.reset(seed=0)
    server.kill()
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)
    server.restart()                                            # a fresh process: default settings, no actors
    bridge.reset()
    assert server.world.get_settings().synchronous_mode
    assert server.traffic_managers[8000].fake_synchronous_mode
    *_, info = bridge.step(IDLE)
    assert info["done_reason"] == ""


def test_a_restarted_server_loses_no_actors_to_stale_ids(bridge, server, fake):
    bridge.reset(seed=0)
    old_ids = set(bridge.spawned_actor_ids)
    server.kill()
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)
    server.restart()
    lib = server.world.get_blueprint_library()
    strangers = [server.world.fake_spawn(lib.find("vehicle.audi.tt"),
                                         fake.Transform(fake.Location(120.0 + 20 * i, 0.0, 0.0)), None)
                 for i in range(len(old_ids))]
    assert old_ids & {a.id for a in strangers}                 # the new process reuses the ids
    bridge.reset()
    assert all(a.is_alive for a in strangers)                  # not destroyed by a stale id


def test_a_failure_during_reset_is_recovered_by_the_next_reset(bridge, server):
    bridge.reset(seed=0)
    server.fail_next(count=1)
    with pytest.raises(CarlaConnectionError):
        bridge.reset(seed=1)                                    # fails while tearing down episode 0
    obs, _ = bridge.reset(seed=1)
    assert bridge.observation_space.contains(obs)
    assert set(server.world.fake_actors) == set(bridge.spawned_actor_ids)   # episode 0 cleaned up
    server.calls.clear()
    server.fail_next(count=1, message="rpc::rpc_error during call in function spawn_actor")
    with pytest.raises(CarlaConnectionError):
        bridge.reset(seed=2)
    bridge.reset(seed=2)
    assert set(server.world.fake_actors) == set(bridge.spawned_actor_ids)


def test_reconnect_to_a_server_on_new_ports(fake, server):
    bridge = make_bridge(fake)
    bridge.reset(seed=0)
    fake.stop_server("localhost", 2000)
    new = fake.start_server("localhost", 2005)
    bridge.reconnect(port=2005)
    assert bridge.config.carla_port == 2005 and bridge.config.tm_port == 8005
    with pytest.raises(RuntimeError, match="reset"):
        bridge.step(IDLE)                                       # the episode went with the old server
    bridge.reset()
    assert new.traffic_managers[8005].fake_synchronous_mode
    assert set(new.world.fake_actors) == set(bridge.spawned_actor_ids)
    bridge.close()
    assert not new.world.fake_actors


def _endpoint(index: int, port: int, generation: int = 0):
    from infra.carla import CarlaEndpoint

    return CarlaEndpoint(index=index, host="localhost", port=port, streaming_port=port + 1, secondary_port=port + 2,
                         tm_port=port + 3, gpu=None, name=f"carla-{index}", container_id="", generation=generation)


@pytest.fixture
def published(fake, tmp_path, monkeypatch):
    """Two servers listed the way the CARLA resource lists them: the variable and the file."""
    from infra.carla import ENV_VAR, FILE_ENV_VAR, endpoints_to_env, write_endpoints_file

    servers = [fake.start_server("localhost", port) for port in (2000, 2004)]
    endpoints = [_endpoint(0, 2000), _endpoint(1, 2004)]
    listing = tmp_path / "servers.json"
    write_endpoints_file(listing, endpoints)
    monkeypatch.setenv(ENV_VAR, endpoints_to_env(endpoints))
    monkeypatch.setenv(FILE_ENV_VAR, str(listing))
    return servers, endpoints, listing


def _slot_env(fake, slot: int) -> CARLABridge:
    return make_carla_env(EnvConfig(backend="carla", image_size=64, vehicles_count=0), seed=0, carla_module=fake,
                          slot=slot, num_walkers=0, headless=True, retry_delay_s=0.0, sensor_timeout_s=0.2)


def test_env_slot_connects_to_its_own_server(fake, published):
    (first, second), endpoints, _ = published
    env = _slot_env(fake, 1)
    env.reset(seed=0)
    assert (env.config.carla_port, env.config.tm_port, env.config.server_slot) == (2004, 2007, 1)
    assert set(second.world.fake_actors) == set(env.spawned_actor_ids)
    assert list(second.traffic_managers) == [2007]
    assert not first.calls                                     # slot 0's server is another env's
    env.close()


def test_a_bridge_follows_its_server_to_the_ports_of_the_listing(fake, published, caplog):
    from infra.carla import write_endpoints_file

    (_, second), endpoints, listing = published
    env = _slot_env(fake, 1)
    env.reset(seed=0)
    env.step(IDLE)
    # The supervisor restarted server 1 on other ports: the old process is gone, the listing moved on.
    second.kill()
    fake.stop_server("localhost", 2004)
    moved = fake.start_server("localhost", 2012)
    write_endpoints_file(listing, [endpoints[0], _endpoint(1, 2012, generation=1)])
    with pytest.raises(CarlaConnectionError):
        env.step(IDLE)
    with caplog.at_level("WARNING", logger="stages.envs.carla_bridge.session"):
        obs, _ = env.reset()
    assert (env.config.carla_host, env.config.carla_port, env.config.tm_port) == ("localhost", 2012, 2015)
    assert "env slot 1: CARLA server carla-1 moved from localhost:2004" in caplog.text
    assert "to localhost:2012 (traffic manager 2015, generation 1)" in caplog.text
    assert env.observation_space.contains(obs)
    assert set(moved.world.fake_actors) == set(env.spawned_actor_ids)
    assert moved.traffic_managers[2015].fake_synchronous_mode and moved.world.get_settings().synchronous_mode
    env.step(IDLE)
    env.close()
    assert not moved.world.fake_actors


def test_without_the_listing_file_the_snapshot_names_the_server(fake, published):
    (_, second), _, listing = published
    env = _slot_env(fake, 1)
    env.reset(seed=0)
    listing.unlink()                                           # the resource is gone; the variable remains
    second.kill()
    with pytest.raises(CarlaConnectionError):
        env.step(IDLE)
    second.restart()                                           # same ports, as a supervisor restart keeps them
    env.reset()
    assert env.config.carla_port == 2004 and set(second.world.fake_actors) == set(env.spawned_actor_ids)
    env.close()


def test_no_server_fails_after_the_retries(fake):
    bridge = make_bridge(fake, connect_retries=3)
    with pytest.raises(CarlaConnectionError, match="after 3 attempts"):
        bridge.reset(seed=0)
    fake.start_server("localhost", 2000)
    obs, _ = bridge.reset(seed=0)                              # the same bridge recovers once it is up
    assert bridge.observation_space.contains(obs)
    bridge.close()


def test_close_after_a_lost_connection_does_not_block(bridge, server):
    bridge.reset(seed=0)
    server.kill()
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)
    calls = len(server.calls)
    bridge.close()
    assert len(server.calls) == calls                           # no calls to a dead server


def test_server_version_probe(fake, server):
    assert server_version("localhost", 2000, timeout=1.0, carla_module=fake) == "0.9.16"
    with pytest.raises(CarlaConnectionError, match="not ready"):
        server_version("localhost", 2999, timeout=1.0, carla_module=fake)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

def test_initialize_builds_the_episode_and_the_first_reset_reuses_it(fake, server):
    bridge = make_bridge(fake)
    bridge.initialize()
    ids = bridge.spawned_actor_ids
    assert ids and server.world.get_settings().synchronous_mode
    obs, info = bridge.reset()
    assert bridge.spawned_actor_ids == ids
    bridge.reset(seed=5)
    assert set(bridge.spawned_actor_ids).isdisjoint(ids)
    bridge.close()


def test_lifecycle_is_one_state_through_initialize_step_failure_reset_and_close(fake, server):
    bridge = make_bridge(fake)
    assert bridge.lifecycle is Lifecycle.DISCONNECTED and not bridge.connected
    with pytest.raises(RuntimeError, match="reset"):
        bridge.step(IDLE)
    bridge.initialize()
    assert bridge.lifecycle is Lifecycle.FRESH and bridge.connected
    bridge.step(IDLE)
    assert bridge.lifecycle is Lifecycle.RUNNING
    server.fail_next()
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)
    assert bridge.lifecycle is Lifecycle.BROKEN and not bridge.connected
    with pytest.raises(CarlaConnectionError):
        bridge.step(IDLE)                                    # broken until reset
    bridge.reset()
    assert bridge.lifecycle is Lifecycle.RUNNING and bridge.connected
    bridge.reconnect()
    assert bridge.lifecycle is Lifecycle.CONNECTED
    with pytest.raises(RuntimeError, match="reset"):
        bridge.expert_action()
    bridge.reset()
    bridge.close()
    assert bridge.lifecycle is Lifecycle.DISCONNECTED and not server.world.fake_actors
    bridge.reset()                                           # a closed bridge connects again
    assert bridge.lifecycle is Lifecycle.RUNNING
    bridge.close()


def test_the_bridge_is_a_backend_of_the_env_contract(bridge):
    from stages.envs.base import INFO_KEYS, DrivingEnvBase, step_seconds
    from stages.envs.base import INFRACTION_KEYS as CONTRACT_INFRACTIONS

    assert isinstance(bridge, DrivingEnvBase) and bridge.metadata["render_fps"] == bridge.config.fps
    obs, info = bridge.reset(seed=0)
    assert set(INFO_KEYS) <= set(info) and info["done_reason"] == "" and bridge.episode_id == 1
    obs, _, _, _, info = bridge.step(IDLE)
    assert set(INFO_KEYS) <= set(info) and set(info["infractions"]) == set(CONTRACT_INFRACTIONS)
    assert bridge.infractions == info["infractions"] and bridge.elapsed_steps == 1
    assert step_seconds(bridge) == pytest.approx(bridge.config.control_dt)
    assert bridge.elapsed_seconds == pytest.approx(bridge.config.control_dt)
    assert np.array_equal(bridge.render(), obs["image"])
    bridge.reset()
    assert bridge.episode_id == 2 and bridge.elapsed_steps == 0 and sum(bridge.infractions.values()) == 0


def test_a_collision_off_the_road_ends_as_a_collision(bridge, server, fake):
    # The contract's order: collision before off_road; both are counted.
    bridge.reset(seed=0, options={"spawn_index": 0})
    teleport(bridge, fake, 30.0, -5.0)
    server.world.fake_inject_collision(bridge.ego)
    *_, terminated, _, info = bridge.step(IDLE)
    assert terminated and info["done_reason"] == "collision"
    assert info["infractions"]["collision"] == 1 and info["infractions"]["off_road"] == 1


def test_observations_are_copies_the_reused_first_reset_does_not_see_changed(fake, server):
    bridge = make_bridge(fake)
    bridge.initialize()
    obs, info = bridge.reset()                               # initialize()'s episode, reused
    image = obs["image"].copy()
    obs["image"][:] = 0
    info["caption"] = "changed"
    assert np.array_equal(bridge.render(), image) and bridge.caption() != "changed"
    bridge.close()


def test_step_after_reconnect_asks_for_a_reset(bridge, server):
    bridge.reset(seed=0)
    bridge.reconnect()
    with pytest.raises(RuntimeError, match="reset"):
        bridge.step(IDLE)
    bridge.reset()
    bridge.step(IDLE)


def test_make_carla_env_from_an_env_config(fake, server):
    env = make_carla_env(EnvConfig(backend="carla", scenario="urban", image_size=64, vehicles_count=2),
                         seed=4, carla_module=fake, num_walkers=0, headless=True)
    obs, _ = env.reset()
    assert obs["image"].shape == (64, 64, 3) and env.observation_space.contains(obs)
    assert env.policy_frequency == pytest.approx(10.0)
    env.close()


def test_make_env_reaches_the_bridge_for_the_carla_backend():
    from stages.envs import make_env

    env = make_env(EnvConfig(backend="carla"))                  # built, not connected: no server needed
    assert isinstance(env, CARLABridge)
    env.close()


def test_the_bridge_runs_in_a_vector_env(bridge):
    from stages.rl.vector import as_vector_env

    vec = as_vector_env(bridge)
    obs, _ = vec.reset(seed=0)
    assert obs["image"].shape == (1, 224, 224, 3) and len(obs["command"]) == 1
    obs, reward, terminated, truncated, infos = vec.step(np.array([[0.5, 0.0, 0.0]], dtype=np.float32))
    assert reward.shape == (1,) and "lane_deviation" in infos


def test_expert_action_follows_the_route(fake, server):
    bridge = make_bridge(fake, control_dt=0.1, physics_dt=0.02)
    bridge.reset(seed=0, options={"spawn_index": 0, "destination": fake.Location(110.0, -60.0, 0.0)})
    for _ in range(400):
        action = bridge.expert_action()
        assert bridge.action_space.contains(action)
        *_, terminated, truncated, info = bridge.step(action)
        if terminated or truncated:
            break
    assert info["done_reason"] == "route_completed", info["done_reason"]
    assert info["infractions"]["off_road"] == 0 and info["infractions"]["wrong_way"] == 0
    bridge.close()


def test_town_is_loaded_with_the_server_asynchronous(fake, server):
    server.world.apply_settings(fake.WorldSettings(synchronous_mode=True, fixed_delta_seconds=0.05))
    old_world = server.world
    bridge = make_bridge(fake, carla_town="Town03")
    bridge.reset(seed=0)
    assert server.loads == ["Town03"]
    assert old_world.fake_settings_applied[-1].synchronous_mode is False    # before load_world
    assert server.world.fake_settings_applied[-1].synchronous_mode is True  # the new town, after it
    bridge.close()
