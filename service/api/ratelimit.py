"""Per-API-key request rate limit, counted in Redis so every API replica shares it.

A fixed one-minute window per key: one atomic ``INCR`` + ``EXPIRE`` (a Lua script, so a crash
between the two can never leave a counter without expiry). A key may burst up to twice the
limit across a window boundary; that is the usual price of a fixed window and acceptable here.
Keys are stored hashed, so a Redis dump never reveals an API key.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WINDOW_SECONDS = 60

# KEYS[1]: counter; ARGV[1]: window seconds. Returns the count after this request.
_INCR_WITH_EXPIRY = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may proceed; ``retry_after`` seconds until the window resets."""

    allowed: bool
    count: int
    limit: int
    retry_after: int


class RateLimiter:
    """Fixed-window request counter per identity (an API key, or the local tenant)."""

    def __init__(self, redis: Redis, limit_per_minute: int, prefix: str = "ham:ratelimit") -> None:
        self._redis = redis
        self._limit = limit_per_minute
        self._prefix = prefix
        self._script = redis.register_script(_INCR_WITH_EXPIRY)
        # What "now" is for the windows (tests set another clock instead of waiting for a boundary).
        self.clock: Callable[[], float] = time.time

    def hit(self, identity: str, now: float | None = None) -> RateDecision:
        """Count one request for ``identity`` and say whether it is within the limit."""
        now = self.clock() if now is None else now
        window = int(now // WINDOW_SECONDS)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        count = int(self._script(keys=[f"{self._prefix}:{digest}:{window}"], args=[WINDOW_SECONDS * 2]))
        retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
        return RateDecision(allowed=count <= self._limit, count=count, limit=self._limit, retry_after=retry_after)


# The policy's name in the headers (one policy: requests per key per minute).
POLICY_NAME = "per-minute"


def ratelimit_headers(decision: RateDecision) -> dict[str, str]:
    """The IETF ``RateLimit-Policy`` and ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers)
    of a decision: the quota per window, what is left of it, and the seconds until it resets."""
    remaining = max(0, decision.limit - decision.count)
    return {
        "RateLimit-Policy": f'"{POLICY_NAME}";q={decision.limit};w={WINDOW_SECONDS}',
        "RateLimit": f'"{POLICY_NAME}";r={remaining};t={decision.retry_after}',
    }


class RateLimitHeaders:
    """Adds the ``RateLimit`` headers to every answer of a request that was counted, errors included.

    The rate-limit dependency leaves its decision in the request's state; this middleware puts it
    on the response start, whichever handler (route, error handler) produced it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            decision = scope.get("state", {}).get("rate_decision")
            if message["type"] == "http.response.start" and decision is not None:
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in ratelimit_headers(decision).items():
                    if name.lower().encode() not in names:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
