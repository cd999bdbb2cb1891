"""One style of a job, as the job record holds it: :class:`StyleRef`.

A job always carries a list of them, one per result, in the order the client gave them. A
style is an image (by its storage key), a prompt, or both; one taken from the style library
also names its ``style_id`` (and the engine's digest of its image, once a worker recorded it).

Every reference is made here: :meth:`StyleRef.uploaded` for an image sent with the request
(its key is assigned once the job id exists, :func:`assign_upload_keys`), :meth:`StyleRef.text`
for a prompt alone, :meth:`StyleRef.library` for a style of the library, and
:func:`refs_from_record` for what Redis holds, records of the previous version included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

# An uploaded style's image before the job (and so its storage key) exists.
PENDING_UPLOAD = ""


@dataclass(frozen=True)
class StyleRef:
    """One style of a job: an image (``key``), a ``prompt``, or both; ``style_id`` when from the library.

    ``digest`` is the engine's digest of the image (the folder of its features in the feature
    store) when already known: a library style's, recorded by the first worker that loaded it.
    """

    key: str | None = None
    prompt: str | None = None
    style_id: str | None = None
    digest: str | None = None

    @classmethod
    def uploaded(cls, prompt: str | None = None) -> StyleRef:
        """An image uploaded with the request (optionally with a prompt); its key comes with the job id."""
        return cls(key=PENDING_UPLOAD, prompt=prompt)

    @classmethod
    def text(cls, prompt: str) -> StyleRef:
        """A style given by a prompt alone."""
        return cls(prompt=prompt)

    @classmethod
    def library(cls, style_id: str, key: str | None = None, prompt: str | None = None,
                digest: str | None = None) -> StyleRef:
        """A style of the library, by id; ``key``/``prompt``/``digest`` once its record is read."""
        return cls(key=key, prompt=prompt, style_id=style_id, digest=digest)

    @property
    def has_image(self) -> bool:
        return self.key is not None

    @property
    def pending_upload(self) -> bool:
        """An uploaded image whose storage key is not assigned yet."""
        return self.key == PENDING_UPLOAD

    def to_dict(self) -> dict[str, str]:
        """The JSON object the job record stores (``None`` attributes left out)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StyleRef:
        """Inverse of :meth:`to_dict` (also reads the untyped dicts the previous version stored)."""
        return cls(**{name: raw.get(name) for name in ("key", "prompt", "style_id", "digest")})


def assign_upload_keys(refs: Sequence[StyleRef], job_id: str) -> list[StyleRef]:
    """``refs`` with each pending upload given its storage key: the first ``inputs/{id}/style.png``,
    the one at place ``i`` after it ``inputs/{id}/style-{i}.png``."""
    out: list[StyleRef] = []
    uploaded = 0
    for index, ref in enumerate(refs):
        if ref.pending_upload:
            ref = replace(ref, key=upload_key(job_id, index, first=uploaded == 0))
            uploaded += 1
        out.append(ref)
    return out


def upload_key(job_id: str, index: int, first: bool) -> str:
    """Storage key of the (normalised PNG) style image uploaded at place ``index`` of a job."""
    return f"inputs/{job_id}/style.png" if first else f"inputs/{job_id}/style-{index}.png"


def refs_to_json(refs: Sequence[StyleRef]) -> str:
    """The ``styles`` field of a job record."""
    return json.dumps([ref.to_dict() for ref in refs], sort_keys=True)


def refs_from_record(fields: Mapping[str, str | None], job_id: str) -> list[StyleRef]:
    """The styles of a job record's (text) fields.

    A record written by the previous version (during a rolling upgrade) has no ``styles`` for
    a one-style job, only ``has_style`` (its image at ``inputs/{id}/style.png``) and
    ``style_prompt``: read as the one :class:`StyleRef` it means.
    """
    if fields.get("styles"):
        return [StyleRef.from_dict(raw) for raw in json.loads(fields["styles"])]
    key = upload_key(job_id, 0, first=True) if fields.get("has_style") == "1" else None
    return [StyleRef(key=key, prompt=fields.get("style_prompt"))]
