"""The app's OpenAPI document: every route documented (permission, roles, example, errors, headers), every error
code the runtime raises declared, and docs/api.md its rendering. The live /openapi.json is checked against
docs/api.md in tests/serving/test_app.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from serving.governance.roles import ENDPOINTS, ROLES  # noqa: E402
from serving.runtime.openapi_docs import DOCS, ERRORS, REGENERATE, undocumented  # noqa: E402
from serving.runtime.reference import render  # noqa: E402
from serving.runtime.router import api  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
HOW_TO_DOCUMENT = ("add the route's endpoint to serving.governance.roles.ENDPOINTS, its entry (example answer, "
                   "error codes) to DOCS in serving/runtime/openapi_docs.py, then run `" + REGENERATE + "`")


@pytest.fixture(scope="module")
def document() -> dict:
    return api.openapi()


def test_every_route_has_docs(document):
    missing = undocumented(document)
    assert not missing, f"routes without docs: {missing}; {HOW_TO_DOCUMENT}"


def test_each_operation_says_who_may_call_it_and_what_it_answers(document):
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path}"
            permission = ENDPOINTS[op["x-terrahash-endpoint"]]
            assert op["x-terrahash-permission"] == permission, where
            holders = [r for r, granted in ROLES.items() if permission is None or permission in granted]
            assert [r for r in op["x-terrahash-roles"] if r in ROLES] == holders and holders, where
            assert op["security"] == ([{"bearerAuth": []}] if permission else [{}, {"bearerAuth": []}]), where
            ok = op["responses"]["200"]
            [(media, content)] = ok["content"].items()
            assert content["example"], where
            for status, response in op["responses"].items():
                if status == "200":
                    continue
                codes = response["x-terrahash-error-codes"]
                example = response["content"]["application/json"]["example"]["error"]
                assert example["code"] in codes and example["message"], where
                assert all(ERRORS[c][0] == int(status) or (int(status), c) in DOCS[where].errors for c in codes), \
                    (where, status, codes)
            statuses = set(op["responses"])
            assert {"500", "504"} <= statuses, where
            if permission is not None:
                assert {"401", "403", "429"} <= statuses, where
                assert "Retry-After" in op["responses"]["429"]["headers"], where
                assert "WWW-Authenticate" in op["responses"]["401"]["headers"], where
            headers = {p["name"] for p in op.get("parameters", []) if p["in"] == "header"}
            if DOCS[where].on_arm:
                assert headers == {"X-Client-Id", "X-TerraHash-Arm"} and "422" in statuses, where
            if DOCS[where].arm_header:
                assert "X-TerraHash-Arm" in ok["headers"], where
    text = document["paths"]["/v1/search/text"]["post"]
    assert text["requestBody"]["content"]["application/json"]["schema"]["required"] == ["query"]
    assert {"invalid_json", "payload_too_large", "unsupported_media_type"} <= {
        c for r in text["responses"].values() for c in r.get("x-terrahash-error-codes", ())}
    assert "HTTPValidationError" not in document["components"]["schemas"]  # the app never answers FastAPI's 422 body


def test_every_error_code_the_runtime_raises_is_declared():
    raised = set()
    for source in (REPO / "serving" / "runtime").glob("*.py"):
        text = source.read_text()
        raised |= set(re.findall(r'ApiError\(\d{3}, "([a-z_]+)"', text))
        raised |= set(re.findall(r'ReceivedError\("([a-z_]+)"', text))
        raised |= set(re.findall(r'error_response\(\d{3}, "([a-z_]+)"', text))
    assert raised and not raised - set(ERRORS), f"error codes missing from ERRORS: {sorted(raised - set(ERRORS))}"


def test_docs_api_md_is_the_rendering_of_the_app_document(document):
    committed = (REPO / "docs" / "api.md").read_text()
    assert render(document) == committed, f"docs/api.md is stale: run `{REGENERATE}`"
