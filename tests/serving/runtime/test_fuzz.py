"""Property-based fuzzing of the live app from its own OpenAPI spec (schemathesis over real HTTP).

Every endpoint gets generated requests, valid and invalid by its declared schema. None may answer
>= 500, every error must be the JSON error shape, and good requests sent between them must keep
getting the right answer.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from serving.model.codes import pack_signs  # noqa: E402
from tests.serving.test_app import call, expected, got, post_json  # noqa: E402

EXAMPLES = 90  # per operation and mode (positive and negative): well over 1,000 requests in all
GOOD_EVERY = 10  # a known-good request after every this many generated ones


def _check(response) -> str | None:
    """What is wrong with one answer, or None."""
    kind = response.headers.get("content-type", "")
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            return f"{response.status_code} with a non-JSON body ({kind}): {response.text[:200]}"
        if not (isinstance(body, dict) and {"code", "message"} <= set(body.get("error", {}))):
            return f"{response.status_code} without the error shape: {json.dumps(body)[:200]}"
    return None


def test_generated_requests_never_fail_the_server(serve_app, reference):
    sent = fuzz_app(serve_app, reference, EXAMPLES)
    assert sent >= 1000, sent


def fuzz_app(url: str, reference, examples: int, key: str | None = None, expect_unauthorised: bool = False,
             tls: dict | None = None) -> int:
    """Generated requests to every operation of the app at ``url`` (with ``key`` as bearer token, if any);
    none may fail the server, and good requests between them keep their answer (or, without a key on an
    app with auth on, keep getting 401). ``tls``: {"cert", "context"} of an HTTPS app's certificate.
    Returns the number sent."""
    from schemathesis.generation import GenerationMode

    verify = {"verify": tls["cert"]} if tls else {}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", **verify)
    good_query = {"query": reference["items"].captions[0], "k": 10}
    want = expected(reference, pack_signs(reference["text"].encode([good_query["query"]])), 10)
    sent, problems, good = [0], [], [0]
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def good_request():
        status, body = post_json(f"{url}/v1/search/text", good_query, headers, (tls or {}).get("context"))
        good[0] += 1
        if expect_unauthorised:
            if status != 401:
                problems.append(f"good request without a key answered {status}: {str(body)[:200]}")
        elif status != 200 or got(body) != want:
            problems.append(f"good request answered {status}: {str(body)[:200]}")

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/search/text", "/v1/search/image", "/v1/captions",
                                              "/v1/search/similar/{image_id}", "/v1/readyz", "/v1/healthz"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call(base_url=url, timeout=30, headers=headers, **verify)
                sent[0] += 1
                problem = _check(response)
                if problem:
                    problems.append(f"{case.method} {case.formatted_path} {mode.name}: {problem}")
                if sent[0] % GOOD_EVERY == 0:
                    good_request()

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (an endpoint without parameters or body)
                assert mode is GenerationMode.NEGATIVE, operation.path
    assert good[0] >= sent[0] // GOOD_EVERY
    assert problems == [], problems[:10]
    assert call(f"{url}/v1/readyz", context=(tls or {}).get("context"))[0] == 200  # and the app is still whole
    return sent[0]
