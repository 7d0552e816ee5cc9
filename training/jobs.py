"""``terrahash train`` as a whole: the training jobs of the chosen schedule, then the final evaluation.

Schedules (``train.schedule``):
- "joint": one job updates both towers at every step (``fit``, or ``fit_distributed`` on Ray Train).
- "sync": the image job runs to the end, then the text job trains against its final snapshot.
- "async": the image and text jobs run at once as two Ray Train runs; the image job publishes
  snapshots of its codes and proxies and the text job picks up the newest (``snapshots.py``).

The split schedules write each job's outputs to ``out/image`` and ``out/text`` and then one
combined checkpoint to ``out``. In MLflow, one parent run covers the whole command; the jobs and
the evaluation are its child runs, each with its own energy figures.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from serving.ingest.dataset import load_dataset

from .config import SCHEDULES, ExperimentConfig, check, save_config  # noqa: F401 (SCHEDULES: re-exported)
from .snapshots import SnapshotStore, start_store_actor
from .tracking import ARTIFACTS, flatten, track_run
from .train import CHECKPOINT, LoopContext, fit

log = logging.getLogger(__name__)

# Evaluates a trained run folder on a split and writes its report: evaluation.evaluate.run_eval's signature,
# (out, data_dir, split, report_path, cache_dir=, device=, skip_bad_images=) -> report.
Evaluator = Callable[..., dict]

EVAL_JSON = "eval_{split}.json"


def check_schedule(config: ExperimentConfig) -> None:
    """Fail before any work on a config that cannot run (a schedule unknown, a snapshot interval
    below 1...), changed in place or not."""
    check(config)


class Job:
    """Runs one role's training, in this process or as a Ray Train run, as a child of the parent run."""

    def __init__(self, config: ExperimentConfig, data_dir, cache_dir, skip_bad_images: bool, parent_run_id):
        self.config, self.data_dir, self.cache_dir = config, data_dir, cache_dir
        self.skip_bad_images, self.parent_run_id = skip_bad_images, parent_run_id

    def __call__(self, role: str, out: Path, workers: int, store=None) -> dict:
        """``store``: a SnapshotStore (in process) or a (name, namespace) of its Ray actor."""
        if workers == 0:
            return fit(self.config, self.data_dir, out, cache_dir=self.cache_dir, skip_bad_images=self.skip_bad_images,
                       context=LoopContext(snapshots=store), role=role, parent_run_id=self.parent_run_id)
        from .distributed import fit_distributed

        return fit_distributed(self.config, self.data_dir, out, cache_dir=self.cache_dir,
                               skip_bad_images=self.skip_bad_images, role=role, parent_run_id=self.parent_run_id,
                               snapshots=store, num_workers=workers)


def _joint(job: Job, out: Path) -> dict:
    return job("joint", out, job.config.distributed.num_workers)


def _sync(job: Job, out: Path) -> dict:
    d = job.config.distributed
    if d.num_workers == 0:  # one process: the store is a plain object
        store = SnapshotStore()
        return {"image": job("image", out / "image", 0, store), "text": job("text", out / "text", 0, store)}
    with _store_actor(job.config) as store:
        return {"image": job("image", out / "image", d.num_workers, store),
                "text": job("text", out / "text", d.text_workers, store)}


def _async(job: Job, out: Path) -> dict:
    """Both jobs at once, each a Ray Train run (Ray Train's fit blocks, so each waits in a thread)."""
    d = job.config.distributed
    image_workers = max(d.num_workers, 1)  # two concurrent jobs need Ray even for one worker each
    with _store_actor(job.config) as store, ThreadPoolExecutor(2, thread_name_prefix="terrahash-job") as pool:
        text = pool.submit(job, "text", out / "text", d.text_workers, store)
        image = pool.submit(job, "image", out / "image", image_workers, store)
        try:
            image_metrics = image.result()
        except BaseException as err:  # the text job would wait for snapshots forever
            _fail_store(store, f"{type(err).__name__}: {err}")
            raise
        return {"image": image_metrics, "text": text.result()}


class _store_actor:
    """A SnapshotStore Ray actor for the duration of a schedule; yields its (name, namespace)."""

    def __init__(self, config: ExperimentConfig):
        self.config = config
        self.address = (f"terrahash-snapshots-{uuid.uuid4().hex[:8]}", "terrahash")

    def __enter__(self) -> tuple[str, str]:
        from .distributed import init_ray

        init_ray(self.config)
        self.actor = start_store_actor(*self.address)
        return self.address

    def __exit__(self, *exc) -> None:
        import ray

        ray.kill(self.actor)


def _fail_store(address: tuple[str, str], reason: str) -> None:
    import ray

    ray.get(ray.get_actor(address[0], namespace=address[1]).fail.remote(reason))


SCHEDULE_RUNNERS = {"joint": _joint, "sync": _sync, "async": _async}


def combine_checkpoints(out: Path, image_dir: Path, text_dir: Path) -> dict:
    """One checkpoint from the split jobs: the image job's image side and proxies, the text job's text side.

    The text job's val figures are those of the combined model: its selected epoch was trained
    and evaluated against the final snapshot, i.e. the image job's selected checkpoint.
    """
    image = torch.load(image_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    text = torch.load(text_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    combined = {**image, "text_head": text["text_head"], "text_encoder": text["text_encoder"],
                "epoch": image["epoch"], "text_epoch": text["epoch"], "val": text["val"]}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(combined, tmp)
    tmp.replace(out / CHECKPOINT)
    return combined


def _split_metrics(config: ExperimentConfig, jobs: dict, combined: dict) -> dict:
    image, text = jobs["image"], jobs["text"]
    return {"config": config.name, "bits": config.train.bits, "dataset": image["dataset"],
            "dataset_fingerprint": image["dataset_fingerprint"], "skipped_images": image["skipped_images"],
            "best_epoch": {"image": image["best_epoch"], "text": text["best_epoch"]},
            "val": combined["val"], "jobs": {"image": image, "text": text}, "device": image["device"]}


def evaluate_phase(config: ExperimentConfig, out: Path, data_dir, split: str, cache_dir, skip_bad_images: bool,
                   dataset, parent_run_id: str | None, run_eval: Evaluator) -> dict:
    """Evaluate the trained model on ``split`` (reported, never used for selection), as child run "eval"."""
    name = EVAL_JSON.format(split=split)
    with track_run(config, out, dataset, images_processed=len(dataset.records), parent_run_id=parent_run_id,
                   run_name="eval", artifacts=(name,)) as tracker:
        report = run_eval(out, data_dir, split, out / name, cache_dir=cache_dir, device=config.train.device,
                          skip_bad_images=skip_bad_images)
        tracker.log_metrics(eval_metrics(report, split))
    return report


def eval_metrics(report: dict, split: str) -> dict[str, float]:
    """The report's binary figures as flat metric names: ``test/image_to_image/map_all``, ``test/mr``..."""
    figures = {task: report[task] for task in ("image_to_image", "text_to_image", "image_to_text")}
    return {name: value for name, value in flatten({split: {**figures, "mr": report["mr"]}}, sep="/").items()
            if isinstance(value, (int, float))}


def run_training(config: ExperimentConfig, data_dir: str | Path, out_dir: str | Path,
                 cache_dir: str | Path | None = None, skip_bad_images: bool = False,
                 eval_split: str | None = "test", evaluate: Evaluator | None = None) -> dict:
    """Train with ``config.train.schedule``, evaluate on ``eval_split`` with ``evaluate`` (None: skip; the
    evaluation lives above training, so its caller passes it: evaluation.evaluate.run_eval), track it all
    in MLflow.

    Writes ``checkpoint.pt``, ``config.yaml``, ``metrics.json`` and ``eval_<split>.json`` to
    ``out_dir``; returns the metrics, with ``mlflow_run_id`` naming the parent run.
    """
    check_schedule(config)
    if evaluate is None:
        eval_split = None
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir, skip_bad_images=skip_bad_images)
    dataset.require_captions(("train", "val"), "training")  # before any run is started
    train_images = len(dataset.split("train")) * config.train.epochs
    schedule = config.train.schedule
    artifacts = ARTIFACTS + ((EVAL_JSON.format(split=eval_split),) if eval_split else ())
    with track_run(config, out, dataset, images_processed=train_images + len(dataset.records),
                   run_name=f"{config.name}-{config.train.bits}bits-{schedule}", artifacts=artifacts) as parent:
        job = Job(config, data_dir, cache_dir, skip_bad_images, parent.run_id)
        log.info("training %s at %d bits, schedule %s", config.name, config.train.bits, schedule)
        metrics = SCHEDULE_RUNNERS[schedule](job, out)
        if schedule != "joint":
            combined = combine_checkpoints(out, out / "image", out / "text")
            save_config(config, out / "config.yaml")
            metrics = _split_metrics(config, metrics, combined)
        metrics.update(schedule=schedule, train_seconds=round(time.time() - started, 1),
                       mlflow_run_id=parent.run_id)
        if eval_split:
            report = evaluate_phase(config, out, data_dir, eval_split, cache_dir, skip_bad_images, dataset,
                                    parent.run_id, evaluate)
            metrics["eval"] = {"split": eval_split, **eval_metrics(report, eval_split)}
            parent.log_metrics(eval_metrics(report, eval_split))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
