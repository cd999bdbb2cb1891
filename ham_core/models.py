"""One API, several models: the catalogue of models a deployment serves, their queues, and what
their workers announce.

- The API serves the models named in ``HAM_MODELS`` (default: just ``HAM_MODEL``); the first is
  the default model, which a transfer naming none gets.
- Each model has its own RQ queue, so each model's worker pool scales on its own list:
  the default model keeps ``HAM_QUEUE_NAME`` (``rq:queue:ham``: deployments and KEDA objects
  from before models existed keep working), every other one gets ``<HAM_QUEUE_NAME>-<slug>``,
  the slug being the name in lower case with every run of other characters than ``a-z0-9._``
  turned into ``-`` (``tiny-xl`` → ``ham-tiny-xl``, ``stabilityai/sdxl-turbo`` →
  ``ham-stabilityai-sdxl-turbo``). A worker serves ``HAM_MODEL`` and takes only its queue, so
  every process of one deployment must agree on ``HAM_MODELS`` (its first entry above all).
- A worker announces its model on every heartbeat (:func:`announce`): family, default and
  maximum size, dtype, device, random preset or not, weights fingerprint. ``GET /v1/models``
  (:func:`catalogue`) joins those with each queue's depth and oldest waiting job.

Redis keys: ``ham:model:{name}:workers`` — hash, worker name → its latest announcement (JSON
with ``announced_at``); a worker counts as online while its announcement is younger than
:func:`online_window`, and its field is dropped once far older (or when it stops cleanly).

Torch-free: the API imports it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from ham_core.config import Settings
from ham_engine.params import FAMILY_DEFAULTS, MAX_SIZE, family_default

KEY_PREFIX = "ham"
MAX_MODEL_NAME_CHARS = 200
# A worker is online while its last announcement is younger than this many heartbeats.
ONLINE_BEATS = 3
# An announcement older than this many heartbeats is forgotten (the worker is gone for good).
FORGET_BEATS = 360

# The random presets of ham_engine.tiny and their families, without importing torch
# (tests/service/test_models.py keeps both equal). Their pictures are noise.
PRESET_FAMILIES: dict[str, str] = {
    "tiny": "sd", "tiny-v": "sd", "tiny-xl": "sdxl", "random-small": "sd", "tiny-sd3": "sd3", "tiny-flux": "flux",
}
RANDOM_PRESET_NOTE = (
    "{name} is a random preset: its weights are random, so its pictures are noise, not art. "
    "Set HAM_MODEL on the workers (and HAM_MODELS on the API) to a real Stable Diffusion model for real images."
)

_SLUG_RUN = re.compile(r"[^a-z0-9._]+")


class UnknownModel(ValueError):
    """A transfer named a model the deployment does not serve."""

    def __init__(self, name: str, served: Sequence[str]) -> None:
        super().__init__(f"model: {name[:80]!r} is not served here; served: {', '.join(served)}")
        self.name = name
        self.served = tuple(served)


def model_slug(name: str) -> str:
    """The queue-name-safe form of a model name (see the module docstring)."""
    return _SLUG_RUN.sub("-", name.lower()).strip("-")


def check_model_names(names: Sequence[str]) -> None:
    """Refuse names that are empty, too long, hold a comma, or share a queue (ValueError)."""
    seen: dict[str, str] = {}
    for name in names:
        if not name or len(name) > MAX_MODEL_NAME_CHARS or "," in name:
            raise ValueError(f"HAM_MODELS: each name must be 1..{MAX_MODEL_NAME_CHARS} characters, got {name!r}")
        slug = model_slug(name)
        if not slug:
            raise ValueError(f"HAM_MODELS: {name!r} has no letter or digit to name its queue by")
        if slug in seen and seen[slug] != name:
            raise ValueError(f"HAM_MODELS: {seen[slug]!r} and {name!r} would share the queue of {slug!r}")
        seen[slug] = name


def queue_name(settings: Settings, model: str | None) -> str:
    """The RQ queue of ``model`` (``None``: the default model, as in job records from before models)."""
    if model is None or model == settings.default_model:
        return settings.queue_name
    return f"{settings.queue_name}-{model_slug(model)}"


def resolve_model(settings: Settings, requested: str | None) -> str:
    """The model a transfer runs on: ``requested`` if served, the default when ``None``; else :class:`UnknownModel`."""
    if requested is None:
        return settings.default_model
    if requested not in settings.served_models:
        raise UnknownModel(requested, settings.served_models)
    return requested


def online_window(settings: Settings) -> float:
    """Seconds a worker's announcement counts as 'online'."""
    return ONLINE_BEATS * settings.worker_heartbeat


def workers_key(model: str) -> str:
    return f"{KEY_PREFIX}:model:{model}:workers"


@dataclass(frozen=True)
class Announcement:
    """What one worker says about the model it serves."""

    model: str
    family: str
    default_size: int
    max_size: int
    dtype: str
    device: str
    random_preset: bool
    fingerprint: str | None
    worker: str
    announced_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Announcement:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def announce(redis: Redis, settings: Settings, info: Announcement, now: float | None = None) -> None:
    """Record ``info`` as its worker's latest announcement (each heartbeat calls it)."""
    now = time.time() if now is None else now
    key = workers_key(info.model)
    with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, info.worker, Announcement(**{**asdict(info), "announced_at": now}).to_json())
        pipe.expire(key, FORGET_BEATS * settings.worker_heartbeat)
        pipe.execute()


def withdraw(redis: Redis, model: str, worker: str) -> None:
    """Forget a worker's announcement (it stops cleanly)."""
    redis.hdel(workers_key(model), worker)


def announcements(redis: Redis, settings: Settings, model: str, now: float | None = None) -> list[Announcement]:
    """The model's recent announcements, newest first; forgotten ones are dropped from Redis."""
    now = time.time() if now is None else now
    out: list[Announcement] = []
    stale: list[Any] = []
    for worker, raw in redis.hgetall(workers_key(model)).items():
        try:
            info = Announcement.from_json(raw)
        except (ValueError, TypeError, KeyError):
            stale.append(worker)
            continue
        if now - info.announced_at > FORGET_BEATS * settings.worker_heartbeat:
            stale.append(worker)
        else:
            out.append(info)
    if stale:
        redis.hdel(workers_key(model), *stale)
    return sorted(out, key=lambda a: a.announced_at, reverse=True)


def guess_family(name: str) -> str:
    """The family of a model no worker announced yet: a preset's own, else from the name (``flux``,
    ``stable-diffusion-3``/``sd3``, ``xl``; else SD 1.x/2.x)."""
    if name in PRESET_FAMILIES:
        return PRESET_FAMILIES[name]
    lower = name.lower()
    if "flux" in lower:
        return "flux"
    if "stable-diffusion-3" in lower or "sd3" in lower:
        return "sd3"
    return "sdxl" if "xl" in lower else "sd"


def model_family(redis: Redis, settings: Settings, model: str) -> tuple[str, str]:
    """``(family, source)``: what a worker of ``model`` announced (``"worker"``), else the guess (``"name"``)."""
    found = announcements(redis, settings, model)
    if found:
        return found[0].family, "worker"
    return guess_family(model), "name"


def queue_depth(redis: Redis, queue_key: str) -> int:
    """Job ids waiting in an RQ list."""
    return int(redis.llen(queue_key))


def oldest_queued_age(redis: Redis, queue_key: str, now: float | None = None) -> float | None:
    """Seconds the job next in line has waited since it was created, ``None`` if the list is empty.

    RQ pops from the head and re-queued jobs go back to the head, so the head is the oldest.
    """
    head = redis.lindex(queue_key, 0)
    if head is None:
        return None
    job_id = head.decode() if isinstance(head, bytes) else head
    created = redis.hget(f"{KEY_PREFIX}:job:{job_id}", "created_at")
    if created is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, now - float(created))


def model_entry(redis: Redis, settings: Settings, model: str, now: float | None = None) -> dict[str, Any]:
    """One model of :func:`catalogue`: configuration, the newest announcement, live workers and queue."""
    now = time.time() if now is None else now
    found = announcements(redis, settings, model, now)
    online = [a for a in found if now - a.announced_at <= online_window(settings)]
    newest = found[0] if found else None
    family = newest.family if newest else guess_family(model)
    queue = queue_name(settings, model)
    key = f"rq:queue:{queue}"
    random_preset = newest.random_preset if newest else model in PRESET_FAMILIES
    return {
        "name": model,
        "default": model == settings.default_model,
        "queue": queue,
        "family": family,
        "family_source": "worker" if newest else "name",
        "default_size": newest.default_size if newest else family_default(family, "size"),
        "max_size": newest.max_size if newest else MAX_SIZE,
        # What a transfer on this model gets for the parameters it leaves out, where the family decides.
        "defaults": dict(FAMILY_DEFAULTS.get(family, {})),
        "dtype": newest.dtype if newest else None,
        "device": newest.device if newest else None,
        "random_preset": random_preset,
        "note": RANDOM_PRESET_NOTE.format(name=model) if random_preset else None,
        "fingerprint": newest.fingerprint if newest else None,
        "workers_online": len(online),
        "last_announced_at": newest.announced_at if newest else None,
        "status": "online" if online else "no_workers",
        "queue_depth": queue_depth(redis, key),
        "oldest_queued_age": oldest_queued_age(redis, key, now),
    }


def catalogue(redis: Redis, settings: Settings, now: float | None = None) -> list[dict[str, Any]]:
    """Every served model, the default first, with its live state (``GET /v1/models``)."""
    return [model_entry(redis, settings, model, now) for model in settings.served_models]


def family_defaults_table(families: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per family, the parameter defaults that differ from one family to another."""
    names = FAMILY_DEFAULTS if families is None else families
    return {name: dict(FAMILY_DEFAULTS[name]) for name in names}
