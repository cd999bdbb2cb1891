"""What the client raises."""

from __future__ import annotations


class HamError(Exception):
    """Base class of everything this client raises."""


class ApiError(HamError):
    """The API answered an error: its HTTP status and the body's ``code``, ``message``, ``field``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class NotTheApi(HamError):
    """A 2xx answer that is not what the HAM API sends: the base URL points elsewhere."""


class Unreachable(HamError):
    """The API could not be reached (connection refused or timed out), after the retries."""


class JobFailed(HamError):
    """``download`` of a job that did not succeed."""

    def __init__(self, job_id: str, status: str, detail: str = "") -> None:
        super().__init__(f"job {job_id} is {status}{': ' + detail if detail else ''}")
        self.job_id = job_id
        self.status = status


class WaitTimeout(HamError, TimeoutError):
    """``wait`` gave up before the job reached a terminal state; ``job`` is how it last stood."""

    def __init__(self, job: object, timeout: float) -> None:
        super().__init__(f"job {getattr(job, 'id', '?')} not finished after {timeout:g}s")
        self.job = job


class WebhookSignatureError(HamError):
    """A webhook whose ``X-HAM-Signature`` does not match its body and secret, or is too old."""
