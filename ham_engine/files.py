"""Writing a file atomically: readers see the old content or the new, never half of it.

The engine's one way to write a file another reader may open at any moment: a feature
blob that other processes share (:mod:`ham_engine.feature_store`), ``ham eval``'s outputs,
records and reports (a rerun trusts what it finds).
"""

from __future__ import annotations

import os
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
