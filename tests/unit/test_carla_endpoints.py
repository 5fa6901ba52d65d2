"""How the CARLA resource publishes its servers to the stage it runs, and how many it starts.

The endpoint list goes out twice: ``DRIVEVLA_CARLA_SERVERS`` (the snapshot a child process takes when it
starts) and the JSON file named by ``DRIVEVLA_CARLA_SERVERS_FILE``, rewritten atomically on every
change and removed when the resource exits. Real files in a temporary directory throughout.
"""
from __future__ import annotations

import json
import os
import threading

import pytest
from typer.testing import CliRunner

from infra.carla import (
    ENV_VAR, FILE_ENV_VAR, CarlaEndpoint, CarlaServerConfig, CarlaServerError, current_endpoints,
    endpoints_from_file, endpoints_to_env, write_endpoints_file)
from stages.config import load_config
from stages.envs.slots import EnvSlotError


def endpoint(index: int, port: int, generation: int = 0) -> CarlaEndpoint:
    return CarlaEndpoint(index=index, host="localhost", port=port, streaming_port=port + 1, secondary_port=port + 2,
                         tm_port=port + 3, gpu=None, name=f"carla-{index}", container_id="", generation=generation)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (ENV_VAR, FILE_ENV_VAR):
        monkeypatch.delenv(name, raising=False)


def test_endpoint_file_round_trip_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "servers.json"
    first = [endpoint(0, 2000), endpoint(1, 2004)]
    write_endpoints_file(path, first)
    assert endpoints_from_file(path) == first
    moved = [first[0], endpoint(1, 2012, generation=1)]
    write_endpoints_file(path, moved)
    assert endpoints_from_file(path) == moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["servers.json"]


def test_concurrent_rewrites_never_show_a_partial_list(tmp_path):
    path = tmp_path / "servers.json"
    lists = [[endpoint(k, 2000 + 4 * k, generation=g) for k in range(40)] for g in range(2)]
    write_endpoints_file(path, lists[0])
    stop = threading.Event()

    def writer() -> None:
        g = 0
        while not stop.is_set():
            g ^= 1
            write_endpoints_file(path, lists[g])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reads = [endpoints_from_file(path) for _ in range(300)]   # raises on a half-written file
    finally:
        stop.set()
        thread.join()
    assert all(r in lists for r in reads)


def test_the_file_wins_over_the_snapshot_and_the_snapshot_is_the_fallback(tmp_path, clean_env):
    path = tmp_path / "servers.json"
    snapshot = [endpoint(0, 2000)]
    newer = [endpoint(0, 2008, generation=1)]
    assert current_endpoints({}) is None
    assert current_endpoints({ENV_VAR: endpoints_to_env(snapshot)}) == snapshot
    write_endpoints_file(path, newer)
    environ = {ENV_VAR: endpoints_to_env(snapshot), FILE_ENV_VAR: str(path)}
    assert current_endpoints(environ) == newer
    path.unlink()                                              # the resource exited
    assert current_endpoints(environ) == snapshot
    path.write_text("{not json")
    with pytest.raises(CarlaServerError, match="not a JSON list"):
        current_endpoints(environ)


def test_publisher_writes_rewrites_and_removes_the_file(tmp_path, monkeypatch, clean_env):
    from tasks.carla_resource import EndpointPublisher

    monkeypatch.setenv(ENV_VAR, "[]")                          # a value from an outer scope, restored at the end
    current = [endpoint(0, 2000), endpoint(1, 2004)]
    path = tmp_path / "servers.json"
    publisher = EndpointPublisher(lambda: current, path)
    publisher.publish()
    assert os.environ[FILE_ENV_VAR] == str(path)
    assert endpoints_from_file(path) == current and json.loads(os.environ[ENV_VAR])[1]["port"] == 2004
    current = [current[0], endpoint(1, 2012, generation=1)]    # the supervisor restarted server 1 elsewhere
    publisher.publish(current[1])                              # as its listener
    assert endpoints_from_file(path)[1].port == 2012 and current_endpoints()[1].generation == 1
    publisher.close()
    assert not path.exists()
    assert os.environ[ENV_VAR] == "[]" and FILE_ENV_VAR not in os.environ
    publisher.publish(current[1])                              # a restart finishing during shutdown
    assert not path.exists()


def test_the_flow_starts_one_server_per_env_slot():
    from tasks.carla_resource import carla_config_for

    cfg = load_config(None, preset="carla")                    # ppo, 4 envs
    assert carla_config_for(cfg).num_servers == 5
    assert carla_config_for(cfg, world_size=2).num_servers == 9
    sac = load_config(None, preset="carla", overrides=["online.algo=sac", "online.sac.num_envs=2"])
    assert carla_config_for(sac).num_servers == 3
    assert carla_config_for(cfg, CarlaServerConfig(num_servers=6)).num_servers == 6    # more is fine
    with pytest.raises(EnvSlotError, match=r"carla.num_servers=4 is too few: the online stage needs 5"):
        carla_config_for(cfg, {"num_servers": 4})


def test_cli_prints_the_servers_the_stage_needs(tmp_path):
    from flows.carla_cli import carla_app

    params = str(tmp_path / "none.yaml")
    runner = CliRunner()
    result = runner.invoke(carla_app, ["servers-needed", "--params", params, "--preset", "carla"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "5"
    result = runner.invoke(carla_app, ["servers-needed", "--params", params, "--preset", "carla",
                                       "--set", "online.ppo.num_envs=2", "--world-size", "3"])
    assert result.output.strip() == "7"
    result = runner.invoke(carla_app, ["servers-needed", "--params", params, "--set", "online.ppo.num_envs=0"])
    assert result.exit_code == 2 and "online.ppo.num_envs" in result.output
