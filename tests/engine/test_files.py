"""The engine's one atomic file write: the old file or the new one, never half, and no leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ham_engine.files import write_atomically, write_bytes_atomically, write_text_atomically


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_text_atomically(path, "old")
    assert write_bytes_atomically(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    seen = []

    def half_then_fail(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".out.png.") and seen[0].suffix == ".tmp"
    assert not seen[0].exists() and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path: Path) -> None:
    names = []

    def write(temporary: Path) -> None:
        names.append(temporary.name)
        temporary.write_bytes(b"x")

    for _ in range(2):
        write_atomically(tmp_path / "blob", write)
    assert len(set(names)) == 2
