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

Retrying is safe for what the service sends: the job transitions are Lua scripts that refuse
a second application (and the worker treats "already done by me" as done); transactions
under ``WATCH`` are never retried by redis-py.
"""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.core.config import Settings

# What "Redis is unreachable right now" looks like to a caller, once the retries are spent.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


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
    """
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout if socket_timeout is None else socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=settings.redis_health_check_interval,
        retry=retry_policy(settings, retries),
        retry_on_error=list(REDIS_UNAVAILABLE),
    )


def connect_async_redis(settings: Settings) -> AsyncRedis:
    """An asyncio client for what waits on Redis inside the API's event loop (job events' pub/sub).

    The same retries and health checks, but no per-reply timeout: a subscriber idles until its
    job changes, which may be minutes.
    """
    backoff = EqualJitterBackoff(cap=settings.redis_retry_cap, base=settings.redis_retry_base)
    return AsyncRedis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=settings.redis_health_check_interval,
        retry=AsyncRetry(backoff, settings.redis_retries, supported_errors=REDIS_UNAVAILABLE),
        retry_on_error=list(REDIS_UNAVAILABLE),
    )
