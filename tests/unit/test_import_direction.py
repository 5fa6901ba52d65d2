"""Imports flow flows → tasks → stages → models; infra serves tasks and stages (flows reach it through tasks).

models/ and stages/ never import prefect or docker; only the CARLA bridge imports carla.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "stages", "models", "infra")
# What each package may import from the project.
ALLOWED = {
    "models": {"models"},
    "stages": {"stages", "models", "infra"},
    "infra": {"infra"},
    "tasks": {"tasks", "stages", "models", "infra"},
    "flows": {"flows", "tasks", "stages", "models"},
}
FORBIDDEN_THIRD_PARTY = {"models": {"prefect", "docker", "carla", "gymnasium", "highway_env", "dvc"},
                         "stages": {"prefect", "docker", "dvc"}}
CARLA_BRIDGE = Path("stages/envs/carla_bridge")


def in_bridge(rel: Path) -> bool:
    return rel == CARLA_BRIDGE.with_suffix(".py") or CARLA_BRIDGE in rel.parents


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def python_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_project_imports_flow_one_way():
    bad = []
    for package in PACKAGES:
        for path in python_files(package):
            for root in imported_roots(path) & set(PACKAGES):
                if root not in ALLOWED[package]:
                    bad.append(f"{path.relative_to(ROOT)} imports {root}")
    assert not bad, "\n".join(bad)


def test_models_and_stages_do_not_import_orchestration():
    bad = []
    for package, forbidden in FORBIDDEN_THIRD_PARTY.items():
        for path in python_files(package):
            for root in imported_roots(path) & forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {root}")
    assert not bad, "\n".join(bad)


def test_only_the_bridge_imports_carla():
    bad = []
    for package in PACKAGES:
        for path in python_files(package):
            if "carla" in imported_roots(path) and not in_bridge(path.relative_to(ROOT)):
                bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"carla imported outside the bridge: {bad}"
