"""Does a bundle answer as the service? The same text and image queries to a running app and to a bundle of
the release it serves, hit by hit.

Text queries: the free-text query set, then the split's distinct captions; image queries: the split's images,
in order (the drift check of both sees the same sequence: start the app fresh, or the drift reports differ). A bundle answers as the service when both use
the same student variant: a default service serves fp32 (serving: ``encoder_variant``), a default bundle
int8 (``terrahash bundle --variant``).

    terrahash serve --index runs/fast_split-64/index   # in another shell
    terrahash bundle --release runs/fast_split-64/index --variant fp32 --with-image-encoder --out ucm-fp32.thb
    python -m evaluation.edge_parity --url http://127.0.0.1:8000 --bundle ucm-fp32.thb
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.request
from pathlib import Path

from evaluation.free_text import load_queries


def post(url: str, data: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{url}: {err.code} {err.read()[:300]!r}") from None


def compare(edge: dict, served: dict, k: int) -> tuple[bool, bool]:
    """(same top-k ids and distances, same hits in every field and the same drift report)."""
    def top(answer):
        return [(h["id"], h["distance"]) for h in answer["results"][:k]]
    return top(edge) == top(served), edge["results"] == served["results"] and edge.get("drift") == served.get("drift")


def run(url: str, bundle: Path, data: str, split: str, n: int, k: int, query_set: str) -> dict:
    from serving.edge.searcher import EdgeSearcher
    from serving.ingest.dataset import load_dataset

    searcher = EdgeSearcher(bundle)
    records = load_dataset(data).split(split)
    captions = list(dict.fromkeys(c for r in records for c in r.captions))
    texts = (load_queries(query_set).texts() + captions)[:n]
    out = {"text": [0, 0, 0], "image": [0, 0, 0], "first_difference": None}
    for text in texts:
        served = post(f"{url}/v1/search/text", json.dumps({"query": text, "k": k}).encode(), "application/json")
        same = compare(searcher.search_text({"query": text, "k": k}), served, k)
        out["text"] = [out["text"][0] + 1, out["text"][1] + same[0], out["text"][2] + same[1]]
        if not same[0] and out["first_difference"] is None:
            out["first_difference"] = {"query": text}
    for record in records[:n]:
        image = record.path.read_bytes()
        kind = mimetypes.guess_type(record.path.name)[0] or "image/jpeg"
        served = post(f"{url}/v1/search/image?k={k}", image, kind)
        same = compare(searcher.search_image(image, {"k": k}), served, k)
        out["image"] = [out["image"][0] + 1, out["image"][1] + same[0], out["image"][2] + same[1]]
        if not same[0] and out["first_difference"] is None:
            out["first_difference"] = {"image": str(record.path)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.edge_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the running app (e.g. http://127.0.0.1:8000)")
    p.add_argument("--bundle", required=True, type=Path, help="a bundle of the release the app serves")
    p.add_argument("--data", default="../shared/data/ucm_captions", help="the dataset the index was built from")
    p.add_argument("--split", default="test", help="whose captions and images are the queries (default: test)")
    p.add_argument("--queries", type=int, default=100, help="text queries, and image queries (default: 100 each)")
    p.add_argument("--k", type=int, default=10, help="results compared per query (default: 10)")
    p.add_argument("--query-set", default="ucm_free_text", help="the free-text queries taken first")
    args = p.parse_args(argv)
    out = run(args.url.rstrip("/"), args.bundle, args.data, args.split, args.queries, args.k, args.query_set)
    for kind in ("text", "image"):
        n, top, whole = out[kind]
        print(f"{kind}: {top}/{n} queries with the same top-{args.k} ids and distances, {whole}/{n} with every hit "
              f"field (and the drift report) equal")
    if out["first_difference"]:
        print(f"first difference: {out['first_difference']}")
    return 0 if all(out[kind][2] == out[kind][0] for kind in ("text", "image")) else 1


if __name__ == "__main__":
    sys.exit(main())
