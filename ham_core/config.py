"""All runtime settings, read from ``HAM_*`` environment variables.

One class for the API, the worker and ``ham up``; each field's default is the embedded
single-machine default. ``docs/configuration.md`` lists them; a test keeps the two, the
compose file and the Kubernetes manifests in agreement.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Every field maps to ``HAM_<FIELD_NAME_UPPERCASE>``."""

    model_config = SettingsConfigDict(env_prefix="HAM_", extra="ignore", frozen=True)

    # --- where things live -------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the queue and job records.")
    storage_url: str = Field(
        "file:///tmp/ham-storage",
        description="Object storage: file:///abs/path or s3://bucket?endpoint=URL&region=R.",
    )
    public_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL clients use to reach the API (file:// result URLs)."
    )
    queue_name: str = Field("ham", description="RQ queue name; the Redis list is rq:queue:<name>.")

    # --- redis connections (see ham_core.redis_client) ---------------------------
    redis_socket_timeout: float = Field(
        5.0, gt=0, description="Seconds a Redis reply may take before the command counts as timed out."
    )
    redis_connect_timeout: float = Field(2.0, gt=0, description="Seconds to open a Redis connection.")
    redis_health_check_interval: int = Field(
        15, ge=0, description="Seconds a pooled Redis connection may idle before it is PINGed before use (0: never)."
    )
    redis_retries: int = Field(
        6, ge=0, description="Retries of a Redis command on a connection error or timeout (backoff with jitter)."
    )
    redis_retry_base: float = Field(
        0.05, ge=0, description="Seconds before the first Redis retry; doubles per retry, half of it random jitter."
    )
    redis_retry_cap: float = Field(1.0, ge=0, description="Longest pause between two Redis retries, in seconds.")
    redis_sentinels: str = Field(
        "",
        description="Comma-separated host:port of Redis Sentinels; when set, clients find the primary through "
        "them (and again after a failover) and HAM_REDIS_URL gives only database and password.",
    )
    redis_sentinel_master: str = Field("mymaster", description="The Sentinels' name of the Redis primary.")
    redis_min_replicas_ack: int = Field(
        0,
        ge=0,
        description="Replicas that must hold a submitted job before the API answers 202 (Redis WAIT; 0: do not "
        "wait). Fewer within HAM_REDIS_REPLICA_ACK_TIMEOUT: 503 redis_no_replicas.",
    )
    redis_replica_ack_timeout: float = Field(
        1.0, gt=0, description="Seconds a submit waits for HAM_REDIS_MIN_REPLICAS_ACK replicas."
    )

    # --- engine --------------------------------------------------------------------
    model: str = Field(
        "tiny",
        description="The worker's model: a diffusers model id or local folder (SD 1.x/2.x, SDXL, SD3, FLUX), or a "
        "random preset 'tiny' / 'tiny-xl' / 'tiny-sd3' / 'tiny-flux' (offline demos whose pictures are noise). "
        "On the API: the default model when HAM_MODELS is empty.",
    )
    models: str = Field(
        "",
        description="Comma-separated model names the API serves (its catalogue, GET /v1/models); the first is the "
        "default model and keeps HAM_QUEUE_NAME, each other one gets the queue <HAM_QUEUE_NAME>-<name>. "
        "Empty: just HAM_MODEL.",
    )
    models_require_worker: bool = Field(
        False,
        description="Refuse (503 model_unavailable) a transfer whose model no worker announced in the last "
        "few heartbeats; false: accept and queue it until a worker of that model starts.",
    )
    device: str | None = Field(None, description="Torch device for the worker (cuda, cuda:1, cpu); auto if unset.")
    dtype: str | None = Field(
        None, description="Worker compute dtype: fp16, bf16 or fp32; unset: fp16 on CUDA, fp32 on CPU."
    )
    record_bytes: int | None = Field(
        None,
        ge=0,
        description="Bytes one transfer may record of its teachers during a 'source' inversion (0: never); "
        "unset: a quarter of the GPU's memory, an eighth of RAM on CPU.",
    )

    feature_store: bool = Field(
        True,
        description="Workers share style features and content inversions under features/ in HAM_STORAGE_URL.",
    )
    feature_ttl: int = Field(
        7 * 86_400, gt=0, description="Seconds a stored feature blob is kept after its last write."
    )
    feature_store_bytes: int = Field(
        10 * 2**30, gt=0, description="Byte budget of features/: the sweep deletes the oldest blobs above it."
    )
    max_styles_per_job: int = Field(4, ge=1, le=16, description="Styles one transfer job may carry (422 above).")

    # --- auth ----------------------------------------------------------------------
    api_keys: str = Field(
        "",
        description="Comma-separated tenant:key pairs. Empty: one local tenant, no auth (ham up only).",
    )
    public_health: bool = Field(True, description="/healthz and /readyz need no API key.")
    public_metrics: bool = Field(True, description="/metrics needs no API key.")

    # --- limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest accepted upload file (413 above).")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest accepted image width*height (413 above; bomb guard)."
    )
    max_queued_per_tenant: int = Field(20, gt=0, description="Queued jobs one tenant may have (429 above).")
    max_queue_length: int = Field(500, gt=0, description="Queued jobs in total (429 above).")
    rate_limit_per_minute: int = Field(120, gt=0, description="Requests per API key per minute (429 above).")
    job_timeout: int = Field(900, gt=0, description="Seconds one job may run before it is failed.")
    job_max_retries: int = Field(2, ge=0, description="Re-runs of a job whose worker died mid-job.")

    # --- lifetimes -----------------------------------------------------------------
    result_ttl: int = Field(86_400, gt=0, description="Seconds inputs, results and job records are kept.")
    url_ttl: int = Field(3_600, gt=0, description="Seconds a result URL stays valid.")
    url_signing_key: str = Field(
        "", description="HMAC key for file:// result URLs; random per process if empty (set it for >1 API replica)."
    )

    # --- webhooks ------------------------------------------------------------------
    webhook_secret: str = Field("", description="HMAC-SHA256 key for webhook signatures; empty disables webhooks.")
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs resolving to private, loopback or link-local addresses."
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds per webhook delivery attempt.")
    webhook_max_attempts: int = Field(6, gt=0, description="Delivery attempts before a webhook is dropped.")

    # --- inputs by URL --------------------------------------------------------------
    fetch_allow_private: bool = Field(
        False, description="Allow content_url/style_url resolving to private, loopback or link-local addresses."
    )
    fetch_timeout: float = Field(
        10.0, gt=0, description="Seconds to fetch one content_url/style_url, redirects included (422 after)."
    )

    # --- worker --------------------------------------------------------------------
    worker_metrics_port: int = Field(9100, ge=0, le=65535, description="Worker Prometheus port (0: off).")
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics and probes bind (the container image sets 0.0.0.0)."
    )
    worker_heartbeat: int = Field(10, gt=0, description="Seconds between worker heartbeats.")
    worker_outage_deadline: float = Field(
        120.0,
        gt=0,
        description="Seconds a worker retries a job's reads, result upload and final status through an outage "
        "before it hands the job back to the queue (no attempt charged).",
    )
    worker_reconnect_max: float = Field(
        15.0, gt=0, description="Longest pause between a worker's tries to reach Redis or storage again."
    )

    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line with request_id, job_id, tenant."
    )

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise ValueError(f"HAM_API_KEYS entries must be tenant:key, got {pair!r}")
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        from ham_core.models import check_model_names  # the naming rules live with the catalogue

        check_model_names([m.strip() for m in value.split(",") if m.strip()])
        return value

    @cached_property
    def served_models(self) -> tuple[str, ...]:
        """The models the API accepts, the default first (``HAM_MODELS``, else just ``HAM_MODEL``)."""
        names = tuple(dict.fromkeys(m.strip() for m in self.models.split(",") if m.strip()))
        return names or (self.model,)

    @property
    def default_model(self) -> str:
        """The model of a transfer that names none: the first of ``HAM_MODELS``."""
        return self.served_models[0]

    @cached_property
    def tenants_by_key(self) -> dict[str, str]:
        """API key → tenant; empty when auth is off."""
        out: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, _, key = pair.partition(":")
            out[key.strip()] = tenant.strip()
        return out

    @property
    def auth_enabled(self) -> bool:
        """False only when ``HAM_API_KEYS`` is empty (single local tenant)."""
        return bool(self.tenants_by_key)


LOCAL_TENANT = "local"


def get_settings() -> Settings:
    """Read the settings from the environment (a fresh object every call)."""
    return Settings()
