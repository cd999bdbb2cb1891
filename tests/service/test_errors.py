"""The error catalogue: one type per code, the OpenAPI responses derived from it, the client's copy equal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ham_client import error_codes
from ham_client.errors import ApiError as ClientApiError
from service.api.errors import CATALOGUE, ApiError, StyleNotFound, TooManyStyles, client_codes_module
from tests.service.test_api import make_client  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def test_the_client_codes_module_is_generated_from_the_catalogue() -> None:
    generated = (REPO / "ham_client" / "error_codes.py").read_text()
    assert generated == client_codes_module(), "run: python -m ham_cli.codegen"


def test_the_client_has_one_type_per_code_with_the_servers_status() -> None:
    server = {code: error.status for code, error in CATALOGUE.items() if error is not ApiError}
    client = {code: error.status_code for code, error in error_codes.ERRORS_BY_CODE.items()}
    assert client == server
    for code, error in error_codes.ERRORS_BY_CODE.items():
        assert error.__name__ == CATALOGUE[code].__name__ and error.error_code == code


def test_the_client_raises_the_type_of_the_code_and_the_plain_error_for_an_unknown_one() -> None:
    known = error_codes.error_for(404, "style_not_found", "no style 'x'", "style_id")
    assert isinstance(known, error_codes.StyleNotFound) and isinstance(known, ClientApiError)
    assert (known.status, known.code, known.field) == (404, "style_not_found", "style_id")
    unknown = error_codes.error_for(418, "teapot", "short and stout")
    assert type(unknown) is ClientApiError and unknown.code == "teapot"


def test_a_type_fills_its_template_and_default_field() -> None:
    error = TooManyStyles(limit=4, count=5)
    assert (error.status, error.code, error.field) == (422, "too_many_styles", "style")
    assert error.message == "at most 4 styles per job (style files and style_ids), got 5"
    assert StyleNotFound(style_id="abc").message == "no style 'abc'"


def test_a_second_type_for_one_code_is_refused() -> None:
    with pytest.raises(TypeError, match="style_not_found"):
        type("Again", (ApiError,), {"status": 404, "code": "style_not_found"})
    assert CATALOGUE["style_not_found"] is StyleNotFound


def test_every_code_of_the_catalogue_is_produced_by_some_path() -> None:
    # A declared code no path produces would be a promise to clients that nothing keeps.
    sources = "\n".join(
        path.read_text()
        for folder in ("service", "ham_core", "ham_cli")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "errors.py"
    ) + (REPO / "service" / "api" / "errors.py").read_text().split("# Routing errors Starlette raises", 1)[1]
    for code, error in CATALOGUE.items():
        if error is ApiError:
            continue
        used = re.search(rf"\b{error.__name__}\b\(|\b{error.__name__}\b[,)}}]|\b{error.__name__}\.code\b", sources)
        assert used or f'"{code}"' in sources, f"{code} ({error.__name__}) is raised nowhere"


@pytest.mark.usefixtures("redis_client")
def test_the_openapi_responses_name_the_codes_of_each_route(make_client) -> None:  # noqa: F811
    paths = make_client().get("/openapi.json").json()["paths"]
    submit = paths["/v1/transfers"]["post"]["responses"]
    assert "`style_not_found`" in submit["404"]["description"]
    assert "`tenant_queue_full`" in submit["429"]["description"] and "`queue_full`" in submit["429"]["description"]
    assert "`job_finished`" in paths["/v1/transfers/{job_id}/cancel"]["post"]["responses"]["409"]["description"]
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and "content" in response:
                    codes = re.findall(r"`([a-z_]+)`:", response.get("description", ""))
                    assert all(CATALOGUE[code].status == int(status) for code in codes), (status, codes)


def test_the_docs_error_table_names_every_code() -> None:
    table = (REPO / "docs" / "api.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    for code, error in CATALOGUE.items():
        assert f"`{code}`" in table and f"| {error.status} |" in table, code
