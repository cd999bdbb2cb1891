"""The playground's routes in-process: redirect, page, assets, and the config the page builds its form from.

The page itself is driven in Chromium against a live stack in tests/e2e/test_playground.py.
"""

from __future__ import annotations

import fnmatch
import html
import re
from collections.abc import Iterator
from dataclasses import fields

import pytest
import tomllib
from fastapi.testclient import TestClient

from ham_core.speed import record_speed
from ham_engine.params import CLIENT_PARAMS, PARAM_SPECS, TransferParams
from service.api.app import create_app
from service.api.routes.playground import ASSETS_DIR
from tests.service.test_api import make_settings


@pytest.fixture
def client(tmp_path, redis_url, redis_client) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, redis_url)), follow_redirects=False) as client:
        yield client


def test_root_and_bare_path_redirect_to_the_playground(client: TestClient) -> None:
    for path in ("/", "/playground"):
        response = client.get(path)
        assert response.status_code == 307 and response.headers["location"] == "/playground/"


def test_page_and_assets_are_served_from_the_package_with_a_strict_csp(client: TestClient) -> None:
    page = client.get("/playground/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assets = re.findall(r'(?:src|href)="(/playground/static/[^"]+)"', page.text)
    assert sorted(a.rsplit(".", 1)[1] for a in assets) == ["css", "js"]
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/playground/static/../../app.py").status_code == 404


def test_no_asset_reaches_outside_the_server() -> None:
    for path in ASSETS_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", text), f"{path.name} loads from a CDN"
        assert "@import" not in text, path.name


def test_the_script_hard_codes_no_parameter() -> None:
    script = (ASSETS_DIR / "playground.js").read_text()
    for name in CLIENT_PARAMS:
        assert f'"{name}"' not in script and f"'{name}'" not in script, f"playground.js names the parameter {name}"
    for default in ("0.75", "0.25", "7.5", "512"):
        assert default not in script, f"playground.js holds the default {default}"


def test_config_lists_every_client_parameter_with_the_server_defaults_and_bounds(client: TestClient) -> None:
    config = client.get("/playground/config.json").json()
    assert config["auth_required"] is True and config["max_upload_bytes"] > 0
    paths = client.get("/openapi.json").json()["paths"]
    assert config["features"] == {"events": "/v1/transfers/{job_id}/events" in paths, "styles": "/v1/styles" in paths}
    by_name = {p["name"]: p for p in config["params"]}
    assert set(by_name) == set(CLIENT_PARAMS) and len(config["params"]) == len(CLIENT_PARAMS)
    # Labels, explanations and groups are the specs' own (no table of the playground's).
    assert [p["name"] for p in config["params"] if p["main"]] == [s.name for s in PARAM_SPECS if s.group == "main"]
    assert [p["name"] for p in config["params"]] == (
        [s.name for s in PARAM_SPECS if s.group == "main"] + [s.name for s in PARAM_SPECS if s.group != "main"])
    for spec in PARAM_SPECS:
        param = by_name[spec.name]
        assert (param["label"], param["explain"], param["group"]) == (spec.label, spec.explain, spec.group)
        # A label in words and an explanation that is more than the label again.
        assert spec.label and spec.label != spec.name and len(spec.explain) > len(spec.label), spec.name
        assert not re.search(r"HAM_[A-Z_]+|our reading|docs/", spec.explain), spec.name
    for name in ("alpha", "beta", "gamma"):  # which way each moves the picture
        assert "Lower" in by_name[name]["explain"] and "higher" in by_name[name]["explain"].lower(), name
    defaults = TransferParams()
    for f in fields(TransferParams):
        if f.name in by_name:
            assert by_name[f.name]["default"] == getattr(defaults, f.name), f.name
    # The bounds are those this server publishes for the request body.
    openapi = client.get("/openapi.json").json()
    schema = openapi["paths"]["/v1/transfers"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in schema:
        schema = openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    schema = {name: openapi["components"]["schemas"][p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
              for name, p in schema["properties"].items()}
    for name, param in by_name.items():
        published = next((c for c in schema[name].get("anyOf", [schema[name]]) if c.get("type") != "null"), {})
        for key in ("minimum", "maximum", "multipleOf"):
            assert param.get(key) == published.get(key), (name, key)
        assert param["description"] == schema[name]["description"]
    assert by_name["size"]["multipleOf"] == 64 and by_name["alpha"]["type"] == "number"
    assert by_name["sini"]["type"] == "boolean" and by_name["steps"]["type"] == "integer"
    # What the estimate needs: which parameters set the cost, and a fast setting within the bounds.
    assert set(config["cost"].values()) <= set(by_name)
    TransferParams(**config["fast"])
    assert config["method_url"] == "/playground/method" and config["speed_url"] == "/playground/speed.json"


def test_the_method_page_explains_each_parameter_in_plain_words(client: TestClient) -> None:
    page = client.get("/playground/method")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for spec in PARAM_SPECS:
        assert f'id="{spec.name}"' in page.text
        assert html.escape(spec.explain) in page.text
    for word in ("SINI", "GAR", "LAT"):
        assert word in page.text


def test_speed_json_publishes_what_the_workers_measured(client: TestClient, redis_client) -> None:
    assert client.get("/playground/speed.json").json() == {"speeds": []}
    record_speed(redis_client, "tiny", 512, 50, 100.0)  # 2 s a step
    record_speed(redis_client, "tiny", 512, 10, 10.0)  # 1 s a step: the mean moves toward it
    record_speed(redis_client, "tiny", 256, 20, 4.0)
    speeds = client.get("/playground/speed.json").json()["speeds"]
    assert [(s["model"], s["size"], s["jobs"]) for s in speeds] == [("tiny", 256, 1), ("tiny", 512, 2)]
    assert speeds[0]["seconds_per_step"] == 0.2
    assert speeds[1]["seconds_per_step"] == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)


def test_config_says_when_no_key_is_needed(tmp_path, redis_url, redis_client) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_url, api_keys=""))) as client:
        assert client.get("/playground/config.json").json()["auth_required"] is False


def test_the_playground_stays_out_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/playground")]


def test_every_asset_ships_in_the_package() -> None:
    """pyproject's package-data must cover the playground's files, or an installed API serves 404s."""
    pyproject = tomllib.loads((ASSETS_DIR.parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["service.api"]
    for path in ASSETS_DIR.iterdir():
        relative = f"playground/{path.name}"
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} is not package data"
