"""What a received image must look like for the frozen hasher to keep its code: the quality bar a
DeepJSCC link (training/jscc.py) has to clear before its queries retrieve like clean ones.

The val split's images, at the link's image size (128 px for the CPU config), are degraded the ways
a link degrades them (downsampled and upsampled back, Gaussian blur, JPEG, pixel noise:
evaluation/corruptions.py) and hashed by the frozen hasher exactly as ``terrahash jscc eval`` does
(resized to its input size). For each degradation: PSNR against the sent image, the bit agreement
of its code with the sent image's, and image-to-image mAP@all against the clean train split
(val queries against train, so that nothing here looks at test), beside the clean queries'.

    python -m evaluation.link_quality --model runs/fast_split-64 [--size 128] [--hasher student] \\
        [--data ../shared/data/ucm_captions] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SCALES = (2, 4, 8)  # downsampling factors
KINDS = ("blur", "jpeg", "gaussian_noise")


def degradations(images: np.ndarray) -> dict:
    """{name: degraded float images (N, 3, S, S) in [0, 1]} of uint8 ``images`` (N, S, S, 3)."""
    import torch.nn.functional as F

    from training.jscc_train import as_tensor

    from .corruptions import SEVERITIES, corrupt

    sent, side = as_tensor(images), images.shape[1]
    out = {}
    for factor in SCALES:
        small = F.interpolate(sent, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
        out[f"downsample x{factor}"] = F.interpolate(small, size=(side, side), mode="bilinear",
                                                     align_corners=False).clamp(0, 1)
    for kind in KINDS:
        for severity in SEVERITIES:
            out[f"{kind} {severity}"] = as_tensor(np.stack([corrupt(im, kind, severity, seed=i)
                                                          for i, im in enumerate(images)]))
    return out


def link_quality(model_dir: str | Path, data_dir: str | Path, size: int = 128, kind: str = "student") -> dict:
    from serving.ingest.dataset import load_dataset
    from training.jscc import psnr
    from training.jscc_eval import hash_codes
    from training.jscc_train import as_tensor, load_hasher, load_images
    from training.train import DatasetIndex

    from .retrieval import signs
    from .robustness import hamming_map

    hasher = load_hasher(model_dir, kind)
    index = DatasetIndex.build(load_dataset(data_dir))
    paths = [r.path for r in index.dataset.records]
    queries, database = index.rows("val"), index.rows("train")
    if not len(queries) or not len(database):
        raise ValueError(f"{data_dir}: needs images in both the val and the train split")
    db_codes = signs(hash_codes(hasher, as_tensor(load_images([paths[r] for r in database], hasher.size))))
    images = load_images([paths[r] for r in queries], size)
    q_labels, db_labels = index.labels[queries], index.labels[database]
    sent = as_tensor(images)
    sent_codes = signs(hash_codes(hasher, sent))
    rows = []
    for name, received in degradations(images).items():
        codes = signs(hash_codes(hasher, received))
        rows.append({"degradation": name, "psnr": float(psnr(sent, received).mean()),
                     "bit_agreement": float((codes == sent_codes).mean()),
                     "map_all": hamming_map(codes, q_labels, db_codes, db_labels)})
    clean = hamming_map(sent_codes, q_labels, db_codes, db_labels)
    for row in rows:
        row["map_ratio"] = row["map_all"] / clean if clean else None
    return {"image_size": size, "hasher": {"model_dir": str(model_dir), "kind": kind}, "queries": int(len(queries)),
            "database": int(len(database)), "map_all_clean": clean, "rows": rows}


def format_quality(report: dict) -> str:
    lines = [f"val queries at {report['image_size']} px against train: clean mAP@all {report['map_all_clean']:.4f}",
             f"{'degradation':<20}{'PSNR':>8}{'bits':>8}{'mAP':>8}{'ratio':>8}"]
    lines += [f"{r['degradation']:<20}{r['psnr']:>8.2f}{r['bit_agreement']:>8.3f}{r['map_all']:>8.4f}"
              f"{r['map_ratio']:>8.3f}" for r in report["rows"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.link_quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a `terrahash train` folder (distilled, for --hasher student)")
    parser.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"),
                        help="dataset folder (default: %(default)s, or $TERRAHASH_DATA)")
    parser.add_argument("--size", type=int, default=128, help="side of the sent images, px (default: %(default)s)")
    parser.add_argument("--hasher", choices=("student", "teacher"), default="student",
                        help="the frozen hasher: the run's image student or its teacher (default: %(default)s)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    report = link_quality(args.model, args.data, args.size, args.hasher)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_quality(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
