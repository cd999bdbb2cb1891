"""A Python client for the HAM style-transfer API (``pip install ham-style-transfer``; needs only httpx
and pydantic, not torch).

    from ham_client import Client

    with Client("http://127.0.0.1:8000", api_key="secret-key") as ham:
        job = ham.submit("photo.jpg", style="painting.png", steps=30, output_format="webp")
        job = ham.wait(job.id)
        open("out.webp", "wb").write(ham.download(job))

:class:`AsyncClient` has the same methods for asyncio. :func:`verify_webhook` checks a webhook
delivery's signature. See docs/client.md.
"""

from ham_client.async_client import AsyncClient
from ham_client.client import Client
from ham_client.errors import (
    ApiError,
    HamError,
    JobFailed,
    NotTheApi,
    Unreachable,
    WaitTimeout,
    WebhookSignatureError,
)
from ham_client.models import Job, JobError, JobPage, ModelInfo, ModelList
from ham_client.protocol import RetryPolicy
from ham_client.webhooks import verify_webhook

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "HamError",
    "Job",
    "JobError",
    "JobFailed",
    "JobPage",
    "ModelInfo",
    "ModelList",
    "NotTheApi",
    "RetryPolicy",
    "Unreachable",
    "WaitTimeout",
    "WebhookSignatureError",
    "verify_webhook",
]
