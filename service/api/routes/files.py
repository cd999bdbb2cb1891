"""``/v1/files/{key}``: downloads of file-backend objects under HMAC-signed, expiring URLs.

The signature is the authorisation (result URLs are handed to browsers and other services),
so no API key is needed. With an S3 backend clients download from S3 directly and this
route answers 404.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from ham_core.storage import FileStorage
from service.api.deps import ServicesDep
from service.api.errors import InvalidRequest, InvalidSignature, NotFound, error_responses

router = APIRouter(tags=["files"])


@router.get(
    "/v1/files/{key:path}",
    summary="Download a stored file (signed URL)",
    response_class=FileResponse,
    responses={
        200: {"content": {media: {"schema": {"type": "string", "format": "binary"}}
                          for media in ("image/png", "image/jpeg", "image/webp")},
              "description": "The file (a result, in its job's `output_format`)."},
        **error_responses(InvalidSignature, NotFound, InvalidRequest),
    },
)
def download_file(
    key: str,
    services: ServicesDep,
    expires: Annotated[str | None, Query(description="Unix time after which the URL is refused.")] = None,
    sig: Annotated[str | None, Query(description="Hex HMAC-SHA256 over key and expiry.")] = None,
) -> FileResponse:
    """Serve one object if `expires`/`sig` verify; tampered or expired → 403."""
    storage = services.storage
    if not isinstance(storage, FileStorage):
        raise NotFound("file downloads are served by the object store, not this API")
    if expires is None or sig is None or not storage.verify(key, expires, sig):
        raise InvalidSignature()
    try:
        path = storage.path_for(key)
    except (ValueError, KeyError):
        raise NotFound("no such file") from None
    if not path.is_file():
        raise NotFound("no such file (it may have expired)")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=60"})
