"""The API's error codes, one exception type each, which the client raises for an error answer.

Generated from ``service.api.errors.CATALOGUE`` (``python -m service.api.errors >
ham_client/error_codes.py``); a test keeps the two equal. ``internal_error`` is the plain
:class:`~ham_client.errors.ApiError`.
"""

from __future__ import annotations

from ham_client.errors import ApiError


class DuplicateField(ApiError):
    """422 ``duplicate_field``: A form field given more than once."""

    status_code = 422
    error_code = "duplicate_field"


class FetchFailed(ApiError):
    """422 ``fetch_failed``: A `content_url`/`style_url` that could not be fetched."""

    status_code = 422
    error_code = "fetch_failed"


class ImageTooLarge(ApiError):
    """413 ``image_too_large``: An image with more pixels than the limit."""

    status_code = 413
    error_code = "image_too_large"


class InvalidCursor(ApiError):
    """422 ``invalid_cursor``: A `cursor` that is not a `next_cursor` this API handed out."""

    status_code = 422
    error_code = "invalid_cursor"


class InvalidDataUri(ApiError):
    """422 ``invalid_data_uri``: A data: URI that does not parse."""

    status_code = 422
    error_code = "invalid_data_uri"


class InvalidField(ApiError):
    """422 ``invalid_field``: A form field of the wrong kind (a file for text or text for a file) or too long."""

    status_code = 422
    error_code = "invalid_field"


class InvalidIdempotencyKey(ApiError):
    """422 ``invalid_idempotency_key``: An `Idempotency-Key` that is blank, too long or not printable ASCII."""

    status_code = 422
    error_code = "invalid_idempotency_key"


class InvalidImage(ApiError):
    """422 ``invalid_image``: An image that is empty, truncated or corrupt."""

    status_code = 422
    error_code = "invalid_image"


class InvalidJson(ApiError):
    """400 ``invalid_json``: The body is not valid JSON."""

    status_code = 400
    error_code = "invalid_json"


class InvalidMultipart(ApiError):
    """400 ``invalid_multipart``: Malformed multipart body."""

    status_code = 400
    error_code = "invalid_multipart"


class InvalidParameter(ApiError):
    """422 ``invalid_parameter``: A parameter is out of range or of the wrong type; `field` names it."""

    status_code = 422
    error_code = "invalid_parameter"


class InvalidRequest(ApiError):
    """422 ``invalid_request``: The request does not have the declared shape (`field` names the input when one is to
    blame)."""

    status_code = 422
    error_code = "invalid_request"


class InvalidSignature(ApiError):
    """403 ``invalid_signature``: The download URL is invalid or has expired."""

    status_code = 403
    error_code = "invalid_signature"


class InvalidUrl(ApiError):
    """422 ``invalid_url``: A `content_url`/`style_url` that is not an http(s) URL or a data: URI, or names a refused
    host."""

    status_code = 422
    error_code = "invalid_url"


class InvalidWebhookUrl(ApiError):
    """422 ``invalid_webhook_url``: A `webhook_url` refused by the SSRF guard or too long."""

    status_code = 422
    error_code = "invalid_webhook_url"


class JobFinished(ApiError):
    """409 ``job_finished``: The job already finished."""

    status_code = 409
    error_code = "job_finished"


class MethodNotAllowed(ApiError):
    """405 ``method_not_allowed``: The path does not take this method; `Allow` names those it takes."""

    status_code = 405
    error_code = "method_not_allowed"


class MissingField(ApiError):
    """422 ``missing_field``: A required field is missing; `field` names it."""

    status_code = 422
    error_code = "missing_field"


class ModelUnavailable(ApiError):
    """503 ``model_unavailable``: With `HAM_MODELS_REQUIRE_WORKER`: no worker of the `model` announced itself
    recently; see `Retry-After`."""

    status_code = 503
    error_code = "model_unavailable"


class NotFound(ApiError):
    """404 ``not_found``: No such resource (for this tenant)."""

    status_code = 404
    error_code = "not_found"


class NotReady(ApiError):
    """503 ``not_ready``: `/readyz`: a dependency is unreachable; `checks` says which."""

    status_code = 503
    error_code = "not_ready"


class ServiceQueueFull(ApiError):
    """429 ``queue_full``: The service queue is full; see `Retry-After`."""

    status_code = 429
    error_code = "queue_full"


class RateLimited(ApiError):
    """429 ``rate_limited``: Rate limit reached; see `Retry-After`."""

    status_code = 429
    error_code = "rate_limited"


class RedisBusy(ApiError):
    """503 ``redis_busy``: Redis is busy running a script; see `Retry-After`."""

    status_code = 503
    error_code = "redis_busy"


class RedisFull(ApiError):
    """503 ``redis_full``: Redis is full (maxmemory) and refuses writes; reads still answer. See `Retry-After`."""

    status_code = 503
    error_code = "redis_full"


class RedisLoading(ApiError):
    """503 ``redis_loading``: Redis is loading its data after a restart; see `Retry-After`."""

    status_code = 503
    error_code = "redis_loading"


class RedisMasterDown(ApiError):
    """503 ``redis_master_down``: The Redis replica lost its primary; see `Retry-After`."""

    status_code = 503
    error_code = "redis_master_down"


class RedisNoReplicas(ApiError):
    """503 ``redis_no_replicas``: Too few Redis replicas to acknowledge the write (the job may be stored: retry with
    the same `Idempotency-Key`); see `Retry-After`."""

    status_code = 503
    error_code = "redis_no_replicas"


class RedisReadOnly(ApiError):
    """503 ``redis_readonly``: Redis is a read-only replica (a failover is under way); see `Retry-After`."""

    status_code = 503
    error_code = "redis_readonly"


class RedisWritesStopped(ApiError):
    """503 ``redis_writes_stopped``: Redis stopped accepting writes (it could not persist); see `Retry-After`."""

    status_code = 503
    error_code = "redis_writes_stopped"


class RequestTooLarge(ApiError):
    """413 ``request_too_large``: The request body is larger than the limit."""

    status_code = 413
    error_code = "request_too_large"


class StyleNotFound(ApiError):
    """404 ``style_not_found``: A `style_id` names no style of this tenant."""

    status_code = 404
    error_code = "style_not_found"


class TenantQueueFull(ApiError):
    """429 ``tenant_queue_full``: You have as many queued jobs as allowed; see `Retry-After`."""

    status_code = 429
    error_code = "tenant_queue_full"


class TooManyStyles(ApiError):
    """422 ``too_many_styles``: More styles in one job than the server allows."""

    status_code = 422
    error_code = "too_many_styles"


class Unauthorized(ApiError):
    """401 ``unauthorized``: Missing or invalid API key."""

    status_code = 401
    error_code = "unauthorized"


class Unavailable(ApiError):
    """503 ``unavailable``: Redis or storage unreachable; see `Retry-After`."""

    status_code = 503
    error_code = "unavailable"


class UnknownField(ApiError):
    """422 ``unknown_field``: A field this route does not know (a typo never runs with a default)."""

    status_code = 422
    error_code = "unknown_field"


class UnknownModel(ApiError):
    """422 ``unknown_model``: A `model` this deployment does not serve; the message lists the served ones (`GET
    /v1/models`)."""

    status_code = 422
    error_code = "unknown_model"


class UnsupportedMediaType(ApiError):
    """415 ``unsupported_media_type``: A body of a type this route does not read, or an image that is not PNG, JPEG
    or WebP."""

    status_code = 415
    error_code = "unsupported_media_type"


class UploadTooLarge(ApiError):
    """413 ``upload_too_large``: An image (uploaded or fetched) larger than the byte limit."""

    status_code = 413
    error_code = "upload_too_large"


class WebhooksDisabled(ApiError):
    """422 ``webhooks_disabled``: A webhook asked of a server without `HAM_WEBHOOK_SECRET`."""

    status_code = 422
    error_code = "webhooks_disabled"


# Every code the API answers with, to its type.
ERRORS_BY_CODE: dict[str, type[ApiError]] = {
    "duplicate_field": DuplicateField,
    "fetch_failed": FetchFailed,
    "image_too_large": ImageTooLarge,
    "invalid_cursor": InvalidCursor,
    "invalid_data_uri": InvalidDataUri,
    "invalid_field": InvalidField,
    "invalid_idempotency_key": InvalidIdempotencyKey,
    "invalid_image": InvalidImage,
    "invalid_json": InvalidJson,
    "invalid_multipart": InvalidMultipart,
    "invalid_parameter": InvalidParameter,
    "invalid_request": InvalidRequest,
    "invalid_signature": InvalidSignature,
    "invalid_url": InvalidUrl,
    "invalid_webhook_url": InvalidWebhookUrl,
    "job_finished": JobFinished,
    "method_not_allowed": MethodNotAllowed,
    "missing_field": MissingField,
    "model_unavailable": ModelUnavailable,
    "not_found": NotFound,
    "not_ready": NotReady,
    "queue_full": ServiceQueueFull,
    "rate_limited": RateLimited,
    "redis_busy": RedisBusy,
    "redis_full": RedisFull,
    "redis_loading": RedisLoading,
    "redis_master_down": RedisMasterDown,
    "redis_no_replicas": RedisNoReplicas,
    "redis_readonly": RedisReadOnly,
    "redis_writes_stopped": RedisWritesStopped,
    "request_too_large": RequestTooLarge,
    "style_not_found": StyleNotFound,
    "tenant_queue_full": TenantQueueFull,
    "too_many_styles": TooManyStyles,
    "unauthorized": Unauthorized,
    "unavailable": Unavailable,
    "unknown_field": UnknownField,
    "unknown_model": UnknownModel,
    "unsupported_media_type": UnsupportedMediaType,
    "upload_too_large": UploadTooLarge,
    "webhooks_disabled": WebhooksDisabled,
}


def error_for(status: int, code: str, message: str, field: str | None = None) -> ApiError:
    """The typed error of an error answer (the plain ApiError for a code this client does not know)."""
    return ERRORS_BY_CODE.get(code, ApiError)(status, code, message, field)
