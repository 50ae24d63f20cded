"""/openapi.json describes every route and every request field the parsers read; /docs is served offline."""

from __future__ import annotations

import re

import pytest
import requests
from spindle_router.api import openai as oa
from spindle_router.api.app import route_table
from spindle_router.validation import Fields, parse_generate_request

from tests.router.api_harness import start_server, write_tokenizer_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    yield s
    s.stop()


def _fields_read(monkeypatch, parse, body) -> dict[str, set[str]]:
    """{object path: keys} every Fields read while `parse(body)` ran."""
    seen: dict[str, set[str]] = {}
    for name in ("has", "raw", "required", "int", "float", "bool", "str", "str_list"):
        original = getattr(Fields, name)

        def spy(self, key, *a, _original=original, **kw):
            seen.setdefault(self.path, set()).add(key)
            return _original(self, key, *a, **kw)

        monkeypatch.setattr(Fields, name, spy)
    parse(body)
    return seen


@pytest.mark.parametrize(
    "schema, parse, body, path",
    [
        ("ChatRequest", oa.parse_chat_request, {"messages": [{"role": "user", "content": "x"}]}, ""),
        ("CompletionRequest", lambda b: oa.parse_completion_request(b, 4), {"prompt": "x"}, ""),
        ("GenerateRequest", parse_generate_request, {"inputs": "x"}, ""),
        ("GenerateParameters", parse_generate_request, {"inputs": "x", "parameters": {}}, "parameters"),
    ],
)
def test_openapi_names_every_field_the_parsers_read(server, monkeypatch, schema, parse, body, path):
    doc = requests.get(server.base_url + "/openapi.json", timeout=10).json()
    read = _fields_read(monkeypatch, parse, body)[path]
    described = set(doc["components"]["schemas"][schema]["properties"])
    assert read - described == set(), f"{schema} lacks {sorted(read - described)}"
    assert len(read) >= 3  # the spy saw the parser at work


def test_openapi_describes_every_route_and_its_path_parameters(server):
    doc = requests.get(server.base_url + "/openapi.json", timeout=10).json()
    for r in route_table():
        op = doc["paths"][r.path][r.method.lower()]
        names = {p["name"] for p in op.get("parameters", [])}
        assert names == set(re.findall(r"{(\w+)}", r.path)), r.path
    assert "/docs" in doc["paths"] and "/docs/{name}" in doc["paths"]


def test_docs_page_and_its_assets_are_served_by_the_router(server):
    page = requests.get(server.base_url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs/") for a in assets)  # nothing from another host
    assert "/openapi.json" in page.text
    for asset in assets:
        r = requests.get(server.base_url + asset, timeout=10)
        assert r.status_code == 200 and len(r.content) > 100, asset
    js = requests.get(server.base_url + "/docs/swagger-ui-bundle.js", timeout=10)
    assert "SwaggerUIBundle" in js.text and js.headers["Content-Type"].startswith("application/javascript")
    missing = requests.get(server.base_url + "/docs/..%2Fpyproject.toml", timeout=10)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
