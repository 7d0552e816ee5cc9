"""Benchmark of the Serve app end to end: text queries over HTTP against 1M random 64-bit codes in 4 shards.

Steps (figures, not timed tests):

1. model: ``--model DIR`` (exported students), else the first ``runs/*/students/onnx`` with 64-bit
   specs, else one made here from the teacher ``runs/fast-64`` (or, without it, the ``fast_split``
   config's encoders with untrained heads: the same sizes and speeds): its text student cut as the
   distillation config's default (2 of MiniLM's 6 layers, undistilled: the same size and speed as a
   distilled one) and exported with training/export.py, beside a tiny random 64-bit image student
   (the app needs one; this benchmark never calls it). The prepared folder is cached.
2. index: 1,000,000 random 64-bit codes, 4 shards (BFlat), on a temporary artifact root.
3. in process: encode (onnxruntime) + one unsharded search, p50 over the queries.
4. HTTP (evaluation/load.py: an asyncio client on keep-alive connections), for each serving layout
   (``colocated``, the default: the text student and every shard in the router replica; ``grouped``:
   the 4 shards in one shard deployment, text encoded in the router; ``per-shard``: a deployment per
   shard and a call to the encoder deployment): ``--sequential`` queries one after another, an idle
   window, then an open loop at each ``--qps`` rate for ``--seconds`` s (rate achieved, p50/p99,
   errors). For each run, CPU milliseconds per request by process kind (proxy, router, shard group,
   encoder, controller, canary, other) and the server-side breakdown each answer carries (encode,
   shard search, merge; the rest is HTTP and Serve overhead). The ingress is HAProxy where installed
   (``--ingress``). ``--config serving/serve.yaml`` serves with a settings file's features on (auth,
   audit, two arms at 90/10, probes) and checks the audit log afterwards; ``--address`` joins a running
   cluster (``terrahash cluster up``) instead of starting Ray.
5. the same runs against ``minimal``: a single-process FastAPI + faiss server over the same index
   (evaluation/minimal_server.py, under uvicorn), what a user could write instead of the app; the
   report ends with each layout's ratios to it (the figures docs/results.md quotes).

Run: ``nice -n 10 python -m evaluation.bench_serve [--model DIR] [--json out.json]``; a shorter run:
``--sequential 100 --seconds 10 --qps 50 --layout colocated --layout minimal``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from evaluation.load import CpuMeter, answers_digest, open_loop, rounded, sequential, summarize

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
    from training.config import load_config, set_bits
    from training.train import build_model, load_trained

    if teacher.exists():
        model, _, _ = load_trained(teacher, torch.device("cpu"))
    else:  # latency does not depend on trained weights: the default config's encoders with fresh heads
        torch.manual_seed(0)
        model, _ = build_model(set_bits(load_config("fast_split"), BITS), num_classes=21)
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


LAYOUTS = {
    # The default: the text student and every shard inside the router replica, no hop per request.
    "colocated": {"layout": "colocated"},
    # Every shard in one shard deployment (ceil(4 shards / 1 node)), text encoded in the router: one hop.
    "grouped": {"layout": "split", "shards_per_replica": 0, "router_encodes_text": True},
    # One deployment per shard and the text encoded by the encoder deployment: a call for each.
    "per-shard": {"layout": "split", "shards_per_replica": 1, "router_encodes_text": False},
}
IDLE_S = 10.0  # the idle window over which background work (probes, reports, key reloads) is measured


def measure(url: str, queries: list[str], k: int, sequential_n: int, rates: list[float], seconds: float,
            meter: CpuMeter, headers: dict | None = None) -> dict:
    """Sequential queries, an idle window, then an open loop at each rate; CPU per process kind for each."""
    sequential(url, queries, k, 30, headers)  # warm-up
    meter.start()
    answers = sequential(url, queries, k, sequential_n, headers)
    seq = {**summarize(answers), "cpu": meter.stop(sequential_n), "answers_sha256": answers_digest(answers)}
    meter.start()
    time.sleep(IDLE_S)
    idle = meter.stop(1)
    idle = {"cores_by_kind": {kind: round(ms / 1000 / idle["wall_s"], 4) for kind, ms in idle["cpu_ms_per_request"].items()
                              if kind != "client"}, "server_cores": idle["server_cores"]}
    runs = []
    for qps in rates:
        meter.start()
        results = open_loop(url, queries, k, qps, seconds, headers)
        runs.append({"qps": qps, "seconds": seconds, **summarize(results, seconds), "cpu": meter.stop(len(results))})
    return {"sequential": seq, "idle": idle, "open_loop": runs}


def bench_settings(layout: str, root: Path, model_dir: Path, tmp: Path, config: str | None):
    """The ServeSettings of a layout over the benchmark's index and model, and the headers requests need.

    With ``config`` (a serve settings file such as serving/serve.yaml) its settings, every feature on,
    with the paths made local: the arms serve the benchmark's model (two arms at 100/0 become 90/10),
    the key file gets a key of its own, the audit log and the canary's root are temporary, the probes
    come from the dataset's val split."""
    import yaml

    from serving.app import ServeSettings
    from serving.governance.keys import KeyFile

    if config is None:
        return ServeSettings(index=str(root), shard_replicas=1, spread_shards=False, rerank="none",
                             shard_num_cpus=0.5, encoder_num_cpus=0.5, router_num_cpus=0.5, **LAYOUTS[layout]), {}
    data = yaml.safe_load(Path(config).read_text()) or {}
    arms = [{**arm, "model": str(model_dir), "index": None} for arm in data.get("arms", [])]
    if [a.get("weight", 0) for a in arms] == [100, 0]:
        arms[0]["weight"], arms[1]["weight"] = 90, 10
    headers = {}
    if data.get("auth", {}).get("enabled"):
        keys = KeyFile(tmp / "keys.json")
        headers = {"Authorization": "Bearer " + keys.create("bench", "reader", rate=100_000, burst=100_000)}
        data["auth"] = {**data["auth"], "keys": str(tmp / "keys.json"), "policy": None}
    if data.get("audit", {}).get("log"):
        data["audit"] = {**data["audit"], "log": str(tmp / "queries.jsonl")}
    data["canary"] = {**data.get("canary", {}), "root": str(tmp / "root"), "probe_data": str(dataset())}
    data.update(index=str(root), tracking_uri=None, arms=arms, spread_shards=False, tls=None, **LAYOUTS[layout])
    return ServeSettings.from_dict(data, config), headers


def dataset() -> Path:
    import os

    return Path(os.environ.get("TERRAHASH_DATA", REPO.parent / "shared" / "data" / "ucm_captions"))


def serve_layout(root: Path, model_dir: Path, queries: list[str], k: int, layout: str, sequential_n: int,
                 rates: list[float], seconds: float, serve_env: dict[str, str], config: str | None,
                 address: str | None) -> dict:
    """Start Ray (or join ``address``) and Serve with one layout, measure, shut down."""
    import os

    import ray
    from ray import serve

    from serving.app import run_apps
    from serving.governance.query_log import QueryLog
    from tests.conftest import free_port

    with tempfile.TemporaryDirectory(prefix="bench_serve_app_") as tmp:
        settings, headers = bench_settings(layout, root, model_dir, Path(tmp), config)
        if address:  # a cluster of `terrahash cluster up` (token authentication, as Ray 2.60 expects)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            ray.init(address=address, configure_logging=False, log_to_driver=False)
        else:
            os.environ.update(serve_env)  # read by Serve's processes at start (controller and proxy inherit it)
            ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
                     runtime_env={"env_vars": serve_env})
        try:
            port = free_port()
            # one proxy, on this node: the local cluster's nodes share this machine's loopback ports
            serve.start(http_options={"host": "127.0.0.1", "port": port},
                        **({"proxy_location": "HeadOnly"} if address else {}))
            run_apps(settings, name="bench", route_prefix="/")
            wait_ready(f"http://127.0.0.1:{port}/v1/readyz", headers)
            figures = measure(f"http://127.0.0.1:{port}/v1/search/text", queries, k, sequential_n, rates, seconds,
                              CpuMeter(), headers)
            serve.shutdown()
        finally:
            ray.shutdown()
        if settings.audit.log:
            time.sleep(2 * settings.audit.flush_s)
            problems, entries = QueryLog(settings.audit.log).verify()
            answered = figures["sequential"]["n"] + 30 + sum(r["n"] - r["errors"] for r in figures["open_loop"])
            figures["audit"] = {"problems": problems[:3], "entries": entries, "answered_at_least": answered}
    return {"settings": {**LAYOUTS[layout], "config": config, "ingress": "haproxy" if serve_env else "python proxy"},
            **figures}


def wait_ready(url: str, headers: dict | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} was not ready within {timeout} s") from None
            time.sleep(0.5)


def minimal_layout(root: Path, model_dir: Path, queries: list[str], k: int, sequential_n: int, rates: list[float],
                   seconds: float) -> dict:
    """The same runs against evaluation/minimal_server.py in a uvicorn subprocess."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    # OMP_NUM_THREADS=1: faiss's omp_set_num_threads only holds for the thread that calls it, and FastAPI runs
    # the endpoint in worker threads whose idle OpenMP teams would spin (the app's searches set it per thread)
    env = {**os.environ, "TERRAHASH_MINIMAL_INDEX": str(root), "TERRAHASH_MINIMAL_MODEL": str(model_dir),
           "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "evaluation.minimal_server:app", "--port", str(port),
                               "--log-level", "warning"], cwd=REPO, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/healthz", timeout=120)
        figures = measure(f"http://127.0.0.1:{port}/v1/search/text", queries, k, sequential_n, rates, seconds,
                          CpuMeter([server.pid]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"settings": {"server": "FastAPI + uvicorn, one process, IndexBinaryFlat"}, **figures}


def _ms(seconds: float) -> float:
    return rounded(seconds * 1000)


# --- main ------------------------------------------------------------------------------------------


def run(model_dir: Path, layouts: list[str], sequential_n: int, rates: list[float], seconds: float, k: int,
        serve_env: dict[str, str], config: str | None = None, address: str | None = None,
        index: str | None = None) -> dict:
    from serving.ingest.items import dataset_items

    queries = dataset_items(dataset()).captions[::7][:500]  # real captions as queries
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(index or tmp)
        t0 = time.perf_counter()
        if index is None:
            build_random_index(root, model_dir)
        build_s = time.perf_counter() - t0
        local = in_process(model_dir, root, queries[:200], k)
        measured = {layout: minimal_layout(root, model_dir, queries, k, sequential_n, rates, seconds)
                    if layout == "minimal" else serve_layout(root, model_dir, queries, k, layout, sequential_n, rates,
                                                             seconds, serve_env, config, address)
                    for layout in layouts}
    report = {"model": str(model_dir), "index": index or f"{ROWS} random codes in {SHARDS} shards", "bits": BITS, "k": k,
              "serve_env": serve_env,
              "index_build_s": rounded(build_s), "in_process": local, "layouts": measured}
    digests = {name: figures["sequential"]["answers_sha256"] for name, figures in measured.items()}
    report["same_answers"] = len(set(digests.values())) == 1 and None not in digests.values()
    if "minimal" in measured:
        report["ratios_to_minimal"] = {name: ratios(figures, measured["minimal"])
                                       for name, figures in measured.items() if name != "minimal"}
    return report


def ratios(serve: dict, minimal: dict) -> dict:
    """The bar's ratios: sequential p50, p99 at each rate, and the highest rate answered with p99 <= 100 ms
    and no errors, each the Serve layout's over the minimal server's."""
    def best(figures):
        good = [r["qps"] for r in figures["open_loop"] if not r["errors"] and r.get("p99_ms", 1e9) <= 100]
        return max(good, default=0.0)
    out = {"sequential_p50": rounded(serve["sequential"]["p50_ms"] / minimal["sequential"]["p50_ms"]),
           "best_rate": rounded(best(serve) / best(minimal)) if best(minimal) else None}
    for mine, theirs in zip(serve["open_loop"], minimal["open_loop"]):
        if "p99_ms" in mine and "p99_ms" in theirs:
            out[f"p99_at_{mine['qps']:g}"] = rounded(mine["p99_ms"] / theirs["p99_ms"])
    return out


def table(report: dict) -> str:
    """One line per layout and rate: offered, achieved, p50, p99, errors, server CPU-ms per request."""
    lines = [f"{'layout':<12} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU-ms/req':>11}"]
    for name, figures in report["layouts"].items():
        seq = figures["sequential"]
        lines.append(f"{name:<12} {'seq':>8} {'':>9} {seq['p50_ms']:>8.2f} {seq['p99_ms']:>8.2f} {seq['errors']:>7} "
                     f"{seq['cpu']['server_cpu_ms_per_request']:>11.2f}")
        for r in figures["open_loop"]:
            lines.append(f"{name:<12} {r['qps']:>8g} {r.get('achieved_qps', 0):>9.1f} {r.get('p50_ms', float('nan')):>8.2f} "
                         f"{r.get('p99_ms', float('nan')):>8.2f} {r['errors']:>7} {r['cpu']['server_cpu_ms_per_request']:>11.2f}")
    lines.append(f"same answers to the {report['layouts'][next(iter(report['layouts']))]['sequential']['n']} "
                 f"sequential queries in every layout: {report['same_answers']}")
    for name, r in report.get("ratios_to_minimal", {}).items():
        lines.append(f"{name} / minimal: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from serving.runtime.ingress import ingress_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="exported model version folder (64-bit students)")
    parser.add_argument("--sequential", type=int, default=300, help="sequential queries (default: %(default)s)")
    parser.add_argument("--qps", type=float, action="append",
                        help="open-loop rate(s), queries/s (repeatable; default: 25, 50, 100, 200)")
    parser.add_argument("--seconds", type=float, default=30, help="open-loop duration per rate (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--layout", action="append", choices=sorted(LAYOUTS) + ["minimal"],
                        help="serving layout(s) to measure, in order (default: colocated, then minimal: a "
                             "single-process FastAPI + faiss server)")
    parser.add_argument("--config", help="serve settings file (e.g. serving/serve.yaml: auth, audit, two arms), "
                                         "its paths made local; default: the plain settings")
    parser.add_argument("--index", help="serve this artifact root's latest release instead of 1M random codes "
                                        "(with --model: the model it was built with, for the minimal server)")
    parser.add_argument("--address", help="an existing Ray cluster to serve on (e.g. `terrahash cluster up`'s)")
    parser.add_argument("--ingress", choices=("auto", "haproxy", "proxy"), default="auto",
                        help="Serve's HTTP ingress for a Ray started here (default: HAProxy where installed)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for Ray Serve's processes (repeatable)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else (find_model() or prepare_model())
    env, why = ingress_env(args.ingress)
    if why:
        print(why, file=sys.stderr)
    report = run(model, args.layout or ["colocated", "minimal"], args.sequential, args.qps or [25, 50, 100, 200],
                 args.seconds, args.k, {**env, **dict(item.split("=", 1) for item in args.serve_env)}, args.config,
                 args.address, args.index)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
