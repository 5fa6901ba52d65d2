"""The CARLA server manager against a real Docker engine, with a locally built stand-in image.

No registry is used: `tests/stubs/build_stub_image.py` imports a static busybox plus two shell scripts
as ``drivevla-test/carla-stub:0.9.16``; it opens the rpc port after a delay and answers the real
`carla` client's ``get_server_version()``. Containers run with ``network_mode=host`` (the only mode of
an engine started with ``--bridge=none``); the default, bridge with loopback-published ports, is checked
on a created container. Every test uses its own owner label and removes whatever
carries it, so nothing is left running. Docker tests are skipped only when no engine is reachable.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from infra.carla import (
    CarlaServerConfig, CarlaServerManager, CarlaServerNotReady, DockerUnavailable, ServerEvent, ServerPorts,
    carla_servers, connect_docker, container_spec, managed_containers, reap_orphans)
from infra.carla.engine import port_open as _port_open
from infra.carla.labels import LABEL_FLOW_RUN_ID, LABEL_MANAGED, LABEL_OWNER, LABEL_PID, MANAGED_VALUE
from tests.stubs.build_stub_image import STUB_REPOSITORY, build_stub_image
from tests.stubs.carla_stub_server import StubServer, version_reply, version_request

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.9.16"


def carla_version_probe(host: str, port: int, timeout: float) -> str:
    """What the CARLA bridge does: the real client's get_server_version()."""
    import carla

    client = carla.Client(host, port)
    client.set_timeout(timeout)
    return client.get_server_version()


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker_client():
    try:
        client = connect_docker()
    except DockerUnavailable as exc:
        pytest.skip(f"no Docker engine reachable: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub_image(docker_client) -> str:
    try:
        return build_stub_image(docker_client, VERSION)
    except FileNotFoundError as exc:
        pytest.fail(f"cannot build the CARLA stand-in image: {exc}")


@pytest.fixture
def owner(docker_client) -> str:
    """A label of this test's own: the finaliser removes every container carrying it."""
    name = f"dvtest-{uuid.uuid4().hex[:8]}"
    yield name
    for container in managed_containers(docker_client, name):
        container.remove(force=True)


@pytest.fixture
def make_config(owner, stub_image):
    def make(**overrides) -> CarlaServerConfig:
        # Host networking: the only mode in which an engine started with --bridge=none reaches a server.
        values = dict(image=STUB_REPOSITORY, tag=VERSION, pull="never", owner=owner, base_port=24000,
                      network_mode="host",
                      ready_timeout_s=20, probe_timeout_s=2, health_interval_s=0.3, stop_timeout_s=1,
                      extra_args=["-stub-delay=0.3"])
        values.update(overrides)
        return CarlaServerConfig(**values)
    return make


def leftovers(client, owner: str) -> list[str]:
    return [c.name for c in managed_containers(client, owner)]


# -- no engine needed -----------------------------------------------------------------------------

def test_docker_not_reachable_says_so_and_how_to_start_it(tmp_path):
    url = f"unix://{tmp_path}/no-docker.sock"
    with pytest.raises(DockerUnavailable) as err:
        connect_docker(url)
    text = str(err.value)
    assert f"Docker engine not reachable at {url}" in text
    assert "systemctl start docker" in text and "scripts/docker-engine.sh" in text
    # The same error from the context manager, before anything is started.
    with pytest.raises(DockerUnavailable, match="not reachable"):
        with carla_servers(CarlaServerConfig(docker_host=url), version_probe=carla_version_probe):
            pytest.fail("must not start")


def test_python_stub_answers_the_real_client():
    server = StubServer(version="9.9.9").start()
    try:
        assert carla_version_probe("127.0.0.1", server.port, 2.0) == "9.9.9"
        assert server.requests == [[0, 1, "version", [[False]]]]
    finally:
        server.stop()


# -- against the engine ---------------------------------------------------------------------------

@pytest.mark.docker
def test_default_server_container_publishes_its_ports_on_loopback_only(docker_client, owner, make_config):
    """Issue #12: the engine itself records the default spec's ports bound to 127.0.0.1, and no host network."""
    config = make_config(network_mode=CarlaServerConfig.model_fields["network_mode"].default)
    assert config.network_mode == "bridge" and not config.exposed
    manager = CarlaServerManager(config, client=docker_client)
    spec = container_spec(config, name=f"{owner}-spec", ports=ServerPorts.block(24990), gpu=None,
                          labels={LABEL_MANAGED: MANAGED_VALUE, LABEL_OWNER: owner})
    spec.pop("detach")
    container = docker_client.containers.create(**spec)   # created, not started: nothing listens
    host_config = container.attrs["HostConfig"]
    assert host_config["NetworkMode"] != "host"
    bindings = host_config["PortBindings"]
    assert sorted(bindings) == ["24990/tcp", "24991/tcp", "24992/tcp"]
    assert {b["HostIp"] for binds in bindings.values() for b in binds} == {"127.0.0.1"}
    assert manager.host == "127.0.0.1"


@pytest.mark.docker
def test_stub_image_speaks_msgpack_rpc_like_the_python_stub(docker_client, make_config):
    """The busybox responder's bytes equal msgpack's for several msgids on one connection."""
    with carla_servers(make_config(), version_probe=carla_version_probe, supervise=False) as servers:
        with socket.create_connection(("127.0.0.1", servers[0].port), timeout=5) as sock:
            for msgid in (1, 2, 77):
                sock.sendall(version_request(msgid))
                want = version_reply(VERSION, msgid)
                got = b""
                while len(got) < len(want):
                    got += sock.recv(64)
                assert got == want


@pytest.mark.docker
def test_two_servers_at_once_distinct_ports_ready_and_removed(docker_client, owner, make_config):
    events: list[ServerEvent] = []
    config = make_config(num_servers=2)
    # Something else holds the first block's streaming port: that block must be skipped.
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", config.base_port + 1))
    blocker.listen()
    try:
        with carla_servers(config, version_probe=carla_version_probe, on_event=events.append) as servers:
            assert len(servers) == 2
            ports = [set((e.port, e.streaming_port, e.secondary_port, e.tm_port)) for e in servers]
            assert not ports[0] & ports[1], "servers share a port"
            assert all(config.base_port + 1 not in p for p in ports)
            for endpoint in servers:
                assert endpoint.version == VERSION
                assert carla_version_probe(endpoint.host, endpoint.port, 2.0) == VERSION
                container = docker_client.containers.get(endpoint.container_id)
                assert container.status == "running"
                assert container.attrs["HostConfig"]["NetworkMode"] == "host"
                assert not container.attrs["HostConfig"]["Privileged"]
                assert f"-carla-rpc-port={endpoint.port}" in container.attrs["Args"]
            assert sorted(leftovers(docker_client, owner)) == sorted(e.name for e in servers)
            rpc_ports = [e.port for e in servers]
    finally:
        blocker.close()
    assert leftovers(docker_client, owner) == []
    assert not any(_port_open("127.0.0.1", p, 0.5) for p in rpc_ports)
    kinds = [e.kind for e in events]
    assert kinds.count("ready") == 2 and kinds.count("stopped") == 2


@pytest.mark.docker
def test_two_runs_at_once_do_not_collide(docker_client, owner, make_config):
    """Two managers (two runs) starting at the same moment get different ports."""
    results: dict[int, list] = {}
    barrier = threading.Barrier(2)
    done = threading.Event()

    def run(slot: int) -> None:
        barrier.wait()
        with carla_servers(make_config(), version_probe=carla_version_probe, supervise=False) as servers:
            results[slot] = list(servers)
            done.wait(30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    for t in threads:
        t.join(30)
    assert len(results) == 2
    assert results[0][0].port != results[1][0].port
    assert results[0][0].version == results[1][0].version == VERSION
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
@pytest.mark.parametrize("mode, expected", [
    ("never", "rpc port"),                    # the port never opens
    ("silent", "get_server_version() kept failing"),  # open, but never answers
])
def test_server_never_ready_times_out_with_its_logs(docker_client, owner, make_config, mode, expected):
    config = make_config(ready_timeout_s=3, extra_args=["-stub-delay=0.2", f"-stub-mode={mode}"])
    t0 = time.monotonic()
    with pytest.raises(CarlaServerNotReady) as err:
        with carla_servers(config, version_probe=carla_version_probe):
            pytest.fail("the server must not count as ready")
    text = str(err.value)
    assert "was not ready after 3 s" in text and expected in text
    assert "CarlaUE4 stand-in" in text and f"mode {mode}" in text  # its logs are in the error
    assert "raise carla.ready_timeout_s" in text
    assert time.monotonic() - t0 < 15
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_server_that_crashes_at_start_fails_fast_with_exit_code(docker_client, owner, make_config):
    config = make_config(ready_timeout_s=30, extra_args=["-stub-delay=0.2", "-stub-mode=crash"])
    t0 = time.monotonic()
    with pytest.raises(CarlaServerNotReady, match=r"exit code 139") as err:
        with carla_servers(config, version_probe=carla_version_probe):
            pass
    assert "Signal 11 caught" in str(err.value)
    assert time.monotonic() - t0 < 10, "an exited server must not wait for the deadline"
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_killed_server_is_restarted_and_the_run_continues(docker_client, owner, make_config):
    reconnects = []
    with carla_servers(make_config(num_servers=2), version_probe=carla_version_probe) as servers:
        servers.add_listener(reconnects.append)
        before = list(servers)
        answered = []
        for episode in range(8):
            if episode == 3:
                servers.manager.container(0).kill()  # the server dies mid-run
            for index in range(len(servers)):
                endpoint = servers[index]
                try:
                    version = carla_version_probe(endpoint.host, endpoint.port, 1.0)
                except RuntimeError:  # client time-out: what an env sees; ask the supervisor, reconnect
                    endpoint = servers.ensure_healthy(index) or servers[index]
                    version = carla_version_probe(endpoint.host, endpoint.port, 2.0)
                answered.append((episode, index, version))
                servers.episode_done(index)
        assert len(answered) == 16 and {v for *_, v in answered} == {VERSION}
        assert servers.restarts(0) == 1 and servers.restarts(1) == 0
        assert servers[0].port == before[0].port and servers[0].generation == 1
        assert [e.index for e in reconnects] == [0]
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_restart_after_n_episodes_and_above_memory_ceiling(docker_client, owner, make_config):
    with carla_servers(make_config(restart_every_episodes=2), version_probe=carla_version_probe,
                       supervise=False) as servers:
        restarted = [servers.episode_done(0) is not None for _ in range(5)]
        assert restarted == [False, True, False, True, False]
        assert servers.restarts(0) == 2 and servers.episodes(0) == 1
        assert carla_version_probe(servers[0].host, servers[0].port, 2.0) == VERSION
    # The stand-in uses about 0.5 MiB; a ceiling below that restarts it after each episode.
    with carla_servers(make_config(memory_limit_mb=0.01), version_probe=carla_version_probe,
                       supervise=False) as servers:
        assert servers.manager.memory_mb(0) > 0.01
        endpoint = servers.episode_done(0)
        assert endpoint is not None and endpoint.generation == 1
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_a_process_attached_to_the_servers_restarts_them_without_double_restarts(docker_client, owner,
                                                                                 make_config):
    """The DVC path: the stage runs in a child process that counts episodes; the resource's process
    owns the containers and watches them. One restart, seen by both, and only the owner removes."""
    from infra.carla import ServerSupervisor, endpoints_from_env, endpoints_to_env

    config = make_config(restart_every_episodes=1)
    with carla_servers(config, version_probe=carla_version_probe) as owner_side:
        adopted = []
        owner_side.add_listener(adopted.append)
        environ = {"DRIVEVLA_CARLA_SERVERS": endpoints_to_env(owner_side.endpoints)}
        child = CarlaServerManager.attach(config, endpoints_from_env(environ), version_probe=carla_version_probe)
        env_side = ServerSupervisor(child)
        endpoint = env_side.episode_done(0)
        assert endpoint is not None and endpoint.port == owner_side[0].port
        assert child.restarts(0) == 1
        deadline = time.monotonic() + 10
        while not adopted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.index for e in adopted] == [0], "the owner's watchdog did not follow the restart"
        assert owner_side.restarts(0) == 0  # it followed, it did not restart again
        child.stop()  # an attached manager never removes what it did not start
        assert leftovers(docker_client, owner) == [owner_side[0].name]
    assert leftovers(docker_client, owner) == []


def _termination() -> BaseException:
    from prefect.exceptions import TerminationSignal

    return TerminationSignal(signal=signal.SIGTERM)


@pytest.mark.docker
@pytest.mark.parametrize("make_exc", [
    lambda: RuntimeError("training diverged"),
    lambda: KeyboardInterrupt(),                 # Ctrl-C
    lambda: asyncio.CancelledError(),            # cancellation of an async task/flow
    _termination,                                # what Prefect raises when a run is cancelled
], ids=["exception", "ctrl-c", "cancelled", "prefect-termination"])
def test_exception_or_cancellation_inside_removes_containers(docker_client, owner, make_config, make_exc):
    exc = make_exc()
    with pytest.raises(type(exc)):
        with carla_servers(make_config(), version_probe=carla_version_probe) as servers:
            assert docker_client.containers.get(servers[0].container_id).status == "running"
            raise exc
    assert leftovers(docker_client, owner) == []


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.docker
def test_sigterm_to_the_process_removes_containers(docker_client, owner, make_config):
    proc = _python("""
        import sys, time
        from infra.carla import CarlaServerConfig, carla_servers
        cfg = CarlaServerConfig.model_validate_json(sys.argv[1])
        with carla_servers(cfg) as servers:
            print("READY", servers[0].port, flush=True)
            time.sleep(60)
    """, make_config().model_dump_json())
    line = proc.stdout.readline()
    assert line.startswith("READY"), proc.stderr.read()
    assert leftovers(docker_client, owner)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 128 + signal.SIGTERM
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_orphans_of_a_crashed_run_are_reaped_by_label_and_nothing_else(docker_client, owner, make_config,
                                                                       stub_image):
    # Must be left alone: a live run's server (this process is alive) and a container without our
    # managed label (it only carries an owner label of the same name).
    live = CarlaServerManager(make_config(), version_probe=carla_version_probe)
    live.start()
    unrelated = docker_client.containers.run(stub_image, ["/bin/sleep", "300"], detach=True, network_mode="host",
                                             name=f"unrelated-{owner}", labels={"drivevla.owner": owner})
    try:
        # An earlier run that died without cleaning up (SIGKILL: no finally, no hook).
        proc = _python("""
            import os, signal, sys
            from infra.carla import CarlaServerConfig, CarlaServerManager
            manager = CarlaServerManager(CarlaServerConfig.model_validate_json(sys.argv[1]))
            manager.start()
            print("STARTED", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """, make_config(num_servers=2).model_dump_json())
        assert proc.stdout.readline().startswith("STARTED"), proc.stderr.read()
        proc.wait(20)
        orphans = sorted(set(leftovers(docker_client, owner)) - {live.endpoint(0).name})
        assert len(orphans) == 2

        assert sorted(reap_orphans(docker_client, owner)) == orphans
        assert leftovers(docker_client, owner) == [live.endpoint(0).name]
        assert docker_client.containers.get(live.endpoint(0).container_id).labels[LABEL_PID] == str(os.getpid())
        unrelated.reload()
        assert unrelated.status == "running"
        assert reap_orphans(docker_client, owner) == []
    finally:
        unrelated.remove(force=True)
        live.stop()
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_flow_run_hook_reaps_that_runs_servers(docker_client, owner, make_config):
    from types import SimpleNamespace

    from tasks.carla_resource import reap_flow_run_servers

    run_id = str(uuid.uuid4())
    manager = CarlaServerManager(make_config(), labels={LABEL_FLOW_RUN_ID: run_id})
    manager.start()
    other = CarlaServerManager(make_config(), labels={LABEL_FLOW_RUN_ID: str(uuid.uuid4())})
    other.start()
    try:
        reap_flow_run_servers(None, SimpleNamespace(id=run_id), SimpleNamespace(name="Cancelled"))
        assert leftovers(docker_client, owner) == [other.endpoint(0).name]
    finally:
        manager.stop()
        other.stop()
    assert leftovers(docker_client, owner) == []


# -- the Prefect resource --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.docker
def test_prefect_flow_failing_inside_the_resource_removes_servers_and_logs_them(
        docker_client, owner, make_config, prefect_api):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks.carla_resource import carla_resource, gpu_slots

    config = make_config()
    seen: dict[str, object] = {}

    @flow(name="carla-resource-test")
    def online_like() -> None:
        with gpu_slots(["test-gpu"], limit=1) as slots:
            with get_client(sync_client=True) as client:
                seen["active_slots"] = client.read_global_concurrency_limit_by_name("carla-gpu-test-gpu").active_slots
            seen["slots"] = slots
        with carla_resource(config, version_probe=carla_version_probe) as servers:
            container = docker_client.containers.get(servers[0].container_id)
            seen["labels"] = container.labels
            seen["env"] = json.loads(os.environ["DRIVEVLA_CARLA_SERVERS"])
            seen["file"] = os.environ["DRIVEVLA_CARLA_SERVERS_FILE"]
            seen["listed"] = json.loads(Path(seen["file"]).read_text())
            time.sleep(0.5)  # let the log follower copy the server's first lines
            raise RuntimeError("training diverged")

    state = online_like(return_state=True)
    assert state.is_failed()
    assert leftovers(docker_client, owner) == []
    assert "DRIVEVLA_CARLA_SERVERS" not in os.environ and "DRIVEVLA_CARLA_SERVERS_FILE" not in os.environ
    assert seen["listed"] == seen["env"] and not Path(seen["file"]).exists()
    assert seen["slots"] == ["carla-gpu-test-gpu"] and seen["active_slots"] == 1
    run_id = str(state.state_details.flow_run_id)
    assert seen["labels"][LABEL_FLOW_RUN_ID] == run_id
    assert seen["env"][0]["version"] == VERSION

    # Logs reach the API in batches: poll for them.
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while True:
            logs = [r.message for r in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
            text = "\n".join(logs)
            if ("stopped" in text and "Listening on rpc port" in text) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert "starting" in text and "ready version 0.9.16" in text and "stopped" in text, text
    assert "Listening on rpc port" in text, text  # the server's own output reached the flow's log



@pytest.mark.docker
def test_resource_rewrites_the_endpoint_file_on_restart_and_removes_it(docker_client, owner, make_config, tmp_path):
    """What a stage process reads to follow a restarted server (stages.envs.carla_bridge.endpoints)."""
    from infra.carla import current_endpoints, endpoints_from_file
    from tasks.carla_resource import carla_resource

    listing = tmp_path / "servers.json"
    # No watchdog: the restart below is this test's own, not a race with one.
    with carla_resource(make_config(num_servers=2), version_probe=carla_version_probe, stream_logs=False,
                        supervise=False, endpoints_file=listing) as servers:
        assert os.environ["DRIVEVLA_CARLA_SERVERS_FILE"] == str(listing)
        assert endpoints_from_file(listing) == servers.endpoints
        assert [e.generation for e in endpoints_from_file(listing)] == [0, 0]
        servers.manager.container(1).kill()
        assert servers.ensure_healthy(1) is not None             # restarted; the listener rewrote the file
        listed = endpoints_from_file(listing)
        assert [e.generation for e in listed] == [0, 1] and listed == servers.endpoints
        assert current_endpoints() == listed                     # the file wins over the start-time snapshot
    assert not listing.exists() and "DRIVEVLA_CARLA_SERVERS_FILE" not in os.environ
    assert leftovers(docker_client, owner) == []


@pytest.mark.docker
def test_run_stage_in_carla_runs_the_stage_while_the_servers_are_up(docker_client, owner, make_config, prefect_api,
                                                                    tmp_path, monkeypatch):
    from prefect import flow

    from tasks import stage_tasks
    from tasks.carla_resource import run_stage_in_carla

    seen: dict[str, object] = {}

    def stage(name, workdir=".", use_dvc=True, overrides=None, **kwargs):  # stands in for the online stage
        seen["endpoints"] = json.loads(os.environ["DRIVEVLA_CARLA_SERVERS"])
        seen["running"] = leftovers(docker_client, owner)
        seen["kwargs"] = kwargs
        return {"stage": name}

    monkeypatch.setattr(stage_tasks.run_stage, "fn", stage)
    (tmp_path / "params.yaml").write_text("preset: smoke\n")

    @flow(name="carla-stage-test")
    def pipeline_like() -> dict:
        return run_stage_in_carla("online", workdir=str(tmp_path), use_dvc=False, timeout_s=60,
                                  carla=make_config(num_servers=2).model_dump())

    assert pipeline_like() == {"stage": "online"}
    assert [e["version"] for e in seen["endpoints"]] == [VERSION, VERSION]
    assert len(seen["running"]) == 2 and seen["kwargs"] == {"timeout_s": 60}
    assert leftovers(docker_client, owner) == []

# -- the command line ----------------------------------------------------------------------------

@pytest.mark.docker
def test_cli_up_status_logs_down(docker_client, owner, stub_image, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from flows.carla_cli import carla_app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"carla": {"image": STUB_REPOSITORY, "tag": VERSION, "pull": "never",
                                                "owner": owner, "base_port": 24000, "ready_timeout_s": 20,
                                                "network_mode": "host",
                                                "extra_args": ["-stub-delay=0.3"]}}))
    runner = CliRunner()

    def cli(*args: str):
        result = runner.invoke(carla_app, [*args, "--params", str(params)])
        assert result.exit_code == 0, result.output
        return result

    up = json.loads(cli("up", "-n", "2", "--format", "json").stdout)
    names = sorted(s["name"] for s in up["servers"])
    assert sorted(leftovers(docker_client, owner)) == names
    assert all(carla_version_probe(s["host"], s["port"], 2.0) == VERSION for s in up["servers"])
    status = json.loads(cli("status", "--format", "json").stdout)
    assert sorted(r["name"] for r in status) == names and {r["started_by"] for r in status} == {"up"}
    assert "Listening on rpc port" in cli("logs", names[0], "--tail", "5").stdout
    # `up` servers belong to no process: the reaper leaves them, `down` removes them.
    assert reap_orphans(docker_client, owner) == []
    assert sorted(cli("down", "--session", up["session"]).stdout.split()[1::2]) == names
    assert leftovers(docker_client, owner) == []
    bad = runner.invoke(carla_app, ["up", "--set", "quality_level=Medium", "--params", str(params)])
    assert bad.exit_code == 2 and "carla.quality_level = 'Medium'" in bad.output
