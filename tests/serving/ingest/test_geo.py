"""GeoTIFF scenes: real GeoTIFFs written from the shared UCM images with a known CRS and transform."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("onnxruntime")

from affine import Affine  # noqa: E402  (rasterio's transforms)

from serving.ingest.archive import archive_items  # noqa: E402
from serving.ingest.build import build_indexes  # noqa: E402
from serving.ingest.items import dataset_items  # noqa: E402
from serving.model.encoders import load_encoder  # noqa: E402
from serving.ingest.geo import ChipConfig, scene_chips, stretch, tiff_datetime  # noqa: E402
from serving.index.releases import load_index  # noqa: E402
from serving.index.versions import read_manifest  # noqa: E402

PIXEL = 1e-4  # degrees per pixel of the EPSG:4326 scene


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """A north-up transform: pixel (0, 0)'s corner at (west, north)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def _mosaic(ucm_many, rows: int, cols: int) -> np.ndarray:
    """(3, 256 rows, 256 cols) uint8: real UCM images side by side."""
    from PIL import Image

    paths = dataset_items(ucm_many).image_paths[::11]
    tiles = [np.asarray(Image.open(p).convert("RGB").resize((256, 256))) for p in paths[:rows * cols]]
    grid = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)
    return np.ascontiguousarray(grid.transpose(2, 0, 1))


def write_geotiff(path: Path, data: np.ndarray, crs: str | None, transform=None, nodata=None, when: str | None = None):
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": str(data.dtype), "tiled": True, "blockxsize": 128, "blockysize": 128}
    if crs:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if when:
            dst.update_tags(TIFFTAG_DATETIME=when)
    return path


@pytest.fixture(scope="module")
def scenes(ucm_many, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scenes")
    mosaic = _mosaic(ucm_many, 2, 3)[:, :500, :600]  # 500 x 600 pixels
    (folder / "survey").mkdir()
    degrees = write_geotiff(folder / "survey" / "lonlat.tif", mosaic, "EPSG:4326",
                            from_origin(-117.0, 34.0, PIXEL, PIXEL), when="2024:06:01 10:30:00")
    utm = write_geotiff(folder / "survey" / "utm.tif", mosaic, "EPSG:32611", from_origin(500000.0, 3760000.0, 0.3, 0.3))
    # A 5-band 16-bit scene whose left half is nodata; band 4 rises from 1000 to 3000 left to right.
    bands = np.zeros((5, 256, 512), np.uint16)
    bands[:, :, 256:] = np.linspace(1000, 3000, 256, dtype=np.uint16)[None, None, :]
    bands[1, :, 256:] = 500
    bands[2, :, 256:] = 700
    multi = write_geotiff(folder / "survey" / "multiband.tif", bands, "EPSG:32611",
                          from_origin(500000.0, 3760000.0, 10.0, 10.0), nodata=0)
    (folder / "survey" / "corrupt.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    return {"folder": folder, "lonlat": degrees, "utm": utm, "multiband": multi}


def test_chips_cover_the_scene_with_footprints_from_its_transform(scenes):
    plan = scene_chips(str(scenes["lonlat"]), ChipConfig(size=256))
    windows = [c.ref.window for c in plan.chips]
    # Columns 0, 256 and 344 (the last aligned to the 600-pixel edge), rows 0 and 244.
    assert windows == [(0, 0, 256, 256), (256, 0, 256, 256), (344, 0, 256, 256),
                       (0, 244, 256, 256), (256, 244, 256, 256), (344, 244, 256, 256)]
    chip = plan.chips[4]  # col 256, row 244
    assert chip.id_suffix == "?window=256,244,256,256"
    west, south, east, north = chip.bbox  # by hand from the transform: origin (-117, 34), 1e-4 degree pixels
    assert west == pytest.approx(-117 + 256 * PIXEL) and east == pytest.approx(-117 + 512 * PIXEL)
    assert north == pytest.approx(34 - 244 * PIXEL) and south == pytest.approx(34 - 500 * PIXEL)
    assert chip.datetime == "2024-06-01T10:30:00Z" and plan.crs == "EPSG:4326"
    # An overlap puts more chips on the grid; every chip still lies inside the scene.
    overlapped = scene_chips(str(scenes["lonlat"]), ChipConfig(size=256, overlap=128)).chips
    assert len(overlapped) == 4 * 3 and all(c + w <= 600 and r + h <= 500 for c, r, w, h in
                                            (x.ref.window for x in overlapped))


def test_a_projected_scene_is_reprojected_to_wgs84(scenes):
    from rasterio.warp import transform

    plan = scene_chips(str(scenes["utm"]), ChipConfig(size=256))
    first = plan.chips[0].bbox
    # The corners of chip 0 in UTM 11N (0.3 m pixels from (500000, 3760000)), reprojected one by one.
    xs = [500000 + dx for dx in (0, 76.8) for _ in (0, 76.8)]
    ys = [3760000 - dy for _ in (0, 76.8) for dy in (0, 76.8)]
    lons, lats = transform("EPSG:32611", "EPSG:4326", xs, ys)
    assert first == pytest.approx((min(lons), min(lats), max(lons), max(lats)), abs=1e-7)
    assert -117.01 < first[0] < -116.99 and 33.9 < first[1] < 34.0


def test_band_selection_stretch_and_nodata(scenes):
    plan = scene_chips(str(scenes["multiband"]), ChipConfig(size=256, bands=(4, 3, 2), percentiles=(0, 100)))
    assert plan.skipped_nodata == 1 and [c.ref.window for c in plan.chips] == [(256, 0, 256, 256)]
    ref = plan.chips[0].ref
    assert ref.bands == (4, 3, 2) and ref.low[0] == pytest.approx(1000) and ref.high[0] == pytest.approx(3000)
    pixels = ref.read()  # (256, 256, 3) uint8, red from band 4
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and np.all(np.diff(pixels[0, :, 0].astype(int)) >= 0)
    with pytest.raises(ValueError, match="do not name 3 of its 5 band"):
        scene_chips(str(scenes["multiband"]), ChipConfig(bands=(4, 3, 9)))
    masked = np.ma.masked_array(np.full((3, 1, 2), 50.0), mask=[[[True, False]]] * 3)
    assert stretch(masked, (0, 0, 0), (100, 100, 100)).tolist() == [[[0, 0, 0], [128, 128, 128]]]
    assert tiff_datetime("2024:06:01 10:30:00") == "2024-06-01T10:30:00Z" and tiff_datetime("June") is None


def test_an_archive_of_scenes_is_chipped_encoded_and_reported(local_ray, model_dir, scenes, tmp_path):
    items = archive_items(scenes["folder"], chips=ChipConfig(size=256))
    lonlat = [i for i in items.image_ids if i.startswith("survey/lonlat.tif?window=")]
    assert len(lonlat) == 6 and len([i for i in items.image_ids if i.startswith("survey/utm.tif")]) == 6
    meta = items.metadata[items.image_ids.index("survey/lonlat.tif?window=256,244,256,256")]
    assert meta["scene"] == "survey/lonlat.tif" and meta["window"] == [256, 244, 256, 256]
    assert meta["datetime"] == "2024-06-01T10:30:00Z" and meta["bbox"][0] == pytest.approx(-117 + 256 * PIXEL)
    assert [path for path, _ in items.skipped] == [str(scenes["folder"] / "survey" / "corrupt.tif")]

    root = str(tmp_path / "index")
    manifest = build_indexes(model_dir, None, 2, root, images=str(scenes["folder"]))["images"]
    assert manifest["rows"] == len(items.image_ids) == 13  # 6 + 6 + 1 kept multiband chip
    assert manifest["extra"]["skipped_images"] == 1 and "corrupt.tif" in manifest["extra"]["skipped_listed"][0][0]
    assert read_manifest(root, "v0001")["extra"]["chips"]["skipped_nodata"] == 1
    # The stored code of a chip is the image student's code of that chip's pixels.
    encoder = load_encoder(next(Path(model_dir).glob("image_student.spec.json")))
    index = load_index(root, "v0001")
    position = items.image_ids.index(lonlat[2])
    for shard in index.shards:
        hit = np.flatnonzero(shard.ids == lonlat[2])
        if hit.size:
            np.testing.assert_array_equal(shard.codes[hit[0]], encoder.encode_packed([items.image_paths[position].read()])[0])
            break
    else:
        pytest.fail("chip not in any shard")


def test_scenes_under_an_s3_prefix_are_chipped_in_place(local_ray, s3_endpoint, model_dir, scenes, tmp_path,
                                                         monkeypatch):
    """GDAL reads the scenes from the loopback S3 endpoint window by window: the same chips, footprints and codes
    as from the local files."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for name in ("lonlat.tif", "multiband.tif"):
        client.upload_file(str(scenes["folder"] / "survey" / name), "terrahash-test", f"scenes/{name}")
    prefix = "s3://terrahash-test/scenes"
    remote = archive_items(prefix, chips=ChipConfig(size=256))
    local = archive_items(scenes["folder"] / "survey", chips=ChipConfig(size=256))
    keep = [n for n, i in enumerate(local.image_ids) if i.startswith(("lonlat", "multiband"))]
    assert remote.image_ids == [local.image_ids[n] for n in keep] and len(remote.image_ids) == 7
    assert [m["bbox"] for m in remote.metadata] == [local.metadata[n]["bbox"] for n in keep]
    assert str(remote.image_paths[0]).startswith(f"{prefix}/lonlat.tif?window=")
    manifest = build_indexes(model_dir, None, 1, str(tmp_path / "index"), images=prefix, batch_size=4)["images"]
    assert manifest["rows"] == 7 and manifest["filterable"]["bbox"] == 7
    shard = load_index(tmp_path / "index", manifest["version"]).shards[0]
    encoder = load_encoder(next(Path(model_dir).glob("image_student.spec.json")))
    by_id = sorted(keep, key=lambda n: local.image_ids[n])  # rows follow the sorted ids
    want = encoder.encode_packed([local.image_paths[n].read() for n in by_id])
    for ref, n in zip(remote.image_paths, keep):  # the same pixels, read over S3 (the codes below may tie)
        np.testing.assert_array_equal(ref.read(), local.image_paths[n].read())
    np.testing.assert_array_equal(shard.codes[np.argsort(shard.rows)], want)
