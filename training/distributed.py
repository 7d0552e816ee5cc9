"""Training as a Ray Train job: the same epoch loop, on N data-parallel workers (DDP).

``fit_distributed`` starts (or joins) Ray, runs ``train_loop_per_worker`` on each worker through
``TorchTrainer``, and leaves the chief's checkpoint, config and metrics in ``out_dir``. Every
evaluated epoch is reported to Ray Train as a checkpoint under the run's storage path, and the
chief's whole output folder as the run's last one (``FINAL``): the driver takes the outputs from
there, never from the chief's disk, so the driver and the chief may be on different machines
(the storage path must then be one every node reaches: s3:// or a shared folder).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from .config import WORKERS_ENV, DistributedConfig, ExperimentConfig, config_from_dict, to_dict
from .snapshots import RemoteSnapshots
from .train import OUTPUTS, LoopContext, copy_outputs, fit

RESUME = "resume.pt"  # shared training state in a reported checkpoint
FINAL = "final"  # the name of the last reported checkpoint: the chief's output folder as it ends

log = logging.getLogger(__name__)



class RayContext(LoopContext):
    """The loop's view of a Ray Train worker: its rank, DDP, and checkpoint reporting."""

    def __init__(self, snapshots=None):
        import ray.train

        context = ray.train.get_context()
        super().__init__(rank=context.get_world_rank(), world_size=context.get_world_size(), snapshots=snapshots)

    def prepare(self, step: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return step
        from ray.train.torch import prepare_model

        # Some parameters get no gradient in a given step (a loss term weighted 0, a frozen
        # tower's head input); DDP must not wait for them.
        return prepare_model(step, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    def report(self, epoch: int, record: dict, out: Path, state, outputs: tuple[str, ...] = OUTPUTS,
               name: str = "epoch") -> None:
        """Report the epoch's losses, with a checkpoint: every worker adds its own random state,
        the chief the shared training state and its ``outputs``. Ray Train merges the workers'
        folders into one checkpoint, and every worker must call this (it is a barrier)."""
        import ray.train

        metrics = {"epoch": epoch, **{f"loss/{k}": v for k, v in record["loss"].items()}}
        snapshot = state()
        with tempfile.TemporaryDirectory(prefix="terrahash-ckpt-") as folder:
            folder = Path(folder)
            torch.save(snapshot["own"], folder / f"rank{self.rank}.pt")
            if self.is_chief:
                torch.save(snapshot["shared"], folder / RESUME)
                copy_outputs(outputs, out, folder)
            # One folder name for all workers, so Ray Train merges their files into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"{name}-{epoch:04d}")

    def report_outputs(self, out: Path) -> None:
        """The chief's whole output folder as the run's last checkpoint (``FINAL``), which the driver
        downloads. Every worker calls it (a barrier); only the chief's carries files."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="terrahash-final-") as folder:
            checkpoint = None
            if self.is_chief:
                shutil.copytree(out, folder, dirs_exist_ok=True)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"final": 1}, checkpoint=checkpoint, checkpoint_dir_name=FINAL)

    def resume(self):
        """The latest reported checkpoint, when Ray Train restarted this worker group after a failure."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        local = Path(tempfile.mkdtemp(prefix="terrahash-resume-"))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, local, dirs_exist_ok=True)
        if not (local / RESUME).exists():  # the final checkpoint: the group failed as it was finishing
            log.warning("the last checkpoint holds no training state; the job starts again from the beginning")
            return None
        shared = torch.load(local / RESUME, map_location="cpu", weights_only=False)
        own_file = local / f"rank{self.rank}.pt"
        if not own_file.exists():  # the checkpoint was written by fewer workers than there are now
            log.warning("checkpoint has no random state for rank %d; it resumes with a fresh one", self.rank)
        own = torch.load(own_file, map_location="cpu", weights_only=False) if own_file.exists() else None
        return shared, own, local


@contextlib.contextmanager
def worker_output(loop_config: dict, context: RayContext):
    """Set a Ray Train worker up like the driver (its working directory when this machine has it, so
    that relative defaults such as the embedded MLflow store mean the same place; torch threads as
    reserved) and yield a scratch folder to write to. When the loop returns, the chief's folder is
    reported as the run's last checkpoint (``report_outputs``); the scratch folders are removed."""
    if Path(loop_config["cwd"]).is_dir():
        os.chdir(loop_config["cwd"])
    torch.set_num_threads(max(1, int(loop_config["threads_per_worker"])))
    scratch = Path(tempfile.mkdtemp(prefix=f"terrahash-rank{context.rank}-"))
    try:
        yield scratch
        context.report_outputs(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def final_outputs(result, out: Path) -> dict:
    """Download the run's last checkpoint (the chief's outputs, ``report_outputs``) into ``out`` and
    return its metrics.json, with ``ray_checkpoint`` naming where the checkpoint is stored."""
    import json

    checkpoint = result.checkpoint
    if checkpoint is None or Path(checkpoint.path).name != FINAL:
        raise RuntimeError(f"the Ray Train run ended without reporting its outputs (last checkpoint: "
                           f"{checkpoint.path if checkpoint else None})")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["ray_checkpoint"] = checkpoint.path
    return metrics


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the plain ``fit`` with a RayContext."""
    config = config_from_dict(loop_config["config"])
    store = loop_config.get("snapshots")  # (actor name, namespace) of the split schedules' SnapshotStore
    context = RayContext(RemoteSnapshots(*store) if store else None)
    with worker_output(loop_config, context) as out:
        fit(config, loop_config["data_dir"], out, cache_dir=loop_config["cache_dir"], progress=context.is_chief,
            skip_bad_images=loop_config["skip_bad_images"], context=context, role=loop_config["role"],
            parent_run_id=loop_config["parent_run_id"])


def ray_storage(storage_path: str | Path | None):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    A local folder (made absolute), Ray's default ``~/ray_results`` for None, or ``s3://bucket/prefix``;
    for S3, ``$AWS_ENDPOINT_URL`` reaches any S3-compatible endpoint (credentials come from the usual
    AWS variables).
    """
    if storage_path is None:
        return None, None
    text = str(storage_path)
    if not text.startswith("s3://"):
        if "://" in text:
            raise ValueError(f"unsupported Ray storage {text!r}: use a folder or s3://bucket/prefix")
        return str(Path(text).resolve()), None
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return text, None  # AWS itself; pyarrow resolves it from the URI
    from urllib.parse import urlparse

    import pyarrow.fs

    parsed = urlparse(endpoint)
    # Credentials are passed explicitly: the filesystem is pickled to Ray's controller and workers,
    # whose environment may differ from the driver's.
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https",
                                         region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                         access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                         secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return text[len("s3://"):], filesystem


def init_ray(config) -> None:
    """Join ``distributed.address`` (or ``$RAY_ADDRESS``), else start a local Ray of our own (a bare ray.init()
    would join any cluster ``ray start`` left on the machine); no-op when connected."""
    import ray

    if not ray.is_initialized():
        address = config.distributed.address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)


def run_name(name: str) -> str:
    """The Ray Train run name: ``$TERRAHASH_RUN_NAME-<name>`` for a submitted job's attempts (the same for
    each), else ``<name>-<time>-<random>``, new for every run."""
    shared = os.environ.get("TERRAHASH_RUN_NAME")
    return f"{shared}-{name}" if shared else f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def apply_worker_type(d: DistributedConfig) -> dict[str, float]:
    """Fit ``d`` to the worker type a submitted job names, and return the custom resources that place
    each Ray Train worker on a node of that type ({} outside a submitted job).

    ``$TERRAHASH_WORKERS`` (JSON, set by ``terrahash submit`` from the cluster description) gives the
    type's node resource, CPUs and GPUs: a type with GPUs sets ``use_gpu`` (one GPU per worker) and
    ``cpus_per_worker`` to its CPUs per GPU; a CPU type gives each worker the CPUs of one node.
    """
    import json

    spec = json.loads(os.environ.get(WORKERS_ENV) or "{}")
    if not spec:
        return {}
    gpus = int(spec.get("gpus") or 0)
    if spec.get("cpus"):
        d.cpus_per_worker = max(1.0, float(spec["cpus"]) // max(gpus, 1))
    d.use_gpu = d.use_gpu or gpus > 0
    return {spec["resource"]: 0.001}


def run_on_ray(loop_per_worker, loop_config: dict, d: DistributedConfig, workers: int, name: str,
               resources: dict[str, float] | None = None):
    """Run ``loop_per_worker(loop_config)`` on ``workers`` Ray Train workers (TorchTrainer); the Result.

    Scaling, failures and storage come from ``d``, and ``resources`` (custom ones) are added to each
    worker's; raises when the run fails for good.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    storage, filesystem = ray_storage(d.storage or None)
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=d.use_gpu,
                                               resources_per_worker={"CPU": d.cpus_per_worker, **(resources or {})}),
        # A name of its own for every job: Ray Train resumes a run whose name it finds in the storage,
        # and two different jobs must never share state that way. The attempts of one submitted job
        # (cluster/jobs.py) share $TERRAHASH_RUN_NAME, so a retry resumes from the last checkpoint.
        run_config=ray.train.RunConfig(name=run_name(name),
                                       storage_path=storage, storage_filesystem=filesystem,
                                       failure_config=ray.train.FailureConfig(max_failures=d.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run {name} failed: {result.error}") from result.error
    return result


def fit_distributed(config: ExperimentConfig, data_dir: str | Path, out_dir: str | Path,
                    cache_dir: str | Path | None = None, skip_bad_images: bool = False, role: str = "joint",
                    parent_run_id: str | None = None, snapshots: tuple[str, str] | None = None,
                    num_workers: int | None = None) -> dict:
    """Train as a Ray Train job as ``config.distributed`` says; returns the chief's metrics (as ``fit`` does).

    Ray starts locally unless ``distributed.address`` (or ``$RAY_ADDRESS``) names a running cluster.
    Input paths are made absolute so that workers, which run in other processes, find them (on a
    cluster: a path every node mounts); the outputs come back through Ray Train's storage. ``role``,
    ``parent_run_id`` and ``snapshots`` (the (name, namespace) of a SnapshotStore actor) are passed
    on to ``fit``; ``num_workers`` overrides ``distributed.num_workers``.
    """
    d = config.distributed
    workers = d.num_workers if num_workers is None else num_workers
    if workers < 1:
        raise ValueError(f"config.distributed.num_workers must be >= 1 for a Ray Train job, got {workers}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resources = apply_worker_type(d)
    init_ray(config)
    loop_config = {
        "config": to_dict(config),
        "data_dir": str(Path(data_dir).resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "skip_bad_images": skip_bad_images,
        "threads_per_worker": d.cpus_per_worker,
        "cwd": os.getcwd(),
        "role": role,
        "parent_run_id": parent_run_id,
        "snapshots": snapshots,
    }
    name = f"{config.name}-{config.train.bits}bits-{role}"
    return final_outputs(run_on_ray(train_loop_per_worker, loop_config, d, workers, name, resources), out)
