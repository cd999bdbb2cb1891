"""The style library: named, tenant-owned styles that transfers refer to by id.

A style is a style image and/or a style prompt, stored once: the image at
``styles/{id}.png`` in job storage, the record in Redis. Transfers name it with
``style_id`` instead of uploading the image again, so a house style applied to
thousands of photos is one stored image and, through the shared feature store, one set
of computed features.

Redis layout (no expiry: a style lives until it is deleted):

- ``ham:style:{id}`` — hash, one field per :class:`StyleRecord` attribute.
- ``ham:tenant:{tenant}:styles`` — sorted set of the tenant's style ids by ``created_at``.

A record is only ever read through its tenant: another tenant's style is, to the API,
indistinguishable from a missing one.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from ham_core.jobs import KEY_PREFIX
from ham_core.style_refs import StyleRef

STYLE_ID = re.compile(r"[0-9a-f]{32}")
_CURSOR = re.compile(r"(\d{1,12}(?:\.\d{1,9})?):([0-9a-f]{32})")

# HSET only while the record exists: a worker recording a digest must not resurrect a deleted style.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def style_image_key(style_id: str) -> str:
    """Storage key of a library style's (normalised PNG) image."""
    return f"styles/{style_id}.png"


@dataclass
class StyleRecord:
    """One library style as stored in Redis."""

    id: str
    tenant: str
    name: str | None = None
    style_prompt: str | None = None
    has_image: bool = False
    created_at: float = field(default_factory=time.time)
    warm_job_id: str | None = None
    # The engine's digest of the image, recorded by the first worker that loads it: the
    # folder of the style's blobs in the feature store.
    image_digest: str | None = None

    @property
    def image_key(self) -> str | None:
        return style_image_key(self.id) if self.has_image else None

    def ref(self) -> StyleRef:
        """This style as a job refers to it."""
        return StyleRef.library(self.id, self.image_key, self.style_prompt, self.image_digest)

    def to_fields(self) -> dict[str, str]:
        raw = {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "style_prompt": self.style_prompt,
            "has_image": "1" if self.has_image else "0",
            "created_at": repr(float(self.created_at)),
            "warm_job_id": self.warm_job_id,
            "image_digest": self.image_digest,
        }
        return {k: v for k, v in raw.items() if v is not None}

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> StyleRecord:
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            id=f["id"],
            tenant=f["tenant"],
            name=f.get("name"),
            style_prompt=f.get("style_prompt"),
            has_image=f.get("has_image") == "1",
            created_at=float(f["created_at"]),
            warm_job_id=f.get("warm_job_id") or None,
            image_digest=f.get("image_digest"),
        )


class StyleStore:
    """Library styles in Redis, always looked up through their tenant."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._set_if_exists = redis.register_script(_SET_IF_EXISTS)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @staticmethod
    def record_key(style_id: str) -> str:
        return f"{KEY_PREFIX}:style:{style_id}"

    @staticmethod
    def tenant_key(tenant: str) -> str:
        return f"{KEY_PREFIX}:tenant:{tenant}:styles"

    def create(self, record: StyleRecord) -> StyleRecord:
        """Store a new style (its image must already be in storage)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.record_key(record.id), mapping=record.to_fields())
        pipe.zadd(self.tenant_key(record.tenant), {record.id: record.created_at})
        pipe.execute()
        return record

    def get(self, tenant: str, style_id: str) -> StyleRecord | None:
        """The tenant's style ``style_id``, or None (missing, malformed id, or another tenant's)."""
        if not isinstance(style_id, str) or not STYLE_ID.fullmatch(style_id):
            return None
        fields = self.redis.hgetall(self.record_key(style_id))
        if not fields:
            return None
        record = StyleRecord.from_fields(fields)
        return record if record.tenant == tenant else None

    def set_field(self, style_id: str, name: str, value: str) -> bool:
        """Set one field of an existing record; False (and nothing written) if it was deleted."""
        return bool(self._set_if_exists(keys=[self.record_key(style_id)], args=[name, value]))

    def delete(self, tenant: str, style_id: str) -> StyleRecord | None:
        """Remove the tenant's style record; returns what it was, or None if there was none."""
        record = self.get(tenant, style_id)
        if record is None:
            return None
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.record_key(style_id))
        pipe.zrem(self.tenant_key(tenant), style_id)
        pipe.execute()
        return record

    def list_for_tenant(
        self, tenant: str, limit: int, cursor: str | None = None
    ) -> tuple[list[StyleRecord], str | None]:
        """The tenant's styles, newest first, ``limit`` per page; ``cursor`` is the previous ``next_cursor``."""
        if limit < 1:
            raise ValueError(f"limit: must be at least 1, got {limit}")
        after = None
        if cursor is not None:
            match = _CURSOR.fullmatch(cursor)
            if match is None:
                raise ValueError(f"cursor: not a cursor returned by this API: {cursor[:80]!r}")
            after = (float(match.group(1)), match.group(2))
        high = "+inf" if after is None else repr(after[0])
        records: list[StyleRecord] = []
        offset = 0
        while True:
            # Equal scores come by member, descending; the cursor is (score, id).
            rows = self.redis.zrevrangebyscore(
                self.tenant_key(tenant), high, "-inf", start=offset, num=limit + 1, withscores=True
            )
            offset += len(rows)
            for member, score in rows:
                style_id = _text(member)
                if after is not None and score == after[0] and style_id >= after[1]:
                    continue
                record = self.get(tenant, style_id)
                if record is None:
                    continue
                if len(records) == limit:
                    return records, f"{records[-1].created_at!r}:{records[-1].id}"
                records.append(record)
            if len(rows) < limit + 1:
                return records, None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
