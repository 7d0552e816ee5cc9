"""Benchmark: the offline edge searcher (serving/edge) on one core, at 100k and 1M items.

From a real bundle (``terrahash bundle``: its int8 text student, tokenizer and image codes), bundles of N items
are written whose codes are the real image codes drawn again with a few bits flipped (so distances and ties
are those of real codes), each with an id, a class, a footprint and a time. For each N, in a fresh process
pinned to one core (onnxruntime with one thread):

- bundle size per item (all members but the students), and of the codes alone;
- cold start: ``terrahash-edge FILE --query ... --json`` from the shell to its answer (interpreter start,
  imports, every member's sha256 checked, the students loaded, one query), and the open alone;
- p50 / p95 latency of a text query including its encoding, over the free-text query sets, unfiltered and
  with a bbox filter, and the search step alone;
- peak memory (VmHWM, the peak resident set) of that process after the queries.

Baseline in the same run: faiss' flat binary index (what a service shard runs) on the same codes, one thread,
per query; the ratio is the edge's top-k alone (no hit building) over it.

    python -m evaluation.bench_edge --bundle ucm.thb
    python -m evaluation.bench_edge --bundle ucm.thb --sizes 100000 --queries 100 --out bench_edge.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUERY_SETS = ("ucm_free_text", "ucm_free_text_val", "ucm_long_text", "ucm_long_text_val")
FLIPS = 4  # bits flipped in each drawn code
BOX = (-10.0, 40.0, 10.0, 55.0)  # where the synthetic footprints lie; the filter takes about a tenth of it
FILTER = [-2.0, 45.0, 2.0, 48.0]


def synthetic_bundle(source: Path, n: int, out: Path, seed: int = 0) -> dict:
    """A bundle of ``n`` items from ``source``'s text student and image codes (see the module docstring)."""
    from serving.edge.collection import add_strings
    from serving.edge.container import Container, npy_bytes, write_container

    opened = Container(source)
    manifest = opened.manifest
    text = manifest["encoders"]["text"]
    members = {name: opened.read(name) for name in (text["spec"], text["model"], *text["files"].values())}
    images = manifest["collections"]["images"]
    real = np.asarray(opened.array(images["members"]["codes"]))
    rng = np.random.default_rng(seed)
    codes = real[rng.integers(0, len(real), n)].copy()
    bits = codes.shape[1] * 8
    for _ in range(FLIPS):
        where = rng.integers(0, bits, n)
        codes[np.arange(n), where // 8] ^= (0x80 >> (where % 8)).astype(np.uint8)
    classes = [f"class{c:02d}" for c in range(21)]
    label = rng.integers(0, len(classes), n)
    entry = {"version": "v0001", "code_space": manifest["code_space"], "rows": n, "filterable": {"bbox": n, "datetime": n},
             "drift": None, "refs": {"extra": {"image_root": ""}}, "members": {"codes": "images/codes.npy"}}
    members["images/codes.npy"] = npy_bytes(codes)
    west = rng.uniform(BOX[0], BOX[2], n)
    south = rng.uniform(BOX[1], BOX[3], n)
    start = rng.uniform(1.6e9, 1.7e9, n)
    columns = {"west": west, "south": south, "east": west + 0.01, "north": south + 0.01, "start": start, "end": start}
    for name, values in columns.items():
        members[f"images/{name}.npy"], entry["members"][name] = npy_bytes(values), f"images/{name}.npy"
    strings = {"ids": [f"scenes/{classes[c]}/{i:07d}.tif" for i, c in enumerate(label)],
               "props": [f'{{"class": "{classes[c]}"}}' for c in label]}
    for field, values in strings.items():
        add_strings(members, entry["members"], "images/", field, values)
    kept = {k: manifest[k] for k in ("release", "model_version", "model", "variant", "code_space", "bits",
                                     "bit_order", "sign_rule")}
    return write_container(out, {**kept, "encoders": {"text": text}, "collections": {"images": entry},
                                 "thumbnails": None}, members)


def query_texts(n: int) -> list[str]:
    from evaluation.free_text import load_queries

    texts = [t for name in QUERY_SETS for t in load_queries(name).texts()]
    return [texts[i % len(texts)] for i in range(n)]


def child(bundle: Path, n_queries: int) -> dict:
    """Run in the measured process: open, first query, then the query set, unfiltered and filtered."""
    start = time.perf_counter()
    from serving.edge.searcher import EdgeSearcher

    imported = time.perf_counter()
    searcher = EdgeSearcher(bundle, threads=1)
    opened = time.perf_counter()
    texts = query_texts(n_queries)
    searcher.search_text({"query": texts[0]})
    first = time.perf_counter()
    out = {"import_s": imported - start, "open_s": opened - imported, "first_query_s": first - opened}
    packed = searcher.encoders["text"].encode_packed(texts[:1])[0]
    topk = []
    for _ in range(len(texts)):  # the top-k alone: XOR, popcount and the count of distances, no hit building
        t = time.perf_counter()
        searcher.images.top_positions(packed, 10)
        topk.append(time.perf_counter() - t)
    out["topk_p50_ms"] = 1000 * float(np.median(topk))
    for name, extra in (("unfiltered", {}), ("bbox", {"bbox": FILTER})):
        total, search = [], []
        for text in texts:
            t = time.perf_counter()
            answer = searcher.search_text({"query": text, "k": 10, **extra})
            total.append(time.perf_counter() - t)
            search.append(answer["timings_ms"]["search"] / 1000)
        out[name] = {"p50_ms": 1000 * float(np.median(total)), "p95_ms": 1000 * float(np.percentile(total, 95)),
                     "search_p50_ms": 1000 * float(np.median(search)), "results": len(answer["results"])}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss, which Linux keeps across exec:
    a child started from a large parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: an upper bound


def one_core_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure(bundle: Path, n_queries: int) -> dict:
    """The child's figures, and the cold start of the command as a user runs it; both on core 0."""
    pin = ["taskset", "-c", "0"] if _has_taskset() else []
    done = subprocess.run([*pin, sys.executable, "-m", "evaluation.bench_edge", "--child", str(bundle),
                           "--queries", str(n_queries)], capture_output=True, text=True, env=one_core_env(), check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    colds = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([*pin, sys.executable, "-m", "serving.edge", str(bundle), "--query", "a river", "--json"],
                       capture_output=True, check=True, env=one_core_env())
        colds.append(time.perf_counter() - start)
    figures["cold_start_s"] = float(np.median(colds))
    return figures


def faiss_baseline(bundle: Path, n_queries: int) -> dict:
    """faiss' flat binary index over the same codes, one thread: per-query search time."""
    import faiss

    from serving.edge.container import Container

    opened = Container(bundle)
    codes = np.ascontiguousarray(opened.array(opened.manifest["collections"]["images"]["members"]["codes"]))
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    faiss.omp_set_num_threads(1)
    queries = codes[np.random.default_rng(1).integers(0, len(codes), n_queries)]
    seconds = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], 10)
        seconds.append(time.perf_counter() - t)
    return {"search_p50_ms": 1000 * float(np.median(seconds))}


def _has_taskset() -> bool:
    from shutil import which

    return which("taskset") is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.bench_edge", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a real bundle (`terrahash bundle ...`): its text student and codes")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="items per bundle")
    p.add_argument("--queries", type=int, default=200, help="text queries timed per size (default %(default)s)")
    p.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the measured process
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.queries)))
        return 0
    if args.bundle is None:
        p.error("--bundle is required")
    rows = []
    with tempfile.TemporaryDirectory(prefix="th-edge-bench-") as folder:
        for n in args.sizes:
            path = Path(folder) / f"edge-{n}.thb"
            manifest = synthetic_bundle(args.bundle, n, path)
            model = sum(m["bytes"] for name, m in manifest["members"].items() if name.startswith("model/"))
            codes = manifest["members"]["images/codes.npy"]["bytes"]
            row = {"items": n, "bundle_mb": path.stat().st_size / 1e6, "bytes_per_item": (path.stat().st_size - model) / n,
                   "code_bytes_per_item": codes / n, "edge": measure(path, args.queries),
                   "faiss_flat": faiss_baseline(path, min(args.queries, 100))}
            row["topk_vs_faiss"] = row["edge"]["topk_p50_ms"] / row["faiss_flat"]["search_p50_ms"]
            rows.append(row)
            print(_line(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def _line(row: dict) -> str:
    e = row["edge"]
    return (f"{row['items']:>9,} items: bundle {row['bundle_mb']:.1f} MB ({row['bytes_per_item']:.1f} B/item, codes "
            f"{row['code_bytes_per_item']:.0f}); cold start {e['cold_start_s']:.2f} s (open {e['open_s']:.2f} s); text "
            f"query p50 {e['unfiltered']['p50_ms']:.1f} ms (p95 {e['unfiltered']['p95_ms']:.1f}), with bbox "
            f"{e['bbox']['p50_ms']:.1f} ms; search step {e['unfiltered']['search_p50_ms']:.2f} ms, its top-k "
            f"{e['topk_p50_ms']:.2f} ms vs faiss flat {row['faiss_flat']['search_p50_ms']:.2f} ms "
            f"({row['topk_vs_faiss']:.2f}x); peak RSS "
            f"{e['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
