"""Writing a file (or building a folder) atomically: readers see the old content or the new, never half of it.

The engine's one way to write a file another reader may open at any moment: a feature
blob that other processes share (:mod:`ham_engine.feature_store`), ``ham eval``'s outputs,
records and reports (a rerun trusts what it finds).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` with a path beside ``path``, then rename it into place; returns ``path``.

    The temporary name is unique (``.NAME.<pid>.<random>.tmp``, hidden), so two writers of
    the same file never share one, and the last rename wins whole. If ``write`` fails the
    temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`write_atomically` of ``data``."""
    return write_atomically(path, lambda temporary: temporary.write_bytes(data))


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_atomically` of ``text`` as UTF-8."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def build_folder_atomically(
    target: str | os.PathLike[str], build: Callable[[Path], None], marker: str, *, shared: bool = False
) -> Path:
    """The folder ``target``, built on first use: ``build(staging)`` fills a fresh folder beside it,
    which is then renamed into place; returns ``target``.

    A folder counts as complete once it holds the file ``marker`` (only whole builds are renamed into
    place), so a complete ``target`` is returned as it is. Two processes may build it at once: when
    the rename fails because the other's complete copy arrived first, that copy is kept. A failed build leaves
    no staging folder behind. ``shared``: the folder is readable by other users (a cache several
    accounts use), not private as a temporary folder starts.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if shared:
            staging.chmod(0o755)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
