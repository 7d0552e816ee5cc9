"""MLflow tracking of a training run: config, data and code identity, per-epoch figures, energy and CO2, artifacts.

``track_run`` wraps one phase: the whole ``terrahash train`` (the parent run), each training job
(child runs "joint", or "image" and "text") and the final evaluation (child run "eval"). Energy comes from codecarbon's offline tracker (no
network): measured where the hardware has an energy counter (CPU through RAPL, GPU through NVML),
otherwise estimated from CPU load and the CPU's rated power (TDP); memory is always a model. The
run records which, so an estimate is never mistaken for a measurement.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import subprocess
import time
from pathlib import Path
from typing import Iterator

from serving.ingest.dataset import CaptionDataset

from .config import TrackingConfig, to_dict

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install terrahash[track]"
ARTIFACTS = ("checkpoint.pt", "config.yaml", "metrics.json")  # what fit writes, logged at the end
REPO_DIR = Path(__file__).resolve().parents[1]

# How codecarbon reads a CPU's power, by its CPU mode: (name, read from a hardware energy counter?).
CPU_METHODS = {
    "intel_rapl": ("RAPL", True),
    "windows_emi": ("Windows energy meter", True),
    "intel_power_gadget": ("Intel Power Gadget", True),
    "cpu_load": ("TDP x CPU load", False),
    "constant": ("constant TDP", False),
}


def check_tracking(tracking: TrackingConfig) -> None:
    """Fail before any work when tracking cannot run: a missing package or an unknown country code."""
    for module in ("mlflow", "codecarbon"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"tracking is on (config.tracking.enabled) but {module} is not installed: "
                              f"`{INSTALL_HINT}`, or turn tracking off (`--no-track`)") from err
    from codecarbon.input import DataSource

    countries = DataSource().get_global_energy_mix_data()
    if tracking.country_iso_code not in countries:
        raise ValueError(f"config.tracking.country_iso_code: {tracking.country_iso_code!r} has no carbon "
                         f"intensity in codecarbon; use a 3-letter ISO code such as 'FRA', 'DEU' or 'USA'")


def git_commit(repo: Path = REPO_DIR) -> str:
    """The commit checked out in ``repo``, or "unknown" (an installed copy, no git): never fails."""
    if not (repo / ".git").exists():  # e.g. installed into site-packages: not this project's checkout
        return "unknown"
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("no git commit for %s: %s", repo, err)
        return "unknown"
    return done.stdout.strip()


def flatten(tree: dict, prefix: str = "", sep: str = ".") -> dict:
    """Nested mappings as one level: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def power_sources(emissions) -> dict[str, tuple[str, bool]]:
    """How codecarbon got each device's power: ``{"cpu": ("RAPL", True), "ram": (..., False)}``.

    The flag says whether it was read from a hardware counter (True) or estimated. codecarbon
    keeps this only on private attributes: its device list and each CPU's mode.
    """
    sources = {}
    for device in getattr(emissions, "_hardware", []):
        kind = type(device).__name__
        if kind == "CPU":
            mode = getattr(device, "_mode", "unknown")
            sources["cpu"] = CPU_METHODS.get(mode, (mode, False))
        elif kind == "GPU":
            vendors = {type(d).__name__ for d in getattr(device.devices, "devices", [])}
            sources["gpu"] = ("NVML", True) if "NvidiaGPUDevice" in vendors else ("AMD SMI", True)
        elif kind == "RAM":
            forced = getattr(device, "_force_ram_power", None) is not None
            sources["ram"] = ("constant (forced)" if forced else "model of installed memory", False)
        elif kind in ("AppleSiliconChip", "Raspberry"):  # read from the chip's own power sensors
            sources[device.chip_part.lower()] = (kind, True)
        else:
            sources[kind.lower()] = (repr(device), False)
    return sources


class Tracker:
    """Logs one training run to MLflow; made by ``track_run``."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Named numbers at one step, in one request."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_epoch(self, epoch: int, losses: dict[str, float], val: dict | None = None) -> None:
        """Mean loss terms as ``loss/<term>`` and, when given, val figures as
        ``val/binary/image_to_image/map_all`` and so on, all at step ``epoch``."""
        values = {f"loss/{name}": value for name, value in losses.items()}
        if val is not None:
            values.update(flatten({"val": val}, sep="/"))
        self.log_metrics(values, step=epoch)

    def log_energy(self, emissions, images_processed: int) -> None:
        """codecarbon's totals (kWh, kg CO2eq, also per 1,000 images) and how they were obtained."""
        from mlflow.entities import Param

        data = getattr(emissions, "final_emissions_data", None)
        if data is None:  # codecarbon catches its own errors and only logs them
            log.warning("codecarbon measured nothing (see the 'codecarbon' logger); the run has no energy figures")
            self.client.set_tag(self.run_id, "energy.source", "not measured")
            return
        values = {"energy_kwh": data.energy_consumed, "emissions_kg_co2eq": data.emissions}
        if images_processed > 0:
            values["energy_kwh_per_1k_images"] = data.energy_consumed * 1000 / images_processed
            values["emissions_kg_per_1k_images"] = data.emissions * 1000 / images_processed
        self.log_metrics(values)
        sources = power_sources(emissions)
        measured = [counter for _, counter in sources.values()]
        method = "; ".join(f"{device}: {name}" for device, (name, _) in sorted(sources.items()))
        self.client.log_batch(self.run_id, params=[
            Param("energy.method", method or "unknown"),
            Param("energy.country_iso_code", str(data.country_iso_code)),
            Param("energy.pue", str(data.pue)),
            Param("energy.images_processed", str(images_processed)),
        ])
        source = "measured" if measured and all(measured) else "estimated" if not any(measured) else "partly estimated"
        self.client.set_tag(self.run_id, "energy.source", source)

    def log_artifacts(self, out_dir: Path, names: tuple[str, ...] = ARTIFACTS) -> None:
        """Files of ``out_dir`` (by default those ``fit`` writes: checkpoint, config, metrics)."""
        for name in names:
            self.client.log_artifact(self.run_id, str(out_dir / name))


class NoTracker:
    """Stands in for a Tracker where nothing is logged: tracking off, or not the logging worker."""

    run_id = None

    def log_epoch(self, epoch: int, losses: dict[str, float], val: dict | None = None) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        pass


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:  # another run created it meanwhile
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def default_run_name(config) -> str:
    """``<config>-<bits>bits`` for a training config, the config's name otherwise."""
    train = getattr(config, "train", None)
    return f"{config.name}-{train.bits}bits" if train is not None else config.name


def run_tags(dataset: CaptionDataset) -> dict[str, str]:
    """What the run was trained on and with: dataset name and content fingerprint, git commit."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    return {"dataset": dataset.name, "dataset.fingerprint": dataset.fingerprint(), MLFLOW_GIT_COMMIT: git_commit()}


@contextlib.contextmanager
def _system_metrics(run_id: str, tracking_uri: str, on: bool) -> Iterator[None]:
    """MLflow's sampler of CPU, memory, disk, network (and GPU) use, as ``system/*`` metrics."""
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def _energy(tracker: Tracker, tracking: TrackingConfig, images_processed: int) -> Iterator[None]:
    """Measure the block with codecarbon's offline tracker and log the figures on exit."""
    from codecarbon import OfflineEmissionsTracker

    # codecarbon logs setup chatter at INFO/WARNING before it applies log_level; it sets the same level anyway.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    emissions = OfflineEmissionsTracker(
        country_iso_code=tracking.country_iso_code, pue=tracking.pue, log_level="error",
        tracking_mode="machine",  # the whole machine's power, as a meter at the wall would see it
        output_methods=[],  # no emissions.csv, no API or HTTP upload: the figures go to MLflow only
        emissions_endpoint=None, electricitymaps_api_token=None,  # ignore any from a codecarbon config file
        project_name="terrahash")
    emissions.start()
    try:
        yield
    finally:
        emissions.stop()
        tracker.log_energy(emissions, images_processed)


@contextlib.contextmanager
def track_run(config, out_dir: str | Path, dataset: CaptionDataset,
              images_processed: int, rank: int = 0, parent_run_id: str | None = None,
              run_name: str | None = None, artifacts: tuple[str, ...] = ARTIFACTS) -> Iterator[Tracker | NoTracker]:
    """Log the phase inside the block to MLflow as one run, with its energy and CO2.

    ``config`` is any component config with a ``tracking`` section (training, distillation).
    On entry: a run named ``run_name`` (default ``<config>-<bits>bits``), a child of
    ``parent_run_id`` when given, with the resolved config as flattened params (``train.bits``,
    ``loss.weights.margin``...) and tags for the dataset, its fingerprint and the git commit.
    While the block runs: the tracker's figures, system metrics, and codecarbon. On exit:
    ``energy_kwh``, ``emissions_kg_co2eq`` and both per 1,000 images (``images_processed``: for
    training, training images x epochs), then on success the ``artifacts`` files of ``out_dir``.
    The run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block raises. Only rank 0 logs:
    other ranks, and ``config.tracking.enabled = False``, get a tracker that does nothing.
    """
    tracking = config.tracking
    if rank != 0 or not tracking.enabled:
        yield NoTracker()
        return
    check_tracking(tracking)
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from serving.model.registry import quiet_mlflow_logs, resolve_tracking_uri

    # MLflow's own INFO lines (creating the database's tables, starting and stopping the system-metrics
    # sampler) say nothing the run's one line below does not.
    quiet_mlflow_logs()

    uri, artifact_location = resolve_tracking_uri(tracking.tracking_uri)
    client = MlflowClient(uri)
    tags = run_tags(dataset) | ({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})
    run = client.create_run(_experiment_id(client, tracking.experiment, artifact_location),
                            run_name=run_name or default_run_name(config), tags=tags)
    tracker = Tracker(client, run.info.run_id)
    log.info("MLflow run %s (%s) in %s", tracker.run_id, run.info.run_name, uri)
    try:
        from mlflow.entities import Param

        client.log_batch(tracker.run_id, params=[Param(k, str(v)) for k, v in flatten(to_dict(config)).items()])
        with (_system_metrics(tracker.run_id, uri, tracking.system_metrics),
              _energy(tracker, tracking, images_processed)):
            yield tracker
        tracker.log_artifacts(Path(out_dir), artifacts)
    except BaseException as err:
        client.set_terminated(tracker.run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(tracker.run_id, "FINISHED")
