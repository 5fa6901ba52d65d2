"""The compose files validate against the Compose specification, and say what drivevla needs.

Validators, each used where this machine has it: the compose-spec JSON schema (shipped by Debian's
``docker-compose`` package, or pointed to by ``DRIVEVLA_COMPOSE_SCHEMA``), ``docker-compose config``
(compose v1, Debian) and ``docker compose config`` (compose v2). At least one must be present.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "infra" / "docker"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.multi-gpu.yml"]
SCHEMA_CANDIDATES = [os.environ.get("DRIVEVLA_COMPOSE_SCHEMA", ""),
                     "/usr/lib/python3/dist-packages/compose/config/compose_spec.json"]


def _schema_path() -> Path | None:
    return next((Path(p) for p in SCHEMA_CANDIDATES if p and Path(p).is_file()), None)


def _compose_v2() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER_DIR / name).read_text())


def test_some_compose_validator_is_available():
    assert _schema_path() or shutil.which("docker-compose") or _compose_v2(), (
        "no way to check compose files here: `apt-get install docker-compose` (scripts/docker-engine.sh does), "
        "or set DRIVEVLA_COMPOSE_SCHEMA to the compose-spec JSON schema")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_valid_against_the_compose_spec_schema(name):
    schema_path = _schema_path()
    if schema_path is None:
        pytest.skip("compose-spec JSON schema not found (Debian's docker-compose package ships it)")
    import jsonschema

    schema = json.loads(schema_path.read_text())
    # The schema Debian ships names its draft by a URI jsonschema does not know: pick the class by name.
    cls = (jsonschema.Draft201909Validator if "2019-09" in schema.get("$schema", "")
           else jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator))
    validator = cls(schema, format_checker=jsonschema.FormatChecker())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load(name))]
    assert not errors, "\n".join(errors)
    # The same validator does reject a misspelt key (so the check above means something).
    broken = load(name)
    broken["services"]["carla"]["privilidged"] = True
    assert list(validator.iter_errors(broken))


@pytest.mark.parametrize("name", COMPOSE_FILES)
@pytest.mark.parametrize("tool", ["docker-compose", "docker compose"])
def test_compose_cli_accepts_it(name, tool, tmp_path):
    if tool == "docker-compose" and not shutil.which("docker-compose"):
        pytest.skip("docker-compose (v1) not installed")
    if tool == "docker compose" and not _compose_v2():
        pytest.skip("docker compose (v2) not installed")
    # `config` only parses and interpolates; it needs no engine. A fresh HOME keeps user config out.
    proc = subprocess.run([*tool.split(), "-f", str(DOCKER_DIR / name), "config", "-q"], capture_output=True,
                          text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr


def _gpu_ids(service: dict) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return [i for d in devices if "gpu" in d["capabilities"] for i in d.get("device_ids", [])]


def test_single_gpu_file_runs_carla_headless_on_loopback():
    carla = load("docker-compose.yml")["services"]["carla"]
    assert re.fullmatch(r"carlasim/carla:\$\{CARLA_VERSION:-0\.9\.16\}", carla["image"])
    assert {"-RenderOffScreen", "-nosound", "-carla-rpc-port=2000"} <= set(carla["command"])
    assert all(p.startswith("127.0.0.1:") for p in carla["ports"])
    assert not carla.get("privileged") and carla["healthcheck"]["test"]
    assert len(_gpu_ids(carla)) == 1


def test_multi_gpu_file_splits_gpus_and_waits_for_a_healthy_carla():
    services = load("docker-compose.multi-gpu.yml")["services"]
    carla, training = services["carla"], services["training"]
    assert _gpu_ids(carla) == ["0"] and _gpu_ids(training) == ["1"]
    assert training["depends_on"]["carla"]["condition"] == "service_healthy"
    assert carla["healthcheck"]["test"]
    context = (DOCKER_DIR / training["build"]["context"]).resolve()
    assert context == ROOT and (context / training["build"]["dockerfile"]).is_file()
    endpoints = json.loads(training["environment"]["DRIVEVLA_CARLA_SERVERS"])
    assert endpoints[0]["host"] == "carla" and endpoints[0]["port"] == 2000


def test_multi_gpu_file_gives_every_env_slot_of_its_command_a_healthy_server():
    from stages.config import build_config
    from stages.envs.slots import OnlineEnvSlots

    services = load("docker-compose.multi-gpu.yml")["services"]
    training = services["training"]
    command = training["command"]
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    cfg = build_config(preset=command[command.index("--preset") + 1],
                       overrides=[re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", s) for s in sets])
    endpoints = json.loads(training["environment"]["DRIVEVLA_CARLA_SERVERS"])
    assert len(endpoints) >= OnlineEnvSlots.for_config(cfg.online).total
    hosts = [e["host"] for e in endpoints]
    assert len(set(hosts)) == len(hosts), "two env slots would tick the same server"
    # The bridges run their traffic managers in the training container: one port each.
    tm_ports = [e["tm_port"] for e in endpoints]
    assert len(set(tm_ports)) == len(tm_ports)
    for host in hosts:
        assert host in services and services[host]["healthcheck"]["test"]
        assert training["depends_on"][host]["condition"] == "service_healthy"


def test_training_dockerfile_copies_what_exists():
    dockerfile = (DOCKER_DIR / "Dockerfile.training").read_text()
    assert re.search(r"^FROM \S+", dockerfile, re.M)
    sources = [src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for src in line.split()[:-1]]
    assert sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources missing from the build context: {missing}"
    assert '"stages.online"' in dockerfile


def test_training_image_runs_as_a_non_root_user():
    """Issue #12: the trainer's process gets no root; the user is made in the image, the last USER is it."""
    dockerfile = (DOCKER_DIR / "Dockerfile.training").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(rf"useradd\b[^\n]*\b{re.escape(users[-1])}\s*$", dockerfile, re.M)
    # Everything after the last USER runs as that user: no install step may follow it.
    tail = dockerfile[dockerfile.rindex(f"USER {users[-1]}"):]
    assert not re.search(r"^RUN\b", tail, re.M)
