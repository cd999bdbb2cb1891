"""The architecture's layering, checked by import-linter against the contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ham_engine", "ham_core", "service", "worker", "ham_cli", "ham_client")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(script), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
    )


def test_layer_contracts_are_kept() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "9 kept, 0 broken" in done.stdout


def test_a_worker_importing_the_http_layer_breaks_a_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "worker" / "shortcut.py").write_text("from service.api.routes import transfers\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "The worker never imports the HTTP layer BROKEN" in done.stdout


def test_a_client_importing_the_server_breaks_a_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "ham_client" / "shortcut.py").write_text("from ham_core.resource import TransferJob\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "The Python client talks to the API only over HTTP, without torch BROKEN" in done.stdout


def test_a_route_importing_another_route_breaks_a_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    events = tmp_path / "service" / "api" / "routes" / "events.py"
    events.write_text(events.read_text() + "\nfrom service.api.routes.transfers import router as _transfers\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "Route modules never import one another BROKEN" in done.stdout


@pytest.mark.parametrize(
    ("package", "shortcut"),
    [
        ("ham_core", "from ham_cli.main import main\n"),
        ("service", "from worker.task import run_transfer\n"),
        ("ham_engine", "from ham_core.config import Settings\n"),
    ],
)
def test_an_import_up_the_layers_breaks_the_layers_contract(tmp_path: Path, package: str, shortcut: str) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / package / "shortcut.py").write_text(shortcut)
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "Each layer imports only the layers below it BROKEN" in done.stdout


def test_every_package_of_ours_is_under_the_contracts() -> None:
    # A new top-level package outside root_packages would escape every contract.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ours = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in {"tests", "bench"})
    assert sorted(config["tool"]["importlinter"]["root_packages"]) == ours
    assert sorted(PACKAGES) == ours
