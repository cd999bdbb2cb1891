"""HAM: training-free style transfer by heterogeneous attention modulation.

``from ham_engine import HamEngine, TransferParams`` is the whole public surface.
The torch-heavy names load lazily so that ``ham_engine.params`` stays importable by the
torch-free HTTP API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ham_engine.params import ParamError, TransferParams

if TYPE_CHECKING:
    from ham_engine.engine import BatchResult, HamEngine, Style, TransferCancelled, TransferResult, TransferStats

__all__ = [
    "BatchResult", "HamEngine", "ParamError", "Style", "TransferCancelled", "TransferParams", "TransferResult",
    "TransferStats",
]  # fmt: skip

_LAZY = {"BatchResult", "HamEngine", "Style", "TransferCancelled", "TransferResult", "TransferStats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ham_engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ham_engine' has no attribute {name!r}")
