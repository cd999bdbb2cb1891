"""No copied code in the product: pylint's similarity checker (``symilar``) over every package of ours.

Six or more lines that stand again elsewhere — comments, docstrings, imports and signatures aside —
mean one piece of logic kept twice, which drifts: the sync and async clients share their decisions
through ``ham_client.protocol``, the engine's folder builds and file writes go through
``ham_engine.files``, and so on. The benchmarks and tests are tools, not product code, and are not
held to it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_code_size import MODULES, ROOT

MIN_LINES = 6

pytestmark = pytest.mark.slow


def _symilar(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "symilar"
    command = [str(script), "-d", str(MIN_LINES), "--ignore-comments", "--ignore-docstrings", "--ignore-imports",
               "--ignore-signatures", *map(str, paths)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_block_of_product_code_is_repeated() -> None:
    done = _symilar(MODULES)
    total = re.search(r"TOTAL lines=(\d+) duplicates=(\d+)", done.stdout)
    assert total is not None, done.stdout[-3000:] + done.stderr[-3000:]
    assert int(total.group(1)) > 15000  # every package was read
    assert int(total.group(2)) == 0, done.stdout[-6000:]


def test_a_copied_block_is_found(tmp_path: Path) -> None:
    # The check itself: a function pasted into a second module is reported.
    original = ROOT / "ham_engine" / "files.py"
    copy = tmp_path / "copy.py"
    copy.write_text(original.read_text())
    done = _symilar([original, copy])
    assert re.search(r"^\d+ similar lines in 2 files$", done.stdout, re.MULTILINE), done.stdout
    assert "duplicates=0" not in done.stdout
