"""``terrahash-edge``: search a bundle offline, from the command line or as a local HTTP server.

    terrahash-edge ucm.thb --query "flooded fields near a river" --k 10
    terrahash-edge ucm.thb --image scene.jpg --bbox 5.9,45.8,10.5,47.8 --json
    terrahash-edge ucm.thb --serve --port 8000
    terrahash-edge ucm.thb --info

Needs only ``pip install 'terrahash[edge]'`` (numpy, onnxruntime, tokenizers): no Ray, torch, faiss,
FastAPI or MLflow is imported. Bundles are written by ``terrahash bundle``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from serving.runtime.checks import FUSION_RULES, RERANK_MODES, ApiError

from .container import BundleError
from .searcher import EdgeSearcher


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="terrahash-edge", description="Search a TerraHash bundle offline: text or image queries against the "
        "release's codes, answered as the service answers (same ids, distances and order).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("bundle", type=Path, help="the bundle file (`terrahash bundle --release ... --out FILE`)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", help="a text query")
    what.add_argument("--image", type=Path, help="an image file to search by (needs a bundle written "
                                                 "--with-image-encoder)")
    what.add_argument("--serve", action="store_true", help="answer /v1/search/text and /v1/search/image over HTTP")
    what.add_argument("--info", action="store_true", help="print what the bundle holds and exit")
    p.add_argument("--k", type=int, default=None, help="results wanted (default 10, at most 100)")
    p.add_argument("--bbox", help="W,S,E,N in WGS84 degrees: only items whose footprint intersects it")
    p.add_argument("--datetime", help="an RFC 3339 instant, a date, or an interval A/B ('..' for an open end)")
    p.add_argument("--rerank", choices=RERANK_MODES, default=None, help="re-ranking (default none)")
    p.add_argument("--fusion", choices=FUSION_RULES, default=None, help="how fusion combines scores")
    p.add_argument("--json", action="store_true", help="print the answer as the service's JSON")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="with --serve: the port (0: any free one)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per query (default 1)")
    p.add_argument("--key-file", help="the index key of an encrypted bundle (or $TERRAHASH_INDEX_KEY[_FILE])")
    p.add_argument("--code-space", help="refuse the bundle unless its codes are of this code space (sha256:...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("TERRAHASH_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    try:
        searcher = EdgeSearcher(args.bundle, key_file=args.key_file, threads=args.threads, code_space=args.code_space)
    except BundleError as err:
        print(f"terrahash-edge: {err}", file=sys.stderr)
        return 2
    if args.info:
        print(json.dumps(searcher.describe(), indent=2))
        return 0
    if args.serve:
        return _serve(searcher, args.host, args.port)
    params = {"k": args.k, "rerank": args.rerank, "fusion": args.fusion, "bbox": args.bbox, "datetime": args.datetime}
    try:
        if args.query is not None:
            answer = searcher.search_text({"query": args.query, **params})
        else:
            answer = searcher.search_image(_read(args.image), params)
    except ApiError as err:
        print(f"terrahash-edge: {err.message} ({err.code})", file=sys.stderr)
        return 2
    try:
        print(json.dumps(answer, indent=2) if args.json else _table(answer), flush=True)
    except BrokenPipeError:  # piped into head, which has read enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ApiError(422, "invalid_image", f"cannot read {path}: {err.strerror}") from None


def _table(answer: dict) -> str:
    """One line per hit: rank, distance, score, id, class, footprint or time when known."""
    lines = [f"{'#':>3}  {'dist':>4}  {'score':>6}  id"]
    for i, hit in enumerate(answer["results"], 1):
        distance = "-" if hit.get("distance") is None else hit["distance"]
        extra = [f"class={hit['properties']['class']}"] if "class" in (hit.get("properties") or {}) else []
        if "bbox" in hit:
            extra.append("bbox=" + ",".join(f"{v:.4f}" for v in hit["bbox"]))
        if "datetime" in hit:
            extra.append(hit["datetime"])
        lines.append(f"{i:>3}  {distance:>4}  {hit['score']:>6.3f}  {hit['id']}  {' '.join(extra)}".rstrip())
    lines.append(f"{len(answer['results'])} results in {answer['latency_ms']:.1f} ms (release {answer['release']}, "
                 f"model {answer['model_version']})")
    return "\n".join(lines)


def _serve(searcher: EdgeSearcher, host: str, port: int) -> int:
    from .http import make_server

    try:
        server = make_server(searcher, host, port)
    except OSError as err:
        print(f"terrahash-edge: cannot listen on {host}:{port}: {err.strerror}", file=sys.stderr)
        return 2
    address, bound = server.server_address[:2]
    print(f"terrahash-edge: serving {searcher.container.path.name} on http://{address}:{bound} (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
