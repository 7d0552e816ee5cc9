"""Benchmark: a frozen backbone's cached features through torch and through onnxruntime, same images, same run.

Training on cached features (the main job's ``fast_split``) spends most of its time computing them once.
This times both runtimes on the first ``--images`` images of the dataset under one view each, after one
warm-up batch, with the same thread count, and prints images per second, the ratio and the largest
difference between the two (training/onnx_features.py refuses more than 1e-4). The export is timed
apart: a run pays it once per weights, pooled stages and input size.

    python -m evaluation.bench_features [--config fast_split] [--images 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.bench_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fast_split", help="training config whose image tower is measured")
    parser.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"))
    parser.add_argument("--images", type=int, default=512, help="images timed (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="images per call (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="threads of both runtimes (0: all cores)")
    args = parser.parse_args(argv)

    import torch

    from serving.ingest.dataset import load_dataset
    from training.config import load_config
    from training.features import load_image, module_fingerprint, normalize
    from training.models import ImageEncoder
    from training.onnx_features import OnnxFeatures

    if args.threads:
        torch.set_num_threads(args.threads)
    tower = load_config(args.config).image
    encoder = ImageEncoder(tower).eval()
    paths = [r.path for r in load_dataset(args.data).records][:args.images]
    images = normalize(torch.from_numpy(np.stack([load_image(p, tower.image_size) for p in paths])), tower.mean,
                       tower.std).contiguous(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        onnx = OnnxFeatures(encoder, module_fingerprint(encoder), tower.image_size, Path(cache), args.threads)
        export_s = time.perf_counter() - started
        timings, outputs = {}, {}
        for name, forward in (("torch", encoder), ("onnxruntime", onnx)):
            with torch.inference_mode():
                forward(images[:args.batch])  # warm-up
                started = time.perf_counter()
                outputs[name] = torch.cat([forward(images[i:i + args.batch]).float()
                                           for i in range(0, len(images), args.batch)]).numpy()
                timings[name] = time.perf_counter() - started
    error = float(np.abs(outputs["torch"] - outputs["onnxruntime"]).max())
    print(f"{tower.backbone}, {tower.image_size} px, pooled stages {list(tower.pool_levels)}, {len(images)} images, "
          f"threads {args.threads or 'all'}")
    for name, seconds in timings.items():
        print(f"  {name:<12} {seconds:7.2f} s  {len(images) / seconds:7.1f} images/s")
    print(f"  onnxruntime / torch speed: {timings['torch'] / timings['onnxruntime']:.2f}x; largest difference "
          f"{error:.2e}; export and check {export_s:.1f} s (once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
