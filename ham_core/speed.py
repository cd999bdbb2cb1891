"""Measured seconds per step, by model and size: what the playground's time estimates are made of.

After a job succeeds, the worker folds its wall time per requested step into an exponentially
weighted mean for (model, size), in one Redis hash (:data:`SPEED_KEY`); the API publishes the
means (``GET /playground/speed.json``). The wall time covers all a job costs — inversion,
sampling, decoding, upload — so ``steps × seconds_per_step`` is the whole job at that size,
on this server's workers, as they ran lately. Nothing here is a benchmark: bench/ measures.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from redis import Redis

log = logging.getLogger("ham.speed")

SPEED_KEY = "ham:speed"
# A new job's share of the mean: recent jobs count most (a warm style cache, a busier GPU).
NEW_WEIGHT = 0.3


def _field(model: str, size: int) -> str:
    return f"{model}|{int(size)}"


def record_speed(redis: Redis, model: str, size: int, steps: int, seconds: float) -> None:
    """Fold one succeeded job (``steps`` at ``size`` px in ``seconds``) into the mean for ``(model, size)``.

    Best effort: a Redis error is logged, never raised (an estimate must not fail a job). Two
    workers finishing at once may each fold into the same old mean; one sample is then lost,
    which an estimate can afford.
    """
    if steps <= 0 or seconds <= 0:
        return
    sample = seconds / steps
    try:
        raw = redis.hget(SPEED_KEY, _field(model, size))
        old = json.loads(raw) if raw else None
        if old:
            mean = (1 - NEW_WEIGHT) * float(old["seconds_per_step"]) + NEW_WEIGHT * sample
            jobs = int(old.get("jobs", 0)) + 1
        else:
            mean, jobs = sample, 1
        entry = {"model": model, "size": int(size), "seconds_per_step": round(mean, 6), "jobs": jobs,
                 "updated_at": round(time.time(), 3)}
        redis.hset(SPEED_KEY, _field(model, size), json.dumps(entry))
    except Exception as exc:
        log.warning("could not record the speed of a %d px job: %s", size, exc)


def measured_speeds(redis: Redis) -> list[dict[str, Any]]:
    """Every (model, size) measured so far: ``{"model", "size", "seconds_per_step", "jobs", "updated_at"}``."""
    entries = []
    for raw in redis.hvals(SPEED_KEY):
        try:
            entry = json.loads(raw)
            entries.append({"model": str(entry["model"]), "size": int(entry["size"]),
                            "seconds_per_step": float(entry["seconds_per_step"]), "jobs": int(entry["jobs"]),
                            "updated_at": float(entry["updated_at"])})
        except (ValueError, KeyError, TypeError):
            continue  # a damaged entry is no estimate
    return sorted(entries, key=lambda e: (e["model"], e["size"]))
