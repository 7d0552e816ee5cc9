"""Benchmark: our faiss binary indexes against peer vector indexes on the same codes.

Indexes: faiss binary flat (exact), IVF, HNSW and multi-index hashing (through serving.index.shards.Shard,
what serving runs); usearch's HNSW over bit vectors (hamming metric, ``b1``); Milvus Lite, the
embedded Milvus, which stores no binary vectors: it gets the +-1 codes as float vectors with inner
product, which ranks exactly as Hamming distance (<a, b> = bits - 2 * hamming(a, b)). For each:
recall@10 against exact search (tie-aware, as bench_index: a returned item counts when its true
distance is <= the exact 10th distance), p50/p99 of single-query searches on one thread, build
time and memory (the serialized index; Milvus Lite: its database file).

Two code sets: ``uniform`` random codes (the worst case for approximate indexes) and ``structured``
codes with the real data's statistics: copies of real image codes, each bit flipped at half the
mean within-class Hamming rate, so that copies of one scene differ as scenes of a class do. That is
what an archive looks like. ``terrahash report`` runs this at 100k codes unless given ``--peers``.

    python -m evaluation.bench_peers --codes runs/fast_split-64 --n 1000000 --json peers.json
    python -m evaluation.bench_peers --n 100000               # random source codes, no run needed
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .bench_index import K, latencies, stats, tie_aware_recall

FAISS_KINDS = {"faiss-flat": "BFlat", "faiss-ivf": "BIVF{nlist}", "faiss-hnsw": "BHNSW32", "faiss-multihash": "BHash{h}x{b}"}
MILVUS_MAX = 2_000_000  # Milvus Lite's inserts go through Python lists: more would take hours here


def within_class_rate(signs: np.ndarray, labels: np.ndarray) -> float:
    """Mean Hamming distance between codes of one class, as a share of the bits."""
    from .metrics import hamming_distances

    rates = []
    for label in np.unique(labels):
        members = signs[labels == label]
        if len(members) > 1:
            d = hamming_distances(members, members)
            rates.append(d[np.triu_indices(len(members), 1)].mean() / signs.shape[1])
    return float(np.mean(rates)) if rates else 0.1


def structured(signs: np.ndarray, n: int, rate: float, seed: int) -> np.ndarray:
    """(n, bits) +-1 copies of ``signs`` rows, each bit flipped with probability ``rate``."""
    rng = np.random.default_rng(seed)
    out = signs[rng.integers(0, len(signs), n)].astype(np.int8)
    out[rng.random(out.shape) < rate] *= -1
    return out


def _faiss(factory: str, packed: np.ndarray, bits: int):
    import faiss

    from serving.index.shards import Shard

    shard = Shard(packed, np.arange(len(packed), dtype=np.int64), bits, factory)
    return (lambda q: shard.search(q, K)[1]), faiss.serialize_index_binary(shard.index).nbytes


def _usearch(packed: np.ndarray, bits: int):
    from usearch.index import Index

    index = Index(ndim=bits, metric="hamming", dtype="b1", connectivity=16)
    index.add(np.arange(len(packed)), packed, threads=1, log=False)

    def search(q):
        return np.asarray(index.search(q, K, threads=1).keys, dtype=np.int64).reshape(len(q), -1)

    return search, int(index.memory_usage)


def _milvus(signs: np.ndarray, folder: Path):
    import logging

    from pymilvus import DataType, MilvusClient

    # Milvus Lite's embedded server logs each segment build at INFO, and its gRPC shim a traceback for
    # the AllocTimestamp call it does not implement (pymilvus falls back by itself): noise, not errors.
    logging.getLogger("milvus_lite").setLevel(logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    client = MilvusClient(str(folder / "milvus.db"))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=signs.shape[1])
    index = client.prepare_index_params()
    # FLAT, its exact index: the default (AUTOINDEX) is approximate and returned 76% of the true top 10.
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("codes", schema=schema, index_params=index, consistency_level="Strong")
    floats = signs.astype(np.float32)
    for start in range(0, len(floats), 20_000):
        chunk = floats[start:start + 20_000]
        client.insert("codes", [{"id": start + i, "vector": v} for i, v in enumerate(chunk.tolist())])
    client.flush("codes")

    def search(q_packed):
        q = np.where(np.unpackbits(q_packed, axis=1) > 0, 1.0, -1.0).astype(np.float32)
        hits = client.search("codes", q.tolist(), limit=K)
        return np.asarray([[h["id"] for h in row] + [-1] * (K - len(row)) for row in hits], dtype=np.int64)

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return search, size, client


def bench_set(name: str, signs_db: np.ndarray, signs_q: np.ndarray, peers: list[str], progress: bool = True) -> dict:
    """One code set through every index: {"size", "bits", "indexes": {name: figures}}."""
    from serving.index.shards import Shard

    n, bits = signs_db.shape
    packed, queries = np.packbits(signs_db > 0, axis=1), np.packbits(signs_q > 0, axis=1)
    flat_kth = Shard(packed, np.arange(n, dtype=np.int64), bits, "BFlat").search(queries, K)[0][:, K - 1]
    nlist = int(min(4096, max(16, 4 * np.sqrt(n))))
    nlist = 1 << int(np.log2(nlist))
    h = max(2, bits // 16)
    out = {"size": int(n), "bits": int(bits), "queries": int(len(queries)), "indexes": {}}
    for peer in tqdm(peers, desc=f"{name} codes", unit="index", disable=not progress):
        start = time.perf_counter()
        closing = None
        if peer in FAISS_KINDS:
            factory = FAISS_KINDS[peer].format(nlist=nlist, h=h, b=bits // h)
            search, memory = _faiss(factory, packed, bits)
            extra = {"factory": factory}
        elif peer == "usearch-hnsw":
            search, memory = _usearch(packed, bits)
            extra = {"metric": "hamming", "dtype": "b1", "connectivity": 16}
        elif peer == "milvus-lite":
            folder = Path(tempfile.mkdtemp(prefix="terrahash-milvus-"))
            search, memory, closing = _milvus(signs_db, folder)
            extra = {"metric": "IP", "vectors": "float32 +-1", "index_type": "FLAT"}
        else:
            raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
        build = time.perf_counter() - start
        seconds, rows = latencies(search, queries)
        out["indexes"][peer] = {"recall_at_10": tie_aware_recall(packed, queries, np.vstack(rows), flat_kth),
                                "latency_ms_p50": stats(seconds)["p50_ms"], "latency_ms_p99": stats(seconds)["p99_ms"],
                                "build_seconds": build, "memory_mb": memory / 2 ** 20, **extra}
        if closing is not None:
            closing.close()
            shutil.rmtree(folder, ignore_errors=True)
    return out


PEERS = (*FAISS_KINDS, "usearch-hnsw", "milvus-lite")


def available(peers) -> tuple[list[str], dict[str, str]]:
    """The peers whose library imports here, and why the others are left out."""
    missing, kept = {}, []
    for peer in peers:
        module = {"usearch-hnsw": "usearch", "milvus-lite": "pymilvus"}.get(peer)
        try:
            if module:
                __import__(module)
            kept.append(peer)
        except ImportError:
            missing[peer] = f"{module} is not installed (pip install terrahash[peers])"
    return kept, missing


def run_peers(real_signs: np.ndarray, n: int, labels: np.ndarray | None = None, n_queries: int = 200, seed: int = 0,
              peers=PEERS, progress: bool = True) -> dict:
    """Both code sets at ``n`` codes of ``real_signs``'s length; the JSON ``terrahash report`` shows."""
    import faiss

    faiss.omp_set_num_threads(1)
    kept, missing = available(peers)
    if n > MILVUS_MAX and "milvus-lite" in kept:
        kept.remove("milvus-lite")
        missing["milvus-lite"] = f"left out above {MILVUS_MAX:,} codes (its Python inserts would take hours)"
    bits = real_signs.shape[1]
    rng = np.random.default_rng(seed)
    rate = within_class_rate(real_signs, labels) / 2 if labels is not None else 0.1
    sets = {"uniform": (np.where(rng.random((n, bits)) < 0.5, 1, -1).astype(np.int8),
                        np.where(rng.random((n_queries, bits)) < 0.5, 1, -1).astype(np.int8)),
            "structured": (structured(real_signs, n, rate, seed + 1), structured(real_signs, n_queries, rate, seed + 2))}
    result = {"sets": {name: bench_set(name, db, q, kept, progress) for name, (db, q) in sets.items()},
              "flip_rate": rate, "threads": 1, "k": K, "missing": missing,
              "note": ("Milvus Lite has no binary vectors: +-1 codes as float32 with inner product (the same ranking); "
                       "faiss multi-hash and usearch have no IVF; recall is tie-aware against exact search")}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--codes", help="a `terrahash train` folder whose train+val image codes seed the structured set "
                                        "(default: random source codes)")
    parser.add_argument("--data", default="../shared/data/ucm_captions", help="its dataset (with --codes)")
    parser.add_argument("--cache-dir", default=".cache/terrahash/features")
    parser.add_argument("--n", type=int, default=1_000_000, help="codes per set (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=64, help="code length without --codes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here (for terrahash report --peers)")
    args = parser.parse_args(argv)
    labels = None
    if args.codes:
        real, labels = run_codes(args.codes, args.data, args.cache_dir)
    else:
        real = np.where(np.random.default_rng(args.seed).random((2000, args.bits)) < 0.5, 1, -1).astype(np.int8)
    result = run_peers(real, args.n, labels, args.queries, args.seed, args.peers)
    print(format_peers(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def run_codes(run: str, data_dir: str, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Sign codes and labels of the train + val images of a trained run."""
    from serving.ingest.dataset import load_dataset
    from training.features import FeatureCache, default_device
    from training.train import DatasetIndex, Encoders, image_codes, load_trained

    device = default_device("cpu")
    model, config, _ = load_trained(run, device)
    index = DatasetIndex.build(load_dataset(data_dir))
    rows = index.database_rows("test")
    codes = image_codes(Encoders(model, config, index, FeatureCache(cache_dir), device))
    return np.where(codes[rows] >= 0, 1, -1).astype(np.int8), index.labels[rows]


def format_peers(result: dict) -> str:
    lines = []
    for name, found in result["sets"].items():
        lines += [f"{name}: {found['size']:,} codes of {found['bits']} bits, {found['queries']} queries",
                  f"{'index':<18}{'recall@10':>10}{'p50 ms':>10}{'p99 ms':>10}{'build s':>10}{'MB':>10}"]
        flat = found["indexes"].get("faiss-flat")
        for peer, f in found["indexes"].items():
            ratio = f"  {f['latency_ms_p50'] / flat['latency_ms_p50']:.2f}x flat's p50" if flat else ""
            lines.append(f"{peer:<18}{f['recall_at_10']:>10.3f}{f['latency_ms_p50']:>10.3f}{f['latency_ms_p99']:>10.3f}"
                         f"{f['build_seconds']:>10.2f}{f['memory_mb']:>10.1f}{ratio}")
    lines += [f"left out: {peer}: {why}" for peer, why in result["missing"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
