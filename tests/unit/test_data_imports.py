"""stages/data has no import cycle, counting the imports deferred into functions too (a deferred import
only hides a cycle: any reordering or refactor can turn it into an ImportError), and the nuScenes
reader reaches nuscenes-devkit only through `infra.packages.require_package` (which names the extra)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "stages" / "data"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Every stages.data module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names
                     if n.startswith("stages.data") and (ROOT / (n.replace(".", "/") + ".py")).is_file())
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_stages_data_has_no_import_cycle_even_through_deferred_imports():
    graph = {module_name(p): project_imports(p) - {module_name(p)} for p in DATA.glob("*.py")}
    assert "stages.data.nuscenes_schema" in graph["stages.data.agents"]   # the graph does see imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_the_old_one():
    old = {"agents": {"nuscenes_schema"}, "nuscenes_schema": {"dataset"}, "dataset": {"recorder"},
           "recorder": {"agents"}}
    assert find_cycle(old) == ["agents", "nuscenes_schema", "dataset", "recorder", "agents"]


@pytest.mark.parametrize("module", sorted(module_name(p) for p in DATA.glob("*.py") if p.name != "__main__.py"))
def test_each_data_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_reader_reaches_the_devkit_through_require_package():
    devkit = {"nuscenes", "pyquaternion"}
    tree = ast.parse((DATA / "nuscenes_reader.py").read_text())
    direct = [ast.unparse(n) for n in ast.walk(tree)
              if (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in devkit)
              or (isinstance(n, ast.Import) and any(a.name.split(".")[0] in devkit for a in n.names))]
    assert not direct, direct
