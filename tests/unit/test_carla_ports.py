"""Ports, config and container spec of the CARLA server manager (no Docker engine needed)."""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from infra.carla import (
    CarlaEndpoint, CarlaServerConfig, CarlaServerError, CarlaServerManager, NoFreePorts, ServerPorts, allocate_ports,
    container_spec, endpoints_from_env, endpoints_to_env, port_is_free, release_ports)
from infra.carla.labels import LABEL_DETACHED, LABEL_HOST, LABEL_PID, LABEL_PID_START, is_orphan
from infra.carla.labels import process_start as _process_start

ROOT = Path(__file__).resolve().parents[2]
BASE = 31000  # away from CARLA's defaults, so a server running on this machine does not matter


@pytest.fixture
def blocks():
    taken: list[ServerPorts] = []
    yield taken
    release_ports(taken)


def test_a_block_is_rpc_streaming_secondary_and_traffic_manager():
    block = ServerPorts.block(2000)
    assert block.all() == (2000, 2001, 2002, 2003)
    assert ServerPorts.from_label(block.label()) == block


def test_allocated_blocks_are_free_and_disjoint(blocks):
    blocks += allocate_ports(3, base_port=BASE, max_port=BASE + 400)
    ports = [p for b in blocks for p in b.all()]
    assert len(ports) == len(set(ports)) == 12
    assert all(port_is_free(p) for p in ports)


def test_a_busy_port_skips_its_whole_block(blocks):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", BASE + 2))  # the secondary port of the first block
        sock.listen()
        assert not port_is_free(BASE + 2)
        blocks += allocate_ports(1, base_port=BASE, max_port=BASE + 400)
    assert blocks[0].rpc == BASE + 4


def test_ports_of_other_runs_are_excluded(blocks):
    blocks += allocate_ports(1, base_port=BASE, max_port=BASE + 400, exclude={BASE + 3})
    assert BASE + 3 not in blocks[0].all()


def test_handed_out_ports_stay_reserved_until_released():
    first = allocate_ports(1, base_port=BASE, max_port=BASE + 400)
    second = allocate_ports(1, base_port=BASE, max_port=BASE + 400)
    try:
        assert first[0].rpc != second[0].rpc  # nothing listens yet, yet no collision
    finally:
        release_ports(first + second)
    again = allocate_ports(1, base_port=BASE, max_port=BASE + 400)
    release_ports(again)
    assert again[0].rpc == first[0].rpc


def test_threads_allocating_at_once_never_collide():
    results: list[list[ServerPorts]] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        results.append(allocate_ports(2, base_port=BASE, max_port=BASE + 400))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        ports = [p for r in results for b in r for p in b.all()]
        assert len(ports) == len(set(ports)) == 8 * 2 * 4
    finally:
        for r in results:
            release_ports(r)


def test_no_free_ports_says_what_to_do():
    with pytest.raises(NoFreePorts, match="widen carla.base_port/carla.max_port"):
        allocate_ports(3, base_port=BASE, max_port=BASE + 7)
    with pytest.raises(ValueError, match="overlap"):
        allocate_ports(1, base_port=BASE, stride=2)


# -- config -----------------------------------------------------------------------------------------

def test_config_defaults_match_the_pip_client_and_the_seed_flags():
    cfg = CarlaServerConfig()
    assert cfg.image_ref == "carlasim/carla:0.9.16"
    assert cfg.network_mode == "bridge" and cfg.bind_address == "127.0.0.1" and not cfg.privileged
    assert cfg.server_args(2000) == ["-RenderOffScreen", "-nosound", "-carla-rpc-port=2000",
                                     "-carla-streaming-port=2001", "-carla-secondary-port=2002",
                                     "-quality-level=Low"]
    cfg = CarlaServerConfig(tag="0.9.15", quality_level="Epic", fps=20, extra_args=["-benchmark"])
    assert cfg.image_ref == "carlasim/carla:0.9.15"
    assert cfg.server_args(3000)[-3:] == ["-quality-level=Epic", "-fps=20", "-benchmark"]


def test_config_validates():
    assert CarlaServerConfig(gpus=[0, 1]).gpus == ["0", "1"]  # YAML ints become device-id strings
    assert CarlaServerConfig(gpus=[0, 1]).gpu_for(3) == "1"
    assert CarlaServerConfig().gpu_for(0) is None
    for bad in ({"quality_level": "Medium"}, {"gpus": [0, 0]}, {"bind_address": "localhost"},
                {"network_mode": "overlay"}, {"num_servers": 0}, {"owner": "has space"},
                {"base_port": 39990, "num_servers": 8}, {"rpc_port": 2000}):
        with pytest.raises(ValidationError):
            CarlaServerConfig(**bad)


# -- container spec ------------------------------------------------------------------------------------

def test_default_spec_publishes_the_servers_ports_on_loopback_only():
    """The RPC has no authentication (issue #12): by default nothing listens beyond this host."""
    cfg = CarlaServerConfig()
    spec = container_spec(cfg, name="s0", ports=ServerPorts.block(2000), gpu=None, labels={})
    assert "network_mode" not in spec                        # the engine's bridge network, not the host's
    assert spec["ports"] == {"2000/tcp": ("127.0.0.1", 2000), "2001/tcp": ("127.0.0.1", 2001),
                             "2002/tcp": ("127.0.0.1", 2002)}
    assert all(ipaddress.ip_address(host).is_loopback for host, _ in spec["ports"].values())
    assert not cfg.exposed and not spec["privileged"]
    # Clients connect where the ports are published.
    assert CarlaServerManager(cfg, client=object()).host == "127.0.0.1"


def test_exposing_the_rpc_is_an_explicit_choice_that_is_logged(caplog):
    assert CarlaServerConfig(network_mode="host").exposed
    assert CarlaServerConfig(bind_address="0.0.0.0").exposed
    assert not CarlaServerConfig(bind_address="::1").exposed

    class NoEngine:
        @property
        def images(self):
            raise RuntimeError("no engine in this test")

    manager = CarlaServerManager(CarlaServerConfig(network_mode="host"), client=NoEngine())
    with caplog.at_level("WARNING", logger="infra.carla.manager"), pytest.raises(RuntimeError, match="no engine"):
        manager.start()
    assert "reachable from other hosts" in caplog.text and "network_mode=host" in caplog.text


def test_spec_host_network_no_gpu():
    ports = ServerPorts.block(2000)
    spec = container_spec(CarlaServerConfig(network_mode="host"), name="s0", ports=ports, gpu=None,
                          labels={"a": "b"})
    assert spec["image"] == "carlasim/carla:0.9.16"
    assert spec["command"][:2] == ["/bin/bash", "./CarlaUE4.sh"] and "-carla-rpc-port=2000" in spec["command"]
    assert spec["network_mode"] == "host" and "ports" not in spec
    assert spec["labels"] == {"a": "b"} and spec["init"] is True and spec["privileged"] is False
    assert "device_requests" not in spec and "runtime" not in spec


def test_spec_bridge_publishes_on_loopback_and_requests_the_gpu():
    cfg = CarlaServerConfig(network_mode="bridge", gpus=["1"], privileged=True, runtime="nvidia")
    spec = container_spec(cfg, name="s0", ports=ServerPorts.block(2100), gpu="1", labels={})
    assert spec["ports"] == {"2100/tcp": ("127.0.0.1", 2100), "2101/tcp": ("127.0.0.1", 2101),
                             "2102/tcp": ("127.0.0.1", 2102)}
    assert "network_mode" not in spec
    (request,) = spec["device_requests"]
    assert request["DeviceIDs"] == ["1"] and request["Capabilities"] == [["gpu"]]
    assert spec["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "all"
    assert spec["privileged"] is True and spec["runtime"] == "nvidia"


# -- endpoints and orphans -------------------------------------------------------------------------

def test_endpoints_travel_through_the_environment():
    eps = [CarlaEndpoint(0, "127.0.0.1", 2000, 2001, 2002, 2003, "0", "s0", "abc", "0.9.16", 2)]
    assert endpoints_from_env({"DRIVEVLA_CARLA_SERVERS": endpoints_to_env(eps)}) == eps
    assert endpoints_from_env({}) == []
    with pytest.raises(CarlaServerError, match="DRIVEVLA_CARLA_SERVERS"):
        endpoints_from_env({"DRIVEVLA_CARLA_SERVERS": "not json"})


def _container(**labels: str) -> SimpleNamespace:
    base = {LABEL_HOST: socket.gethostname(), LABEL_DETACHED: "false"}
    return SimpleNamespace(labels={**base, **labels})


def test_orphan_means_its_creating_process_is_gone():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = str(os.getpid())
    assert is_orphan(_container(**{LABEL_PID: str(dead.pid)}))
    assert not is_orphan(_container(**{LABEL_PID: me, LABEL_PID_START: _process_start(os.getpid())}))
    # A recycled pid: alive, but not the process that created the container.
    assert is_orphan(_container(**{LABEL_PID: me, LABEL_PID_START: "1"}))
    # Never orphans: detached servers (`drivevla carla up`), other hosts' runs, unreadable labels.
    assert not is_orphan(_container(**{LABEL_PID: str(dead.pid), LABEL_DETACHED: "true"}))
    assert not is_orphan(_container(**{LABEL_PID: str(dead.pid), LABEL_HOST: "another-host"}))
    assert not is_orphan(_container(**{LABEL_PID: "?"}))


def test_importing_the_manager_loads_neither_docker_nor_carla():
    code = "import sys, infra.carla, tasks.carla_resource; print('docker' in sys.modules, 'carla' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["False", "False"]


def test_missing_docker_sdk_names_the_extra():
    code = ("import sys; sys.modules['docker'] = None\n"
            "from infra.carla import CarlaServerConfig, CarlaServerManager\n"
            "try:\n    CarlaServerManager(CarlaServerConfig()).client\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "pip install -e .[docker]" in out


def test_without_the_carla_client_readiness_falls_back_to_the_open_port(monkeypatch):
    """bridge_version_probe's documented fallback: no client, no probe (not a probe failing until the deadline)."""
    from stages.envs.carla_bridge import server_version
    from tasks.carla_resource import bridge_version_probe

    monkeypatch.setitem(sys.modules, "carla", None)   # makes `import carla` raise ImportError
    assert bridge_version_probe() is None
    monkeypatch.undo()
    pytest.importorskip("carla", reason="the carla extra is not installed (pip install -e .[carla])")
    assert bridge_version_probe() is server_version
