"""Every Redis client of the service is built here, with one deliberate connection policy.

- **Retries.** A command that meets a connection error or a timeout is retried
  ``settings.redis_retries`` times, pausing with exponential backoff and equal jitter
  (``redis_retry_base`` doubling up to ``redis_retry_cap``; half of each pause is random, so
  replicas that lost Redis together do not reconnect in lockstep). With the defaults a command
  rides through about 1.75–3.5 s of unavailability: a Redis restart, a failover, a dropped
  connection. Longer outages surface as :data:`REDIS_UNAVAILABLE` errors: the API answers 503,
  the worker waits it out (:mod:`worker.connectivity`).
- **Health checks.** A pooled connection idle for ``redis_health_check_interval`` seconds is
  PINGed before use, so a connection the server dropped while idle is replaced before it
  carries a real command.
- **Timeouts.** ``redis_connect_timeout`` to connect, ``redis_socket_timeout`` per reply. A
  client that issues blocking commands (the worker's idle ``BLPOP``) passes a longer
  ``socket_timeout``.

- **Refusals are outages too.** A Redis that answers but refuses — full (``OOM``, maxmemory
  with ``noeviction``), a replica after a failover (``READONLY``), loading its data after a
  restart (``LOADING``), cut off from its primary (``MASTERDOWN``), stuck in a script (``BUSY``),
  writes stopped after a failed snapshot (``MISCONF``), too few replicas (``NOREPLICAS``) — is
  retried like a dropped connection and then surfaces as :data:`REDIS_UNAVAILABLE`, never as a
  bug. :func:`refusal` names the reason (the API's 503 code, ``/readyz``, the worker's log);
  :func:`probe_writable` is the readiness check that sees them (``PING`` answers even while
  Redis refuses every write).

Retrying is safe for what the service sends: the job transitions are Lua scripts that refuse
a second application (and the worker treats "already done by me" as done), and Redis refuses
a script for lack of memory only at its first write, so a refused script changed nothing;
transactions under ``WATCH`` are never retried by redis-py.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import EqualJitterBackoff
from redis.connection import parse_url
from redis.exceptions import BusyLoadingError, MasterDownError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

from ham_core.config import Settings


class RedisBusyError(ResponseError):
    """``BUSY``: Redis is running a script (or module command) past its time limit."""


class RedisWritesStoppedError(ResponseError):
    """``MISCONF``: Redis stopped accepting writes because it could not persist its data."""


class RedisNoReplicasError(ResponseError):
    """``NOREPLICAS``: fewer replicas than ``min-replicas-to-write`` are connected."""


# redis-py raises a bare ResponseError for these codes; give them classes so a retry policy can
# name them. Registered on the parsers' shared table (sync and asyncio, RESP2 and RESP3).
for _code, _error in (("BUSY", RedisBusyError), ("MISCONF", RedisWritesStoppedError),
                      ("NOREPLICAS", RedisNoReplicasError)):  # fmt: skip
    BaseParser.EXCEPTION_CLASSES.setdefault(_code, _error)

# A Redis that answers but refuses to serve: an outage, not a bug (waited out, answered 503).
REDIS_REFUSED: tuple[type[Exception], ...] = (
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    RedisBusyError,
    RedisWritesStoppedError,
    RedisNoReplicasError,
)
# What "Redis cannot serve us right now" looks like to a caller, once the retries are spent.
# (``LOADING`` is a BusyLoadingError, a ConnectionError to redis-py.)
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, *REDIS_REFUSED)

# Why Redis is unavailable, one word per kind; the API's 503 code is ``redis_<word>`` for a
# refusal and ``unavailable`` for ``unreachable``. Most specific first (BusyLoadingError is a
# ConnectionError).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (OutOfMemoryError, "full"),
    (ReadOnlyError, "readonly"),
    (BusyLoadingError, "loading"),
    (MasterDownError, "master_down"),
    (RedisBusyError, "busy"),
    (RedisWritesStoppedError, "writes_stopped"),
    (RedisNoReplicasError, "no_replicas"),
)
UNREACHABLE = "unreachable"
# The key the writability probe sets (tiny, expires by itself).
PROBE_KEY = "ham:probe"


def refusal(exc: BaseException) -> str:
    """Why Redis failed a call: ``full``, ``readonly``, ``loading``, ``master_down``, ``busy``,
    ``writes_stopped``, ``no_replicas``, or ``unreachable`` (connection errors and timeouts)."""
    for error, reason in _REASONS:
        if isinstance(exc, error):
            return reason
    return UNREACHABLE


def probe_writable(redis: Redis) -> None:
    """Raise what a write would meet now (:data:`REDIS_UNAVAILABLE`), else return.

    A one-key write with a short expiry: ``PING`` answers while Redis is full, read-only or
    cut off from its primary, so readiness needs a write to see those.
    """
    redis.set(PROBE_KEY, "1", ex=60)


def raise_outage_behind(exc: BaseException) -> None:
    """Re-raise the outage behind ``exc`` (a ``WatchError``), if one is.

    redis-py turns an error its retry policy covers — a refusal such as OOM at ``EXEC`` included —
    into a ``WatchError`` while keys are watched; a WATCH loop that took it for contention would
    retry a refused transaction forever.
    """
    if isinstance(exc.__context__, REDIS_UNAVAILABLE):
        raise exc.__context__ from None


def memory_usage(redis: Redis) -> tuple[int, int]:
    """``(used_memory, maxmemory)`` in bytes from ``INFO memory`` (``maxmemory`` 0: no limit)."""
    info = redis.info("memory")
    return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))


def retry_policy(settings: Settings, retries: int | None = None) -> Retry:
    """The bounded retry of one Redis command (``retries`` overrides ``settings.redis_retries``)."""
    backoff = EqualJitterBackoff(cap=settings.redis_retry_cap, base=settings.redis_retry_base)
    count = settings.redis_retries if retries is None else retries
    return Retry(backoff, count, supported_errors=REDIS_UNAVAILABLE)


def connect_redis(settings: Settings, *, socket_timeout: float | None = None, retries: int | None = None) -> Redis:
    """A client for ``settings.redis_url`` (bytes responses, as RQ needs) with the service's policy.

    ``socket_timeout`` replaces ``settings.redis_socket_timeout`` for clients that block in
    Redis on purpose; ``retries=0`` makes a client for best-effort writes that must fail fast.
    Connections open lazily: building a client never fails because Redis is down.

    With ``settings.redis_sentinels`` the client asks those Sentinels for the current primary of
    ``settings.redis_sentinel_master`` (and asks again after a failover: a ``READONLY`` answer from
    a demoted primary drops the connection); ``redis_url`` then only gives database and password.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout if socket_timeout is None else socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": settings.redis_health_check_interval,
        "retry": retry_policy(settings, retries),
        "retry_on_error": list(REDIS_UNAVAILABLE),
    }
    if settings.redis_sentinels:
        sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
        return sentinel.master_for(settings.redis_sentinel_master, redis_class=Redis, **_url_auth(settings), **kwargs)
    return Redis.from_url(settings.redis_url, **kwargs)


def connect_async_redis(settings: Settings) -> AsyncRedis:
    """An asyncio client for what waits on Redis inside the API's event loop (job events' pub/sub).

    The same retries, health checks and Sentinel discovery, but no per-reply timeout: a
    subscriber idles until its job changes, which may be minutes.
    """
    backoff = EqualJitterBackoff(cap=settings.redis_retry_cap, base=settings.redis_retry_base)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": settings.redis_health_check_interval,
        "retry": AsyncRetry(backoff, settings.redis_retries, supported_errors=REDIS_UNAVAILABLE),
        "retry_on_error": list(REDIS_UNAVAILABLE),
    }
    if settings.redis_sentinels:
        sentinel = AsyncSentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
        return sentinel.master_for(
            settings.redis_sentinel_master, redis_class=AsyncRedis, **_url_auth(settings), **kwargs
        )
    return AsyncRedis.from_url(settings.redis_url, **kwargs)


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """``HAM_REDIS_SENTINELS`` (``host:port,host:port``) as ``[(host, port), ...]``."""
    out = []
    for item in filter(None, (part.strip() for part in settings.redis_sentinels.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis_sentinels: expected host:port, got {item!r}")
        out.append((host, int(port)))
    return out


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    # Sentinels answer quickly or not at all: a short timeout lets the client try the next one.
    return {"socket_timeout": settings.redis_connect_timeout, "socket_connect_timeout": settings.redis_connect_timeout}


def _url_auth(settings: Settings) -> dict[str, Any]:
    """Database, user and password of ``redis_url`` (its host is the Sentinels' business)."""
    parsed = parse_url(settings.redis_url)
    return {key: parsed[key] for key in ("db", "username", "password") if parsed.get(key) is not None}


def wait_for_replicas(redis: Redis, settings: Settings) -> None:
    """Block until ``settings.redis_min_replicas_ack`` replicas have every write made so far
    (``WAIT``), at most ``settings.redis_replica_ack_timeout`` seconds; fewer in time raise
    :class:`RedisNoReplicasError` (the write may not survive a failover). No-op when 0."""
    wanted = settings.redis_min_replicas_ack
    if wanted <= 0:
        return
    # WAIT covers the writes of its own connection, and a pooled client may hand out another one:
    # a tiny write on the same connection first, whose offset is past every earlier write.
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(PROBE_KEY, "1", ex=60)
        pipe.wait(wanted, int(settings.redis_replica_ack_timeout * 1000))
        _, acked = pipe.execute()
    if int(acked) < wanted:
        raise RedisNoReplicasError(f"NOREPLICAS {acked} of {wanted} replicas acknowledged the write in time")
