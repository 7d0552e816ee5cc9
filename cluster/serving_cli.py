"""``terrahash index build|add|verify`` and ``terrahash serve``: thin layers over serving.build and serving.app.

Nothing heavy is imported until a subcommand runs, and nothing here ever imports torch.
"""
from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrackingConfig  # plain dataclasses (yaml only): no torch


@dataclass
class IndexJob:
    """What one ``terrahash index build|add`` did, logged to MLflow as the run's params."""

    name: str  # the MLflow run name: index-build or index-add
    model: str
    data: str
    out: str
    shards: int | None = None
    factory: str | None = None
    variant: str | None = None
    base: str | None = None
    captions: bool = True
    batch_size: int = 64
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _index_job(args: argparse.Namespace, name: str) -> IndexJob:
    tracking = TrackingConfig(enabled=not args.no_track, tracking_uri=args.tracking_uri or "",
                              system_metrics=False)
    return IndexJob(name=name, model=str(getattr(args, "model", "") or ""), data=args.data, out=args.out,
                    shards=getattr(args, "shards", None), factory=getattr(args, "factory", None),
                    variant=getattr(args, "variant", None), base=getattr(args, "base", None),
                    captions=not args.no_captions, batch_size=args.batch_size, tracking=tracking)


def _tracked(job: IndexJob, work) -> dict:
    """Run ``work()`` (-> manifests) inside an MLflow run with its energy and CO2 (per 1,000 images
    encoded), the index versions as tags and the manifests as an artifact; untracked with --no-track."""
    import tempfile

    from training.data import load_dataset
    from training.tracking import track_run

    if not job.tracking.enabled:
        return work()
    dataset = load_dataset(job.data, check_images=False)
    images = len(dataset.records)
    with tempfile.TemporaryDirectory(prefix="terrahash-index-") as tmp:
        with track_run(job, tmp, dataset, images_processed=images, run_name=job.name,
                       artifacts=("manifests.json",)) as tracker:
            start = time.perf_counter()
            manifests = work()
            tracker.log_metrics({"index_seconds": time.perf_counter() - start, "images_encoded": images,
                                 **{f"{c}_rows": m["rows"] for c, m in manifests.items() if m is not None}})
            tags = {"index.root": job.out, "model_version": manifests["images"]["model_version"],
                    **{f"index.{c}.version": m["version"] for c, m in manifests.items() if m is not None}}
            for name, value in tags.items():
                tracker.client.set_tag(tracker.run_id, name, value)
            (Path(tmp) / "manifests.json").write_text(json.dumps(manifests, indent=2))
    return manifests


def _build(args: argparse.Namespace) -> int:
    from serving.build import build_indexes

    manifests = _tracked(_index_job(args, "index-build"), lambda: build_indexes(
        args.model, args.data, args.shards, args.out, factory=args.factory, variant=args.variant,
        captions=not args.no_captions, batch_size=args.batch_size, address=args.address))
    _print_versions(args.out, manifests)
    return 0


def _add(args: argparse.Namespace) -> int:
    from serving.build import add_images

    manifests = _tracked(_index_job(args, "index-add"), lambda: add_images(
        args.data, args.out, base_version=args.base, captions=not args.no_captions, batch_size=args.batch_size,
        address=args.address))
    _print_versions(args.out, manifests)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from serving.index import latest_version, list_versions, verify_index

    ok = True
    for collection in args.collections:
        if not list_versions(args.index, collection):
            print(f"{collection}: no index versions under {args.index}")
            continue
        report = verify_index(args.index, args.version or latest_version(args.index, collection), collection)
        print(report)
        ok &= report.ok
    return 0 if ok else 1


def _serve(args: argparse.Namespace) -> int:
    from serving.app import ServeSettings, load_settings, run_local

    overrides = {"index": args.index, "model": args.model, "shard_replicas": args.shard_replicas,
                 "shards_per_replica": args.shards_per_replica}
    settings = (load_settings(args.config, **overrides) if args.config
                else ServeSettings.from_dict({k: v for k, v in overrides.items() if v is not None}))
    print(f"serving index {settings.index} on http://{args.host}:{args.port}/v1 (docs at /docs); Ctrl-C stops")
    if not (args.query or args.exit):
        run_local(settings, host=args.host, port=args.port)
        return 0
    from ray import serve

    run_local(settings, host=args.host, port=args.port, blocking=False)
    url = f"http://{args.host}:{args.port}"
    try:
        _wait_ready(url, timeout=args.ready_timeout)
        labels = _dataset_labels(args.data) if args.data else {}
        for query in args.query:
            answer = _post_json(f"{url}/v1/search/text", {"query": query, "k": args.k})
            print(_format_answer(query, answer, labels), flush=True)
        if args.exit:
            return 0
        print("serving until Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()


def _wait_ready(url: str, timeout: float) -> None:
    """Poll /v1/readyz until every shard is loaded (or fail with its last answer)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = err.read().decode(errors="replace")[:300]
        except OSError as err:
            last = str(err)
        time.sleep(1)
    raise RuntimeError(f"the app at {url} is not ready after {timeout:.0f} s: {last}")


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _dataset_labels(data: str) -> dict[str, str]:
    """Image id (path relative to the dataset folder) -> its class, to name what a query found."""
    from training.data import load_dataset

    dataset = load_dataset(data, check_images=False)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    return {Path(r.path).resolve().relative_to(root.resolve()).as_posix(): r.label or "" for r in dataset.records}


def _format_answer(query: str, answer: dict, labels: dict[str, str]) -> str:
    lines = [f"query: {query!r} (model {answer.get('model_version', '?')}, index {answer.get('index_version', '?')}, "
             f"{answer.get('latency_ms', 0):.1f} ms server-side)"]
    for rank, hit in enumerate(answer["results"], 1):
        label = labels.get(hit["image_id"], "")
        lines.append(f"{rank:>3}. {hit['image_id']:<48} distance {hit['distance']:>3}  {label}")
    if labels:
        found = [labels.get(hit["image_id"], "?") for hit in answer["results"]]
        counts = {c: found.count(c) for c in dict.fromkeys(found)}
        lines.append("classes: " + ", ".join(f"{c} x{n}" for c, n in counts.items()))
    return "\n".join(lines)


def _print_versions(out: str, manifests: dict) -> None:
    for collection, manifest in manifests.items():
        if manifest is not None:
            shards = [entry["rows"] for entry in manifest["shards"]]
            print(f"{collection}: version {manifest['version']} in {out}: {manifest['rows']} rows in shards {shards}, "
                  f"model {manifest['model_version']}")


def add_serving_commands(subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``index`` (build, add, verify) and ``serve`` to the ``terrahash`` subcommands."""
    index = subparsers.add_parser("index", help="build, extend and verify sharded search indexes",
                                  description="Index versions of image codes (and caption codes) on an artifact "
                                              "root: a folder or s3://bucket/prefix ($AWS_ENDPOINT_URL for any "
                                              "S3-compatible store).")
    commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    ray_args = argparse.ArgumentParser(add_help=False)
    ray_args.add_argument("--batch-size", type=int, default=64, help="images per Ray task (default: %(default)s)")
    ray_args.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    ray_args.add_argument("--no-captions", action="store_true", help="do not encode the captions into a caption index")
    ray_args.add_argument("--no-track", action="store_true",
                          help="do not log the job to MLflow nor measure its energy (tracking is on by default and "
                               "needs `pip install terrahash[track]`)")
    ray_args.add_argument("--tracking-uri", metavar="URI",
                          help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")

    build = commands.add_parser("build", parents=[common, ray_args], help="encode a dataset and cut N shards",
                                description="Encode every image of --data with the model version's image student "
                                            "(parallel Ray tasks), pack the bits, place each image on a shard by a "
                                            "stable hash of its id, and write shard files, ids and a manifest; the "
                                            "captions become a second index for fusion and image-to-text search.")
    build.add_argument("--model", required=True, metavar="VERSION_OR_DIR",
                       help="folder of exported students (ONNX + spec files), or a run name under runs/ "
                            "whose students/onnx holds them")
    build.add_argument("--shards", type=int, required=True, help="number of shards")
    build.add_argument("--out", required=True, metavar="URI", help="artifact root: a folder or s3://bucket/prefix")
    build.add_argument("--factory", default="BFlat", help="faiss binary index factory string (default: %(default)s)")
    build.add_argument("--variant", default="fp32", choices=("fp32", "int8"), help="which exported students to use")
    build.set_defaults(handler=_build)

    add = commands.add_parser("add", parents=[common, ray_args], help="add new imagery to the latest index version",
                              description="Encode --data's images with the model the index was built with and "
                                          "write a new version; shards that receive nothing keep their files.")
    add.add_argument("--out", required=True, metavar="URI", help="artifact root holding the index")
    add.add_argument("--base", help="version to add to (default: the latest)")
    add.set_defaults(handler=_add)

    verify = commands.add_parser("verify", help="check every shard's checksum and row count",
                                 description="Exit status 1 when any shard does not match its manifest.")
    verify.add_argument("index", metavar="URI", help="artifact root holding the index")
    verify.add_argument("--version", help="version to check (default: the latest of each collection)")
    verify.add_argument("--collections", nargs="+", default=["images", "captions"], help="default: %(default)s")
    verify.set_defaults(handler=_verify)

    serve = subparsers.add_parser("serve", help="run the search service locally (Ray Serve)",
                                  description="Deploy the search app on a local Ray (or $RAY_ADDRESS) and serve "
                                              "HTTP until interrupted. For a cluster, use serving/deploy.yaml "
                                              "with `serve deploy`.")
    serve.add_argument("--index", required=True, metavar="URI", help="artifact root holding the index")
    serve.add_argument("--model", help="model version folder (default: the one the index was built with)")
    serve.add_argument("--config", help="YAML file of serve settings (serving.app.ServeSettings fields)")
    serve.add_argument("--shard-replicas", type=int, help="replicas per shard (default: 2)")
    serve.add_argument("--shards-per-replica", type=int, metavar="N",
                       help="shards held by one shard deployment (default: ceil(shards / nodes), so every shard "
                            "in one deployment on a single machine)")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--query", action="append", default=[], metavar="TEXT",
                       help="once the app is ready, send this text query over HTTP and print the top results "
                            "(repeatable); the app keeps serving afterwards unless --exit")
    serve.add_argument("-k", "--k", type=int, default=10, help="results per --query (default: %(default)s)")
    serve.add_argument("--data", help="dataset folder, to print the class of each result of --query")
    serve.add_argument("--exit", action="store_true", help="stop once the --query answers are printed")
    serve.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for readiness (default: %(default)s)")
    serve.set_defaults(handler=_serve)

