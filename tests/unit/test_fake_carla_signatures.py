"""The fake carla client (tests/fakes/fake_carla.py) against the installed carla 0.9.16 wheel.

`inspect.signature` cannot read Boost.Python functions, but their docstrings carry one signature
line per overload, e.g. ``spawn_actor( (World)arg1, (ActorBlueprint)blueprint, (Transform)transform
[, (Actor)attach_to=None ...]) -> Actor``: parameter names, and ``[`` before the optional ones.
``argN`` marks a parameter without a name (positional only). These tests parse those lines and check
that every public method of the fake exists on the real class and accepts the same calls: for each
number of arguments the fake takes, some real overload takes that many, with the same names where
the real one names them and positional-only parameters where it does not (so a keyword call that
would fail on the real client fails on the fake too). Properties and instance attributes must exist
on the real class; enum members and weather presets must have the real values; and every
``carla.X.Y`` the bridge's code reaches must exist in both modules.
"""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes import fake_carla as fake

carla = pytest.importorskip("carla", reason="the carla extra is not installed (pip install -e .[carla])")

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "stages" / "envs" / "carla_bridge"

# Fake classes standing for real ones (the fake's own helpers start with "_" or "Fake").
API_CLASSES = ["Client", "World", "Map", "Waypoint", "Transform", "Location", "Rotation", "Vector3D", "BoundingBox",
               "WorldSettings", "WeatherParameters", "VehicleControl", "BlueprintLibrary", "ActorBlueprint",
               "ActorAttribute", "Actor", "Vehicle", "Walker", "WalkerAIController", "Sensor", "ActorList",
               "TrafficManager", "SensorData", "Image", "CollisionEvent", "LaneInvasionEvent", "LaneMarking"]
COMMANDS = ["SpawnActor", "DestroyActor", "SetAutopilot", "Response"]
ENUMS = ["LaneType", "LaneChange", "LaneMarkingType", "AttachmentType"]
# Classes whose constructor the bridge (or a test) calls with arguments: their __init__ must match.
# The others are built only by the fake itself (the real ones come from the server).
CONSTRUCTED = {"Client", "Transform", "Location", "Rotation", "Vector3D", "VehicleControl", "WorldSettings",
               "WeatherParameters", "SpawnActor", "DestroyActor", "SetAutopilot"}
DUNDERS = {"__iter__", "__len__", "__getitem__", "__add__", "__sub__", "__mul__", "__eq__"}


@dataclass(frozen=True)
class Param:
    name: str
    optional: bool

    @property
    def named(self) -> bool:
        return re.fullmatch(r"arg\d+", self.name) is None


_LINE = re.compile(r"^\s*(\w+)\((.*)\)\s*->\s*[\w.]+\s*:\s*$")
_PARAM = re.compile(r"\(([\w.]+)\)(\w+)")


def overloads(function: object) -> list[list[Param]]:
    """The overloads of a Boost.Python function, without the leading self / ``(object)arg1``."""
    out = []
    for line in (getattr(function, "__doc__", None) or "").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        text = m.group(2)
        params = [Param(p.group(2), text[:p.start()].count("[") > 0) for p in _PARAM.finditer(text)]
        if text.lstrip().startswith("["):          # e.g. BoundingBox: "__init__([  (object)location=... [, ..."
            params = [Param(p.name, True) for p in params]
        elif params:
            params = params[1:]
        out.append(params)
    return out


def fake_params(function: object) -> list[inspect.Parameter]:
    sig = inspect.signature(function)
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def compatible(fake_fn: object, real_overloads: list[list[Param]]) -> str | None:
    """None when every call the fake accepts is accepted by some real overload; else why not."""
    params = fake_params(fake_fn)
    required = sum(p.default is inspect.Parameter.empty for p in params)
    for k in range(required, len(params) + 1):
        ok = False
        for real in real_overloads:
            needed = sum(not p.optional for p in real)
            if not needed <= k <= len(real):
                continue
            if all((r.name == f.name) if r.named else f.kind == f.POSITIONAL_ONLY
                   for f, r in zip(params[:k], real[:k])):
                ok = True
                break
        if not ok:
            shown = [[p.name + ("?" if p.optional else "") for p in o] for o in real_overloads]
            return f"called with {[p.name for p in params[:k]]}: no real overload matches {shown}"
    return None


def fake_class(name: str) -> type:
    return getattr(fake.command, name) if name in COMMANDS else getattr(fake, name)


def real_class(name: str) -> type:
    return getattr(carla.command, name) if name in COMMANDS else getattr(carla, name)


def public_methods(cls: type) -> dict[str, object]:
    out = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__ != fake.__name__:
            continue
        for name, value in vars(klass).items():
            if name in out or name.startswith("fake_") or (name.startswith("_") and name not in DUNDERS):
                continue
            out[name] = value
    return out


def test_docstring_parser_reads_overloads():
    parsed = overloads(carla.World.spawn_actor)
    assert [p.name for p in parsed[0]] == ["blueprint", "transform", "attach_to", "attachment_type", "bone"]
    assert [p.optional for p in parsed[0]] == [False, False, True, True, True]
    assert [[p.name for p in o] for o in overloads(carla.World.get_actors)] == [[], ["actor_ids"]]
    assert [p.named for p in overloads(carla.World.set_weather)[0]] == [False]
    assert "get_server_version( (Client)arg1) -> str" in carla.Client.get_server_version.__doc__


@pytest.mark.parametrize("name", API_CLASSES + COMMANDS)
def test_fake_methods_exist_with_compatible_parameters(name):
    real = real_class(name)
    problems = []
    for method, value in public_methods(fake_class(name)).items():
        if method == "__init__":
            continue
        if not hasattr(real, method):
            problems.append(f"{name}.{method} does not exist in carla")
            continue
        real_attr = inspect.getattr_static(real, method) if not method.startswith("__") else getattr(real, method)
        if isinstance(value, property):
            if not isinstance(real_attr, property):
                problems.append(f"{name}.{method} is a property in the fake but not in carla")
            continue
        if not inspect.isfunction(value):
            continue                       # class-level data (weather presets): existence is enough
        if not callable(value) or isinstance(real_attr, property):
            problems.append(f"{name}.{method}: callable in one, property in the other")
            continue
        why = compatible(value, overloads(getattr(real, method)))
        if why:
            problems.append(f"{name}.{method} {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_constructors_match(name):
    why = compatible(fake_class(name).__init__, overloads(real_class(name).__init__))
    assert why is None, f"{name}() {why}"


def _samples() -> dict[str, object]:
    """One instance of each fake class, built through the fake's own API."""
    fake.reset()
    server = fake.start_server("localhost", 2000)
    client = fake.Client("localhost", 2000)
    world = client.get_world()
    lib = world.get_blueprint_library()
    vehicle = world.spawn_actor(lib.find("vehicle.audi.tt"), fake.Map("Town01").get_spawn_points()[0])
    walker = world.spawn_actor(lib.find("walker.pedestrian.0001"), fake.Transform(fake.Location(50, -6, 1)))
    controller = world.spawn_actor(lib.find("controller.ai.walker"), fake.Transform(), attach_to=walker)
    sensor = world.spawn_actor(lib.find("sensor.camera.rgb"), fake.Transform(), attach_to=vehicle)
    images: list[object] = []
    sensor.listen(images.append)
    world.tick()
    spawn = fake.command.SpawnActor(lib.find("vehicle.tesla.model3"), fake.Transform(fake.Location(200, 0, 0)))
    samples = {
        "Client": client, "World": world, "Map": world.get_map(), "Waypoint": world.get_map().get_topology()[0][0],
        "Transform": fake.Transform(), "Location": fake.Location(), "Rotation": fake.Rotation(),
        "Vector3D": fake.Vector3D(), "BoundingBox": vehicle.bounding_box, "WorldSettings": world.get_settings(),
        "WeatherParameters": world.get_weather(), "VehicleControl": fake.VehicleControl(),
        "BlueprintLibrary": lib, "ActorBlueprint": lib.find("vehicle.audi.tt"),
        "ActorAttribute": lib.find("vehicle.audi.tt").get_attribute("color"), "Actor": world.get_spectator(),
        "Vehicle": vehicle, "Walker": walker, "WalkerAIController": controller, "Sensor": sensor,
        "TrafficManager": client.get_trafficmanager(8000), "Image": images[-1],
        "SensorData": fake.SensorData(1, 0.0, fake.Transform()),
        "CollisionEvent": fake.CollisionEvent(1, 0.0, fake.Transform(), vehicle, walker, fake.Vector3D()),
        "LaneInvasionEvent": fake.LaneInvasionEvent(1, 0.0, fake.Transform(), vehicle, [fake.LaneMarking()]),
        "LaneMarking": fake.LaneMarking(), "SpawnActor": spawn, "DestroyActor": fake.command.DestroyActor(vehicle),
        "SetAutopilot": fake.command.SetAutopilot(vehicle, True, 8000),
        "Response": client.apply_batch_sync([spawn])[0],
    }
    assert server.world is world
    return samples


def test_fake_instance_attributes_exist_in_carla():
    problems = []
    for name, obj in _samples().items():
        real = real_class(name)
        for attr in vars(obj):
            if attr.startswith("_") or attr.startswith("fake_"):
                continue
            if not hasattr(real, attr):
                problems.append(f"{name}.{attr}")
    fake.reset()
    assert not problems, f"attributes of the fake that carla does not have: {problems}"


def test_class_hierarchy_matches():
    names = API_CLASSES
    for a in names:
        for b in names:
            if a != b and issubclass(fake_class(a), fake_class(b)):
                assert issubclass(real_class(a), real_class(b)), f"fake {a} is a {b}, real is not"


@pytest.mark.parametrize("name", ENUMS)
def test_enum_members_have_the_real_values(name):
    real_names = getattr(carla, name).names
    for member in getattr(fake, name):
        assert member.name in real_names, f"{name}.{member.name} is not in carla"
        assert int(real_names[member.name]) == int(member), f"{name}.{member.name} value differs"


def test_weather_presets_have_the_real_values():
    for preset in fake._WEATHER_PRESETS:
        real, mine = getattr(carla.WeatherParameters, preset), getattr(fake.WeatherParameters, preset)
        for field in fake._WEATHER_FIELDS:
            assert getattr(mine, field) == pytest.approx(getattr(real, field), abs=1e-3), f"{preset}.{field}"


def test_command_module():
    assert fake.command.FutureActor == carla.command.FutureActor == 0
    for name in COMMANDS:
        assert hasattr(carla.command, name)


def _carla_paths(tree: ast.AST) -> set[str]:
    """Dotted names reached from `carla`, `self.carla` or `self._carla` (e.g. ``command.SpawnActor``) in code."""
    paths = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        chain.reverse()
        if isinstance(cur, ast.Name) and cur.id == "carla":
            paths.add(".".join(chain))
        elif isinstance(cur, ast.Name) and cur.id == "self" and chain[0] in ("carla", "_carla") and len(chain) > 1:
            paths.add(".".join(chain[1:]))
    return paths


def test_everything_the_bridge_reaches_through_carla_exists_in_both():
    paths = set()
    for source in sorted(BRIDGE.glob("*.py")):
        paths |= _carla_paths(ast.parse(source.read_text()))
    assert {"VehicleControl", "command.SpawnActor", "command.DestroyActor", "LaneType.Driving",
            "WeatherParameters", "Client"} <= paths
    missing = []
    for path in sorted(paths):
        for label, module in (("carla", carla), ("fake", fake)):
            obj = module
            for part in path.split("."):
                if not hasattr(obj, part):
                    missing.append(f"{label}.{path}")
                    break
                obj = getattr(obj, part)
    assert not missing, missing
