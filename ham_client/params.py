"""The per-request parameters of a transfer, typed: what ``submit(**params)`` accepts.

The server's parameter table (``ParamSpec`` in ``ham_engine.params`` and the output format) is the
source; this client must not import it (it needs neither torch nor the service), so the table is
restated here as a ``TypedDict`` and ``tests/e2e/test_client.py`` checks it against the server's
specs, name by name and type by type: a parameter added there and not here fails that test.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class TransferOptions(TypedDict, total=False):
    """Every optional parameter of ``POST /v1/transfers`` (the server's defaults apply to those left out)."""

    steps: int
    seed: int
    size: int
    alpha: float
    beta: float
    gamma: float
    guidance: float
    sini: bool
    gar: bool
    lat: bool
    guide_student: bool
    step_start: float
    step_end: float
    inversion: Literal["target", "source"]
    teachers: Literal["auto", "live", "recorded"]
    output_format: Literal["png", "jpeg", "webp"]
    output_quality: int
