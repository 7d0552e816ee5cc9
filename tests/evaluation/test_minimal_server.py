"""The benchmark's baseline server (evaluation/minimal_server.py) answers like the app's exact search."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


def test_the_minimal_server_answers_the_unsharded_top_k(built_index, model_dir, reference):
    from fastapi.testclient import TestClient

    from evaluation.minimal_server import create_app

    client = TestClient(create_app(str(built_index["root"]), str(model_dir)))
    assert client.get("/v1/healthz").json() == {"status": "ok"}
    query = "a beach with white waves"
    answer = client.post("/v1/search/text", json={"query": query, "k": 7}).json()
    distances, rows = reference["flat"].search(reference["text"].encode_packed([query]), 7)
    assert [h["distance"] for h in answer["results"]] == distances[0].tolist()
    assert [h["id"] for h in answer["results"]] == [str(i) for i in reference["flat"].ids[rows[0]]]
    assert {"encode", "search"} <= set(answer["timings_ms"]) and answer["latency_ms"] > 0
