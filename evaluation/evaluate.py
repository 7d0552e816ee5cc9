"""``terrahash eval``: retrieval figures of a trained model on one split of a dataset.

Queries are the split's images and captions; the database is the protocol's for that split
(``retrieval.DATABASE_SPLITS``: train for val, as checkpoint selection ranks it; train + val for
test) with class relevance (``map_*``); the instance figures (``r*``, ``mr``) use the split alone.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .retrieval import format_table

log = logging.getLogger(__name__)


def evaluate_model(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                   cache_dir: str | Path | None = None, device: str = "auto", skip_bad_images: bool = False) -> dict:
    """Figures of the model in ``model_dir`` on ``split`` of the dataset in ``data_dir``."""
    from training.data import load_dataset
    from training.features import FeatureCache, default_device
    from training.train import DatasetIndex, Encoders, dataset_codes, load_trained

    from .retrieval import database_splits, evaluate_rows

    torch_device = default_device(device)
    model, config, state = load_trained(model_dir, torch_device)
    index = DatasetIndex.build(load_dataset(data_dir, skip_bad_images=skip_bad_images))
    if list(index.dataset.classes) != state["classes"]:
        raise ValueError(f"{data_dir}: classes {list(index.dataset.classes)[:5]}... differ from the model's "
                         f"{state['classes'][:5]}...; evaluate on the dataset the model was trained for")
    encoders = Encoders(model, config, index, FeatureCache(cache_dir), torch_device)
    images, captions = dataset_codes(encoders)
    query_rows = index.rows(split)
    if len(query_rows) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no images")
    db_rows = index.database_rows(split)
    figures = evaluate_rows(images, captions, index.labels, index.captions_of, query_rows, db_rows, pr_curve=True)
    return {"bits": config.train.bits, **figures["binary"], "float": figures["float"],
            "pr_curve_image_to_image": figures["pr_curve"], "split": split,
            "database": {"splits": list(database_splits(split)), "images": len(db_rows)},
            "dataset": index.dataset.name, "dataset_fingerprint": index.dataset.fingerprint(),
            "skipped_images": list(index.dataset.skipped),
            "model": str(model_dir), "config": config.name, "checkpoint_epoch": state["epoch"]}


def run_eval(model_dir, data_dir, split: str, json_out: str | Path | None, cache_dir=None, device="auto",
             skip_bad_images: bool = False) -> dict:
    """Evaluate, write the JSON, print the table; returns the figures."""
    report = evaluate_model(model_dir, data_dir, split, cache_dir, device, skip_bad_images)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    print(format_table(report, report["float"],
                       title=f"{report['dataset']} {split} split, {report['bits']} bits ({report['config']}):"))
    return report
