"""Webhooks: signing, an SSRF guard for target URLs, and background delivery with retries.

Signature header (documented for receivers)::

    X-HAM-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

A receiver recomputes the HMAC over the raw request body with the shared
``HAM_WEBHOOK_SECRET``, compares in constant time and refuses timestamps older than a few
minutes (``verify`` does all three). Each attempt is signed afresh, so a retry an hour later
still carries a current timestamp. ``X-HAM-Delivery`` is a stable id per delivery, for
de-duplicating retries; ``X-HAM-Event`` says why it was sent (``start``, ``progress``, ``completed``).

Target URLs must be http(s) and resolve only to public addresses unless
``HAM_WEBHOOK_ALLOW_PRIVATE`` is set; the check runs again right before every attempt, so a
DNS record changed after submission (rebinding) is caught too. Redirects are never followed.

This module is torch-free; the worker (terminal job states) and the API (cancel of a queued
job) both use it.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ham_core.ssrf import check_public_url, pinned_request

if TYPE_CHECKING:
    from redis import Redis

    from ham_core.config import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-HAM-Signature"
DELIVERY_HEADER = "X-HAM-Delivery"
EVENT_HEADER = "X-HAM-Event"
USER_AGENT = "ham-webhooks/1"

# Redis keys of the persisted schedule: a sorted set (delivery id → due time) and its payloads.
REDIS_DUE_KEY = "ham:webhooks:due"
REDIS_DATA_KEY = "ham:webhooks:data"


# --- signing -------------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-HAM-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={int(timestamp)},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance: int = 300, now: float | None = None) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its timestamp is within ``tolerance`` seconds."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in (header or "").split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def check_webhook_url(url: str, allow_private: bool) -> str | None:
    """:func:`ham_core.ssrf.check_public_url` for a ``webhook_url``: the vetted address, or ``ValueError``."""
    return check_public_url(url, allow_private, field="webhook_url", setting="HAM_WEBHOOK_ALLOW_PRIVATE")


# --- delivery schedule ---------------------------------------------------------------------------


@dataclass
class _Delivery:
    id: str
    url: str
    body: str
    attempt: int = 0
    event: str = "completed"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> _Delivery:
        return cls(**json.loads(raw))


class _MemorySchedule:
    """Deliveries due at a time, in this process only."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Delivery]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def add(self, delivery: _Delivery, due: float) -> None:
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._order), delivery))

    def claim(self, now: float) -> _Delivery | None:
        with self._lock:
            if self._heap and self._heap[0][0] <= now:
                return heapq.heappop(self._heap)[2]
            return None

    def next_due(self) -> float | None:
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def done(self, delivery: _Delivery) -> None:
        """Nothing to forget: a claimed delivery already left the heap."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


# Claim the earliest due delivery and push its due time out by a lease, atomically, so two
# dispatchers sharing Redis never send the same attempt; if the claimant dies, the lease expires
# and another dispatcher (or the restarted one) picks it up.
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
local data = redis.call('HGET', KEYS[2], ids[1])
if not data then redis.call('ZREM', KEYS[1], ids[1]) return false end
redis.call('ZADD', KEYS[1], ARGV[2], ids[1])
return data
"""


class _RedisSchedule:
    """Deliveries persisted in Redis, shared by every dispatcher on that Redis."""

    def __init__(self, redis: Redis, lease: float) -> None:
        self._redis = redis
        self._lease = lease
        self._claim = redis.register_script(_CLAIM_LUA)

    def add(self, delivery: _Delivery, due: float) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(REDIS_DATA_KEY, delivery.id, delivery.to_json())
        pipe.zadd(REDIS_DUE_KEY, {delivery.id: due})
        pipe.execute()

    def claim(self, now: float) -> _Delivery | None:
        raw = self._claim(keys=[REDIS_DUE_KEY, REDIS_DATA_KEY], args=[now, now + self._lease])
        return _Delivery.from_json(raw) if raw else None

    def next_due(self) -> float | None:
        first = self._redis.zrange(REDIS_DUE_KEY, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def done(self, delivery: _Delivery) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(REDIS_DUE_KEY, delivery.id)
        pipe.hdel(REDIS_DATA_KEY, delivery.id)
        pipe.execute()

    def __len__(self) -> int:
        return int(self._redis.zcard(REDIS_DUE_KEY))


# --- dispatcher ----------------------------------------------------------------------------------


class WebhookDispatcher:
    """Delivers signed webhooks on background threads; ``submit`` never waits for the network.

    A failed attempt (connection error, timeout, HTTP 5xx/408/425/429) is retried after
    ``backoff * 2**(attempt-1)`` seconds (capped at ``max_backoff``, with jitter) up to
    ``settings.webhook_max_attempts`` attempts; other 4xx and 3xx answers are final. With a
    ``redis`` client the pending deliveries live in Redis, so a restart (or another worker)
    finishes them; without one they live in memory and are lost when the process exits.
    An empty ``settings.webhook_secret`` disables webhooks: ``submit`` only logs.
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis | None = None,
        *,
        senders: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        poll_interval: float = 1.0,
    ) -> None:
        if senders < 1:
            raise ValueError(f"senders must be >= 1, got {senders}")
        self._secret = settings.webhook_secret
        self._allow_private = settings.webhook_allow_private
        self._timeout = settings.webhook_timeout
        self._max_attempts = settings.webhook_max_attempts
        self._senders = senders
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._poll_interval = poll_interval
        self._memory = _MemorySchedule()
        self._shared = _RedisSchedule(redis, lease=settings.webhook_timeout + 30) if redis is not None else None
        self._schedule_failing = False
        self._wakeup = threading.Condition()
        self._generation = 0  # bumped by every submit, under _wakeup
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counts_lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # delivered / retried / dropped / rejected_url

    @property
    def enabled(self) -> bool:
        """False when no webhook secret is configured."""
        return bool(self._secret)

    def start(self) -> None:
        """Start the sender threads (idempotent)."""
        if self._threads:
            return
        self._stopping.clear()
        for n in range(self._senders):
            thread = threading.Thread(target=self._run, name=f"ham-webhook-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5) -> None:
        """Stop the senders, waiting up to ``timeout`` seconds for attempts in flight."""
        self._stopping.set()
        with self._wakeup:
            self._wakeup.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        if len(self._memory):
            log.warning("webhook dispatcher stopped with %d undelivered in-memory webhooks", len(self._memory))

    def submit(self, url: str, payload: dict[str, Any], event: str = "completed") -> None:
        """Queue ``payload`` (JSON) for delivery to ``url`` and return at once.

        ``event`` (``start``, ``progress`` or ``completed``) travels in the ``X-HAM-Event`` header.
        """
        if not self.enabled:
            log.info("webhook to %s not sent: HAM_WEBHOOK_SECRET is empty", url)
            return
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str)
        delivery = _Delivery(id=uuid.uuid4().hex, url=url, body=body, event=event)
        self._schedule(delivery, time.time())

    def pending(self) -> int:
        """Deliveries waiting (including those waiting for a retry)."""
        return len(self._memory) + (len(self._shared) if self._shared is not None else 0)

    # -- internals --

    def _schedule(self, delivery: _Delivery, due: float) -> None:
        if self._shared is not None:
            try:
                self._shared.add(delivery, due)
            except Exception as exc:  # Redis down: keep the webhook in memory rather than lose it
                log.warning("webhook %s kept in memory, Redis unavailable: %s", delivery.id, exc)
                self._memory.add(delivery, due)
        else:
            self._memory.add(delivery, due)
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify()

    def _claim(self) -> tuple[_Delivery, _MemorySchedule | _RedisSchedule] | None:
        now = time.time()
        delivery = self._memory.claim(now)
        if delivery is not None:
            return delivery, self._memory
        if self._shared is not None:
            try:
                delivery = self._shared.claim(now)
            except Exception as exc:
                if not self._schedule_failing:  # once per outage, not once per poll
                    log.warning("cannot read webhook schedule from Redis: %s", exc)
                    self._schedule_failing = True
                return None
            if self._schedule_failing:
                log.warning("webhook schedule in Redis readable again")
                self._schedule_failing = False
            if delivery is not None:
                return delivery, self._shared
        return None

    def _idle_wait(self, generation: int) -> None:
        due = self._memory.next_due()
        # Redis may gain deliveries from other processes (e.g. the API): poll it.
        wait = self._poll_interval if self._shared is not None else 3600.0
        if due is not None:
            wait = min(wait, max(0.0, due - time.time()))
        with self._wakeup:
            # A submit since our claim attempt bumped the generation: don't sleep through it.
            if self._generation == generation and not self._stopping.is_set():
                self._wakeup.wait(wait)

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout, follow_redirects=False, trust_env=False) as client:
            while not self._stopping.is_set():
                generation = self._generation
                claimed = self._claim()
                if claimed is None:
                    self._idle_wait(generation)
                    continue
                delivery, schedule = claimed
                try:
                    self._attempt(client, delivery, schedule)
                except Exception:  # never let one bad delivery kill a sender thread
                    log.exception("webhook %s to %s failed unexpectedly", delivery.id, delivery.url)
                    schedule.done(delivery)
                    self._count("dropped")

    def _attempt(self, client: httpx.Client, delivery: _Delivery, schedule: _MemorySchedule | _RedisSchedule) -> None:
        delivery.attempt += 1
        try:
            address = check_webhook_url(delivery.url, self._allow_private)
        except ValueError as exc:
            log.warning("webhook %s dropped: %s", delivery.id, exc)
            schedule.done(delivery)
            self._count("rejected_url")
            return
        body = delivery.body.encode()
        url, host_header, extensions = pinned_request(delivery.url, address)
        headers = {
            **host_header,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
            DELIVERY_HEADER: delivery.id,
            EVENT_HEADER: delivery.event,
        }
        try:
            response = client.post(url, content=body, headers=headers, extensions=extensions)
            status: int | None = response.status_code
            outcome = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, outcome = None, f"{type(exc).__name__}: {exc}"
        if status is not None and 200 <= status < 300:
            schedule.done(delivery)
            self._count("delivered")
            log.debug("webhook %s delivered to %s (attempt %d)", delivery.id, delivery.url, delivery.attempt)
            return
        retryable = status is None or status >= 500 or status in (408, 425, 429)
        if retryable and delivery.attempt < self._max_attempts:
            delay = min(self._max_backoff, self._backoff * 2 ** (delivery.attempt - 1)) * random.uniform(1.0, 1.25)
            log.info(
                "webhook %s to %s: %s on attempt %d, retrying in %.1fs",
                delivery.id,
                delivery.url,
                outcome,
                delivery.attempt,
                delay,
            )
            # Re-adding to the same schedule: a Redis delivery stays in Redis (survives a restart).
            schedule.add(delivery, time.time() + delay)
            self._count("retried")
            return
        log.warning(
            "webhook %s to %s dropped after %d attempts: %s", delivery.id, delivery.url, delivery.attempt, outcome
        )
        schedule.done(delivery)
        self._count("dropped")

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self.counts[outcome] += 1
