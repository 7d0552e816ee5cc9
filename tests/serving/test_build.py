"""Index build and add over real UCM images with Ray tasks, and the `terrahash index` commands."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cluster.cli import main  # noqa: E402
from serving.build import add_images, dataset_items, find_spec, model_version_label  # noqa: E402
from serving.encoders import load_encoder  # noqa: E402
from serving.index import load_index, read_manifest, stable_shard  # noqa: E402
from tests.serving.conftest import SHARDS  # noqa: E402


def test_build_writes_image_and_caption_indexes_of_real_codes(built_index, model_dir, ucm_many):
    items = dataset_items(ucm_many)
    images, captions = built_index["images"], built_index["captions"]
    assert images["rows"] == len(items.image_ids) == 210 and images["n_shards"] == SHARDS
    assert captions["rows"] == len(items.captions) and captions["has_image_ids"]
    spec = find_spec(model_dir, "image")
    assert images["model_version"] == captions["model_version"] == model_version_label(model_dir, spec)
    index = load_index(built_index["root"], images["version"])
    # The stored codes are the image student's codes of the real files, on the shard the id hashes to.
    encoder = load_encoder(spec)
    for image_id, path in list(zip(items.image_ids, items.image_paths))[::40]:
        shard = index.shards[stable_shard(image_id, SHARDS)]
        position = int(np.flatnonzero(shard.ids == image_id)[0])
        np.testing.assert_array_equal(shard.codes[position], encoder.encode_packed([path])[0])
    caption_index = load_index(built_index["root"], captions["version"], "captions")
    assert set(caption_index.image_ids(np.arange(captions["rows"]))) == set(items.image_ids)


def test_find_spec_picks_kind_and_variant(model_dir):
    assert find_spec(model_dir, "text").name == "text_student.spec.json"
    assert find_spec(model_dir, "image", "int8").name == "image_student.int8.spec.json"
    with pytest.raises(ValueError, match="variant"):
        find_spec(model_dir, "image", "fp16")


def _halves(ucm_many, tmp_path):
    """Two datasets over disjoint halves of the 210 images."""
    document = json.loads((ucm_many / "dataset_subset.json").read_text())
    folders = []
    for n, part in enumerate((document["images"][::2], document["images"][1::2])):
        folder = tmp_path / f"half{n}"
        folder.mkdir()
        (folder / "dataset_half.json").write_text(json.dumps({"dataset": "half", "images": part}))
        folders.append(folder)
    return folders


def test_add_extends_the_index_without_rebuilding_other_shards(local_ray, mlflow_server, model_dir, ucm_many,
                                                               tmp_path):
    from mlflow import MlflowClient

    first, second = _halves(ucm_many, tmp_path)
    root = str(tmp_path / "root")
    assert main(["index", "build", "--model", str(model_dir), "--data", str(first), "--shards", "4",
                 "--out", root, "--no-captions", "--tracking-uri", mlflow_server]) == 0
    base = read_manifest(root, "v0001")
    # The build is an MLflow run of its own, with its energy and what it wrote.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("terrahash")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`index.root` = '{root}'")
    assert run.info.run_name == "index-build" and run.info.status == "FINISHED"
    assert run.data.metrics["images_encoded"] == 105 and run.data.metrics["images_rows"] == base["rows"] == 105
    assert run.data.metrics["energy_kwh"] > 0 and "energy_kwh_per_1k_images" in run.data.metrics
    assert run.data.params["shards"] == "4" and run.data.params["model"] == str(model_dir)
    assert run.data.tags["index.images.version"] == "v0001"
    assert run.data.tags["model_version"] == base["model_version"] and run.data.tags["energy.source"]
    [artifact] = client.list_artifacts(run.info.run_id)
    assert artifact.path == "manifests.json"
    one = json.loads((second / "dataset_half.json").read_text())
    (second / "dataset_half.json").write_text(json.dumps({**one, "images": one["images"][:2]}))  # two new images
    manifests = add_images(second, root, captions=False)
    new = manifests["images"]
    assert new["version"] == "v0002" and new["rows"] == base["rows"] + 2 and new["base_version"] == "v0001"
    untouched = [b for b, n in zip(base["shards"], new["shards"]) if n["rows"] == b["rows"]]
    assert len(untouched) >= 2  # two ids reach at most two of the four shards; the rest keep their files
    for entry in untouched:
        assert entry == next(n for n in new["shards"] if n["name"] == entry["name"])
    with pytest.raises(ValueError, match="already in the index"):
        add_images(second, root, captions=False)  # the same images again


def test_verify_command_reports_a_corrupted_shard(built_index, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(built_index["root"], root)
    assert main(["index", "verify", str(root)]) == 0
    assert "all good" in capsys.readouterr().out
    victim = root / "index" / "images" / built_index["images"]["version"] / "shard-00001.codes.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["index", "verify", str(root), "--collections", "images"]) == 1
    out = capsys.readouterr().out
    assert "shard-00001" in out and "checksum mismatch" in out
