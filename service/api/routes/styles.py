"""``/v1/styles``: the style library — create, list, read and delete named styles.

A style is stored once (its image at ``styles/{id}.png``, its record in Redis) and named
by ``style_id`` in transfers. ``warm`` on creation queues a feature-building job: a
transfer of a plain grey square content with the style, whose run leaves the style's
features in the shared feature store, so the first real transfer with it is warm on any
worker (for square outputs of that size and steps; other sizes are computed on first
use and then shared). Styles are tenant-scoped like jobs: another tenant's style is a 404.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ham_core.feature_store import delete_style_features
from ham_core.jobs import CURSOR_PATTERN, Job, QueueFull, content_key, new_job_id
from ham_core.styles import StyleRecord, StyleStore, style_image_key
from ham_engine.params import (
    MAX_PROMPT_CHARS,
    PARAM_SPECS,
    ParamError,
    ParamSpec,
    TransferParams,
    check_style_reference,
    family_params,
)
from service.api.catalogue import choose_model
from service.api.deps import Services, current_tenant, get_services
from service.api.errors import (
    REDIS_REFUSALS,
    DuplicateField,
    ImageTooLarge,
    InvalidCursor,
    InvalidField,
    InvalidImage,
    InvalidMultipart,
    InvalidParameter,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    RateLimited,
    RequestTooLarge,
    Unauthorized,
    Unavailable,
    UnknownField,
    UnknownModel,
    UnsupportedMediaType,
    UploadTooLarge,
    error_responses,
)
from service.api.form_values import form_value
from service.api.schemas import StyleList, StyleResource
from service.api.uploads import read_upload

log = logging.getLogger("ham.api")

router = APIRouter(prefix="/v1/styles", tags=["styles"])

# warm=true queues a job that computes the style's features; size and steps are that job's, for `model`.
WARM_SPEC = ParamSpec("warm", bool, False, "queue a job that computes the style's features now")
WARM_PARAM_SPECS = tuple(spec for name in ("size", "steps") for spec in PARAM_SPECS if spec.name == name)
FIELDS = ("image", "style_prompt", "name", WARM_SPEC.name, *(spec.name for spec in WARM_PARAM_SPECS), "model")
MAX_NAME_CHARS = 200
_WARM_GREY = (128, 128, 128)

# What every route of a tenant's styles may answer with, besides its own errors.
_ERRORS = (Unauthorized, RateLimited, Unavailable, *REDIS_REFUSALS)


def style_resource(record: StyleRecord) -> StyleResource:
    """The public view of a library style."""
    return StyleResource(
        id=record.id,
        name=record.name,
        style_prompt=record.style_prompt,
        has_image=record.has_image,
        created_at=datetime.fromtimestamp(record.created_at, tz=timezone.utc),
        warm_job_id=record.warm_job_id,
    )


def _owned_style(services: Services, tenant: str, style_id: str) -> StyleRecord:
    record = services.styles.get(tenant, style_id)
    if record is None:
        raise NotFound(f"no style {style_id[:80]!r}")
    return record


async def _style_form(request: Request) -> FormData:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the style as multipart/form-data")
    try:
        return await request.form(max_files=2, max_fields=len(FIELDS) + 4, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        raise InvalidMultipart(str(exc.detail)) from None


def _fields(form: FormData) -> dict[str, str | UploadFile]:
    values: dict[str, str | UploadFile] = {}
    for name, value in form.multi_items():
        if name not in FIELDS:
            raise UnknownField(where="form ", name=name[:80], known=", ".join(FIELDS), field=name[:80])
        if name in values:
            raise DuplicateField(field=name)
        # An empty value is "not given" (what HTML forms send); blanks are values (a blank prompt is refused).
        if isinstance(value, str) and value == "":
            continue
        if isinstance(value, UploadFile) and not value.filename and value.size == 0:
            continue
        if name != "image" and not isinstance(value, str):
            raise InvalidField(f"{name} must be a text field, not a file", field=name)
        values[name] = value
    return values


def _warm_params(values: dict[str, str | UploadFile], family: str = "sd") -> TransferParams | None:
    """The parameters of the warming job (``warm=true``), parsed like a transfer's form fields; None without.

    ``family``: the warmed model's, whose defaults fill what is not given (its training size).
    ``size``/``steps`` are checked either way (a value out of range is a mistake) but ignored without
    warm (they describe the warm job): a generated client may send every field of the form.
    """
    warm = form_value(WARM_SPEC, str(values["warm"])) if "warm" in values else WARM_SPEC.default
    given = {spec.name: form_value(spec, str(values[spec.name])) for spec in WARM_PARAM_SPECS if spec.name in values}
    # Features are per model: warm them for the model named (its family's size when none is given).
    params = TransferParams(**family_params(family, given))
    return params if warm else None


def _grey_square(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), _WARM_GREY).save(buffer, format="PNG")
    return buffer.getvalue()


def _create(
    services: Services, record: StyleRecord, image_png: bytes | None, warm: TransferParams | None,
    model: str | None = None,
) -> None:
    settings = services.settings
    if image_png is not None:
        services.storage.put(style_image_key(record.id), image_png, "image/png")
    warm_job = None
    if warm is not None:
        warm_job = Job(
            id=new_job_id(),
            tenant=record.tenant,
            params=warm.to_dict(),
            styles=[record.ref()],
            model=model,
        )
        record.warm_job_id = warm_job.id
    services.styles.create(record)
    if warm_job is None:
        return
    try:
        services.storage.put(content_key(warm_job.id), _grey_square(warm.size), "image/png")
        services.jobs.submit(warm_job, None, settings.max_queued_per_tenant, settings.max_queue_length)
    except QueueFull:
        # The style exists either way; only its warming is skipped (the first transfer computes).
        log.warning("style %s: queue full, not warmed", record.id)
        services.storage.delete(content_key(warm_job.id))
        record.warm_job_id = None
        services.styles.set_field(record.id, "warm_job_id", "")


@router.post(
    "",
    status_code=201,
    response_model=StyleResource,
    summary="Add a style to your library",
    responses=error_responses(
        *_ERRORS, InvalidMultipart, RequestTooLarge, UploadTooLarge, ImageTooLarge, UnsupportedMediaType,
        UnknownField, DuplicateField, InvalidField, InvalidParameter, InvalidImage, UnknownModel, ModelUnavailable,
    ),
    # Parsed by hand (below); the form is declared as a named schema so generated clients get a model for it.
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/StyleForm"}}}}},
)
async def create_style(
    request: Request,
    response: Response,
    tenant: str = Depends(current_tenant),
    services: Services = Depends(get_services),
) -> StyleResource:
    """Store a style (multipart: `image` and/or `style_prompt`, optional `name`).

    `warm=true` (with optional `size` and `steps`, default the engine's, and `model`, default the
    default model's) queues a job that computes the style's features for that model, so the first
    transfer with it on that model is warm. The style itself is usable with every model.
    """
    form = await _style_form(request)
    try:
        values = _fields(form)
        name = values.get("name")
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise InvalidField(f"name: at most {MAX_NAME_CHARS} characters", field="name")
        try:
            prompt_text = values.get("style_prompt")
            if prompt_text is not None and len(prompt_text) > MAX_PROMPT_CHARS:
                raise ParamError("style_prompt", f"at most {MAX_PROMPT_CHARS} characters")
            if prompt_text is not None and not prompt_text.strip():
                raise ParamError("style_prompt", "blank; leave it out or describe a style")
            prompt = check_style_reference("image" in values, prompt_text)
            model = None
            warming = "warm" in values and form_value(WARM_SPEC, str(values["warm"]))
            if warming or "model" in values:
                # 422 unknown_model either way; without warm the model, like size/steps, is checked and ignored.
                model = await choose_model(services, values.get("model"))
            warm = _warm_params(values, model.family if model else "sd")
        except ParamError as exc:
            field = "image" if exc.field == "style" else exc.field
            raise InvalidParameter(str(exc).replace("style:", "image:", 1), field=field) from None
        image_png = await read_upload(values["image"], "image", services.settings) if "image" in values else None
    finally:
        await form.close()
    record = StyleRecord(
        id=StyleStore.new_id(),
        tenant=tenant,
        name=name.strip() if isinstance(name, str) else None,
        style_prompt=prompt,
        has_image=image_png is not None,
    )
    await run_in_threadpool(_create, services, record, image_png, warm, model.name if model else None)
    response.headers["Location"] = f"/v1/styles/{record.id}"
    log.info("style %s created for tenant %s", record.id, tenant)
    return style_resource(record)


@router.get(
    "",
    response_model=StyleList,
    summary="List your styles",
    responses=error_responses(*_ERRORS, InvalidRequest, InvalidCursor),
)
def list_styles(
    limit: int = Query(20, ge=1, le=100, description="Page size."),
    # The pattern is declared, not enforced by FastAPI: the store's own check answers with `invalid_cursor`.
    cursor: str | None = Query(
        None, max_length=200, json_schema_extra={"pattern": CURSOR_PATTERN},
        description="`next_cursor` of the previous page.",
    ),
    tenant: str = Depends(current_tenant),
    services: Services = Depends(get_services),
) -> StyleList:
    """Your styles, newest first, one page at a time."""
    try:
        records, next_cursor = services.styles.list_for_tenant(tenant, limit, cursor)
    except ValueError as exc:
        raise InvalidCursor(str(exc), field="cursor") from None
    return StyleList(items=[style_resource(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/{style_id}", response_model=StyleResource, summary="Get a style", responses=error_responses(*_ERRORS, NotFound)
)
def get_style(
    style_id: str, tenant: str = Depends(current_tenant), services: Services = Depends(get_services)
) -> StyleResource:
    """One style of your library."""
    return style_resource(_owned_style(services, tenant, style_id))


@router.delete(
    "/{style_id}", status_code=204, summary="Delete a style", responses=error_responses(*_ERRORS, NotFound)
)
def delete_style(
    style_id: str, tenant: str = Depends(current_tenant), services: Services = Depends(get_services)
) -> Response:
    """Remove the style, its stored image and its stored features. Jobs already submitted with it keep
    their own copy of its image and run as submitted."""
    record = services.styles.delete(tenant, style_id)
    if record is None:
        raise NotFound(f"no style {style_id[:80]!r}")
    if record.image_key:
        services.storage.delete(record.image_key)
    if record.image_digest:
        removed = delete_style_features(services.storage, record.image_digest)
        log.info("style %s deleted with %d feature blob(s)", style_id, removed)
    return Response(status_code=204)
