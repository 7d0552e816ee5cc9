"""Index build and add over real UCM images with Ray tasks, and the `terrahash index` commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cluster.cli.main import main  # noqa: E402
from serving.ingest.build import add_images  # noqa: E402
from serving.model.versions import find_spec, model_version_label  # noqa: E402
from serving.ingest.items import dataset_items  # noqa: E402
from serving.model.encoders import load_encoder  # noqa: E402
from serving.index.refs import ImageRefs
from serving.index.releases import load_index, read_release, resolve_release, verify_release
from serving.index.shards import stable_shard
from serving.index.versions import read_manifest
from serving.model.spec import code_space_id, load_spec  # noqa: E402
from tests.conftest import SHARDS  # noqa: E402


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
    assert run.data.tags["index.images.version"] == "v0001" and run.data.tags["index.release"] == "r0001"
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


def test_build_records_the_code_space_in_manifests_and_release(built_index, model_dir):
    expected = code_space_id(load_spec(find_spec(model_dir, "image")).data)
    assert built_index["images"]["code_space"] == built_index["captions"]["code_space"] == expected
    release = read_release(built_index["root"], built_index["release"]["release"])
    assert release["code_space"] == expected and release["collections"]["captions"]["version"] == \
        built_index["captions"]["version"]
    assert verify_release(built_index["root"]).ok


def synthetic_dataset(folder, n: int, seed: int, name: str = "new"):
    """New imagery outside the first dataset's folder: random JPEGs with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{name}{i}.jpg")
        entries.append({"filename": f"{name}{i}.jpg", "filepath": "images", "split": "test", "class": "new",
                        "sentences": [{"raw": f"a new scene number {i}"}, {"raw": "something new"}]})
    (folder / "dataset_new.json").write_text(json.dumps({"dataset": name, "images": entries}))
    return folder


def test_add_to_a_named_release_uses_its_versions_and_the_new_datas_image_root(local_ray, model_dir, ucm_many,
                                                                               tmp_path):
    first, _ = _halves(ucm_many, tmp_path)
    root = str(tmp_path / "root")
    assert main(["index", "build", "--model", str(model_dir), "--data", str(first), "--shards", "3",
                 "--out", root, "--no-track"]) == 0
    newer = synthetic_dataset(tmp_path / "newer", 2, seed=1, name="newer")
    assert main(["index", "add", "--data", str(newer), "--out", root, "--no-track"]) == 0  # r0002: v0002 both
    other = synthetic_dataset(tmp_path / "other", 3, seed=2, name="other")
    assert main(["index", "add", "--base", "r0001", "--data", str(other), "--out", root, "--no-track"]) == 0
    served = resolve_release(root)
    assert served["release"] == "r0003" and read_release(root, "r0003")["base_release"] == "r0001"
    images, captions = served["images"], served["captions"]
    assert images["base_version"] == "v0001" and captions["base_version"] == "v0001"  # not the latest, v0002
    assert images["rows"] == 105 + 3 and captions["rows"] == 105 * 5 + 3 * 2
    # The added images are found where they are, not under the first dataset's folder.
    refs, index = ImageRefs(images), load_index(root)
    for row in range(105, 108):
        image_id = index.ids([row])[0]
        assert image_id.startswith("images/other") and Path(refs(row, image_id)).is_file(), refs(row, image_id)
    assert Path(refs(0, index.ids([0])[0])).is_file()
    caption_refs, caption_index = ImageRefs(captions), load_index(root, collection="captions")
    last = captions["rows"] - 1
    assert Path(caption_refs(last, caption_index.image_ids([last])[0])).is_file()
    assert main(["index", "verify", root, "--release", "r0003"]) == 0


def test_bad_images_stop_a_build_unless_skipped(local_ray, model_dir, tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data", 4, seed=3)
    (data / "images" / "new1.jpg").write_bytes(b"not a jpeg")
    root = str(tmp_path / "root")
    command = ["index", "build", "--model", str(model_dir), "--data", str(data), "--shards", "2", "--out", root,
               "--no-track"]
    assert main(command) == 2
    assert "1 input(s) cannot be encoded" in capsys.readouterr().err and "new1.jpg" not in str(list(Path(root).rglob("*")))
    assert main([*command, "--skip-bad-images"]) == 0
    assert "left out 1 image(s)" in capsys.readouterr().out
    served = resolve_release(root)
    assert served["images"]["rows"] == 3 and served["captions"]["rows"] == 6  # its captions left out too
    assert served["images"]["extra"]["skipped_images"] == 1
    assert served["images"]["extra"]["skipped_listed"][0][0].endswith("new1.jpg")


def test_options_that_do_not_apply_to_index_builds_are_not_accepted(capsys):
    for option in (["--device", "cpu"], ["--cache-dir", "x"], ["--no-cache"]):
        with pytest.raises(SystemExit):
            main(["index", "build", "--model", "m", "--shards", "1", "--out", "o", *option])
        assert "unrecognized arguments" in capsys.readouterr().err
