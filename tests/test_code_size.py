"""The product code stays readable in pieces: no module over 500 lines, no function over 60.

Every package of ours is held to it (the engine, the shared core, the HTTP API, the worker, the
``ham`` command and the Python client); the benchmarks and tests are tools, not product code.
The generated module (``ham_client/error_codes.py``, written by ``python -m ham_cli.codegen``)
and the error catalogue (one declarative class per code) are exempt from the module length only.

A function that is a declared copy of another project's (``# Copied from ...`` on the line
above it, checked against the original by its own test) keeps the original's shape and is
exempt: splitting it would break the comparison.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ham_engine", "ham_core", "service", "worker", "ham_cli", "ham_client")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MODULES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
# Declarative or generated: long by nature, not by mixing concepts (their functions are still held).
LONG_BY_DECLARATION = {ROOT / "ham_client" / "error_codes.py", ROOT / "service" / "api" / "errors.py"}


def _is_declared_copy(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    return lines[first - 2].strip().startswith("# Copied from ")


def test_every_package_has_modules_to_check() -> None:
    for package in PACKAGES:
        assert any(path.parent.name == package for path in MODULES), package
    assert len(MODULES) > 100


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_its_functions_stay_short(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if path not in LONG_BY_DECLARATION:
        assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines; split it by concept"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_declared_copy(lines, node):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({length} lines, from line {node.lineno})")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
