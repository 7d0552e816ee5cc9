"""Benchmark: the serving index kinds on random codes, and sharded search + merge vs one flat index.

(a) On N random codes (default 1,000,000 of 64 bits), for each factory string: build time, per-query
    latency (p50 / p99, batch 1, through serving.index.shards.Shard, which is what serving runs) and
    recall@10 against BFlat. Recall is tie-aware: a returned item counts as correct when its true
    Hamming distance is <= the flat index's 10th distance for that query.
(b) On M random codes (default 10,000,000) cut into S shards (default 4): per-query time of searching
    every shard and merging (one after the other, and with one thread per shard) vs one in-process
    flat index over the same codes; the merged answers are checked equal to the unsharded ones.

Random codes are the hardest case for the approximate kinds (no clusters to exploit), so their
recall here is a floor, not what real image codes get. Stages: ground truth, run, report.

    python -m evaluation.bench_index                      # the defaults above
    python -m evaluation.bench_index --n 100000 --sharded-n 1000000 --queries 200
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

K = 10


def latencies(search, queries) -> tuple[np.ndarray, list]:
    """Run ``search`` on one query at a time: (seconds per query (Q,), results)."""
    seconds, results = np.empty(len(queries)), []
    for i in range(len(queries)):
        start = time.perf_counter()
        results.append(search(queries[i:i + 1]))
        seconds[i] = time.perf_counter() - start
    return seconds, results


def tie_aware_recall(db, queries, rows, flat_kth) -> float:
    """Mean over queries of |returned items with true distance <= flat's k-th distance| / k."""
    from serving.model.codes import hamming

    found = rows >= 0  # (Q, k)
    true = hamming(db[np.where(found, rows, 0)], queries[:, None, :])  # (Q, k)
    correct = found & (true <= flat_kth[:, None])
    return float(correct.sum(axis=1).clip(max=K).mean() / K)


def stats(seconds: np.ndarray) -> dict:
    return {"p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p99_ms": 1e3 * float(np.percentile(seconds, 99))}


def bench_kinds(n: int, bits: int, n_queries: int, kinds: list[str], seed: int) -> list[dict]:
    """Part (a): one row per index kind."""
    from serving.model.codes import random_codes
    from serving.index.shards import Shard

    db = random_codes(n, bits, seed=seed)
    queries = random_codes(n_queries, bits, seed=seed + 1)
    rows_all = np.arange(n, dtype=np.int64)
    # Ground truth: the tie-exact flat search, in one batch.
    flat_kth = Shard(db, rows_all, bits, "BFlat").search(queries, K)[0][:, K - 1]
    table = []
    for factory in kinds:
        start = time.perf_counter()
        shard = Shard(db, rows_all, bits, factory)
        build_s = time.perf_counter() - start
        seconds, results = latencies(lambda q: shard.search(q, K)[1], queries)
        recall = tie_aware_recall(db, queries, np.vstack(results), flat_kth)
        table.append({"factory": factory, "n": n, "build_s": build_s, **stats(seconds), "recall@10": recall})
        print(f"  {factory}: built in {build_s:.1f} s, p50 {table[-1]['p50_ms']:.3f} ms, recall@10 {recall:.3f}",
              flush=True)
    return table


def bench_sharded(n: int, bits: int, n_shards: int, n_queries: int, seed: int) -> dict:
    """Part (b): S flat shards searched and merged vs one flat index over the same codes."""
    from serving.model.codes import random_codes
    from serving.index.shards import Shard, merge_topk

    db = random_codes(n, bits, seed=seed)
    queries = random_codes(n_queries, bits, seed=seed + 1)
    # Rows spread over shards at random (as stable_shard spreads ids); each shard keeps rows ascending.
    shard_of = np.random.default_rng(seed + 2).integers(0, n_shards, n)
    shards = []
    for s in range(n_shards):
        rows = np.flatnonzero(shard_of == s)
        shards.append(Shard(db[rows], rows, bits, "BFlat", name=f"shard-{s}"))
    del shard_of
    one = Shard(db, np.arange(n, dtype=np.int64), bits, "BFlat", name="unsharded")

    def sequential(q):
        return merge_topk([shard.search(q, K) for shard in shards], K)

    pool = ThreadPoolExecutor(n_shards)

    def threaded(q):  # faiss releases the GIL, so shards can run side by side
        return merge_topk(list(pool.map(lambda shard: shard.search(q, K), shards)), K)

    timings, answers = {}, {}
    for name, search in (("unsharded", lambda q: one.search(q, K)), ("sharded_sequential", sequential),
                         ("sharded_threaded", threaded)):
        seconds, results = latencies(search, queries)
        timings[name], answers[name] = stats(seconds), results
        print(f"  {name}: p50 {timings[name]['p50_ms']:.2f} ms", flush=True)
    pool.shutdown()
    same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for name in ("sharded_sequential", "sharded_threaded")
               for a, b in zip(answers[name], answers["unsharded"]))
    return {"n": n, "shards": n_shards, "queries": n_queries, "timings": timings, "same_answers": same}


def report(kinds: list[dict], sharded: dict | None) -> str:
    """The tables and ratios as text."""
    lines = [f"{'factory':<12}{'n':>10}{'build s':>10}{'p50 ms':>10}{'p99 ms':>10}{'recall@10':>11}"]
    for row in kinds:
        lines.append(f"{row['factory']:<12}{row['n']:>10}{row['build_s']:>10.2f}{row['p50_ms']:>10.3f}"
                     f"{row['p99_ms']:>10.3f}{row['recall@10']:>11.3f}")
    flat = next((row for row in kinds if row["factory"] == "BFlat"), None)
    if flat:
        for row in kinds:
            lines.append(f"  {row['factory']}: p50 latency {row['p50_ms'] / flat['p50_ms']:.2f}x BFlat's")
    if sharded:
        t = sharded["timings"]
        lines += ["", f"{sharded['n']} codes, {sharded['shards']} shards, {sharded['queries']} queries, batch 1",
                  f"{'search':<22}{'p50 ms':>10}{'p99 ms':>10}{'p50 / unsharded':>17}"]
        for name, row in t.items():
            lines.append(f"{name:<22}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}"
                         f"{row['p50_ms'] / t['unsharded']['p50_ms']:>17.2f}")
        lines.append(f"merged answers equal the unsharded ones (distance, row): {sharded['same_answers']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="codes for part (a)")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000, help="queries for part (a), batch 1")
    parser.add_argument("--kinds", nargs="+", default=["BFlat", "BHNSW32", "BIVF1024", "BHash4x16"])
    parser.add_argument("--sharded-n", type=int, default=10_000_000, help="codes for part (b); 0 skips it")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--sharded-queries", type=int, default=200)
    # One OpenMP thread by default: batch-1 queries gain little from more, and on a busy 2-core
    # machine OpenMP's spinning threads stalled single queries for hundreds of milliseconds (p99).
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"(a) {args.n} random {args.bits}-bit codes, {args.queries} queries", flush=True)
    kinds = bench_kinds(args.n, args.bits, args.queries, args.kinds, args.seed)
    sharded = None
    if args.sharded_n:
        print(f"(b) {args.sharded_n} codes in {args.shards} shards", flush=True)
        sharded = bench_sharded(args.sharded_n, args.bits, args.shards, args.sharded_queries, args.seed)
    print()
    print(report(kinds, sharded))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "kinds": kinds, "sharded": sharded}, f, indent=2)


if __name__ == "__main__":
    main()
