"""``terrahash distill``: distil a teacher into ONNX students, check their parity, track and register them.

The job: students trained on the teacher's codes (``distill.distill``; in one process or as a Ray
Train job), exported to ONNX fp32 and int8 with their specs (``export.export_students``), checked
against the torch students and the teacher on val (database: train) and on the test split, from one
encoding pass (``training.parity.parity_reports``), then logged to MLflow with the teacher's run as
lineage and registered as a new version of ``config.registered_model``. The val figures are also set
as tags on the model version: they are what the promotion gates compare (serving/lifecycle/gates.py); the
test figures are reported only.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.ingest.dataset import load_dataset

from .export import ONNX_DIR, export_students
from .students import DISTILL_CONFIG, DistillConfig, load_distill_config
from .tracking import flatten, track_run

log = logging.getLogger(__name__)

CALIBRATION_PER_CLASS = 3  # train images per class that calibrate the static int8 image model
HELD_OUT = 64  # val images that pick the int8 image variant and check the fp32 export


def resolve_teacher(teacher: str | Path, tracking_uri: str | None = None) -> Path:
    """A local folder holding the teacher: a run folder; ``s3://.../RUN`` written by ``terrahash train
    --out s3://...`` (downloaded and checked against its manifest); or ``runs:/<run id>`` of a tracked
    training run (its checkpoint and config are downloaded from MLflow)."""
    text = str(teacher)
    if text.startswith("s3://"):
        from serving.storage import fetch_folder

        folder = fetch_folder(text)
    elif not text.startswith("runs:/"):
        folder = Path(text)
    else:
        from mlflow import MlflowClient

        run_id = text[len("runs:/"):].strip("/")
        client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
        folder = Path(tempfile.mkdtemp(prefix="terrahash-teacher-"))
        for name in ("checkpoint.pt", "config.yaml", "metrics.json"):
            client.download_artifacts(run_id, name, str(folder))
    if not (folder / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"teacher {text!r}: no checkpoint.pt there (give a `terrahash train` output "
                                "folder, its s3:// copy, or runs:/<MLflow run id>)")
    return folder


def _portable(teacher: str | Path, teacher_dir: Path) -> str:
    """How a Ray Train worker, on any node, finds the teacher: its URI, or the (absolute) folder."""
    text = str(teacher)
    return text if text.startswith(("s3://", "runs:/")) else str(teacher_dir.resolve())


def distill_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the plain ``distill`` with a RayContext."""
    from .distill import distill
    from .distributed import RayContext, worker_output
    from .students import distill_config_from_dict

    context = RayContext()
    config = distill_config_from_dict(loop_config["config"])
    with worker_output(loop_config, context) as out:
        teacher = resolve_teacher(loop_config["teacher"], config.tracking.tracking_uri or None)
        distill(teacher, config, loop_config["data_dir"], out, cache_dir=loop_config["cache_dir"],
                progress=context.is_chief, context=context)


def train_students(teacher_dir: Path, config: DistillConfig, data_dir, out: Path, cache_dir,
                   teacher: str | Path | None = None) -> dict:
    """The students' training, in this process or on ``config.distributed.num_workers`` Ray Train workers
    (which fetch the ``teacher`` URI themselves when it is one: the driver's copy is on its disk only)."""
    from .distill import distill

    d = config.distributed
    if d.num_workers == 0:
        return distill(teacher_dir, config, data_dir, out, cache_dir=cache_dir)
    from .config import to_dict
    from .distributed import apply_worker_type, final_outputs, init_ray, run_on_ray

    resources = apply_worker_type(d)
    init_ray(config)
    loop_config = {"teacher": _portable(teacher or teacher_dir, teacher_dir), "config": to_dict(config),
                   "data_dir": str(Path(data_dir).resolve()),
                   "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
                   "threads_per_worker": d.cpus_per_worker, "cwd": os.getcwd()}
    return final_outputs(run_on_ray(distill_loop_per_worker, loop_config, d, d.num_workers, config.name,
                                    resources), out)


def _export_sets(dataset) -> tuple[list[Path], list[Path]]:
    """Calibration images (a few train images per class) and held-out ones (val), never test."""
    per_class: dict[str, list[Path]] = {}
    for record in dataset.split("train"):
        per_class.setdefault(record.label, []).append(record.path)
    calibration = [p for paths in per_class.values() for p in paths[:CALIBRATION_PER_CLASS]]
    rng = np.random.default_rng(0)
    val = [r.path for r in dataset.split("val")]
    held_out = [val[i] for i in sorted(rng.choice(len(val), min(HELD_OUT, len(val)), replace=False))]
    return calibration, held_out


def file_sizes(onnx_dir: Path) -> dict[str, int]:
    """Bytes of every exported model file: ``size/image_student.onnx`` ..."""
    return {f"size_bytes/{p.name}": p.stat().st_size for p in sorted(onnx_dir.glob("*.onnx"))}


def run_distillation(teacher: str | Path, config: DistillConfig, data_dir, out_dir, cache_dir=None,
                     parity_split: str = "test") -> dict:
    """Distil, export, check and register; writes ``out_dir/metrics.json`` and returns it.

    ``metrics["parity"]`` is the ``parity_split`` report (test: reported only), ``metrics["val_parity"]``
    the val one; run metrics ``parity/...`` (the former), ``val/<model>/...`` and ``val_parity/...``."""
    from training.parity import metric_name, parity_reports, version_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = resolve_teacher(teacher, config.tracking.tracking_uri or None)
    teacher_run = json.loads((teacher_dir / "metrics.json").read_text()).get("mlflow_run_id") \
        if (teacher_dir / "metrics.json").exists() else None
    dataset = load_dataset(data_dir)
    epochs = max(config.image.epochs if "image" in config.students else 0,
                 config.text.epochs if "text" in config.students else 0)
    artifacts = ("metrics.json", DISTILL_CONFIG)
    with track_run(config, out, dataset, images_processed=len(dataset.split("train")) * epochs,
                   run_name=config.name, artifacts=artifacts) as tracker:
        if tracker.run_id:
            tracker.client.set_tag(tracker.run_id, "teacher.run_id", teacher_run or "unknown")
            tracker.client.set_tag(tracker.run_id, "teacher.source", str(teacher))
        phases, clock = {}, time.perf_counter()

        def phase(name: str) -> None:  # seconds since the previous phase ended
            nonlocal clock
            phases[name], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

        metrics = train_students(teacher_dir, config, data_dir, out, cache_dir, teacher)
        phase("students")
        calibration, held_out = _export_sets(dataset)
        exported = export_students(out, calibration_images=calibration, held_out_images=held_out)
        phase("export")
        reports = parity_reports(teacher_dir, out, data_dir, cache_dir, splits=tuple(dict.fromkeys(("val", parity_split))))
        phase("parity")
        report, val = reports[parity_split], reports["val"]
        metrics.update(teacher_run_id=teacher_run, parity=report, val_parity=val, sizes=file_sizes(out / ONNX_DIR),
                       int8_image_choice=exported.get("image", {}).get("int8_agreement"), phases_s=phases)
        version_tags = version_figures(val, "val")  # what the model version carries for the promotion gates
        figures = {**flatten({"parity": {"bit_agreement": report["bit_agreement_with_torch"],
                                         "map_ratio": report["map_ratio"]}}, sep="/"), **metrics["sizes"],
                   **flatten({"val": {m: val["figures"][m] for m in ("teacher", "fp32", "int8")}}, sep="/"),
                   **version_tags}
        tracker.log_metrics({metric_name(k): v for k, v in figures.items()})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        if tracker.run_id:
            tracker.client.log_artifacts(tracker.run_id, str(out / ONNX_DIR), ONNX_DIR)
            metrics["registered"] = register_students(tracker, config.registered_model, teacher_run, version_tags)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if metrics.get("registered"):  # after the run has ended, so that the card has its energy too
        _model_card(tracker, metrics, dataset, out)
    return metrics


def _model_card(tracker, metrics: dict, dataset, out: Path) -> None:
    """The registered version's model card (evaluation/model_card.py), beside its students and in MLflow."""
    from evaluation.model_card import publish_card, write_card
    from serving.model.spec import load_spec

    registered, onnx = metrics["registered"], out / ONNX_DIR
    facts = {**metrics, "mlflow_run_id": tracker.run_id,
             "bits": load_spec(onnx / "image_student.spec.json").bits}
    write_card(onnx, facts, dataset, registered["name"], registered["version"], tracker.client)
    publish_card(tracker.client, registered["name"], registered["version"], onnx, tracker.run_id, ONNX_DIR)
    log.info("model card of %s version %s written (%s/model_card.md)", registered["name"], registered["version"], onnx)


def register_students(tracker, name: str, teacher_run: str | None, figures: dict[str, float] | None = None) -> dict:
    """A new version of registered model ``name`` whose source is this run's ``onnx/`` artifacts, tagged
    with its teacher's run id and ``figures`` (the val figures, shown in MLflow's model registry UI)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description="TerraHash ONNX students (image + text encoders, specs)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(tracker.run_id)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{ONNX_DIR}", run_id=tracker.run_id,
                                          tags={"teacher.run_id": teacher_run or "unknown",
                                                **{k: f"{v:.6f}" for k, v in (figures or {}).items()}})
    log.info("registered %s version %s", name, version.version)
    return {"name": name, "version": version.version}


def load_config_for_cli(path_or_name: str) -> DistillConfig:
    """A distillation config file, or a shipped one by name (``training/configs/distill/<name>.yaml``)."""
    path = Path(path_or_name)
    if not path.exists():
        shipped = Path(__file__).parent / "configs" / "distill" / f"{path_or_name}.yaml"
        if not shipped.exists():
            names = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
            raise FileNotFoundError(f"distillation config {path_or_name!r} is neither a file nor a shipped one {names}")
        path = shipped
    return load_distill_config(path)
