"""FastAPI dependencies: the per-app clients, the caller's tenant, the rate limit.

The clients (Redis, storage, job store) are built once by :func:`service.api.app.create_app` and
kept in :class:`Services` on ``app.state``; routes reach them only through these functions.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ham_core.config import LOCAL_TENANT, Settings
from ham_core.logs import bind
from ham_core.redis_client import REDIS_UNAVAILABLE, refusal
from service.api.errors import RateLimited, Unauthorized
from service.api.ratelimit import RateLimiter

if TYPE_CHECKING:
    from ham_core.jobs import JobStore
    from ham_core.storage import Storage
    from ham_core.styles import StyleStore
    from ham_core.webhooks import WebhookDispatcher
    from service.api.metrics import ApiMetrics

log = logging.getLogger("ham.api")

_BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass
class Services:
    """Everything a request handler may talk to, built once per app."""

    settings: Settings
    redis: Redis
    storage: Storage
    jobs: JobStore
    styles: StyleStore
    limiter: RateLimiter
    metrics: ApiMetrics
    # Not started in the API: deliveries are stored in Redis and the workers' dispatchers send them.
    webhooks: WebhookDispatcher
    # For what waits on Redis inside the event loop: the job events' pub/sub (SSE, Prefer: wait).
    aredis: AsyncRedis


def get_services(request: Request) -> Services:
    """The app's clients."""
    return request.app.state.services


def _tenant_for_key(settings: Settings, presented: str) -> str | None:
    # Compare against every key in constant time so response timing does not leak key prefixes.
    found = None
    for key, tenant in settings.tenants_by_key.items():
        if hmac.compare_digest(key.encode(), presented.encode()):
            found = tenant
    return found


# auto_error=False: a missing key is answered by authenticate() in the API's own error shape.
_bearer = HTTPBearer(auto_error=False, description="An API key from HAM_API_KEYS (not needed when auth is off).")


def _presented_key(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None or not credentials.credentials.strip():
        return None
    return credentials.credentials.strip()


ServicesDep = Annotated[Services, Depends(get_services)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def authenticate(credentials: CredentialsDep, services: ServicesDep) -> str:
    """The caller's tenant from ``Authorization: Bearer <key>``; 401 without a valid key.

    With auth off (``HAM_API_KEYS`` empty) every caller is the local tenant.
    """
    settings = services.settings
    if not settings.auth_enabled:
        bind(tenant=LOCAL_TENANT)
        return LOCAL_TENANT
    key = _presented_key(credentials)
    if key is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'",
                           headers=_BEARER_CHALLENGE)
    tenant = _tenant_for_key(settings, key)
    if tenant is None:
        raise Unauthorized("invalid API key", headers=_BEARER_CHALLENGE)
    bind(tenant=tenant)
    return tenant


def current_tenant(tenant: Annotated[str, Depends(authenticate)], credentials: CredentialsDep,
                   services: ServicesDep, request: Request) -> str:
    """The authenticated tenant, after counting this request against its key's rate limit (429 above)."""
    # The limit is per key; with auth off there is one identity, the local tenant.
    identity = _presented_key(credentials) if services.settings.auth_enabled else LOCAL_TENANT
    try:
        decision = services.limiter.hit(f"key:{identity}")
    except REDIS_UNAVAILABLE as exc:
        # Fail open: a Redis that refuses writes (full, read-only) must not take reads down with it.
        # The request itself still meets Redis and answers 503 if it needs what Redis refuses.
        reason = refusal(exc)
        services.metrics.ratelimit_fail_open.labels(reason=reason).inc()
        log.warning("rate limit not counted (redis %s): %s", reason, exc)
        return tenant
    request.state.rate_decision = decision  # the RateLimit headers of the answer (RateLimitHeaders)
    if not decision.allowed:
        raise RateLimited(limit=decision.limit, retry_after=decision.retry_after,
                          headers={"Retry-After": str(decision.retry_after)})
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
"""The caller's tenant, authenticated and counted against the rate limit."""


def operator_access(public_flag: str) -> Callable[..., None]:
    """A dependency that demands a valid key unless ``settings.<public_flag>`` is true."""

    def check(credentials: CredentialsDep, services: ServicesDep) -> None:
        if not getattr(services.settings, public_flag):
            authenticate(credentials, services)

    return check
