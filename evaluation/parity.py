"""Parity of exported students: bits against the torch students, retrieval figures against the teacher.

Used by ``terrahash distill`` (its report, logged to MLflow) and by ``evaluation/bench_students.py``.
The split is only reported on: the students are chosen on val.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .retrieval import evaluate_rows, format_table

PARITY_TARGETS = {"fp32": 0.999, "int8": 0.99, "map_ratio": 0.98}


def parity(teacher_dir, students_dir, data_dir, cache_dir=None, split: str = "test") -> dict:
    """Bit agreement of the ONNX students with the torch students on ``split``, and retrieval
    figures of teacher and students (queries from ``split``, database: the other splits)."""
    import torch

    from serving.encoders import ImageEncoder, TextEncoder
    from training.distill import bit_agreement, teacher_targets
    from training.export import ONNX_DIR
    from training.features import load_image, normalize
    from training.students import load_image_student, load_text_student

    teacher = teacher_targets(teacher_dir, data_dir, cache_dir)
    index = teacher.index
    paths = [str(r.path) for r in index.dataset.records]
    query, db = index.rows(split), index.database_rows(split)
    query_captions = np.concatenate([index.captions_of[r] for r in query])
    onnx = Path(students_dir) / ONNX_DIR
    codes = {"teacher": (teacher.images, teacher.captions)}
    for variant, name in (("", "fp32"), (".int8", "int8")):
        image = ImageEncoder(onnx / f"image_student{variant}.spec.json")
        text = TextEncoder(onnx / f"text_student{variant}.spec.json")
        codes[name] = (in_batches(image.encode, paths, 32), in_batches(text.encode, index.captions, 256))

    image_student, _ = load_image_student(students_dir)
    text_student, tokenizer, _ = load_text_student(students_dir)
    c = image_student.config
    with torch.inference_mode():
        torch_images = in_batches(lambda b: image_student(normalize(torch.from_numpy(
            np.stack([load_image(p, c.image_size) for p in b])), c.mean, c.std)).numpy(), [paths[r] for r in query], 32)
        torch_captions = in_batches(lambda b: text_student(**{k: v for k, v in tokenizer(
            b, padding=True, truncation=True, max_length=text_student.max_length, return_tensors="pt").items()
            if k in ("input_ids", "attention_mask")}).numpy(), [index.captions[i] for i in query_captions], 256)
    report = {"split": split, "bit_agreement_with_torch": {}, "figures": {}}
    for name in ("fp32", "int8"):
        images, captions = codes[name]
        report["bit_agreement_with_torch"][name] = {"image": bit_agreement(images[query], torch_images),
                                                    "text": bit_agreement(captions[query_captions], torch_captions)}
    for name, (images, captions) in {**codes, "fp32 text + teacher images": (teacher.images, codes["fp32"][1])}.items():
        report["figures"][name] = evaluate_rows(images, captions, index.labels, index.captions_of, query, db)["binary"]
    teacher_figures = report["figures"]["teacher"]
    report["map_ratio"] = {name: {task: figures[task]["map_all"] / teacher_figures[task]["map_all"]
                                  for task in ("image_to_image", "text_to_image")}
                           for name, figures in report["figures"].items() if name != "teacher"}
    return report


def in_batches(run, items: list, size: int) -> np.ndarray:
    return np.concatenate([run(items[i:i + size]) for i in range(0, len(items), size)])


def format_parity(report: dict) -> str:
    lines = [f"bit agreement with the torch students ({report['split']} split):"]
    for name, values in report["bit_agreement_with_torch"].items():
        target = PARITY_TARGETS[name]
        lines += [f"  {name} {kind:<6}{value:>10.5f}  (target >= {target}: {'met' if value >= target else 'NOT met'})"
                  for kind, value in values.items()]
    lines.append(f"binary mAP@all relative to the teacher (target >= {PARITY_TARGETS['map_ratio']}):")
    for name, values in report["map_ratio"].items():
        lines += [f"  {name:<28}{task:<16}{value:>8.4f}" for task, value in values.items()]
    for name, figures in report["figures"].items():
        lines.append("")
        lines.append(format_table(figures, title=f"{name}:"))
    return "\n".join(lines)


