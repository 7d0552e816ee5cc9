"""Throughput of archive indexing: GeoTIFF chips against plain JPEGs, same images, same model, same run.

Writes one GeoTIFF scene mosaicked from ``--tiles`` x ``--tiles`` UCM images (256-pixel tiles, a
UTM CRS, tiled and deflate-compressed as survey products are) and a folder of the same images as
JPEGs, then measures, per second:

- reading only: chips cut from the scene (windowed read + percentile stretch), against JPEG decodes;
- encoding end to end: serving.ingest.build.encode_all over each (Ray tasks, the model's image student).

    python -m evaluation.bench_archive --model runs/fast_split-64/students/onnx --tiles 12
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_archives(data: Path, tiles: int, folder: Path) -> tuple[Path, Path]:
    import rasterio
    from PIL import Image
    from affine import Affine

    from serving.ingest.items import dataset_items

    paths = dataset_items(data).image_paths[: tiles * tiles]
    if len(paths) < tiles * tiles:
        raise SystemExit(f"--tiles {tiles}: the dataset has only {len(paths)} images")
    jpegs = folder / "jpeg"
    jpegs.mkdir(parents=True)
    scene = np.zeros((3, tiles * 256, tiles * 256), np.uint8)
    for n, path in enumerate(paths):
        image = Image.open(path).convert("RGB").resize((256, 256))
        image.save(jpegs / f"{n:05d}.jpg", quality=95)
        r, c = divmod(n, tiles)
        scene[:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = np.asarray(image).transpose(2, 0, 1)
    scenes = folder / "scenes"
    scenes.mkdir()
    with rasterio.open(scenes / "mosaic.tif", "w", driver="GTiff", width=scene.shape[2], height=scene.shape[1],
                       count=3, dtype="uint8", crs="EPSG:32611", transform=Affine(0.3, 0, 500000, 0, -0.3, 3760000),
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(scene)
    return jpegs, scenes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder of exported students (image_student.spec.json)")
    parser.add_argument("--data", default="../shared/data/ucm_captions", help="UCM-Captions folder")
    parser.add_argument("--tiles", type=int, default=12, help="the scene is tiles x tiles images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import ray

    from serving.ingest.archive import archive_items, read_source
    from serving.ingest.build import encode_all
    from serving.model.versions import find_spec
    from serving.model.encoders import decode_and_resize

    spec = find_spec(args.model, "image")
    with tempfile.TemporaryDirectory() as tmp:
        jpegs, scenes = write_archives(Path(args.data), args.tiles, Path(tmp))
        figures = {}
        if not ray.is_initialized():
            ray.init(address="local", configure_logging=False, log_to_driver=False)
        warm = archive_items(jpegs).image_paths
        encode_all(spec, warm * 2, max(1, len(warm) // 4), "warm-up")  # workers started, models loaded, for both
        for name, folder in (("jpeg", jpegs), ("geotiff chips", scenes)):
            start = time.perf_counter()
            items = archive_items(folder)
            plan = time.perf_counter() - start
            start = time.perf_counter()
            for item in items.image_paths:
                pixels = read_source(item)
                if isinstance(pixels, str):  # a JPEG path: decode it as the encoder would
                    decode_and_resize(pixels, 256)
            read = time.perf_counter() - start
            start = time.perf_counter()
            encode_all(spec, items.image_paths, args.batch_size, name)
            encode = time.perf_counter() - start
            n = len(items.image_ids)
            figures[name] = (n, plan, n / read, n / encode)
            print(f"{name:14s} {n:5d} items  planning {plan:6.2f} s  read {n / read:7.1f} /s  "
                  f"encode end to end {n / encode:6.1f} /s")
        ratio = figures["geotiff chips"][3] / figures["jpeg"][3]
        print(f"geotiff chips / jpeg, end to end: {ratio:.2f}x; reading only: "
              f"{figures['geotiff chips'][2] / figures['jpeg'][2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
