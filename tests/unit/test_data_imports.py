"""Each stages/data module imports first in a fresh interpreter (the project-wide cycle check, deferred
imports included, is tests/unit/test_import_graph.py), and the nuScenes reader reaches nuscenes-devkit
only through `infra.packages.require_package` (which names the extra)."""
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
