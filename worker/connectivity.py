"""What a worker knows about reaching its dependencies, and how it waits for them to return.

One :class:`Link` per dependency (Redis, object storage) per worker process. Every part of
the worker that talks to the dependency reports what it saw (:meth:`Link.failed`,
:meth:`Link.recovered`); the link logs only when the state changes (one line when it is lost,
one when it is back, with the outage's length) and tells the readiness probe, so ``/readyz``
answers 503 while Redis is away. :meth:`Link.wait_until_up` and :func:`outlast` retry with
exponential backoff and jitter, capped at ``settings.worker_reconnect_max``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ham_core.config import Settings
from ham_core.jobs import JobStore
from ham_core.redis_client import REDIS_UNAVAILABLE, probe_writable
from ham_core.storage import Storage, StorageError

log = logging.getLogger("ham.worker")

T = TypeVar("T")

# First pause of a wait; doubles per failed try up to the link's cap.
WAIT_BASE = 0.25


def backoff(failures: int, cap: float, base: float = WAIT_BASE) -> float:
    """Seconds to pause after ``failures`` failed tries: exponential, half of it random (equal jitter)."""
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Link:
    """The observed state of one dependency: up or down, since when, and who wants to know."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], object],
        errors: tuple[type[BaseException], ...],
        reconnect_max: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self.probe = probe
        self.errors = errors
        self.reconnect_max = reconnect_max
        self.on_change = on_change
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self.outages = 0

    @property
    def up(self) -> bool:
        return self._down_since is None

    def failed(self, exc: BaseException) -> None:
        """Report a failed call: the first report of an outage logs it and flips readiness."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        log.warning("%s unreachable (%s: %s); carrying on without it and retrying", self.name, type(exc).__name__, exc)
        if self.on_change is not None:
            self.on_change(False)

    def recovered(self) -> None:
        """Report a successful call: the first after an outage logs it and restores readiness."""
        with self._lock:
            if self._down_since is None:
                return
            lasted = time.monotonic() - self._down_since
            self._down_since = None
        log.warning("%s reachable again after %.1fs", self.name, lasted)
        if self.on_change is not None:
            self.on_change(True)

    def wait_until_up(self, should_stop: Callable[[], bool] = lambda: False, deadline: float | None = None) -> bool:
        """Probe with backoff until the dependency answers (True), or ``deadline``/``should_stop`` (False)."""
        failures = 0
        while True:
            try:
                self.probe()
            except self.errors as exc:
                self.failed(exc)
                failures += 1
            else:
                self.recovered()
                return True
            pause = backoff(failures, self.reconnect_max)
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
            if should_stop() or pause <= 0:
                return False
            time.sleep(pause)


class OutageTooLong(Exception):
    """A dependency stayed away past the deadline; ``what`` says which step gave up."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: gave up after an outage ({type(cause).__name__}: {cause})")
        self.what = what
        self.cause = cause


def outlast(what: str, action: Callable[[], T], link: Link, deadline: float) -> T:
    """Run ``action``, retrying through ``link``'s errors with backoff until ``deadline`` (monotonic).

    Past the deadline raises :class:`OutageTooLong`. Every other exception passes through.
    """
    failures = 0
    while True:
        try:
            result = action()
        except link.errors as exc:
            link.failed(exc)
            failures += 1
            pause = min(backoff(failures, link.reconnect_max), deadline - time.monotonic())
            if pause <= 0:
                raise OutageTooLong(what, exc) from exc
            log.debug("%s: %s unavailable, retry %d in %.2fs", what, link.name, failures, pause)
            time.sleep(pause)
        else:
            link.recovered()
            return result


def redis_link_for(store: JobStore, settings: Settings, on_change: Callable[[bool], None] | None = None) -> Link:
    """The worker's view of Redis, probed with a one-key write on the store's client (``PING``
    answers while Redis is full or read-only; a write sees those refusals too)."""
    return Link("Redis", lambda: probe_writable(store.redis), REDIS_UNAVAILABLE, settings.worker_reconnect_max,
                on_change)  # fmt: skip


def storage_link_for(
    storage: Storage, settings: Settings, on_change: Callable[[bool], None] | None = None
) -> Link:
    """The worker's view of object storage (``on_change(up)`` hears each change)."""
    return Link("object storage", storage.ping, (StorageError,), settings.worker_reconnect_max, on_change)
