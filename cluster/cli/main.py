"""The ``terrahash`` command: one subcommand per job, each a thin layer over a library function.

Heavy imports (torch, transformers) happen inside the subcommand that needs them, so
``terrahash --help`` is instant and serving commands never load torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

from cluster.cli.cluster import add_cluster_commands
from cluster.cli.edge import add_edge_commands
from cluster.cli.governance import add_governance_commands
from cluster.cli.jobs import add_job_commands
from cluster.cli.jscc import add_jscc_commands
from cluster.cli.lifecycle import add_lifecycle_commands
from cluster.cli.serving import add_serving_commands

DEFAULT_DATA = os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions")
DEFAULT_CACHE = os.environ.get("TERRAHASH_CACHE", ".cache/terrahash/features")


def _train(args: argparse.Namespace) -> int:
    from evaluation.evaluate import run_eval
    from training.config import check, load_config, set_bits
    from training.jobs import run_training

    config = load_config(args.config)
    if args.schedule is not None:
        config.train.schedule = args.schedule
    if args.bits is not None:
        set_bits(config, args.bits)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.seed is not None:
        config.train.seed = args.seed
    if args.device is not None:
        config.train.device = args.device
    if args.no_track:
        config.tracking.enabled = False
    if args.tracking_uri is not None:
        config.tracking.tracking_uri = args.tracking_uri
    out = args.out or f"runs/{config.name}-{config.train.bits}"
    cache_dir = None if args.no_cache else args.cache_dir
    d = config.distributed
    for name in ("workers", "cpus_per_worker", "address", "storage", "max_failures"):
        value = getattr(args, name)
        if value is not None:
            setattr(d, "num_workers" if name == "workers" else name, value)
    if args.device is not None:
        d.use_gpu = args.device == "cuda"
    check(config)  # the flags are held to the config's types and ranges, like the file
    eval_split = None if args.eval_split == "none" else args.eval_split
    from serving.storage import output_folder

    with output_folder(out) as folder:  # s3://: staged here, uploaded once the run has succeeded
        metrics = run_training(config, args.data, folder, cache_dir=cache_dir, skip_bad_images=args.skip_bad_images,
                               eval_split=eval_split, evaluate=run_eval)
    print(f"trained {config.name} at {config.train.bits} bits ({config.train.schedule} schedule) in "
          f"{metrics['train_seconds']} s; best val epoch {metrics['best_epoch']}; checkpoint in {out}")
    if metrics["mlflow_run_id"]:
        print(f"MLflow run {metrics['mlflow_run_id']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from evaluation.evaluate import run_eval

    run_eval(args.model, args.data, args.split, args.json, cache_dir=None if args.no_cache else args.cache_dir,
             device=args.device or "auto", skip_bad_images=args.skip_bad_images, queries=args.queries)
    return 0


def _paragraphs(*texts: str) -> str:
    """A --help description of several paragraphs (with RawDescriptionHelpFormatter)."""
    return "\n\n".join(textwrap.fill(text, 100) for text in texts)


def _distill(args: argparse.Namespace) -> int:
    from training.config import check
    from training.distill_job import load_config_for_cli, run_distillation

    config = load_config_for_cli(args.config)
    if args.workers is not None:
        config.distributed.num_workers = args.workers
    if args.device is not None:
        config.device = args.device
        config.distributed.use_gpu = args.device == "cuda"
    if args.no_track:
        config.tracking.enabled = False
    if args.tracking_uri is not None:
        config.tracking.tracking_uri = args.tracking_uri
    check(config, "distill")
    if args.out is None and str(args.teacher).startswith("runs:/"):
        raise ValueError("give --out for a runs:/ teacher (its default, TEACHER/students, is a folder or s3:// path)")
    out = args.out or f"{str(args.teacher).rstrip('/')}/students"
    from serving.storage import output_folder

    with output_folder(out) as folder:
        metrics = run_distillation(args.teacher, config, args.data, folder,
                                   cache_dir=None if args.no_cache else args.cache_dir)
    ratios = metrics["parity"]["map_ratio"]
    print(f"students in {out}/onnx; test mAP of the fp32 students relative to the teacher: "
          f"image-to-image {ratios['fp32']['image_to_image']:.4f}, text-to-image {ratios['fp32']['text_to_image']:.4f}")
    if metrics.get("registered"):
        print(f"registered {metrics['registered']['name']} version {metrics['registered']['version']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from evaluation.report import write_report

    report = write_report(args.models, args.data, args.out, peers=args.peers,
                          cache_dir=None if args.no_cache else args.cache_dir, device=args.device or "auto",
                          peer_codes=args.peer_codes, links=args.links)
    front = ", ".join(report["pareto"]["front"])
    print(f"wrote {Path(args.out) / 'report.html'} and report.json ({len(report['code_length']['order'])} models); "
          f"Pareto front: {front}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from evaluation.summary import summarize

    print(summarize(args.reports))
    return 0


def _dataset_options(data_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Parent parsers of the options of commands that read a dataset: (--data, --cache-dir,
    --no-cache, --device; the same with --skip-bad-images), --data helped by ``data_help``."""
    data_options = argparse.ArgumentParser(add_help=False)
    data_options.add_argument("--data", default=DEFAULT_DATA, help=data_help)
    data_options.add_argument("--cache-dir", default=DEFAULT_CACHE,
                              help="where features of frozen encoders are cached (default: %(default)s, "
                                   "or $TERRAHASH_CACHE)")
    data_options.add_argument("--no-cache", action="store_true", help="recompute features instead of caching them")
    data_options.add_argument("--device", choices=("auto", "cpu", "cuda"),
                              help="compute device (default: the config's, auto)")
    common = argparse.ArgumentParser(add_help=False, parents=[data_options])
    common.add_argument("--skip-bad-images", action="store_true",
                        help="leave out missing or undecodable images (counted, logged and listed in the output) "
                             "instead of stopping")
    return data_options, common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="terrahash",
        description="Binary hash codes for remote sensing images and text: train, evaluate, search.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Options of every command that reads the dataset; `common` adds --skip-bad-images to them.
    # distill has no --skip-bad-images: the teacher's codes and the parity report are of the
    # teacher's whole dataset, so a bad image there stops it.
    data_options, common = _dataset_options("dataset folder holding one Karpathy-style dataset*.json (default: "
                                            "%(default)s, or $TERRAHASH_DATA)")
    # eval reads class-folder sets too (serving.ingest.dataset); its --data says so.
    _, eval_options = _dataset_options(
        "labelled dataset folder, in one of two layouts: a Karpathy-style dataset*.json (captions, classes, "
        "splits optional), or, when the folder holds no dataset*.json, one subfolder per class with its images "
        "(DIR/<class>/*.jpg|png|tif at any depth, as RSSCN7, AID or UC Merced's own release come; image-only, no "
        "splits, so evaluated leave-one-out), such as a set written by `python -m evaluation.transfer_set` "
        "(default: %(default)s, or $TERRAHASH_DATA)")

    train = sub.add_parser("train", parents=[common], help="train the image and text hashing towers",
                           description="Train the asymmetric hashing model, in one process (CPU or one GPU) or "
                                       "as Ray Train jobs. The checkpoint is chosen on the val split, then evaluated "
                                       "on --eval-split; writes checkpoint.pt, config.yaml, metrics.json and "
                                       "eval_<split>.json to --out, and logs it all to MLflow (one parent run, child "
                                       "runs per job and for the evaluation) with energy and CO2.")
    train.add_argument("--config", required=True,
                       help="YAML config file, or a shipped config name: fast_split (the default of the demo: "
                            "frozen backbones, a code with class and instance bits, minutes on a CPU), fast "
                            "(class codes only), fast_instance, or full (fine-tuned backbones, for a GPU)")
    train.add_argument("--out", help="output folder, or s3://bucket/prefix/NAME in the artifact root (written once the "
                                     "run has succeeded; $AWS_ENDPOINT_URL for an S3-compatible store); default: "
                                     "runs/<config>-<bits>")
    train.add_argument("--bits", type=int, help="code length, overriding the config (a multiple of 8 from 8 to 1024; "
                       "a split code keeps its share of instance bits)")
    train.add_argument("--epochs", type=int, help="number of epochs, overriding the config")
    train.add_argument("--seed", type=int, help="random seed, overriding the config")
    train.add_argument("--schedule", choices=("joint", "sync", "async"),
                       help="how the towers train (default: the config's, joint): joint = one job updates both at "
                            "every step; sync = an image job, then a text job against its final codes; async = both "
                            "jobs at once on Ray Train, the text job learning against the newest snapshot of the "
                            "image job's codes and proxies")
    train.add_argument("--eval-split", default="test", choices=("train", "val", "test", "none"),
                       help="split the chosen checkpoint is evaluated on at the end (reported only, never used to "
                            "choose; default: %(default)s)")
    train.add_argument("--no-track", action="store_true",
                       help="do not log the run to MLflow nor measure its energy (tracking is on by default "
                            "and needs `pip install terrahash[track]`)")
    train.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow tracking URI, overriding the config: a server (http://host:5000) or a database "
                            "(sqlite:///path.db). Default: the config's, else $MLFLOW_TRACKING_URI, else ./mlruns.db "
                            "with artifacts in ./mlartifacts/")
    ray_options = train.add_argument_group("Ray Train (data-parallel workers, DDP)")
    ray_options.add_argument("--workers", type=int, default=None,
                             help="run as a Ray Train job on N workers, each training on its shard of the data "
                                  "(default: the config's distributed.num_workers; 0 is one plain process)")
    ray_options.add_argument("--cpus-per-worker", type=float, default=None,
                             help="CPUs reserved per worker (default: the config's, 1)")
    ray_options.add_argument("--address", default=None,
                             help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray locally)")
    ray_options.add_argument("--storage", default=None,
                             help="where Ray Train persists reported checkpoints: a folder or s3://bucket/prefix "
                                  "($AWS_ENDPOINT_URL for an S3-compatible endpoint; default: ~/ray_results)")
    ray_options.add_argument("--max-failures", type=int, default=None,
                             help="worker failures to survive: the worker group is restarted and resumes from the last "
                                  "reported checkpoint (default: the config's, 0)")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser(
        "eval", parents=[eval_options],
        help="retrieval figures of a trained model, on its dataset or another labelled one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Retrieval figures of a trained model on a split of any labelled dataset: a Karpathy-style "
            "dataset*.json, or a folder of class folders (DIR/<class>/*.jpg|png|tif, no JSON; see --data).",
            "Queries are the split's images and captions; the database is train + val for test, train only for val "
            "(as checkpoint selection ranks it), val + test for train. Class relevance (mAP@all, mAP@50, P@10) uses "
            "the evaluated dataset's own classes, so a model can be measured on another dataset than its training "
            "one: the report then says \"transfer\": true and the table's title names both. A dataset without a "
            "split field, or whose split or database is empty, is evaluated leave-one-out: every image a query "
            "against all the others (never itself). Image-only sets (no captions) give the image-to-image figures "
            "only.",
            "R@1/5/10 and mR: instance retrieval on the split alone. Identical captions get identical codes, so "
            "duplicate captions cap text-to-image R@K whatever the model; the table's footnote gives that ceiling "
            "for the queried captions (UCM-Captions test: R@1 about 38, R@5 about 85).",
            "Every figure comes three ways: binary (Hamming on sign codes, the JSON's top level), asymmetric (the "
            "continuous query code scored by inner product against every binary database code, the whole database "
            "ranked: JSON key \"asymmetric\") and float (cosine on continuous codes: \"float\"). Prints the "
            "table; --json writes the report.",
            "A shifted copy of a split, as another sensor and scale would see it (zoom, arbitrary rotation, colour, "
            "blur or JPEG, another size), is written in the class-folder layout by `python -m evaluation.transfer_set "
            "--data DIR --split test --out OUT` and evaluated with --data OUT (evaluation/README.md)."))
    evaluate.add_argument("--model", required=True, help="folder written by `terrahash train`")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="query split (default: test)")
    evaluate.add_argument("--json", help="write the figures to this JSON file")
    evaluate.add_argument("--queries", metavar="FILE", default=None,
                          help="also evaluate a labelled free-text query set: a JSON file (format in "
                               "evaluation/queries/README.md) or a shipped set's name, such as ucm_free_text (105 "
                               "queries for UCM-Captions). Text-to-image against the same database by class "
                               "relevance, binary, asymmetric and float, with the mAP of each class; JSON key "
                               "\"free_text\" (default: none)")
    evaluate.set_defaults(handler=_eval)

    distill = sub.add_parser("distill", parents=[data_options], help="distil a teacher into compact ONNX students",
                             description="Train compact students (a small timm image network, a shallower copy of the "
                                         "teacher's text encoder) to reproduce a trained teacher's codes, from images "
                                         "and captions without labels; choose them on val; export them to ONNX (fp32 "
                                         "and int8) with their spec files; check their bits and mAP against the torch "
                                         "students and the teacher on the test split; log and register them in MLflow.")
    distill.add_argument("--teacher", required=True,
                         help="a `terrahash train` output: its folder, its s3:// URI, or runs:/<MLflow run id> of a "
                              "tracked training run")
    distill.add_argument("--config", default="default",
                         help="distillation YAML file, or a shipped config name (default: %(default)s)")
    distill.add_argument("--out", help="output folder or s3:// URI (default: TEACHER/students)")
    distill.add_argument("--workers", type=int, default=None,
                         help="train the students as a Ray Train job on N workers (default: the config's, 0: one process)")
    distill.add_argument("--no-track", action="store_true", help="do not log to MLflow nor register the students")
    distill.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI, overriding the config")
    distill.set_defaults(handler=_distill)

    report = sub.add_parser(
        "report", parents=[data_options], help="one HTML page comparing models, baselines and peer indexes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Evaluate trained models side by side on the test split (queries) against train + val (database), as "
            "terrahash eval does, and write OUT/report.html (self-contained: plots and thumbnails embedded), "
            "OUT/report.json (every number the page shows) and the plots as PNG files.",
            "Sections: the code-length dial (binary, asymmetric and float figures, PR curves, R@K with its ceiling, "
            "teacher against its fp32 and int8 students when RUN/students holds them); baselines on the same frozen "
            "features (LSH, ITQ, float cosine, PQ, and per-modality PQ indexes fused by average or maximum, AP@50); the "
            "Pareto front of mAP against bytes per item, measured query latency and energy per 1,000 queries; "
            "per-class fairness and confusion; robustness to 7 corruptions at 3 severities and the drift detector's "
            "alarm rates (the fp32 image student of the first model that has students, else the first model); example queries with thumbnails; peer "
            "indexes (faiss kinds, usearch, Milvus Lite).",
            "Features of frozen encoders come from --cache-dir, so models trained here recompute none."))
    report.add_argument("--models", nargs="+", required=True, metavar="RUN",
                        help="`terrahash train` output folders (their s3:// copies, or runs:/<MLflow run id>); "
                             "the robustness and drift sections use the first one with students (else the first)")
    report.add_argument("--out", required=True, help="output folder")
    report.add_argument("--peers", metavar="FILE",
                        help="the JSON of `python -m evaluation.bench_peers --json FILE` (for example at 1M codes); "
                             "without it the peer benchmark runs here at --peer-codes codes")
    report.add_argument("--peer-codes", type=int, default=100_000,
                        help="codes per set of the peer benchmark run without --peers (default: %(default)s)")
    report.add_argument("--links", metavar="FILE",
                        help="the JSON of `terrahash jscc eval --json FILE` with code links: adds the section on "
                             "field queries over radio links (mAP ratio against channel uses, pixel links beside)")
    report.set_defaults(handler=_report)

    summary = sub.add_parser("summarize", help="a Markdown table over several eval JSON reports",
                             description="Print one Markdown row per `terrahash eval --json` report.")
    summary.add_argument("reports", nargs="+", help="JSON files written by `terrahash eval --json`")
    summary.set_defaults(handler=_summarize)
    add_serving_commands(sub, common)
    add_edge_commands(sub)
    add_lifecycle_commands(sub)
    add_governance_commands(sub)
    add_cluster_commands(sub)
    add_job_commands(sub)
    add_jscc_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the run's URL is already logged once by training.tracking; MLflow would print it again on every run end
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" on a first plot
        # transformers draws a "Loading weights" bar each time a text encoder loads; it reads this
        # variable when first imported (later, by the command), and nothing here is downloaded
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if hasattr(args, "data") and not Path(args.data).exists():
        print(f"terrahash: dataset {args.data!r} not found (give --data or set TERRAHASH_DATA)", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        # Known user errors (bad config key, missing file, corrupt image...) end with one clear line.
        logging.getLogger("terrahash").debug("error detail", exc_info=True)
        print(f"terrahash {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
