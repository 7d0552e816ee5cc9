"""What a user could write instead of the Serve app: one process, FastAPI + one faiss flat index.

The baseline of ``evaluation/bench_serve.py`` (layout ``minimal``): the text student in onnxruntime
and every code of an index release in one ``IndexBinaryFlat``, behind ``POST /v1/search/text`` with
the app's request and answer shape (``results``, ``latency_ms``, ``timings_ms``), and nothing else:
no shards, no replicas, no limits, no audit, no traffic arms. Configured by the environment:

    TERRAHASH_MINIMAL_INDEX=ROOT TERRAHASH_MINIMAL_MODEL=DIR python -m uvicorn evaluation.minimal_server:app
"""
from __future__ import annotations

import os
import time

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel


class TextQuery(BaseModel):
    query: str
    k: int = 10


def create_app(index_root: str, model_dir: str) -> FastAPI:
    import faiss

    from serving.model.versions import find_spec
    from serving.model.encoders import load_encoder
    from serving.index.releases import load_index

    faiss.omp_set_num_threads(1)
    encoder = load_encoder(find_spec(model_dir, "text"), threads=1)
    index = load_index(index_root)
    rows = np.concatenate([s.rows for s in index.shards])
    order = np.argsort(rows)  # by row, so that faiss breaks distance ties by row as the app does
    codes = np.concatenate([s.codes for s in index.shards])[order]
    ids = index.ids(rows[order])
    flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    flat.add(codes)
    app = FastAPI(title="minimal faiss search")

    @app.get("/v1/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/search/text")
    def search(body: TextQuery):
        start = time.perf_counter()
        packed = encoder.encode_packed([body.query])
        encoded = time.perf_counter()
        distances, rows = flat.search(packed, body.k)
        searched = time.perf_counter()
        results = [{"id": str(ids[r]), "distance": int(d)} for d, r in zip(distances[0], rows[0]) if r >= 0]
        return {"results": results, "latency_ms": (time.perf_counter() - start) * 1000,
                "timings_ms": {"encode": (encoded - start) * 1000, "search": (searched - encoded) * 1000}}

    return app


app = create_app(os.environ["TERRAHASH_MINIMAL_INDEX"], os.environ["TERRAHASH_MINIMAL_MODEL"]) \
    if "TERRAHASH_MINIMAL_INDEX" in os.environ else None
