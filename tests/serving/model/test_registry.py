"""The model registry as the source of model versions: models:/ URIs, verified fetches, index builds from it.

Against a real MLflow tracking server (proxied artifacts), with the tiny exported students registered
as versions of a model.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("onnxruntime")

from serving.model import registry  # noqa: E402
from serving.model.registry import (INDEX_RELEASES_TAG, ModelIntegrityError, ModelNotFoundError,  # noqa: E402
                              fetch_model, index_releases, parse_model_uri, resolve_model)

NAME = "registry-test-students"
MODEL_FILES = shutil.ignore_patterns("torch_students.pt", "done.json")  # the export's extras, not a model version


def register(tracking_uri: str, folder: Path, name: str = NAME) -> str:
    """Log ``folder`` as a run's ``onnx/`` artifacts and register it as a new version of ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name("registry-test") is None:
        client.create_experiment("registry-test")
    run = client.create_run(client.get_experiment_by_name("registry-test").experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "onnx")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id).version


@pytest.fixture(scope="module")
def registered(mlflow_server, model_dir, tmp_path_factory) -> dict:
    """Version 1 of NAME: the tiny exported students, with the alias "challenger"."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("version") / "onnx"
    shutil.copytree(model_dir, folder, ignore=MODEL_FILES)
    version = register(mlflow_server, folder)
    MlflowClient(mlflow_server).set_registered_model_alias(NAME, "challenger", version)
    return {"version": version, "folder": folder, "uri": mlflow_server}


@pytest.fixture
def downloads(monkeypatch) -> list:
    """Every download fetch_model makes, counted."""
    calls = []
    real = registry._download

    def counted(ref, temp, tracking_uri):
        calls.append(ref.version_uri)
        return real(ref, temp, tracking_uri)

    monkeypatch.setattr(registry, "_download", counted)
    return calls


def test_model_uris_parse_and_malformed_ones_are_refused():
    assert parse_model_uri("models:/terrahash-students/3") == ("terrahash-students", "3", None)
    assert parse_model_uri("models:/terrahash-students@champion") == ("terrahash-students", None, "champion")
    assert parse_model_uri("runs/fast-64/students/onnx") is None and parse_model_uri(Path("/tmp/x")) is None
    for bad in ("models:/", "models:/name", "models:/name/", "models:/name/latest", "models:/name/0",
                "models:/name/3/onnx", "models:/name@", "models:/@alias", "models:/a b/1"):
        with pytest.raises(ValueError, match="malformed model URI"):
            parse_model_uri(bad)


def test_resolve_by_version_and_by_alias(registered):
    by_version = resolve_model(f"models:/{NAME}/{registered['version']}", registered["uri"])
    by_alias = resolve_model(f"models:/{NAME}@challenger", registered["uri"])
    assert by_version.version == by_alias.version == registered["version"]
    assert by_alias.alias == "challenger" and by_alias.version_uri == f"models:/{NAME}/{registered['version']}"
    assert by_version.source.endswith("/onnx") and by_version.run_id
    folder = resolve_model(str(registered["folder"]))
    assert folder.name is None and folder.version is None and folder.source == str(registered["folder"])


def test_unknown_names_versions_and_aliases_name_what_exists(registered):
    with pytest.raises(ModelNotFoundError, match=rf"no version 99; its versions: \[.*{registered['version']}"):
        resolve_model(f"models:/{NAME}/99", registered["uri"])
    with pytest.raises(ModelNotFoundError, match=rf"no alias 'champion'; its aliases: challenger -> "
                                                 rf"{registered['version']}"):
        resolve_model(f"models:/{NAME}@champion", registered["uri"])
    with pytest.raises(ModelNotFoundError, match=rf"no registered model 'nope'.*{NAME}"):
        resolve_model("models:/nope/1", registered["uri"])


def test_tracking_uri_comes_from_the_argument_then_the_environment(registered, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert resolve_model(f"models:/{NAME}/{registered['version']}").version == registered["version"]
    with pytest.raises(ModelNotFoundError, match="no registered model"):  # the argument wins: an empty store
        resolve_model(f"models:/{NAME}/1", f"sqlite:///{tmp_path / 'empty.db'}")


def test_fetch_downloads_once_verifies_and_refetches_a_damaged_copy(registered, downloads, tmp_path):
    from serving.model.encoders import load_encoder

    uri = f"models:/{NAME}/{registered['version']}"
    cache = tmp_path / "cache"
    local = fetch_model(uri, cache, registered["uri"])
    assert local == cache / NAME / registered["version"]
    assert sorted(p.name for p in local.glob("*.onnx")) == sorted(p.name for p in registered["folder"].glob("*.onnx"))
    assert load_encoder(local / "text_student.spec.json").encode_packed(["a runway"]).shape == (1, 2)
    assert fetch_model(f"models:/{NAME}@challenger", cache, registered["uri"]) == local  # alias: same version
    assert len(downloads) == 1
    # A cached copy that lost bytes is noticed by its sizes and fetched again.
    with open(local / "image_student.onnx", "ab") as f:
        f.write(b"x")
    assert fetch_model(uri, cache, registered["uri"]) == local and len(downloads) == 2
    assert registry.cached_problem(local, "sha256") is None
    assert not [p for p in (cache / NAME).iterdir() if p.name.endswith(".partial")]
    # The same name and version fetched from another registry earlier (its record names another source).
    record = json.loads((local / registry.FETCH_RECORD).read_text())
    (local / registry.FETCH_RECORD).write_text(json.dumps({**record, "source": "mlflow-artifacts:/elsewhere/onnx"}))
    assert fetch_model(uri, cache, registered["uri"]) == local and len(downloads) == 3


def test_fetch_refuses_a_version_whose_model_does_not_match_its_spec(registered, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(registered["folder"], tampered)
    with open(tampered / "image_student.int8.onnx", "ab") as f:
        f.write(b"\0")  # the model changed after its spec recorded its sha256
    version = register(registered["uri"], tampered)
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match=r"image_student\.int8\.onnx has sha256 .* its spec "
                                                  r"image_student\.int8\.spec\.json says"):
        fetch_model(f"models:/{NAME}/{version}", cache, registered["uri"])
    assert not (cache / NAME / version).exists()  # nothing half-fetched is left to be reused
    assert not [p for p in (cache / NAME).iterdir() if not p.name.endswith(".lock")]


def test_concurrent_fetches_on_one_machine_download_once(registered, downloads, tmp_path):
    uri, cache = f"models:/{NAME}/{registered['version']}", tmp_path / "cache"
    results, errors = [], []
    barrier = threading.Barrier(4)

    def replica():
        barrier.wait()
        try:
            results.append(fetch_model(uri, cache, registered["uri"]))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert downloads == [uri]


def test_a_folder_is_returned_as_it_is(registered, tmp_path):
    assert fetch_model(registered["folder"], tmp_path / "cache") == registered["folder"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_model(tmp_path / "missing", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_index_build_from_the_registry_records_the_model_and_tags_the_version(local_ray, registered, subset,
                                                                             model_dir, tmp_path):
    from serving.ingest.build import add_images, build_indexes
    from serving.model.versions import served_model
    from serving.index.releases import read_release, resolve_release

    root, cache = str(tmp_path / "index"), tmp_path / "cache"
    version = registered["version"]
    # Asked by alias, recorded by number.
    result = build_indexes(f"models:/{NAME}@challenger", subset, 2, root, batch_size=32, splits=("train",),
                           tracking_uri=registered["uri"], model_cache=cache)
    model = {"uri": f"models:/{NAME}/{version}", "name": NAME, "version": version}
    release = read_release(root, result["release"]["release"])
    assert release["model"] == model and result["images"]["extra"]["model"] == model
    assert result["captions"]["extra"]["model"] == model
    assert result["images"]["model_version"].startswith(f"{NAME}/{version}@")
    assert served_model(release) == served_model(resolve_release(root)) == model["uri"]
    ref = resolve_model(model["uri"], registered["uri"])
    assert index_releases(ref, registered["uri"]) == [{"index": str(Path(root).resolve()), "release": "r0001"}]

    # An add on another machine: no model folder there; the model comes from the registry again.
    shutil.rmtree(cache)
    added = add_images(subset, root, splits=("val",), tracking_uri=registered["uri"], model_cache=cache)
    assert (cache / NAME / version).is_dir()
    assert read_release(root, added["release"]["release"])["model"] == model
    tags = resolve_model(model["uri"], registered["uri"]).tags
    assert [e["release"] for e in json.loads(tags[INDEX_RELEASES_TAG])] == ["r0001", "r0002"]

    # An index built from a folder keeps a checked copy of it in its own root, and serves that copy,
    # so that no manifest names a folder of the build machine.
    old_root = tmp_path / "old"
    old = build_indexes(model_dir, subset, 1, str(old_root), batch_size=32, captions=False)
    assert "model" not in old["release"] and "model_dir" not in old["images"]["extra"]
    copy = Path(served_model(resolve_release(old_root), str(old_root)))
    assert copy.parent.parent == (old_root / "models").resolve() and copy.name == model_dir.name
    assert sorted(p.name for p in copy.iterdir() if p.name != "MANIFEST.json") == sorted(
        p.name for p in model_dir.iterdir())
    with pytest.raises(ValueError, match="artifact root"):
        served_model(resolve_release(old_root))
