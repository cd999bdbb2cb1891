"""``POST /v1/transfers`` as ``multipart/form-data``: the images as file parts, the rest as text fields.

Text fields are parsed strictly (ASCII digits, ``true``/``false``...), an empty text field counts
as not given (what HTML forms send for blanks), and unknown or repeated fields are refused, so
a typo never runs silently with a default.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ham_core.idempotency import file_digest, form_fingerprint
from ham_core.style_refs import StyleRef
from ham_engine.params import ParamError
from service.api.catalogue import choose_model
from service.api.deps import Services
from service.api.errors import (
    DuplicateField,
    InvalidField,
    InvalidMultipart,
    InvalidParameter,
    MissingField,
    TooManyStyles,
    UnknownField,
)
from service.api.form_values import form_value
from service.api.submission import (
    REQUEST_SPECS,
    Submission,
    build_params,
    check_webhook,
    invalid,
    one_style,
    webhook_events,
)
from service.api.uploads import read_upload

FILE_FIELDS = ("content", "style")
TEXT_FIELDS = ("style_prompt", "style_id", "webhook_url", "webhook_events", "model")
# May be given several times: the job then carries several styles, in the order given.
STYLE_FIELDS = ("style", "style_id")
KNOWN_FIELDS = frozenset(spec.name for spec in REQUEST_SPECS) | frozenset(FILE_FIELDS) | frozenset(TEXT_FIELDS)
MAX_TEXT_FIELD_BYTES = 64 * 1024
# How many style parts (files and style_ids) the form parser reads before it gives up with a 400;
# any count between max_styles_per_job and this is a 422 too_many_styles.
MAX_STYLE_PARTS = 1000


async def read_multipart(request: Request, services: Services) -> Submission:
    """The submission in a multipart body; 400/413/415/422 naming the field otherwise."""
    form = await _parse_form(request, services.settings.max_styles_per_job)
    try:
        values = _form_fields(form)
        refs = _style_fields(form, services.settings.max_styles_per_job)
        one_upload = len(refs) <= 1 and all(name == "style" for name, _ in refs)
        given: dict[str, Any] = {}
        for spec in REQUEST_SPECS:
            raw = _text(values, spec.name)
            if raw is not None:
                try:
                    given[spec.name] = form_value(spec, raw)
                except ParamError as exc:
                    raise invalid(exc) from None
        model = await choose_model(services, _text(values, "model"))
        params, output = build_params(given, model.family)
        if one_upload:
            styles: tuple[StyleRef, ...] = (one_style(values.get("style") is not None, _text(values, "style_prompt")),)
        elif _text(values, "style_prompt") is not None:
            raise InvalidParameter("style_prompt: with a style_id or several styles, give each its prompt through the "
                                   "style library", field="style_prompt")
        else:
            styles = tuple(StyleRef.library(value.strip()) if name == "style_id" else StyleRef.uploaded()
                           for name, value in _text_style_ids(refs))
        if values.get("content") is None:
            raise MissingField("the content image is required", field="content")
        events_text = _text(values, "webhook_events")
        events = webhook_events(None if events_text is None else [e.strip() for e in events_text.split(",")])
        webhook_url = await check_webhook(services, _text(values, "webhook_url"))
        content = await read_upload(values["content"], "content", services.settings)
        uploads = [values["style"]] if one_upload and "style" in values else [v for n, v in refs if n == "style"]
        pngs = [await read_upload(upload, "style", services.settings) for upload in uploads]
    finally:
        await form.close()
    return Submission(params, output, webhook_url, events, content, styles, tuple(pngs), model=model.name)


def _style_fields(form: FormData, limit: int) -> list[tuple[str, str | UploadFile]]:
    """The ``style`` files and ``style_id``s, in the order given (blanks skipped); 422 above ``limit``."""
    refs: list[tuple[str, str | UploadFile]] = []
    # Blank parts count toward the limit (the schema's maxItems counts every field of the name).
    parts = 0
    for name, value in form.multi_items():
        if name not in STYLE_FIELDS:
            continue
        parts += 1
        if isinstance(value, str) and value.strip() == "":
            continue
        if isinstance(value, UploadFile) and not value.filename and value.size == 0:
            continue
        refs.append((name, value))
    if parts > limit:
        raise TooManyStyles(limit=limit, count=parts)
    return refs


def _text_style_ids(refs: list[tuple[str, str | UploadFile]]) -> list[tuple[str, str | UploadFile]]:
    """``refs``, each ``style_id`` checked to be a text field (422 naming it otherwise)."""
    for name, value in refs:
        if name == "style_id" and not isinstance(value, str):
            raise InvalidField("style_id must be a text field, not a file", field="style_id")
    return refs


async def multipart_fingerprint(request: Request, services: Services) -> str:
    """The idempotency fingerprint of a multipart submission: its text fields and its files' digests.

    Reads each file part once (they are spooled already) and rewinds it for :func:`read_multipart`.
    """
    form = await _parse_form(request, services.settings.max_styles_per_job)
    limit = services.settings.max_upload_bytes
    items: list[tuple[str, str]] = []
    for name, value in form.multi_items():
        if isinstance(value, str):
            items.append((name, value))
            continue
        if not value.filename and value.size == 0:
            continue  # an empty file input: not given
        data = await value.read(limit + 1)  # an oversized file is refused later; its head tells it apart
        await value.seek(0)
        items.append((name, file_digest(data)))
    return form_fingerprint(items, STYLE_FIELDS)


async def _parse_form(request: Request, styles: int) -> FormData:
    # The parser's own part limits are far above what a valid form holds, so that a form with too
    # many styles reaches _style_fields and gets its 422 too_many_styles; the body's byte limit
    # (the BodySizeLimit middleware) bounds what the parts cost. Starlette keeps the parsed form on the
    # request, so the fingerprint and the reader parse it once.
    try:
        return await request.form(max_files=len(FILE_FIELDS) + MAX_STYLE_PARTS, max_fields=len(KNOWN_FIELDS)
                                  + MAX_STYLE_PARTS, max_part_size=MAX_TEXT_FIELD_BYTES)
    except StarletteHTTPException as exc:
        raise InvalidMultipart(str(exc.detail)) from None


def _form_fields(form: FormData) -> dict[str, str | UploadFile]:
    """One value per known field; unknown and repeated fields are refused."""
    values: dict[str, str | UploadFile] = {}
    for name, value in form.multi_items():
        if name not in KNOWN_FIELDS:
            raise UnknownField(where="form ", name=name[:80], known=", ".join(sorted(KNOWN_FIELDS)), field=name[:80])
        if name in values and name not in STYLE_FIELDS:
            raise DuplicateField(field=name)
        # An empty text value means "not given" (what HTML forms and Swagger UI send for blanks).
        if isinstance(value, str) and value == "":
            continue
        if isinstance(value, UploadFile) and name in FILE_FIELDS and not value.filename and value.size == 0:
            continue
        values.setdefault(name, value)
    return values


def _text(values: dict[str, str | UploadFile], name: str) -> str | None:
    value = values.get(name)
    if value is None or isinstance(value, str):
        return value
    raise InvalidField(f"{name} must be a text field, not a file", field=name)
