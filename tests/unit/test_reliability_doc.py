"""docs/reliability.md is a table of faults, each backed by a test: every test it names exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`")


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def table_rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ") and REF.search(line)]


def test_every_fault_row_names_a_test_that_exists():
    missing = []
    for row in table_rows():
        for file, name in REF.findall(row):
            path = ROOT / file
            if not path.is_file() or name not in defined_functions(path):
                missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_the_fault_table_has_at_least_thirty_rows():
    assert len(table_rows()) >= 30
