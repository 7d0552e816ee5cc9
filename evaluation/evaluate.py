"""``terrahash eval``: retrieval figures of a trained model on one split of any labelled dataset.

Queries are the split's images and captions; the database is the protocol's for that split
(``retrieval.DATABASE_SPLITS``: train for val, as checkpoint selection ranks it; train + val for
test) with class relevance (``map_*``); the instance figures (``r*``, ``mr``) use the split alone.
A dataset without those splits is evaluated leave-one-out (``retrieval.choose_rows``).

Relevance always comes from the evaluated dataset's own classes: a model trained on one dataset
can be measured on another (a *transfer* figure, ``"transfer": true``), including an image-only
one (no captions: only image-to-image figures; the text ones are None).

Each figure comes three ways (``retrieval.SIMILARITIES``): binary (Hamming, the report's top
level, as before), ``asymmetric`` (continuous query code against binary database codes) and
``float``. With a free-text query set (``evaluation.free_text``) the report also has
``free_text``: text-to-image figures of those queries against the same database.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .ceiling import recall_ceiling
from .tables import format_report

log = logging.getLogger(__name__)


def trained_on(model_dir: Path, state: dict) -> dict:
    """What the model was trained on: its classes, and the dataset's name and fingerprint when the
    run's metrics.json records them (None otherwise)."""
    recorded = {}
    metrics = Path(model_dir) / "metrics.json"
    if metrics.is_file():
        try:
            recorded = json.loads(metrics.read_text())
        except json.JSONDecodeError:
            log.warning("%s: not readable JSON; the training dataset's fingerprint is unknown", metrics)
    return {"dataset": recorded.get("dataset"), "dataset_fingerprint": recorded.get("dataset_fingerprint"),
            "classes": list(state["classes"])}


def transfer_reasons(training: dict, classes: list[str], fingerprint: str) -> list[str]:
    """Why a figure is a transfer figure (empty: same data as training)."""
    reasons = []
    if training["classes"] != classes:
        reasons.append(f"classes differ ({len(training['classes'])} trained, {len(classes)} evaluated)")
    if training["dataset_fingerprint"] and training["dataset_fingerprint"] != fingerprint:
        reasons.append(f"dataset differs (fingerprint {training['dataset_fingerprint']} trained, "
                       f"{fingerprint} evaluated)")
    return reasons


def free_text_report(query_set, codes: np.ndarray, classes: tuple[str, ...], db_codes: np.ndarray,
                     db_labels: np.ndarray) -> dict:
    """The ``free_text`` entry: figures of the queries of the dataset's classes (others left out)."""
    from .free_text import free_text_figures

    lookup = {c: i for i, c in enumerate(classes)}
    keep = [n for n, q in enumerate(query_set.queries) if q.label in lookup]
    if not keep:
        raise ValueError(f"{query_set.path}: none of its classes {list(query_set.classes)[:5]}... is a class of "
                         f"the evaluated dataset ({list(classes)[:5]}...)")
    labels = np.asarray([lookup[query_set.queries[n].label] for n in keep], dtype=np.int64)
    figures = free_text_figures(codes[keep], labels, db_codes, db_labels, classes)
    with_queries = {query_set.queries[n].label for n in keep}
    return {"file": str(query_set.path), "name": query_set.name, "queries": len(keep), **figures,
            "classes_left_out": sorted(set(query_set.classes) - set(classes)),
            "classes_without_queries": sorted(set(classes) - with_queries)}


def evaluate_model(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                   cache_dir: str | Path | None = None, device: str = "auto", skip_bad_images: bool = False,
                   queries: str | Path | None = None) -> dict:
    """Figures of the model in ``model_dir`` on ``split`` of the dataset in ``data_dir`` (with the
    free-text query file ``queries`` when given)."""
    from serving.ingest.dataset import load_dataset
    from training.features import FeatureCache, default_device
    from training.train import DatasetIndex, Encoders, dataset_codes, load_trained, text_codes

    from .free_text import load_queries
    from .retrieval import choose_rows, database_splits, evaluate_rows

    database_splits(split)  # an unknown split fails before any work
    query_set = load_queries(queries) if queries else None  # so does a bad query file
    torch_device = default_device(device)
    model, config, state = load_trained(model_dir, torch_device)
    dataset = load_dataset(data_dir, skip_bad_images=skip_bad_images)
    index = DatasetIndex.build(dataset)
    training = trained_on(Path(model_dir), state)
    reasons = transfer_reasons(training, list(dataset.classes), dataset.fingerprint())
    if reasons:
        log.info("transfer evaluation of %s on %s: %s", model_dir, dataset.name, "; ".join(reasons))
    encoders = Encoders(model, config, index, FeatureCache(cache_dir), torch_device)
    images, captions = dataset_codes(encoders)
    query_rows, db_rows, database = choose_rows(index.rows(split), index.database_rows(split),
                                                len(index.labels), split)
    figures = evaluate_rows(images, captions, index.labels, index.captions_of, query_rows, db_rows,
                            pr_curve=True, asymmetric=True, class_names=list(dataset.classes))
    query_captions = [c for r in query_rows for c in index.captions_of[r]]
    report = {"bits": config.train.bits, **figures["binary"], "asymmetric": figures["asymmetric"],
              "float": figures["float"], "pr_curve_image_to_image": figures["pr_curve"],
              "per_class": figures["per_class"],
              "recall_ceiling": recall_ceiling([index.captions[c] for c in query_captions],
                                               index.caption_owner[query_captions].tolist()),
              "split": split, "database": {**database, "queries": int(len(query_rows)),
                                           "query_captions": len(query_captions)},
              "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(),
              "classes": list(dataset.classes),
              "transfer": bool(reasons), "transfer_reasons": reasons, "trained_on": training,
              "skipped_images": list(dataset.skipped),
              "model": str(model_dir), "config": config.name, "checkpoint_epoch": state["epoch"]}
    if query_set is not None:
        codes = text_codes(model, query_set.texts(), torch_device, desc="free-text queries")
        report["free_text"] = free_text_report(query_set, codes, dataset.classes, images[db_rows],
                                               index.labels[db_rows])
    return report


def run_eval(model_dir, data_dir, split: str, json_out: str | Path | None, cache_dir=None, device="auto",
             skip_bad_images: bool = False, queries: str | Path | None = None) -> dict:
    """Evaluate, write the JSON, print the tables; returns the figures."""
    report = evaluate_model(model_dir, data_dir, split, cache_dir, device, skip_bad_images, queries)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report
