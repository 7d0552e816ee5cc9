"""Benchmark of the Serve app end to end: text queries over HTTP against 1M random 64-bit codes in 4 shards.

Steps (figures, not timed tests):

1. model: ``--model DIR`` (exported students), else the first ``runs/*/students/onnx`` with 64-bit
   specs, else one made here from the teacher ``runs/fast-64``: its text student cut as the
   distillation config's default (2 of MiniLM's 6 layers, undistilled: the same size and speed as a
   distilled one) and exported with training/export.py, beside a tiny random 64-bit image student
   (the app needs one; this benchmark never calls it). The prepared folder is cached.
2. index: 1,000,000 random 64-bit codes, 4 shards (BFlat), on a temporary artifact root.
3. in process: encode (onnxruntime) + one unsharded search, p50 over the queries.
4. HTTP, for each serving layout (``grouped``: the 4 shards in one deployment and text encoded in
   the router, the default on one node; ``per-shard``: a deployment per shard and a call to the
   encoder deployment): sequential p50/p99 over ``--sequential`` queries; then an open loop of
   ``--qps`` queries/s for ``--seconds`` s (p50/p99, errors); the breakdown comes from the
   server-side timings each answer carries (encode, shard search, merge; the rest is HTTP and
   Serve overhead).
5. the same two runs against ``minimal``: a single-process FastAPI + faiss server over the same
   index (evaluation/minimal_server.py, under uvicorn), what a user could write instead of the app.

Run: ``nice -n 10 python -m evaluation.bench_serve [--model DIR] [--json out.json]``; a shorter run:
``--sequential 100 --seconds 20 --layout grouped --layout minimal``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "terrahash" / "bench_model"
BITS, ROWS, SHARDS = 64, 1_000_000, 4


# --- 1. the model ------------------------------------------------------------------------------------


def find_model(bits: int = BITS) -> Path | None:
    """An exported model version with ``bits``-bit students, under runs/ or the cache."""
    from serving.model.versions import find_spec
    from serving.model.spec import load_spec

    for folder in sorted(REPO.glob("runs/*/students/onnx")) + [CACHE]:
        try:
            if load_spec(find_spec(folder, "text")).bits == bits:
                return folder
        except (FileNotFoundError, ValueError):
            continue
    return None


def prepare_model(teacher: Path = REPO / "runs" / "fast-64", out: Path = CACHE) -> Path:
    """Export a text student cut from ``teacher`` and a tiny random image student to ``out``."""
    import torch

    from training.export import export_image_student, export_text_student
    from training.students import ImageStudent, ImageStudentConfig, TextStudentConfig, build_text_student
    from training.train import load_trained

    model, _, _ = load_trained(teacher, torch.device("cpu"))
    student = build_text_student(TextStudentConfig(), model.text_encoder, model.text_head).eval()
    export_text_student(student, model.text_encoder.tokenizer, out)
    torch.manual_seed(0)
    tiny = ImageStudent(ImageStudentConfig(backbone="test_efficientnet", weights="none", image_size=64,
                                           pool_levels=(1,), head_hidden=(32,)), student_bits(student)).eval()
    export_image_student(tiny, out)
    return out


def student_bits(student) -> int:
    import torch

    with torch.no_grad():
        return int(student(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).shape[-1])


# --- 2. the index ------------------------------------------------------------------------------------


def build_random_index(root: Path, model_dir: Path, rows: int = ROWS, shards: int = SHARDS) -> dict:
    from serving.model.codes import random_codes
    from serving.index.releases import publish_release
    from serving.index.versions import build_index

    codes = random_codes(rows, BITS, seed=0)
    ids = [f"tile/{i:07d}" for i in range(rows)]
    manifest = build_index(codes, ids, BITS, shards, str(root), model_version="bench",
                           extra={"model_dir": str(model_dir), "image_root": ""})
    publish_release(str(root), {"images": manifest})
    return manifest


# --- 3. in process -----------------------------------------------------------------------------------


def in_process(model_dir: Path, root: Path, queries: list[str], k: int) -> dict:
    """p50 of encode + one unsharded IndexBinaryFlat search, in this process."""
    from serving.model.versions import find_spec
    from serving.model.encoders import load_encoder
    from serving.index.releases import load_index

    encoder = load_encoder(find_spec(model_dir, "text"), threads=1)
    index = load_index(str(root))
    codes = np.concatenate([s.codes for s in index.shards])
    import faiss

    faiss.omp_set_num_threads(1)  # as in the shard replicas: one query, one thread
    flat = faiss.IndexBinaryFlat(BITS)
    flat.add(codes)
    encode, search = [], []
    for query in queries:
        t0 = time.perf_counter()
        packed = encoder.encode_packed([query])
        t1 = time.perf_counter()
        flat.search(packed, k)
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        search.append(t2 - t1)
    total = np.add(encode, search)
    return {"encode_p50_ms": _ms(np.median(encode)), "search_p50_ms": _ms(np.median(search)),
            "encode_search_p50_ms": _ms(np.median(total))}


# --- 4. over HTTP --------------------------------------------------------------------------------------


def post(url: str, query: str, k: int) -> tuple[float, dict | None, str | None]:
    """(client seconds, body or None, error or None) of one text query."""
    request = urllib.request.Request(url, json.dumps({"query": query, "k": k}).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = json.loads(answer.read())
        return time.perf_counter() - start, body, None
    except Exception as err:  # counted as an error of the run
        return time.perf_counter() - start, None, f"{type(err).__name__}: {err}"


def sequential(url: str, queries: list[str], k: int, n: int) -> list:
    return [post(url, queries[i % len(queries)], k) for i in range(n)]


def open_loop(url: str, queries: list[str], k: int, qps: float, seconds: float) -> list:
    """Send at a fixed rate whatever the answers' speed (one thread per request in flight)."""
    results, threads = [], []
    lock = threading.Lock()

    def one(i):
        outcome = post(url, queries[i % len(queries)], k)
        with lock:
            results.append(outcome)

    start = time.perf_counter()
    for i in range(int(qps * seconds)):
        delay = start + i / qps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results


def summarize(results: list) -> dict:
    """Client latency percentiles, errors, and the server-side breakdown (medians, ms)."""
    ok = [(t, b) for t, b, e in results if e is None]
    errors = [e for _, _, e in results if e is not None]
    client = np.array([t for t, _ in ok]) * 1000
    server = np.array([b["latency_ms"] for _, b in ok])
    parts = {name: float(np.median([b["timings_ms"].get(name, 0.0) for _, b in ok])) for name in ("encode", "search", "merge")}
    return {"n": len(results), "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": _r(np.percentile(client, 50)), "p99_ms": _r(np.percentile(client, 99)),
            "server_p50_ms": _r(np.median(server)),
            "breakdown_p50_ms": {**{k: _r(v) for k, v in parts.items()},
                                 "router_other": _r(np.median(server) - sum(parts.values())),
                                 "http_and_serve_overhead": _r(np.median(client - server))}}


def _ms(seconds: float) -> float:
    return _r(seconds * 1000)


def _r(value: float) -> float:
    return round(float(value), 3)


# --- main ------------------------------------------------------------------------------------------


LAYOUTS = {
    # Every shard in one deployment (the default on one node: ceil(4 shards / 1 node)), text encoded in the router.
    "grouped": {"shards_per_replica": 0, "router_encodes_text": True},
    # One deployment per shard and the text encoded by the encoder deployment: a call for each.
    "per-shard": {"shards_per_replica": 1, "router_encodes_text": False},
}


def serve_layout(root: Path, queries: list[str], k: int, layout: str, sequential_n: int, qps: float, seconds: float,
                 serve_env: dict[str, str]) -> dict:
    """Start Ray and Serve with one layout, measure sequential and open-loop queries, shut down."""
    import os

    import ray
    from ray import serve

    from serving.app import ServeSettings, run_apps
    from tests.conftest import free_port

    os.environ.update(serve_env)  # read by Serve's processes at start (controller and proxy inherit it)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": serve_env})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(index=str(root), shard_replicas=1, spread_shards=False, rerank="none",
                                 shard_num_cpus=0.5, encoder_num_cpus=0.5, router_num_cpus=0.5, **LAYOUTS[layout])
        run_apps(settings, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/search/text"
        sequential(url, queries, k, 30)  # warm-up
        seq = summarize(sequential(url, queries, k, sequential_n))
        sustained = summarize(open_loop(url, queries, k, qps, seconds))
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"settings": LAYOUTS[layout], "sequential": seq, "sustained": {"qps": qps, "seconds": seconds, **sustained}}


def minimal_layout(root: Path, model_dir: Path, queries: list[str], k: int, sequential_n: int, qps: float,
                   seconds: float) -> dict:
    """The same runs against evaluation/minimal_server.py in a uvicorn subprocess."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "TERRAHASH_MINIMAL_INDEX": str(root), "TERRAHASH_MINIMAL_MODEL": str(model_dir)}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "evaluation.minimal_server:app", "--port", str(port),
                               "--log-level", "warning"], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/healthz", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the minimal server did not start") from None
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/search/text"
        sequential(url, queries, k, 30)  # warm-up
        seq = summarize(sequential(url, queries, k, sequential_n))
        sustained = summarize(open_loop(url, queries, k, qps, seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"settings": {"server": "FastAPI + uvicorn, one process, IndexBinaryFlat"}, "sequential": seq,
            "sustained": {"qps": qps, "seconds": seconds, **sustained}}


def run(model_dir: Path, layouts: list[str], sequential_n: int, qps: float, seconds: float, k: int,
        serve_env: dict[str, str]) -> dict:
    import os

    from serving.ingest.items import dataset_items

    data = Path(os.environ.get("TERRAHASH_DATA", REPO.parent / "shared" / "data" / "ucm_captions"))
    queries = dataset_items(data).captions[::7][:500]  # real captions as queries
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_random_index(root, model_dir)
        build_s = time.perf_counter() - t0
        local = in_process(model_dir, root, queries[:200], k)
        measured = {layout: minimal_layout(root, model_dir, queries, k, sequential_n, qps, seconds)
                    if layout == "minimal" else serve_layout(root, queries, k, layout, sequential_n, qps, seconds, serve_env)
                    for layout in layouts}
    for figures in measured.values():
        figures["ratio_e2e_p50_to_in_process"] = _r(figures["sequential"]["p50_ms"] / local["encode_search_p50_ms"])
    report = {"model": str(model_dir), "rows": ROWS, "shards": SHARDS, "bits": BITS, "k": k,
              "serve_env": serve_env, "index_build_s": _r(build_s), "in_process": local,
              "layouts": measured}
    for name in layouts[1:]:
        for mode in ("sequential", "sustained"):
            a, b = measured[layouts[0]][mode]["p50_ms"], measured[name][mode]["p50_ms"]
            report[f"{mode}_p50_{layouts[0]}_over_{name}"] = _r(a / b)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="exported model version folder (64-bit students)")
    parser.add_argument("--sequential", type=int, default=300, help="sequential queries (default: %(default)s)")
    parser.add_argument("--qps", type=float, default=50, help="open-loop rate (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="open-loop duration (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--layout", action="append", choices=sorted(LAYOUTS) + ["minimal"],
                        help="serving layout(s) to measure, in order, each against the first (default: grouped, "
                             "per-shard, then minimal: a single-process FastAPI + faiss server)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for Ray Serve's processes, e.g. "
                             "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 (repeatable)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else (find_model() or prepare_model())
    report = run(model, args.layout or ["grouped", "per-shard", "minimal"], args.sequential, args.qps, args.seconds, args.k,
                 dict(item.split("=", 1) for item in args.serve_env))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
