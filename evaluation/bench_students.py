"""Benchmark and parity of distilled ONNX students against their torch teacher, on this CPU.

Benchmark: per-query latency at batch 1 (median over N queries) and throughput at batch 32, and
model size, for the text teacher (torch) vs the text student (ONNX fp32 and int8), and the image
teacher (torch, all its encode views, as it retrieves) vs the image student (one view). Queries are
real test-split captions and images. Text timings include tokenization; image timings start from
preprocessed pixels (decoding is the same for both sides). Sizes: ONNX file size for the students,
fp32 parameters and buffers of the modules a query runs through for the teacher.

Parity (``--parity``, training/parity.py): on the test split, the share of bits on which the ONNX
students (fp32, int8) agree with the torch students, and the retrieval figures of teacher and students.

    python -m evaluation.bench_students --teacher runs/fast-64 --students STUDENTS_DIR \\
        --data /path/to/ucm_captions [--parity] [--cache-dir .cache/features] [--json out.json]

``STUDENTS_DIR`` is a ``training.distill.distill`` output folder with its ONNX export in ``onnx/``
(``training.export.export_students``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from training.parity import format_parity, parity

RATIO_TARGETS = {"text int8 latency b=1": 5.0, "text int8 size": 4.0, "image latency b=1": 3.0}


def median_seconds(run, batches: list, warmup: int = 3) -> float:
    """Median wall time of ``run(batch)`` over ``batches`` (after a few warm-up calls)."""
    for batch in batches[:warmup]:
        run(batch)
    times = []
    for batch in batches:
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _batches(items: list, size: int, count: int) -> list:
    """``count`` batches of ``size`` consecutive items, wrapping around."""
    return [[items[(i * size + j) % len(items)] for j in range(size)] for i in range(count)]


def _module_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


# ----------------------------------------------------------------------------------------------
# Benchmark


def _teacher_runners(teacher_dir):
    """(text runner, image runner, text bytes, image bytes) of the torch teacher."""
    import torch

    from training.features import dihedral
    from training.train import load_trained

    model, config, _ = load_trained(teacher_dir)
    views = config.image.encode_views

    @torch.inference_mode()
    def text(texts):
        return model.text_head(model.text_encoder.encode(texts)).numpy()

    @torch.inference_mode()
    def image(pixels):  # pixels (B, 3, S, S) float32: the teacher's code is the mean over its views
        x = torch.from_numpy(pixels)
        codes = [model.image_head(model.image_encoder(dihedral(x, v).contiguous(memory_format=torch.channels_last)))
                 for v in views]
        return torch.stack(codes).mean(0).numpy()

    return (text, image, _module_bytes(model.text_encoder.model, model.text_head),
            _module_bytes(model.image_encoder, model.image_head), config)


def benchmark(teacher_dir, students_dir, data_dir, queries: int = 100, batches: int = 10) -> list[dict]:
    """Rows of (model, latency b=1 in ms, throughput b=32 per second, size in MB)."""
    from serving.model.encoders import ImageEncoder, TextEncoder, preprocess_images
    from serving.ingest.dataset import load_dataset

    from training.export import ONNX_DIR

    onnx = Path(students_dir) / ONNX_DIR
    test = load_dataset(data_dir).split("test")
    captions = [c for r in test for c in r.captions]
    paths = [str(r.path) for r in test]
    teacher_text, teacher_image, text_bytes, image_bytes, config = _teacher_runners(teacher_dir)
    rows = []

    def add(name, run, items, size):
        one = median_seconds(run, _batches(items, 1, queries))
        many = median_seconds(run, _batches(items, 32, batches))
        rows.append({"model": name, "latency_b1_ms": one * 1e3, "throughput_b32_per_s": 32 / many,
                     "size_mb": size / 1e6})

    add("text teacher (torch)", teacher_text, captions, text_bytes)
    for variant in ("", ".int8"):
        encoder = TextEncoder(onnx / f"text_student{variant}.spec.json")
        add(f"text student (onnx {'int8' if variant else 'fp32'})", encoder.encode, captions,
            encoder.spec.model_path.stat().st_size)
    teacher_pixels = preprocess_images(paths[:64], config.image.image_size, config.image.mean, config.image.std)
    add(f"image teacher (torch, {len(config.image.encode_views)} views)", lambda batch: teacher_image(np.stack(batch)),
        list(teacher_pixels), image_bytes)
    for variant in ("", ".int8"):
        encoder = ImageEncoder(onnx / f"image_student{variant}.spec.json")
        spec = encoder.spec.image
        pixels = list(preprocess_images(paths[:64], spec["size"], spec["mean"], spec["std"]))
        run = lambda batch, e=encoder: e.session.run([e.spec.output_name], {e.spec.input_names[0]: np.stack(batch)})
        add(f"image student (onnx {'int8' if variant else 'fp32'})", run, pixels,
            encoder.spec.model_path.stat().st_size)
    return rows


def ratios(rows: list[dict]) -> dict:
    """Teacher / student ratios (higher is better for the student)."""
    by = {r["model"].split(" (")[0] + (" int8" if "int8" in r["model"] else ""): r for r in rows}
    out = {}
    for kind in ("text", "image"):
        teacher = by[f"{kind} teacher"]
        for variant in ("", " int8"):
            student = by[f"{kind} student{variant}"]
            name = f"{kind}{variant or ' fp32'}"
            out[f"{name} latency b=1"] = teacher["latency_b1_ms"] / student["latency_b1_ms"]
            out[f"{name} throughput b=32"] = student["throughput_b32_per_s"] / teacher["throughput_b32_per_s"]
            out[f"{name} size"] = teacher["size_mb"] / student["size_mb"]
    return out


def format_benchmark(rows: list[dict], ratio: dict) -> str:
    lines = [f"{'model':<34}{'latency b=1 (ms)':>18}{'b=32 (items/s)':>16}{'size (MB)':>11}"]
    lines += [f"{r['model']:<34}{r['latency_b1_ms']:>18.2f}{r['throughput_b32_per_s']:>16.1f}{r['size_mb']:>11.1f}"
              for r in rows]
    lines.append("")
    lines.append(f"{'teacher / student':<34}{'latency b=1':>18}{'throughput b=32':>16}{'size':>11}")
    for name in ("text fp32", "text int8", "image fp32", "image int8"):
        lines.append(f"{name:<34}{ratio[f'{name} latency b=1']:>17.2f}x{ratio[f'{name} throughput b=32']:>15.2f}x"
                     f"{ratio[f'{name} size']:>10.2f}x")
    checks = {"text int8 latency b=1": ratio["text int8 latency b=1"], "text int8 size": ratio["text int8 size"],
              "image latency b=1": max(ratio["image fp32 latency b=1"], ratio["image int8 latency b=1"])}
    lines.append("")
    lines += [f"target {name} >= {RATIO_TARGETS[name]}x: {value:.2f}x "
              f"{'met' if value >= RATIO_TARGETS[name] else 'NOT met'}" for name, value in checks.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Parity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher run folder (checkpoint.pt)")
    parser.add_argument("--students", required=True, help="distill output folder, with its export in onnx/")
    parser.add_argument("--data", required=True, help="dataset folder (real queries; the split for --parity)")
    parser.add_argument("--parity", action="store_true", help="also measure bit agreement and mAP on the test split")
    parser.add_argument("--cache-dir", default=None, help="the teacher's feature cache (for --parity)")
    parser.add_argument("--queries", type=int, default=100, help="batch-1 queries timed (median reported)")
    parser.add_argument("--batches", type=int, default=10, help="batches of 32 timed")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rows = benchmark(args.teacher, args.students, args.data, args.queries, args.batches)
    ratio = ratios(rows)
    print(format_benchmark(rows, ratio))
    result = {"benchmark": rows, "ratios": ratio}
    if args.parity:
        result["parity"] = parity(args.teacher, args.students, args.data, args.cache_dir)
        print()
        print(format_parity(result["parity"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
