"""``terrahash index build|add|verify|release`` and ``terrahash serve``: thin layers over serving.ingest.build,
serving.index.versions and serving.app.

Nothing heavy is imported until a subcommand runs, and nothing here ever imports torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrackingConfig  # plain dataclasses (yaml only): no torch

log = logging.getLogger(__name__)


@dataclass
class IndexJob:
    """What one ``terrahash index build|add`` did, logged to MLflow as the run's params."""

    name: str  # the MLflow run name: index-build or index-add
    model: str
    data: str
    out: str
    source_kind: str = "dataset"  # dataset (--data), archive (--images) or stac (--stac)
    shards: int | None = None
    factory: str | None = None
    variant: str | None = None
    base: str | None = None
    captions: bool = True
    batch_size: int = 64
    skip_bad_images: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _index_job(args: argparse.Namespace, name: str) -> IndexJob:
    tracking = TrackingConfig(enabled=not args.no_track, tracking_uri=args.tracking_uri or "",
                              system_metrics=False)
    return IndexJob(name=name, model=str(getattr(args, "model", "") or ""),
                    data=args.stac or args.images or args.data, out=args.out,
                    source_kind="stac" if args.stac else "archive" if args.images else "dataset",
                    shards=getattr(args, "shards", None), factory=getattr(args, "factory", None),
                    variant=getattr(args, "variant", None), base=getattr(args, "base", None),
                    captions=not args.no_captions, batch_size=args.batch_size,
                    skip_bad_images=args.skip_bad_images, tracking=tracking)


def _tracked(job: IndexJob, work) -> dict:
    """Run ``work()`` (-> {"release", "images", "captions"}) inside an MLflow run with its energy and CO2
    (per 1,000 images encoded), the release and index versions as tags and the manifests as an artifact;
    untracked with --no-track."""
    import tempfile

    from serving.ingest.dataset import load_dataset
    from training.tracking import track_run

    if not job.tracking.enabled:
        return work()
    dataset = _tracked_source(job, load_dataset)
    images = len(dataset.records)  # for energy per 1,000 images: files listed (a GeoTIFF scene counts once)
    with tempfile.TemporaryDirectory(prefix="terrahash-index-") as tmp:
        with track_run(job, tmp, dataset, images_processed=images, run_name=job.name,
                       artifacts=("manifests.json",)) as tracker:
            start = time.perf_counter()
            result = work()
            collections = _collections(result)
            tracker.log_metrics({"index_seconds": time.perf_counter() - start,
                                 "images_encoded": result["images"]["rows"],
                                 **{f"{c}_rows": m["rows"] for c, m in collections.items()}})
            tags = {"index.root": job.out, "model_version": result["images"]["model_version"],
                    "index.release": result["release"]["release"],
                    "code_space": result["images"].get("code_space") or "unknown",
                    **{f"index.{c}.version": m["version"] for c, m in collections.items()}}
            for name, value in tags.items():
                tracker.client.set_tag(tracker.run_id, name, value)
            (Path(tmp) / "manifests.json").write_text(json.dumps(result, indent=2))
    return result


@dataclass
class _Listing:
    """What an MLflow run records of an archive that is no dataset (an S3 prefix, a STAC catalog):
    its name, its item count and a fingerprint of its item list."""

    name: str
    records: list
    digest: str

    def fingerprint(self) -> str:
        return self.digest


def _tracked_source(job: IndexJob, load_dataset):
    """What the run's dataset tags name: a dataset (--data), or a local archive that is a class-folder set, by
    its content fingerprint; any other archive (a flat folder of photos or scenes, an S3 prefix) and a STAC
    catalog by a _Listing of its items. Indexing needs no labels, so neither does the run that records it."""
    import hashlib

    from serving.ingest.dataset import DatasetError

    source = job.data
    if job.source_kind == "stac":
        from serving.ingest.stac import read_catalog

        keys = sorted(item.id for item in read_catalog(Path(source)))
    elif source.startswith("s3://"):
        from serving.ingest.archive import list_images

        keys = list_images(source)[1]
    else:
        try:
            return load_dataset(source, check_images=False)
        except DatasetError:
            if job.source_kind != "archive":
                raise
        from serving.ingest.archive import list_images

        keys = list_images(source)[1]
        log.info("%s is no class-folder set: the MLflow run names it by its list of %d image file(s), without "
                 "classes", source, len(keys))
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return _Listing(source.rstrip("/").rsplit("/", 1)[-1], keys, digest)


def _collections(result: dict) -> dict:
    """The collection manifests of a build or add result (not its release)."""
    return {c: result[c] for c in ("images", "captions") if result.get(c) is not None}


def _source(args: argparse.Namespace) -> dict:
    """The build's input: --images or --stac replaces --data; a --sidecar needs --images."""
    if args.sidecar and not args.images:
        raise SystemExit("--sidecar describes an archive: give it with --images DIR_OR_PREFIX")
    if args.images and args.stac:
        raise SystemExit("give --images (a folder or prefix) or --stac (a catalog), not both")
    if args.stac_asset and not args.stac:
        raise SystemExit("--stac-asset names an asset of the items of --stac CATALOG")
    if args.images or args.stac:
        return {"data": None, "images": args.images, "sidecar": args.sidecar, "stac": args.stac,
                "stac_asset": args.stac_asset}
    return {"data": args.data}


def _chips(args: argparse.Namespace):
    """The serving.ingest.geo.ChipConfig of --chip-size, --chip-overlap, --bands and --sensor."""
    from serving.ingest.geo import ChipConfig

    try:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
        return ChipConfig(size=args.chip_size, overlap=args.chip_overlap, bands=bands, sensor=args.sensor)
    except ValueError as err:
        raise SystemExit(f"--chip-size/--chip-overlap/--bands/--sensor: {err}") from None


def _build(args: argparse.Namespace) -> int:
    from serving.ingest.build import build_indexes

    source = _source(args)
    result = _tracked(_index_job(args, "index-build"), lambda: build_indexes(
        args.model, source.pop("data"), args.shards, args.out, factory=args.factory, variant=args.variant,
        captions=not args.no_captions, batch_size=args.batch_size, address=args.address,
        skip_bad_images=args.skip_bad_images, tracking_uri=args.tracking_uri, chips=_chips(args),
        encrypt=args.encrypt, key_file=args.key_file, **source))
    _print_versions(args.out, result)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from serving.index.crypto import write_key_file

    key_id = write_key_file(args.file)
    print(f"wrote a new index key to {args.file} (key id {key_id}, readable by you only); keep it away from the "
          f"index: `terrahash index build --encrypt --key-file {args.file} ...`")
    return 0


def _add(args: argparse.Namespace) -> int:
    from serving.ingest.build import add_images

    source = _source(args)
    result = _tracked(_index_job(args, "index-add"), lambda: add_images(
        source.pop("data"), args.out, base_release=args.base, captions=not args.no_captions,
        batch_size=args.batch_size, address=args.address, skip_bad_images=args.skip_bad_images,
        tracking_uri=args.tracking_uri, chips=_chips(args), key_file=args.key_file, **source))
    _print_versions(args.out, result)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """A release (default: the latest) with both collections; or, with --version, one version of each
    of --collections; or, on a root written before releases, the latest version of each."""
    from serving.index.releases import list_releases, verify_release
    from serving.index.versions import latest_version, list_versions, verify_index

    if args.version is None and (args.release or list_releases(args.index)):
        report = verify_release(args.index, args.release, args.collections, key_file=args.key_file)
        print(report)
        return 0 if report.ok else 1
    if args.version is None:
        print(f"no release under {args.index}: checking the latest version of each collection "
              f"(`terrahash index release {args.index}` publishes them as one)")
    ok, found = True, 0
    for collection in args.collections:
        if not list_versions(args.index, collection):
            print(f"{collection}: no index versions under {args.index}")
            continue
        found += 1
        report = verify_index(args.index, args.version or latest_version(args.index, collection), collection,
                              key_file=args.key_file)
        print(report)
        ok &= report.ok
    if not found:
        print(f"nothing to verify: {args.index} holds no index (`terrahash index build ... --out {args.index}`)")
    return 0 if ok and found else 1


def _release(args: argparse.Namespace) -> int:
    """Publish a release of existing versions (default: the latest complete one of each collection)."""
    from serving.index.releases import publish_release
    from serving.index.versions import latest_version, list_versions, read_manifest

    manifests = {"images": read_manifest(args.index, args.images or latest_version(args.index, "images"), "images")}
    if args.captions != "none" and (args.captions or list_versions(args.index, "captions")):
        captions = args.captions or latest_version(args.index, "captions")
        manifests["captions"] = read_manifest(args.index, captions, "captions")
    release = publish_release(args.index, manifests)
    print(_release_line(args.index, release))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serving.app import ServeSettings, load_settings

    if args.labels_data is not None and not Path(args.labels_data).exists():
        raise FileNotFoundError(f"dataset {args.labels_data!r} (--data) not found")
    overrides = {"index": args.index, "model": args.model, "release": args.release,
                 "shard_replicas": args.shard_replicas, "shards_per_replica": args.shards_per_replica}
    settings = (load_settings(args.config, **overrides) if args.config
                else ServeSettings.from_dict({k: v for k, v in overrides.items() if v is not None}))
    arms = settings.arm_list()  # checks that every arm has an index
    if not args.render:
        settings = settings.with_absolute_paths()
    if args.render:
        import yaml

        from serving.runtime.serve_config import serve_config

        text = yaml.safe_dump(serve_config(settings, host=args.host, port=args.port,
                                           proxy_location=args.proxy_location), sort_keys=False)
        Path(args.render).write_text(_RENDER_HEADER + text)
        print(f"wrote the Serve config of {len(arms)} arm(s) to {args.render}: `serve deploy {args.render}`")
        return 0
    import ray

    from serving.app import check_arms, deploy_local

    check_arms(settings)
    where = settings.index or ", ".join(f"{a.name}: {a.index}" for a in arms)
    scheme = "https" if settings.tls else "http"
    print(f"serving {where} on {scheme}://{args.host}:{args.port}/v1 (docs at /docs); Ctrl-C stops", flush=True)
    if not settings.auth.enabled:
        print("auth is off: anyone who reaches this port can search (settings auth: {enabled: true, keys: FILE}; "
              "README: Security and governance)", file=sys.stderr, flush=True)
    previous = _stop_on_sigterm()
    started_ray = not ray.is_initialized()
    try:
        deploy_local(settings, host=args.host, port=args.port)
    except KeyboardInterrupt:
        _shut_down(started_ray, previous)
        return 0
    _stop_on_sigterm()  # again: starting Ray may have put its own handler in place
    url = f"{scheme}://{args.host}:{args.port}{settings.route_prefix.rstrip('/')}"
    client = _Client(settings)
    try:
        _wait_ready(url, timeout=args.ready_timeout, client=client)
        if args.query:
            labels = _labels(settings, args.labels_data)
            where = {k: v for k, v in (("bbox", args.bbox), ("datetime", args.datetime)) if v}
            for query in args.query:
                answer = _post_json(f"{url}/v1/search/text", {"query": query, "k": args.k, **where}, client)
                print(_format_answer(query, answer, labels), flush=True)
        if args.exit:
            return 0
        print("serving until Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        _shut_down(started_ray, previous)


def _stop_on_sigterm():
    """SIGTERM (what systemd and Kubernetes send) stops serving as Ctrl-C does; the handler it replaces."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def _shut_down(started_ray: bool, sigterm_handler) -> None:
    """Serve's replicas finish their requests in flight and stop; the Ray this command started stops with
    every process it ran (dashboard and agents included). Signals meanwhile are ignored; then the SIGTERM
    handler before the command is back."""
    import signal

    import ray
    from ray import serve

    sigint_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        print("stopping: answering the requests in flight, then shutting Serve and Ray down", file=sys.stderr,
              flush=True)
        if ray.is_initialized():
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, sigint_handler)
        signal.signal(signal.SIGTERM, sigterm_handler)


_RENDER_HEADER = """# Serve config written by `terrahash serve --render` from the serve settings (serving/runtime/settings.py).
# Applications: the router's (Router + Canary), one per index release, one per model version. The split
# is the Router's and Canary's user_config "traffic": `terrahash traffic set` changes it in place; the
# access settings (auth, the policy read from its file, rate limits) are the Router's "access":
# `terrahash policy apply FILE` changes the policy in place.
"""


class _Client:
    """How this command talks to the app it started: trusting its own certificate (a self-signed one too),
    with $TERRAHASH_API_KEY as bearer token when auth is on."""

    def __init__(self, settings=None):
        import os
        import ssl

        self.context = None
        if settings is not None and settings.tls:
            self.context = ssl.create_default_context()
            self.context.load_verify_locations(settings.tls.certfile)
        key = os.environ.get("TERRAHASH_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def open(self, request, timeout: float):
        return urllib.request.urlopen(request, timeout=timeout, context=self.context)


def _wait_ready(url: str, timeout: float, client: _Client | None = None) -> None:
    """Poll /v1/readyz until every shard is loaded (or fail with its last answer)."""
    client = client or _Client()
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with client.open(f"{url}/v1/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = err.read().decode(errors="replace")[:300]
        except OSError as err:
            last = str(err)
        time.sleep(1)
    raise RuntimeError(f"the app at {url} is not ready after {timeout:.0f} s: {last}")


def _post_json(url: str, payload: dict, client: _Client | None = None) -> dict:
    client = client or _Client()
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json", **client.headers})
    try:
        with client.open(request, timeout=60) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:  # the app's JSON error: say what it says
        try:
            error = json.loads(err.read())["error"]
        except (ValueError, KeyError):
            raise err from None
        raise SystemExit(f"the app refused the query ({err.code} {error['code']}): {error['message']}") from None


def _labels(settings, data: str | None) -> dict[str, str]:
    """Image id -> class, to name what a --query found: from ``data`` (--data), else from the dataset the
    served image index was built from when it is still there; {} when neither is readable."""
    from serving.index.releases import resolve_release

    if data is None:
        arm = settings.arm_list()[0]
        served = resolve_release(arm.index, arm.release, image_version=settings.image_version)
        data = served["images"].get("extra", {}).get("dataset")
        if not data or not Path(data).exists():
            return {}
    try:
        return _dataset_labels(data)
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger(__name__).warning("no classes for the answers: %s", err)
        return {}


def _dataset_labels(data: str) -> dict[str, str]:
    """Image id (as the index build makes it, serving.ingest.items.dataset_items) -> its class."""
    from serving.ingest.items import dataset_items

    items = dataset_items(data)
    return dict(zip(items.image_ids, items.labels))


def _format_answer(query: str, answer: dict, labels: dict[str, str]) -> str:
    lines = [f"query: {query!r} (arm {answer.get('arm', '?')}: model {answer.get('model_version', '?')}, "
             f"index {answer.get('index_version', '?')}, "
             f"{answer.get('latency_ms', 0):.1f} ms server-side)"]
    def label(hit):  # the class the index keeps, else the dataset's
        return hit.get("properties", {}).get("class") or labels.get(hit["image_id"], "")

    for rank, hit in enumerate(answer["results"], 1):
        when = hit.get("datetime") or hit.get("start_datetime") or ""
        lines.append(f"{rank:>3}. {hit['image_id']:<48} distance {hit['distance']:>3}  {label(hit)}  {when}".rstrip())
    if not answer["results"]:
        lines.append("  (no results)")
    if any(label(hit) for hit in answer["results"]):
        found = [label(hit) or "?" for hit in answer["results"]]
        counts = {c: found.count(c) for c in dict.fromkeys(found)}
        lines.append("classes: " + ", ".join(f"{c} x{n}" for c, n in counts.items()))
    return "\n".join(lines)


def _print_versions(out: str, result: dict) -> None:
    for collection, manifest in _collections(result).items():
        shards = [entry["rows"] for entry in manifest["shards"]]
        print(f"{collection}: version {manifest['version']} in {out}: {manifest['rows']} rows in shards {shards}, "
              f"model {manifest['model_version']}")
        if manifest.get("extra", {}).get("skipped_images"):
            print(f"{collection}: left out {manifest['extra']['skipped_images']} image(s) that cannot be read or "
                  f"decoded, listed in the manifest's extra.skipped_listed; the first:")
            for path, reason in manifest["extra"]["skipped_listed"][:5]:
                print(f"  {path}: {reason}")
    print(_release_line(out, result["release"]))


def _release_line(out: str, release: dict) -> str:
    versions = ", ".join(f"{c} {e['version']}" for c, e in sorted(release["collections"].items()))
    return (f"release {release['release']} in {out}: {versions} (model {release['model_version']}, "
            f"code space {release.get('code_space') or 'unknown'})")


logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX2 probe says INFO lines on every start


def add_serving_commands(subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``index`` (build, add, verify, release) and ``serve`` to the ``terrahash`` subcommands.

    Of ``common`` only the default of --data is used: the feature cache, device and the training
    options do not apply to index builds (ONNX students on onnxruntime's CPU provider).
    """
    index = subparsers.add_parser("index", help="build, extend and verify sharded search indexes",
                                  description="Index versions of image codes (and caption codes) on an artifact "
                                              "root: a folder or s3://bucket/prefix ($AWS_ENDPOINT_URL for any "
                                              "S3-compatible store with conditional writes). Every build or add "
                                              "publishes one release (index/releases/rNNNN.json) naming the image "
                                              "and caption versions served together.")
    commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    data_args = argparse.ArgumentParser(add_help=False)
    data_args.add_argument("--data", default=common.get_default("data"),
                           help="dataset folder holding one Karpathy-style dataset*.json (default: %(default)s, "
                                "or $TERRAHASH_DATA)")
    data_args.add_argument("--images", metavar="DIR_OR_PREFIX",
                           help="index an archive instead of --data: a folder tree or s3://bucket/prefix of JPEG, "
                                "PNG and TIFF files, no JSON needed (ids are paths relative to it; unreadable files "
                                "are left out and reported)")
    data_args.add_argument("--sidecar", metavar="FILE",
                           help="with --images: a CSV or JSON of per-image classes, captions and metadata by id "
                                "(see serving/ingest/archive.py)")
    data_args.add_argument("--stac", metavar="CATALOG",
                           help="index a static STAC catalog, collection or item collection (JSON file) instead of "
                                "--data: each item's image asset, with its bbox, datetime and properties")
    data_args.add_argument("--stac-asset", metavar="KEY",
                           help="with --stac: the asset to index (default: the first image asset whose roles "
                                "include visual, then data)")
    data_args.add_argument("--chip-size", type=int, default=256, metavar="PX",
                           help="with --images: GeoTIFF scenes are cut into chips of this side (default: %(default)s)")
    data_args.add_argument("--chip-overlap", type=int, default=0, metavar="PX",
                           help="pixels neighbouring chips share (default: %(default)s)")
    data_args.add_argument("--bands", metavar="R,G,B",
                           help="1-based bands of a scene read as red, green, blue (default: the --sensor's, else "
                                "1,2,3; band 1 for a single-band scene)")
    data_args.add_argument("--sensor", choices=("rgb", "sentinel2"),
                           help="band preset: rgb = 1,2,3; sentinel2 = B4,B3,B2 of a 13-band stack")
    data_args.add_argument("--skip-bad-images", action="store_true",
                           help="leave out images that cannot be decoded or are missing (counted, logged and "
                                "listed in the image manifest) instead of stopping")

    ray_args = argparse.ArgumentParser(add_help=False)
    ray_args.add_argument("--batch-size", type=int, default=64, help="images per Ray task (default: %(default)s)")
    ray_args.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    ray_args.add_argument("--no-captions", action="store_true", help="do not encode the captions into a caption index")
    ray_args.add_argument("--no-track", action="store_true",
                          help="do not log the job to MLflow nor measure its energy (tracking is on by default and "
                               "needs `pip install terrahash[track]`)")
    ray_args.add_argument("--tracking-uri", metavar="URI",
                          help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    key_args = argparse.ArgumentParser(add_help=False)
    key_args.add_argument("--key-file", metavar="FILE",
                          help="the key of an index encrypted at rest (default: $TERRAHASH_INDEX_KEY, else "
                               "$TERRAHASH_INDEX_KEY_FILE); never kept beside the index")

    build = commands.add_parser("build", parents=[data_args, ray_args, key_args], help="encode a dataset and cut N shards",
                                description="Encode every image of --data with the model version's image student "
                                            "(parallel Ray tasks), pack the bits, place each image on a shard by a "
                                            "stable hash of its id, and write shard files, ids and a manifest; the "
                                            "captions become a second index for fusion and image-to-text search; "
                                            "then publish a release naming both.")
    build.add_argument("--model", required=True, metavar="MODEL",
                       help="models:/NAME/VERSION or models:/NAME@ALIAS (fetched from the MLflow registry; the "
                            "release records the version), a folder of exported students (ONNX + spec files), "
                            "or a run name under runs/ whose students/onnx holds them")
    build.add_argument("--shards", type=int, required=True, help="number of shards")
    build.add_argument("--out", required=True, metavar="URI", help="artifact root: a folder or s3://bucket/prefix")
    build.add_argument("--factory", default="BFlat", help="faiss binary index factory string (default: %(default)s)")
    build.add_argument("--variant", default="fp32", choices=("fp32", "int8"), help="which exported students to use")
    build.add_argument("--encrypt", action="store_true",
                       help="encrypt the shard files at rest (AES-256-GCM) with the key of --key-file or the "
                            "environment; the manifests' checksums cover the ciphertext")
    build.set_defaults(handler=_build)

    add = commands.add_parser("add", parents=[data_args, ray_args, key_args], help="add new imagery to the latest release",
                              description="Encode --data's images (and captions) with the model the index was built "
                                          "with, write new versions of the release's image and caption indexes "
                                          "(shards that receive nothing keep their files) and publish a new release. "
                                          "The new images are referenced from --data's own folder.")
    add.add_argument("--out", required=True, metavar="URI", help="artifact root holding the index")
    add.add_argument("--base", metavar="RELEASE", help="release to add to, e.g. r0002 (default: the latest; "
                                                        "concurrent adds to the latest each land in it)")
    add.set_defaults(handler=_add)

    verify = commands.add_parser("verify", parents=[key_args], help="check a release: every shard's checksum and row count",
                                 description="Check the latest release (or --release): its file, the sha256 of each "
                                             "manifest it names, and every shard of both collections. Exit status 1 "
                                             "when anything does not match.")
    verify.add_argument("index", metavar="URI", help="artifact root holding the index")
    verify.add_argument("--release", help="release to check (default: the latest)")
    verify.add_argument("--version", help="check this version of each of --collections instead of a release")
    verify.add_argument("--collections", nargs="+", default=["images", "captions"],
                        help="collections to check (default: %(default)s)")
    verify.set_defaults(handler=_verify)

    release = commands.add_parser("release", help="publish a release of existing index versions",
                                  description="Name an image version (and caption version) as one release, for a "
                                              "root written before releases existed or to serve older versions "
                                              "again. Default: the latest complete version of each collection.")
    release.add_argument("index", metavar="URI", help="artifact root holding the index")
    release.add_argument("--images", metavar="VERSION", help="image index version (default: the latest)")
    release.add_argument("--captions", metavar="VERSION",
                         help="caption index version, or 'none' (default: the latest, if any)")
    release.set_defaults(handler=_release)

    keygen = commands.add_parser("keygen", help="write a new key for encrypting indexes at rest",
                                 description="Write 32 random bytes, base64, to a new file readable by its owner "
                                             "only. Give it to `index build --encrypt --key-file FILE`, and to "
                                             "serving as index_key_file (a copy on every node holding shards).")
    keygen.add_argument("file", metavar="FILE", help="the key file to create (it must not exist)")
    keygen.set_defaults(handler=_keygen)

    serve = subparsers.add_parser("serve", help="run the search service locally (Ray Serve)",
                                  description="Deploy the search app on a local Ray (or $RAY_ADDRESS) from its Serve "
                                              "config and serve HTTP until interrupted. With `arms` in --config, "
                                              "each arm is a model version and an index release with a share of "
                                              "traffic (then --index is not needed); `terrahash traffic` changes the "
                                              "split live. For a cluster, --render writes the Serve config for "
                                              "`serve deploy`.")
    serve.add_argument("--index", metavar="URI", help="artifact root holding the index (not needed with arms)")
    serve.add_argument("--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a folder (default: the model "
                                       "the index release was built with)")
    serve.add_argument("--release", help="index release to serve (default: the latest)")
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
    serve.add_argument("--bbox", nargs=4, type=float, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                       help="only --query results whose footprint intersects this WGS84 box (degrees)")
    serve.add_argument("--datetime", metavar="TIME",
                       help="only --query results acquired at this RFC 3339 instant, date or interval A/B (.. open)")
    # Its own dest: `terrahash` checks that a command's --data exists, and this one is optional.
    serve.add_argument("--data", dest="labels_data", metavar="DIR",
                       help="dataset folder, to print the class of each result of --query (default: the dataset "
                            "the index was built from, if it is still there)")
    serve.add_argument("--exit", action="store_true", help="stop once the --query answers are printed")
    serve.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                       help="with --render: HTTP proxies on every node, or on the head only (several nodes on one "
                            "machine share one port; default: %(default)s)")
    serve.add_argument("--render", metavar="FILE",
                       help="write the Serve config of these settings (every application) to FILE and exit")
    serve.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for readiness (default: %(default)s)")
    serve.set_defaults(handler=_serve)

    from cluster.cli.traffic import add_traffic_commands

    add_traffic_commands(subparsers)

