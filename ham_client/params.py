"""The per-request parameters of a transfer, typed: what ``submit(**params)`` accepts.

Generated from the server's parameter table (``TransferParams`` in ``ham_engine.params`` and
``OUTPUT_SPECS`` in ``ham_core.output``) by ``python -m ham_cli.codegen``: do not edit. The client
imports nothing of the server (it needs neither torch nor the service), so the table is written
out here; the test suite fails when this file is stale.
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
