"""Checking a webhook the HAM service sent: ``verify_webhook(body, headers, secret)``."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from ham_client.errors import WebhookSignatureError
from ham_client.models import Job

SIGNATURE_HEADER = "X-HAM-Signature"


def verify_webhook(
    body: bytes, headers: Mapping[str, str], secret: str, tolerance: float = 300, now: float | None = None
) -> Job:
    """The job in a webhook delivery, once its signature is checked; :class:`WebhookSignatureError` otherwise.

    ``body`` must be the raw bytes received (before any JSON parsing); ``headers`` any mapping of
    the request's headers (looked up case-insensitively); ``secret`` the server's
    ``HAM_WEBHOOK_SECRET``. The header is ``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``;
    a timestamp more than ``tolerance`` seconds away from now is refused (replays).
    """
    header = next((value for name, value in headers.items() if name.lower() == SIGNATURE_HEADER.lower()), None)
    if not header:
        raise WebhookSignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookSignatureError(f"malformed {SIGNATURE_HEADER} header")
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise WebhookSignatureError(f"signature timestamp is more than {tolerance:g}s away from now")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookSignatureError("signature does not match the body")
    return Job.model_validate_json(body)
