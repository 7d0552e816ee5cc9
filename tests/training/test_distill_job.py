"""`terrahash distill` end to end on real images: students, ONNX export, parity, MLflow lineage and registration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
pytest.importorskip("onnxruntime")
from mlflow import MlflowClient  # noqa: E402

from cluster.cli.main import main  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from training.config import config_from_dict  # noqa: E402
from training.distill_job import resolve_teacher  # noqa: E402
from training.train import fit  # noqa: E402

TINY_STUDENTS = {
    "name": "tiny-students",
    "image": {"backbone": "test_efficientnet", "weights": "none", "image_size": 64, "pool_levels": [],
              "head_hidden": [32], "epochs": 4, "batch_size": 6, "views": [0, 5], "lr": 3e-3},
    "text": {"num_layers": 1, "epochs": 2, "batch_size": 16, "lr": 1e-3},
    "eval_every": 2, "device": "cpu", "warmup_epochs": 0, "registered_model": "tiny-students",
}


def test_teacher_must_be_a_run_folder_or_an_mlflow_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        resolve_teacher(tmp_path)


def test_distill_registers_onnx_students_with_their_teacher_as_lineage(mlflow_server, subset, tiny_text_encoder,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    tracking = {"tracking_uri": mlflow_server, "experiment": "distill-test"}
    teacher = fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=2, tracking=tracking)), subset,
                  tmp_path / "teacher", cache_dir=tmp_path / "cache", progress=False)
    config_file = tmp_path / "students.yaml"
    config_file.write_text(yaml.safe_dump({**TINY_STUDENTS, "tracking": tracking}))
    out = tmp_path / "students"
    # The teacher is named by its MLflow run: its checkpoint comes from the tracking server.
    assert main(["distill", "--teacher", f"runs:/{teacher['mlflow_run_id']}", "--config", str(config_file),
                 "--data", str(subset), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    parity = metrics["parity"]["bit_agreement_with_torch"]
    assert parity["fp32"]["image"] >= 0.999 and parity["fp32"]["text"] >= 0.999
    assert parity["int8"]["image"] >= 0.9 and parity["int8"]["text"] >= 0.9  # tiny random students
    client = MlflowClient(mlflow_server)
    registered = metrics["registered"]
    version = client.get_model_version(registered["name"], registered["version"])
    run = client.get_run(version.run_id)
    assert run.data.tags["teacher.run_id"] == teacher["mlflow_run_id"] == version.tags["teacher.run_id"]
    assert run.data.metrics["parity/bit_agreement/fp32/image"] == pytest.approx(parity["fp32"]["image"])
    for key in ("energy_kwh", "size_bytes/text_student.int8.onnx", "parity/map_ratio/fp32/image_to_image"):
        assert run.data.metrics[key] > 0, key
    files = {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}
    for name in ("image_student", "text_student", "image_student.int8", "text_student.int8"):
        assert {f"onnx/{name}.onnx", f"onnx/{name}.spec.json"} <= files, name
    # The registered version's files are what serving loads: a spec + ONNX pair that checks out.
    from serving.model.encoders import load_encoder

    local = client.download_artifacts(run.info.run_id, "onnx", str(tmp_path / "download"))
    assert load_encoder(f"{local}/text_student.int8.spec.json").encode_packed(["a runway"]).shape == (1, 2)
    # The version's model card: with its files, as its description, from the runs' own figures.
    card = json.loads((Path(local) / "model_card.json").read_text())
    assert card["model"]["uri"] == f"models:/{registered['name']}/{registered['version']}" and card["model"]["bits"] == 16
    assert card["model"]["teacher_run_id"] == teacher["mlflow_run_id"] and card["data"]["dataset"] == "ucm_subset"
    assert card["data"]["splits"]["train"]["images"] == 12 and card["training"]["teacher"]["train.epochs"] == "2"
    per_class = card["per_class"]["image_to_image"]
    assert set(per_class) == {"agricultural", "airplane", "baseballdiamond"} and card["per_class"]["worst"]["class"] in per_class
    assert card["per_class"]["worst"]["value"] == min(per_class.values())
    assert card["figures"]["models"]["fp32"]["image_to_image"]["map_all"] == pytest.approx(
        metrics["parity"]["figures"]["fp32"]["image_to_image"]["map_all"])
    assert card["energy"]["distillation"]["energy_kwh"] == client.get_run(run.info.run_id).data.metrics["energy_kwh"]
    assert card["energy"]["training"]["run_id"] == teacher["mlflow_run_id"]
    assert {m["name"] for m in card["failure_modes"]} >= {"duplicate_captions", "weak_class", "class_collapse"}
    again = client.get_model_version(registered["name"], registered["version"])
    assert again.tags["model_card"] == "onnx/model_card.json" and again.description.startswith("# Model card")
    assert main(["card", registered["name"], registered["version"], "--data", str(subset), "--tracking-uri",
                 mlflow_server, "--out", str(tmp_path / "card")]) == 0  # written again, for an older version
    assert json.loads((tmp_path / "card" / "model_card.json").read_text())["model"]["bits"] == 16


def test_students_train_on_two_ray_train_workers(local_ray, subset, tiny_text_encoder, tmp_path):
    from training.distill_job import train_students
    from training.students import distill_config_from_dict, load_image_student

    teacher = tmp_path / "teacher"
    fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=2)), subset, teacher, cache_dir=tmp_path / "cache",
        progress=False)
    config = distill_config_from_dict({**TINY_STUDENTS, "tracking": {"enabled": False},
                                       "distributed": {"num_workers": 2, "cpus_per_worker": 0.5,
                                                       "storage": str(tmp_path / "ray")}})
    metrics = train_students(teacher, config, subset, tmp_path / "students", tmp_path / "cache")
    assert metrics["world_size"] == 2
    for kind in ("image", "text"):  # the chief evaluated on val at epochs 2 and 4 and kept the best
        history = metrics["students"][kind]["history"]
        assert [h["epoch"] for h in history if "val_bit_agreement" in h] == [2, 4][:len(history) // 2]
        assert metrics["students"][kind]["best"]["epoch"] in (2, 4)
    _, state = load_image_student(tmp_path / "students")
    assert state["epoch"] == metrics["students"]["image"]["best"]["epoch"]
    from training.students import load_text_student

    assert load_text_student(tmp_path / "students")[2]["epoch"] == metrics["students"]["text"]["best"]["epoch"]


def test_killed_distillation_worker_resumes_from_the_last_checkpoint(local_ray, subset, tiny_text_encoder, tmp_path):
    import threading

    from tests.training.test_distributed import kill_a_worker_after_first_checkpoint
    from training.distill_job import train_students
    from training.students import distill_config_from_dict

    teacher = tmp_path / "teacher"
    fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=2)), subset, teacher, cache_dir=tmp_path / "cache",
        progress=False)
    # A checkpoint at every epoch: enough of them that the kill lands in the middle of the run.
    raw = {**TINY_STUDENTS, "tracking": {"enabled": False}, "eval_every": 1,
           "image": {**TINY_STUDENTS["image"], "epochs": 12}, "text": {**TINY_STUDENTS["text"], "epochs": 4},
           "distributed": {"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(tmp_path / "ray_a")}}
    baseline = train_students(teacher, distill_config_from_dict(raw), subset, tmp_path / "baseline", tmp_path / "cache")

    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(tmp_path / "ray_b", killed))
    killer.start()
    raw["distributed"] = {**raw["distributed"], "storage": str(tmp_path / "ray_b"), "max_failures": 1}
    recovered = train_students(teacher, distill_config_from_dict(raw), subset, tmp_path / "recovered",
                               tmp_path / "cache")
    killer.join()

    assert killed, "no worker was killed: the run ended before its first checkpoint"
    resumed = {kind: recovered["students"][kind]["resumed_from_epoch"] for kind in ("image", "text")}
    assert max(resumed.values()) >= 1, resumed  # restarted from a reported checkpoint, not from scratch
    assert all(baseline["students"][kind]["resumed_from_epoch"] == 0 for kind in ("image", "text"))
    for kind, epochs in (("image", 12), ("text", 4)):
        ours, theirs = recovered["students"][kind], baseline["students"][kind]
        assert [h["epoch"] for h in ours["history"]] == list(range(1, epochs + 1))  # nothing lost, nothing twice
        # Same seed, same data: the interrupted run ends where the uninterrupted one does.
        assert ours["best"]["epoch"] == theirs["best"]["epoch"]
        assert ours["best"]["val_bit_agreement"] == pytest.approx(theirs["best"]["val_bit_agreement"], abs=0.02)
    for name in ("image_student.pt", "text_student.pt", "tokenizer", "distill_config.yaml"):
        assert (tmp_path / "recovered" / name).exists(), name
