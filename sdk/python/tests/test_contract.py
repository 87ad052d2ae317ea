"""Every route the SDK calls exists in the daemon's `/openapi.json` with the method, query
parameters, body fields and answer fields the SDK uses; every error code has its class."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import hutch
from hutch import _routes
from hutch._errors import ERRORS


@pytest.fixture(scope="module")
def doc(client: hutch.Client) -> dict[str, Any]:
    return client.openapi()


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with `$ref` followed."""
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def variants(doc: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas a schema allows (one, or each of a `oneOf`)."""
    schema = resolve(doc, schema)
    if "oneOf" in schema:
        return [v for one in schema["oneOf"] for v in variants(doc, one)]
    return [schema]


def properties(doc: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    return {p for v in variants(doc, schema) for p in v.get("properties", {})}


def required(doc: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """Fields every variant requires."""
    return set.intersection(*(set(v.get("required", [])) for v in variants(doc, schema)))


def fields(cls: type) -> tuple[set[str], set[str]]:
    """A dataclass's field names, and those without a default (read as always present)."""
    fs = dataclasses.fields(cls)
    no_default = {
        f.name
        for f in fs
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return {f.name for f in fs}, no_default


@pytest.mark.parametrize("route", _routes.ALL, ids=lambda r: f"{r.method} {r.path}")
def test_route_matches_the_openapi_document(doc: dict[str, Any], route: _routes.Route) -> None:
    assert route.path in doc["paths"], f"{route.path} is not in /openapi.json"
    op = doc["paths"][route.path].get(route.method.lower())
    assert op is not None, f"{route.method} {route.path} is not in /openapi.json"

    params = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
    assert set(route.query) <= params, f"query {set(route.query) - params} not documented"
    path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
    assert path_params == {seg[1:-1] for seg in route.path.split("/") if seg.startswith("{")}

    body = op.get("requestBody", {}).get("content", {})
    if route.request is not None:
        schema = body["application/json"]["schema"]
        sent, _ = fields(route.request)
        assert sent <= properties(doc, schema), f"sends fields {sent - properties(doc, schema)}"
    if route.body_type is not None:
        assert route.body_type in body, f"body {route.body_type} not in {list(body)}"

    answers = {k: v for k, v in op["responses"].items() if k.startswith(("101", "2"))}
    assert answers, "no success answer documented"
    if route.response is not None:
        content = [
            a["content"]["application/json"]["schema"]
            for a in answers.values()
            if "application/json" in a.get("content", {})
        ]
        assert content, "no JSON answer documented"
        for schema in content:
            if route.many:
                assert resolve(doc, schema)["type"] == "array"
                schema = schema["items"]
            read, always = fields(route.response)
            assert read <= properties(doc, schema), f"reads {read - properties(doc, schema)}"
            assert always <= required(doc, schema), f"needs {always - required(doc, schema)}"
    if route.answer_type is not None:
        types = {t for a in answers.values() for t in a.get("content", {})}
        assert route.answer_type in types, f"answer {route.answer_type} not in {types}"


def test_every_error_code_has_its_own_exception(doc: dict[str, Any]) -> None:
    codes = set(doc["components"]["schemas"]["ErrorCode"]["enum"])
    assert set(ERRORS) == codes
    assert len(set(ERRORS.values())) == len(codes)
    for code, cls in ERRORS.items():
        assert issubclass(cls, hutch.HutchError) and cls.code == code


def test_every_sandbox_sub_route_is_covered(doc: dict[str, Any]) -> None:
    """New sandbox and template operations in the API show up here until the SDK has them."""
    called = {(r.method.lower(), r.path) for r in _routes.ALL}
    documented = {
        (method, path)
        for path, ops in doc["paths"].items()
        for method in ops
        if path.startswith(("/v1/sandboxes", "/v1/templates"))
    }
    assert documented - called == set()
