"""Model lifecycle against a real MLflow server: gates, alias moves, the hash-chained audit log, rollback.

Two tiny student pairs are distilled and registered once for the module (``terrahash distill``'s
run_distillation, with the val figures it sets on each version), each with an index built from the
registry:

* ``good``: a teacher trained for 4 epochs, students distilled for 60 (image) and 2 (text) epochs;
* ``one_epoch``: a teacher trained for 1 epoch, students distilled for 1 epoch each.

Tiny random towers give codes that tie heavily on the 6 val images, so val mAP is not a reliable
judge of the two here. The refusal of the one-epoch model is asserted on figures that are reliably
worse: the parity gate's val bit agreement of its fp32 student with its teacher (about 0.3 after one
epoch against 0.98 for ``good``; the shipped threshold is 0.9). The tiny students never reach their
teacher's mAP, so the tests' gate file lowers ``min_map_ratio`` (and the int8 bit agreement, as
tests/training/test_distill_job.py does for tiny int8 students); every other threshold is the shipped one.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
pytest.importorskip("onnxruntime")
from mlflow import MlflowClient  # noqa: E402

from cluster.cli.main import main  # noqa: E402
from serving.governance.audit import ZERO_SHA256, AuditLog, canonical_bytes, entry_sha256  # noqa: E402
from serving.lifecycle.gates import GateConfig, check_gates, load_gate_config, write_canary_record  # noqa: E402
from serving.lifecycle.promotion import PromotionRefused, promote, rollback  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.training.test_distill_job import TINY_STUDENTS  # noqa: E402

NAME = "lifecycle-students"
TINY_GATES = {"min_map_ratio": 0.0, "min_bit_agreement_int8": 0.9, "variants": ["fp32", "int8"]}


@pytest.fixture(scope="module")
def lifecycle(mlflow_server, subset, tiny_text_encoder, local_ray, tmp_path_factory) -> dict:
    """Two registered versions of NAME (good, one_epoch), each with a verified index release."""
    from serving.ingest.build import build_indexes
    from training.config import config_from_dict
    from training.distill_job import run_distillation
    from training.students import distill_config_from_dict
    from training.train import fit

    tmp = tmp_path_factory.mktemp("lifecycle")
    tracking = {"tracking_uri": mlflow_server, "experiment": "lifecycle-test", "system_metrics": False}
    plans = {"good": (4, {"epochs": 60, "lr": 1e-2}, 2), "one_epoch": (1, {"epochs": 1}, 1)}
    versions = {}
    for label, (teacher_epochs, image, text_epochs) in plans.items():
        teacher = tmp / f"teacher-{label}"
        fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=teacher_epochs)), subset, teacher,
            cache_dir=tmp / "cache", progress=False)
        config = distill_config_from_dict({**TINY_STUDENTS, "registered_model": NAME, "tracking": tracking,
                                           "eval_every": 1, "image": {**TINY_STUDENTS["image"], **image},
                                           "text": {**TINY_STUDENTS["text"], "epochs": text_epochs}})
        metrics = run_distillation(teacher, config, subset, tmp / f"students-{label}", tmp / "cache")
        versions[label] = metrics["registered"]["version"]
        build_indexes(f"models:/{NAME}/{versions[label]}", subset, 2, str(tmp / f"index-{label}"), batch_size=32,
                      tracking_uri=mlflow_server, model_cache=tmp / "models")
    gates = tmp / "tiny-gates.yaml"
    gates.write_text(yaml.safe_dump(TINY_GATES))
    return {"uri": mlflow_server, "root": str(tmp / "root"), "gates": str(gates), "tmp": tmp,
            "cache": tmp / "models", "client": MlflowClient(mlflow_server), **versions}


def cli(lifecycle, *argv: str) -> list[str]:
    return [*argv, "--root", lifecycle["root"], "--tracking-uri", lifecycle["uri"]]


def holder(lifecycle, alias: str) -> str | None:
    aliases = lifecycle["client"].get_registered_model(NAME).aliases
    return None if alias not in aliases else str(aliases[alias])


def tags(lifecycle, version: str) -> dict:
    return lifecycle["client"].get_model_version(NAME, version).tags


def test_a_distilled_version_carries_its_val_figures(lifecycle):
    run = lifecycle["client"].get_run(lifecycle["client"].get_model_version(NAME, lifecycle["good"]).run_id)
    for key in ("val/fp32/image_to_image/map_all", "val/fp32/text_to_image/map_all", "val/fp32/mr",
                "val/int8/image_to_image/map_all", "val_parity/bit_agreement/fp32/image",
                "val_parity/teacher_agreement/fp32/text", "parity/bit_agreement/fp32/image"):
        assert key in run.data.metrics, key
    version_tags = tags(lifecycle, lifecycle["good"])
    assert float(version_tags["val/fp32/mr"]) == pytest.approx(run.data.metrics["val/fp32/mr"], abs=1e-5)
    assert not [k for k in version_tags if k.startswith(("parity/", "test"))]  # test figures are never gate inputs


def test_the_shipped_gate_file_is_the_default_config(tmp_path):
    assert load_gate_config() == GateConfig()
    bad = tmp_path / "gates.yaml"
    bad.write_text("min_map_ratio: '0.5'\nmax_val_drop: 0.1\n")
    with pytest.raises(ValueError) as err:
        load_gate_config(bad)
    assert f"{bad}: max_val_drop: unknown key" in str(err.value) and f"{bad}: min_map_ratio" in str(err.value)


def test_a_one_epoch_model_is_refused_naming_the_failed_gates(lifecycle, capsys):
    alias = "staging-a"
    assert main(cli(lifecycle, "promote", NAME, lifecycle["good"], "--alias", alias, "--gates", lifecycle["gates"])) == 0
    out = capsys.readouterr().out
    for gate in ("spec", "index", "val", "parity"):
        assert f"PASS {gate}" in out, out
    assert "no current holder" in out and holder(lifecycle, alias) == lifecycle["good"]
    assert tags(lifecycle, lifecycle["good"])["gate.parity"].startswith("passed: ")
    entries = AuditLog(lifecycle["root"], NAME).entries()

    assert main(cli(lifecycle, "promote", NAME, lifecycle["one_epoch"], "--alias", alias,
                    "--gates", lifecycle["gates"])) == 1
    captured = capsys.readouterr()
    assert "FAIL parity" in captured.out and "teacher agreement fp32 image" in captured.out, captured.out
    assert "failed gate(s): " in captured.err and "parity" in captured.err.split("failed gate(s): ")[1]
    assert holder(lifecycle, alias) == lifecycle["good"]  # nothing moved
    assert AuditLog(lifecycle["root"], NAME).entries() == entries  # and nothing was logged
    refused = tags(lifecycle, lifecycle["one_epoch"])
    assert refused["gate.parity"].startswith("failed: ") and "gate.checked" in refused
    # The val gate compared the two (its verdict on tiny codes is shown, not asserted).
    assert f"holder version {lifecycle['good']}" in refused["gate.val"]


def test_a_version_without_figures_or_index_fails_those_gates(lifecycle):
    client = lifecycle["client"]
    source = client.get_model_version(NAME, lifecycle["good"])
    bare = client.create_model_version(NAME, source.source, run_id=source.run_id).version  # no tags at all
    gates = {g.name: g for g in check_gates(NAME, bare, "staging-x", root=lifecycle["root"], tracking_uri=lifecycle["uri"],
                                            config=load_gate_config(lifecycle["gates"]), model_cache=lifecycle["cache"])}
    assert gates["spec"].passed and "no verified index release" in gates["spec"].detail
    assert not gates["index"].passed and f"--model models:/{NAME}/{bare}" in gates["index"].detail
    assert not gates["val"].passed and "no val figures" in gates["val"].detail
    assert not gates["parity"].passed and "canary" not in gates


def test_a_forced_promotion_records_its_reason_and_failed_gates(lifecycle, capsys):
    alias = "staging-b"
    assert main(cli(lifecycle, "promote", NAME, lifecycle["one_epoch"], "--alias", alias, "--force")) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert main(cli(lifecycle, "promote", NAME, lifecycle["one_epoch"], "--alias", alias, "--force", "--reason",
                    "hotfix: the old model fails on snow scenes", "--gates", lifecycle["gates"])) == 0
    assert "force-promote" in capsys.readouterr().out
    entry = AuditLog(lifecycle["root"], NAME).latest(alias)
    assert entry["action"] == "force-promote" and entry["reason"] == "hotfix: the old model fails on snow scenes"
    assert entry["from_version"] is None and entry["to_version"] == lifecycle["one_epoch"]
    assert "parity" in [g["name"] for g in entry["gates"] if not g["passed"]]
    assert holder(lifecycle, alias) == lifecycle["one_epoch"]
    assert f"alias.{alias}.since" in tags(lifecycle, lifecycle["one_epoch"])


def test_rollback_moves_the_alias_back_and_is_logged(lifecycle, capsys):
    alias = "staging-c"
    root, uri = lifecycle["root"], lifecycle["uri"]
    config = load_gate_config(lifecycle["gates"])
    promote(NAME, lifecycle["good"], alias, root=root, tracking_uri=uri, config=config, model_cache=lifecycle["cache"])
    with pytest.raises(ValueError, match="unset before its latest move"):
        rollback(NAME, alias, root=root, reason="nothing before", tracking_uri=uri)
    promote(NAME, lifecycle["one_epoch"], alias, root=root, tracking_uri=uri, config=config, force=True,
            reason="try the new one", model_cache=lifecycle["cache"])
    assert holder(lifecycle, alias) == lifecycle["one_epoch"]
    assert main(cli(lifecycle, "rollback", NAME, "--alias", alias, "--reason", "errors went up")) == 0
    assert f"{lifecycle['one_epoch']} -> {lifecycle['good']}" in capsys.readouterr().out
    assert holder(lifecycle, alias) == lifecycle["good"]
    entry = AuditLog(root, NAME).latest(alias)
    assert (entry["action"], entry["from_version"], entry["to_version"], entry["reason"]) == \
        ("rollback", lifecycle["one_epoch"], lifecycle["good"], "errors went up")
    assert tags(lifecycle, lifecycle["one_epoch"])["canary.status"] == "rolled_back"
    # The controller's automatic rollback: back again, recorded as such with its figures.
    automatic = rollback(NAME, alias, root=root, reason="probe mAP fell", tracking_uri=uri, automatic=True,
                         actor="serving-controller", figures={"probe_map": 0.1})
    assert automatic["action"] == "auto-rollback" and automatic["actor"] == "serving-controller"
    assert automatic["figures"] == {"probe_map": 0.1} and holder(lifecycle, alias) == lifecycle["one_epoch"]


def test_champion_needs_a_healthy_canary_as_challenger(lifecycle):
    root, uri, config = lifecycle["root"], lifecycle["uri"], load_gate_config(lifecycle["gates"])
    good = lifecycle["good"]
    with pytest.raises(PromotionRefused) as refused:
        promote(NAME, good, "champion", root=root, tracking_uri=uri, config=config, model_cache=lifecycle["cache"])
    assert refused.value.failed == ["canary"]
    assert "never served as 'challenger'" in {g.name: g for g in refused.value.gates}["canary"].detail
    promote(NAME, good, "challenger", root=root, tracking_uri=uri, config=config, model_cache=lifecycle["cache"])
    write_canary_record((NAME, good), {"status": "healthy", "requests": 12, "error_rate": 0.0, "p99_ms": 40.0,
                                       "probe_map": 0.6}, uri)
    with pytest.raises(PromotionRefused, match="12 requests < 50"):
        promote(NAME, good, "champion", root=root, tracking_uri=uri, config=config, model_cache=lifecycle["cache"])
    with pytest.raises(ValueError, match="canary status"):
        write_canary_record((NAME, good), {"status": "fine"}, uri)
    write_canary_record(f"models:/{NAME}/{good}", {"status": "healthy", "requests": 500, "error_rate": 0.001,
                                                   "p99_ms": 41.5, "probe_map": 0.61}, uri)
    entry = promote(NAME, good, "champion", root=root, tracking_uri=uri, config=config, model_cache=lifecycle["cache"])
    assert entry["action"] == "promote" and holder(lifecycle, "champion") == good
    assert {g["name"]: g["passed"] for g in entry["gates"]}["canary"]
    assert tags(lifecycle, good)["canary.requests"] == "500"


def test_history_verify_finds_an_edited_or_deleted_entry(lifecycle, tmp_path, capsys):
    promote(NAME, lifecycle["good"], "staging-d", root=lifecycle["root"], tracking_uri=lifecycle["uri"],
            config=load_gate_config(lifecycle["gates"]), model_cache=lifecycle["cache"])
    promote(NAME, lifecycle["one_epoch"], "staging-d", root=lifecycle["root"], tracking_uri=lifecycle["uri"],
            force=True, reason="for the history test", model_cache=lifecycle["cache"])
    copy = tmp_path / "root"
    shutil.copytree(lifecycle["root"], copy)
    argv = ["history", NAME, "--root", str(copy), "--verify"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chain intact" in out and "force-promote" in out and "staging-d" in out and "for the history test" in out
    assert main(["history", NAME, "--root", str(copy), "--aliases", "--tracking-uri", lifecycle["uri"]]) == 0
    capsys.readouterr()
    assert main(["history", NAME, "--root", str(copy), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["problems"] == [] and len(listed["entries"]) >= 4

    files = sorted((copy / "audit" / NAME).glob("*.json"))
    second = json.loads(files[1].read_text())
    edited = {**second, "reason": "nothing to see"}
    files[1].write_text(json.dumps(edited))
    assert main(argv) == 1
    assert f"{files[1].name}: edited" in capsys.readouterr().out
    # Re-hashing the edited entry does not help: the next entry's link breaks instead.
    files[1].write_text(json.dumps({**edited, "sha256": entry_sha256(edited)}))
    assert main(argv) == 1
    assert f"{files[2].name}: broken link" in capsys.readouterr().out

    files[1].write_text(json.dumps(second))
    assert main(argv) == 0
    capsys.readouterr()
    files[1].unlink()
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"gap in the log, entry {files[1].stem} is missing" in out and "broken link" in out
    files[0].write_text("{not json")
    assert main(argv) == 1 and "unparseable" in capsys.readouterr().out
    # A log whose last entries were lost no longer matches the registry's aliases.
    shutil.rmtree(copy)
    shutil.copytree(lifecycle["root"], copy)
    sorted((copy / "audit" / NAME).glob("*.json"))[-1].unlink()
    assert main(["history", NAME, "--root", str(copy), "--aliases", "--tracking-uri", lifecycle["uri"]]) == 1
    assert "alias 'staging-d' is version" in capsys.readouterr().out


# --- the audit log on its own -------------------------------------------------------------------------------


def test_entries_chain_by_the_sha256_of_their_canonical_bytes(tmp_path):
    audit = AuditLog(tmp_path, "m")
    first = audit.append(action="promote", alias="champion", to_version=1, actor="ana@host")
    second = audit.append(action="rollback", alias="champion", from_version=1, to_version="2", reason="why")
    assert (first["seq"], first["prev_sha256"]) == (1, ZERO_SHA256)
    assert second["prev_sha256"] == first["sha256"] and second["to_version"] == "2" and second["from_version"] == "1"
    stored = json.loads((tmp_path / "audit" / "m" / "000002.json").read_text())
    assert stored == second and stored["sha256"] == __import__("hashlib").sha256(canonical_bytes(stored)).hexdigest()
    assert b" " not in canonical_bytes({"b": 1, "a": [1, 2]}) and canonical_bytes({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    assert audit.previous_version("champion") == "1" and audit.previous_version("other") is None
    assert audit.verify() == []
    with pytest.raises(ValueError, match="action"):
        audit.append(action="delete", alias="champion", to_version="3")
    with pytest.raises(ValueError, match="cannot be given"):
        audit.append(action="promote", alias="champion", to_version="3", seq=7)


def test_concurrent_appends_never_share_a_number(tmp_path):
    root = tmp_path / "root"
    errors = []
    barrier = threading.Barrier(6)

    def writer(n):
        barrier.wait()
        try:
            for i in range(5):
                AuditLog(root, "m").append(action="promote", alias=f"a{n}", to_version=str(i + 1))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit = AuditLog(root, "m")
    assert not errors and [e["seq"] for e in audit.entries()] == list(range(1, 31))
    assert audit.verify() == []


def test_the_log_lives_on_s3_too(s3_endpoint):
    import uuid

    from serving.storage import open_root

    root = open_root(f"s3://terrahash-test/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    audit = AuditLog(root, "m")
    for version in ("1", "2", "3"):
        audit.append(action="promote", alias="champion", to_version=version, from_version=audit.latest("champion")
                     and audit.latest("champion")["to_version"])
    assert audit.verify() == [] and audit.previous_version("champion") == "2"
    root.write_bytes("audit/m/000002.json", root.read_bytes("audit/m/000002.json").replace(b'"2"', b'"9"'))
    assert [p for p in audit.verify() if "000002.json: edited" in p]


def test_the_default_root_and_actor_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TERRAHASH_ROOT", str(tmp_path / "env-root"))
    monkeypatch.setenv("TERRAHASH_ACTOR", "ops-bot")
    entry = AuditLog(None, "m").append(action="promote", alias="champion", to_version="1")
    assert entry["actor"] == "ops-bot" and (tmp_path / "env-root" / "audit" / "m" / "000001.json").is_file()
    assert Path(tmp_path / "env-root").is_dir()
