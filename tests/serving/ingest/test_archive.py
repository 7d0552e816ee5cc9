"""Indexing archives as users have them: a folder tree or an S3 prefix of images, no dataset JSON."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cluster.cli.main import main  # noqa: E402
from serving.ingest.archive import ArchiveError, archive_items, read_sidecar  # noqa: E402
from serving.ingest.build import add_images, build_indexes  # noqa: E402
from serving.ingest.items import dataset_items  # noqa: E402
from serving.index.refs import ImageRefs  # noqa: E402
from serving.index.items import ItemFilter  # noqa: E402
from serving.index.releases import load_index  # noqa: E402
from serving.index.versions import read_manifest  # noqa: E402


def _codes_by_file(root, manifest) -> dict[str, np.ndarray]:
    """Stored code of every item of an index version, by the item's file name."""
    index = load_index(root, manifest["version"])
    out = {}
    for shard in index.shards:
        for image_id, code in zip(shard.ids, shard.codes):
            out[Path(str(image_id)).name] = code
    return out


@pytest.fixture(scope="module")
def archive(ucm_many, tmp_path_factory) -> Path:
    """A plain folder tree of real UCM images (class folders, one nested deeper), with what real folders
    also hold: a corrupt JPEG, a text file, a hidden folder."""
    folder = tmp_path_factory.mktemp("archive")
    for item_path in dataset_items(ucm_many).image_paths[::7]:  # 30 images across the classes
        source = Path(item_path)
        target = folder / source.parent.name / source.name
        if source.parent.name == "beach":
            target = folder / "coast" / "beach" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (folder / ".thumbs").mkdir()
    shutil.copyfile(source, folder / ".thumbs" / "cached.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "README.txt").write_text("scenes from the survey")
    return folder


def test_archive_items_walk_the_tree_in_order_with_relative_ids(archive):
    items = archive_items(archive)
    assert items.image_ids == sorted(items.image_ids) and len(items.image_ids) == 31  # 30 scenes + broken.jpg
    assert "broken.jpg" in items.image_ids and not any(i.startswith(".thumbs") for i in items.image_ids)
    assert not any(i.endswith(".txt") for i in items.image_ids)
    assert any(i.startswith("coast/beach/") for i in items.image_ids)
    assert items.image_paths == [str(archive / i) for i in items.image_ids] and items.captions == []


def test_a_folder_index_has_the_json_index_codes_and_reports_the_unreadable_file(local_ray, built_index, model_dir,
                                                                                  archive, tmp_path, capsys):
    root = str(tmp_path / "index")
    assert main(["index", "build", "--model", str(model_dir), "--images", str(archive), "--shards", "2",
                 "--out", root, "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "left out 1 image(s)" in out and "broken.jpg" in out
    manifest = read_manifest(root, "v0001")
    assert manifest["rows"] == 30 and manifest["extra"]["skipped_images"] == 1
    [[path, reason]] = manifest["extra"]["skipped_listed"]
    assert path == str(archive / "broken.jpg") and "decode" in reason
    # The same files give the same codes as the Karpathy-JSON index of the same images.
    folder_codes = _codes_by_file(root, manifest)
    json_codes = _codes_by_file(built_index["root"], built_index["images"])
    assert len(folder_codes) == 30
    for name, code in folder_codes.items():
        np.testing.assert_array_equal(code, json_codes[name])
    # Each item's source: the archive root recorded for its rows, then its relative id.
    refs = ImageRefs(manifest)
    index = load_index(root, "v0001")
    shard = index.shards[0]
    assert refs(int(shard.rows[0]), str(shard.ids[0])) == str(archive / str(shard.ids[0]))


def test_a_sidecar_gives_classes_and_captions_and_a_wrong_one_is_refused(archive, tmp_path):
    ids = archive_items(archive).image_ids
    sidecar = tmp_path / "meta.csv"
    with sidecar.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "class", "caption", "acquired"])
        writer.writerow([ids[0], "agricultural", "rows of crops | a green field", "2024-05-01"])
        writer.writerow([ids[1], "agricultural", "", "2024-05-02"])
    items = archive_items(archive, sidecar)
    assert items.captions == ["rows of crops", "a green field"]
    assert items.caption_ids == [f"{ids[0]}#0", f"{ids[0]}#1"] and items.caption_image_ids == [ids[0]] * 2
    assert items.labels[:3] == ["agricultural", "agricultural", ""]
    assert items.metadata[0] == {"acquired": "2024-05-01"} and items.metadata[2] == {}
    as_json = tmp_path / "meta.json"
    as_json.write_text(json.dumps({ids[0]: {"class": "agricultural", "captions": ["rows of crops"]}}))
    assert read_sidecar(as_json)[ids[0]]["captions"] == ["rows of crops"]

    with sidecar.open("a", newline="") as f:
        csv.writer(f).writerow(["nowhere/missing.jpg", "beach", "", ""])
    with pytest.raises(ArchiveError, match="1 id.*name no image file.*nowhere/missing.jpg"):
        archive_items(archive, sidecar)
    no_id = tmp_path / "bad.csv"
    no_id.write_text("file,class\na.jpg,beach\n")
    with pytest.raises(ArchiveError, match="'id' column"):
        archive_items(archive, no_id)
    with pytest.raises(ArchiveError, match="no such folder"):
        archive_items(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ArchiveError, match="no image files"):
        archive_items(empty)


def test_an_s3_prefix_is_indexed_by_tasks_that_read_the_objects(local_ray, s3_endpoint, model_dir, archive,
                                                                 tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    local = archive_items(archive)
    chosen = [i for i in local.image_ids if i != "broken.jpg"][:6]
    for image_id in chosen:
        client.upload_file(str(archive / image_id), "terrahash-test", f"survey/2024/{image_id}")
    client.put_object(Bucket="terrahash-test", Key="survey/2024/notes.txt", Body=b"not an image")
    prefix = "s3://terrahash-test/survey/2024"
    items = archive_items(prefix)
    assert items.image_ids == sorted(chosen) and items.image_paths[0] == f"{prefix}/{items.image_ids[0]}"

    root = str(tmp_path / "index")
    result = build_indexes(model_dir, None, 2, root, images=prefix, batch_size=4)
    manifest = result["images"]
    assert manifest["rows"] == 6 and manifest["extra"]["dataset"] == prefix and result["captions"] is None
    folder_root = str(tmp_path / "folder_index")
    folder = build_indexes(model_dir, None, 2, folder_root, images=str(archive))["images"]
    s3_codes, folder_codes = _codes_by_file(root, manifest), _codes_by_file(folder_root, folder)
    for name, code in s3_codes.items():
        np.testing.assert_array_equal(code, folder_codes[name])
    refs = ImageRefs(manifest)
    assert refs(0, "x.jpg") == f"{prefix}/x.jpg"  # results point at the objects themselves

    # New imagery arriving in another prefix is added to the same index, from its own root.
    client.upload_file(str(archive / chosen[0]), "terrahash-test", f"survey/2025/new/{Path(chosen[0]).name}")
    added = add_images(None, root, images="s3://terrahash-test/survey/2025")["images"]
    assert added["rows"] == 7
    assert ImageRefs(added)(6, "new/a.jpg") == "s3://terrahash-test/survey/2025/new/a.jpg"


def test_the_command_line_says_what_goes_with_what(model_dir, archive, tmp_path):
    with pytest.raises(SystemExit, match="--sidecar describes an archive"):
        main(["index", "build", "--model", str(model_dir), "--sidecar", str(tmp_path / "m.csv"), "--shards", "1",
              "--out", str(tmp_path / "i"), "--no-track"])
    with pytest.raises(ValueError, match="only one of"):
        build_indexes(model_dir, archive, 1, str(tmp_path / "i"), images=str(archive))
    with pytest.raises(SystemExit, match="not both"):
        main(["index", "build", "--model", str(model_dir), "--images", str(archive), "--stac", "c.json",
              "--shards", "1", "--out", str(tmp_path / "i"), "--no-track"])
    with pytest.raises(SystemExit, match="--stac-asset names an asset"):
        main(["index", "build", "--model", str(model_dir), "--stac-asset", "visual", "--shards", "1",
              "--out", str(tmp_path / "i"), "--no-track"])


def readme_build(images: Path, model_dir: Path, out: Path) -> int:
    """The README's archive example as a newcomer types it: tracking on (the default, into $MLFLOW_TRACKING_URI)."""
    return main(["index", "build", "--images", str(images), "--model", str(model_dir), "--shards", "2",
                 "--out", str(out)])


def tracked_build(tracking_uri: str, out: Path):
    """The finished MLflow run of the index build that wrote ``out``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("terrahash")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`index.root` = '{out}'")
    assert run.info.run_name == "index-build" and run.info.status == "FINISHED"
    return run


def test_the_readme_archive_command_tracks_a_flat_folder_of_photos(local_ray, mlflow_server, model_dir, ucm_many,
                                                                    tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    folder = tmp_path / "photos"  # photos straight off a drive: no class folders, no dataset JSON
    folder.mkdir()
    for path in dataset_items(ucm_many).image_paths[::7]:
        shutil.copyfile(path, folder / Path(path).name)
    out = tmp_path / "index"
    with caplog.at_level(logging.INFO, logger="cluster.cli.serving"):
        assert readme_build(folder, model_dir, out) == 0
    [note] = [r.getMessage() for r in caplog.records if "no class-folder set" in r.getMessage()]
    assert "30 image file(s)" in note and "\n" not in note
    manifest = read_manifest(str(out), "v0001")
    assert manifest["rows"] == 30
    run = tracked_build(mlflow_server, out)
    assert run.data.tags["dataset"] == "photos" and len(run.data.tags["dataset.fingerprint"]) == 16
    assert run.data.metrics["images_encoded"] == run.data.metrics["images_rows"] == 30
    assert run.data.tags["index.release"] == "r0001" and run.data.tags["model_version"] == manifest["model_version"]
    assert run.data.metrics["energy_kwh"] > 0 and run.data.params["source_kind"] == "archive"


def test_the_readme_archive_command_tracks_a_flat_folder_of_scenes_and_a_box_finds_their_chips(
        local_ray, mlflow_server, model_dir, ucm_many, tmp_path, monkeypatch):
    from tests.serving.ingest.test_geo import PIXEL, _mosaic, from_origin, write_geotiff  # needs rasterio

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    folder = tmp_path / "scenes"
    folder.mkdir()
    mosaic = _mosaic(ucm_many, 2, 3)[:, :500, :600]  # 6 chips of 256 pixels each
    write_geotiff(folder / "lonlat.tif", mosaic, "EPSG:4326", from_origin(-117.0, 34.0, PIXEL, PIXEL))
    # UTM zone 11, about 90 km east of the first scene
    write_geotiff(folder / "utm.tif", mosaic, "EPSG:32611", from_origin(600000.0, 3760000.0, 0.3, 0.3))
    out = tmp_path / "index"
    assert readme_build(folder, model_dir, out) == 0
    run = tracked_build(mlflow_server, out)
    assert run.data.tags["dataset"] == "scenes"
    assert run.data.metrics["images_encoded"] == run.data.metrics["images_rows"] == 12  # chips, not files

    # A box around the first scene answers its chips only, in (distance, row) order, at their true distances.
    index = load_index(str(out), "v0001")
    ids = np.concatenate([s.ids for s in index.shards]).astype(str)
    codes = np.concatenate([s.codes for s in index.shards])
    query = codes[[i.startswith("utm.tif") for i in ids].index(True)][None, :]
    distances, rows = index.search(query, 20, where=ItemFilter.parse(bbox=[-117.01, 33.9, -116.9, 34.01]))
    found = [str(i) for i in index.ids(rows[0]) if i]
    assert sorted(found) == sorted(i for i in ids if i.startswith("lonlat.tif?window=")) and len(found) == 6
    kept = distances[0][:len(found)]
    assert list(kept) == sorted(kept)
    want = {i: int(np.unpackbits(np.bitwise_xor(query[0], c)).sum()) for i, c in zip(ids, codes)}
    assert [int(d) for d in kept] == [want[i] for i in found]
