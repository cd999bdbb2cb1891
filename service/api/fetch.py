"""Images given by reference in a JSON submission: ``content_url`` / ``style_url``.

A reference is an ``http(s)://`` URL or a ``data:`` URI. A URL is fetched under the SSRF guard
of :mod:`ham_core.ssrf` (public addresses only unless ``HAM_FETCH_ALLOW_PRIVATE``; the
request connects to the address that was vetted), following at most :data:`MAX_REDIRECTS`
redirects, each vetted again, within ``HAM_FETCH_TIMEOUT`` seconds in all and
``HAM_MAX_UPLOAD_BYTES`` bytes. Every failure is one of the API's errors naming the field
(:class:`InvalidUrl`, :class:`FetchFailed`, :class:`InvalidDataUri`, :class:`UploadTooLarge`), so
the API answers 4xx (``content_url: ...``) and nothing of the job exists yet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx
from starlette.concurrency import run_in_threadpool

from ham_core.ssrf import check_public_url, pinned_request
from service.api.errors import FetchFailed, InvalidDataUri, InvalidUrl, UploadTooLarge

if TYPE_CHECKING:
    from ham_core.config import Settings

MAX_REDIRECTS = 3
MAX_REFERENCE_CHARS = 2048  # an http(s) URL; a data: URI is bounded by the byte cap instead
USER_AGENT = "ham-fetch/1"
_DATA_URI = re.compile(r"(?i:data):(?P<type>[^,;]*)(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL)


async def fetch_reference(field: str, reference: str, settings: Settings) -> bytes:
    """The bytes behind ``reference`` (a URL or a ``data:`` URI), or one of the errors above."""
    if reference[:5].lower() == "data:":  # URI schemes are case-insensitive (RFC 3986 §3.1)
        return decode_data_uri(field, reference, settings.max_upload_bytes)
    if len(reference) > MAX_REFERENCE_CHARS:
        raise InvalidUrl(f"at most {MAX_REFERENCE_CHARS} characters (or use a data: URI)", field=field)
    scheme = urlsplit(reference).scheme if "://" in reference else ""
    if scheme not in ("http", "https"):
        raise InvalidUrl("must be an http(s):// URL or a data: URI", field=field)
    try:
        return await asyncio.wait_for(_fetch(field, reference, settings), timeout=settings.fetch_timeout)
    except asyncio.TimeoutError:
        raise FetchFailed(f"not fetched within {settings.fetch_timeout:g}s", field=field) from None


async def _fetch(field: str, url: str, settings: Settings) -> bytes:
    limit = settings.max_upload_bytes
    timeout = httpx.Timeout(settings.fetch_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                # Resolves DNS: off the event loop.
                address = await run_in_threadpool(
                    check_public_url, url, settings.fetch_allow_private, field, "HAM_FETCH_ALLOW_PRIVATE"
                )
            except ValueError as exc:
                raise InvalidUrl(str(exc).removeprefix(f"{field} "), field=field) from None
            target, host, extensions = pinned_request(url, address)
            # identity: the byte cap counts what arrives, and a compressed body would not be an image.
            headers = {**host, "User-Agent": USER_AGENT, "Accept": "image/png, image/jpeg, image/webp",
                       "Accept-Encoding": "identity"}
            try:
                async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise FetchFailed(f"GET {_short(url)} answered HTTP "
                                         f"{response.status_code}", field=field)
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise _too_large(field, limit)
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > limit:
                            raise _too_large(field, limit)
                    return bytes(body)
            except httpx.HTTPError as exc:
                raise FetchFailed(f"GET {_short(url)} failed: "
                                 f"{type(exc).__name__} {exc}".rstrip(), field=field) from None
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", field=field)


def decode_data_uri(field: str, uri: str, limit: int) -> bytes:
    """The payload of a ``data:[<type>][;base64],<data>`` URI (RFC 2397), at most ``limit`` bytes."""
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise InvalidDataUri("not a data: URI (data:[<type>][;base64],<data>)", field=field)
    data = match.group("data")
    # Every 4 base64 characters carry 3 bytes: refuse before decoding anything oversized.
    if len(data) * 3 // 4 > limit + 3:
        raise _too_large(field, limit)
    if ";base64" in match.group("params").lower():
        try:
            payload = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidDataUri("the data: URI's base64 is malformed", field=field) from None
    else:
        payload = unquote_to_bytes(data)
    if len(payload) > limit:
        raise _too_large(field, limit)
    return payload


def _too_large(field: str, limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"larger than {limit} bytes", field=field)


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
