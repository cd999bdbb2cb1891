"""The engine's one atomic file write (and folder build): the old or the new, never half, and no leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ham_engine.files import build_folder_atomically, write_atomically, write_bytes_atomically, write_text_atomically


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


def test_a_folder_is_built_once_and_renamed_into_place(tmp_path: Path) -> None:
    built = []

    def build(staging: Path) -> None:
        built.append(staging)
        (staging / "weights.bin").write_bytes(b"w")
        (staging / "done.json").write_text("{}")

    target = tmp_path / "cache" / "model"
    assert build_folder_atomically(target, build, "done.json", shared=True) == target
    assert (target / "weights.bin").read_bytes() == b"w" and target.stat().st_mode & 0o777 == 0o755
    assert build_folder_atomically(target, build, "done.json") == target
    assert len(built) == 1  # complete: returned as it is
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_failed_folder_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"h")
        raise ValueError("no vocabulary")

    with pytest.raises(ValueError, match="no vocabulary"):
        build_folder_atomically(tmp_path / "model", build, "done.json")
    assert list(tmp_path.iterdir()) == []
