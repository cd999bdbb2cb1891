"""The engine's code stays readable in pieces: no module over 500 lines, no function over 60.

A function that is a declared copy of another project's (``# Copied from ...`` on the line
above it, checked against the original by its own test) keeps the original's shape and is
exempt: splitting it would break the comparison.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ham_engine"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MODULES = sorted(PACKAGE.rglob("*.py"))


def _is_declared_copy(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    return lines[first - 2].strip().startswith("# Copied from ")


def test_the_package_has_modules_to_check() -> None:
    assert len(MODULES) > 20 and (PACKAGE / "engine.py") in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_its_functions_stay_short(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines; split it by concept"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_declared_copy(lines, node):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({length} lines, from line {node.lineno})")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
