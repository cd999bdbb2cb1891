"""A parameter's value in a form's text field, parsed strictly: the one reader of form text.

Used by every multipart body (``POST /v1/transfers``, ``POST /v1/styles``), so that a form field
means the same on every route: ASCII digits, ``true``/``false`` and nothing else for a boolean.
"""

from __future__ import annotations

import re
from typing import Any

from ham_engine.params import ParamError, ParamSpec

# ASCII only: Python's int()/float() also accept other scripts' digits ("٤", fullwidth "４") and
# underscores ("1_0" is 10.0), none of which a client means as a number.
_INT = re.compile(r"[+-]?[0-9]{1,20}")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)
# What the schema's `boolean` means in a form: the words, not 1/0 or yes/no (a strict reader keeps
# /openapi.json exact, and every client library sends these).
_TRUE = frozenset({"true"})
_FALSE = frozenset({"false"})


def form_value(spec: ParamSpec, raw: str) -> Any:
    """The value of parameter ``spec`` in the text ``raw`` of a form field; :class:`ParamError` naming it otherwise.

    Ranges are left to the parameters' own checks (``TransferParams``, ``OutputSpec``).
    """
    text = raw.strip()
    name = spec.name
    if spec.kind is str:
        return text
    if spec.kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ParamError(name, f"must be true or false, got {raw[:40]!r}")
    if spec.kind is int:
        if not _INT.fullmatch(text):
            raise ParamError(name, f"must be an integer, got {raw[:40]!r}")
        return int(text)
    # nan/inf parse here so that the range check names them ("must be in [0.0, 1.0], got nan").
    if not _FLOAT.fullmatch(text):
        raise ParamError(name, f"must be a number, got {raw[:40]!r}")
    return float(text)
