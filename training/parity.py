"""Parity of exported students: bits against the torch students, retrieval figures against the teacher.

Used by ``terrahash distill`` (its report, logged to MLflow and set on the registered model version)
and by ``evaluation/bench_students.py``. ``parity_reports`` checks several query splits from one
encoding pass: val (database: train, the protocol's checkpoint-selection ranking), whose figures the
promotion gates read (serving/lifecycle/gates.py), and test, reported only: the students are chosen on val.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.retrieval import evaluate_rows, format_table
from serving.lifecycle.gates import PARITY_TARGETS

VARIANTS = {"fp32": "", "int8": ".int8"}  # variant -> suffix of its ONNX and spec files


def parity(teacher_dir, students_dir, data_dir, cache_dir=None, split: str = "test") -> dict:
    """Bit agreement of the ONNX students with the torch students on ``split``, and retrieval
    figures of teacher and students (queries from ``split``, database: its protocol database)."""
    return parity_reports(teacher_dir, students_dir, data_dir, cache_dir, splits=(split,))[split]


def parity_reports(teacher_dir, students_dir, data_dir, cache_dir=None, splits=("val", "test")) -> dict:
    """``{split: report}`` for each query split, from one pass: the teacher's, the ONNX students' and
    the torch students' codes are each computed once (the torch students on the union of the splits'
    query images and captions) and every split's figures are read from them.

    A report: {"split", "bit_agreement_with_torch": {variant: {"image", "text"}}, "bit_agreement_with_teacher"
    (the same, of the ONNX students' codes with the teacher's), "figures": {model:
    binary figures}, "map_ratio": {model: {task: student mAP@all / teacher mAP@all}}}; the models are
    "teacher", "fp32", "int8" and "fp32 text + teacher images"."""
    import torch

    from serving.model.encoders import ImageEncoder, TextEncoder
    from training.distill import bit_agreement, teacher_targets
    from training.export import ONNX_DIR
    from training.features import load_image, normalize
    from training.students import load_image_student, load_text_student

    teacher = teacher_targets(teacher_dir, data_dir, cache_dir)
    index = teacher.index
    paths = [str(r.path) for r in index.dataset.records]
    queries = {split: index.rows(split) for split in splits}
    if any(len(rows) == 0 for rows in queries.values()):
        raise ValueError(f"{data_dir}: no images in split(s) {[s for s, r in queries.items() if not len(r)]}")
    onnx = Path(students_dir) / ONNX_DIR
    codes = {"teacher": (teacher.images, teacher.captions)}
    for name, suffix in VARIANTS.items():
        image = ImageEncoder(onnx / f"image_student{suffix}.spec.json")
        text = TextEncoder(onnx / f"text_student{suffix}.spec.json")
        codes[name] = (in_batches(image.encode, paths, 32), distinct_in_batches(text.encode, index.captions, 256))

    # The torch students' codes of every query row of every split, once: (R, bits), (C, bits).
    rows = np.unique(np.concatenate(list(queries.values())))
    caption_rows = np.concatenate([index.captions_of[r] for r in rows])
    image_student, _ = load_image_student(students_dir)
    text_student, tokenizer, _ = load_text_student(students_dir)
    c = image_student.config
    with torch.inference_mode():
        torch_images = in_batches(lambda b: image_student(normalize(torch.from_numpy(
            np.stack([load_image(p, c.image_size) for p in b])), c.mean, c.std)).numpy(), [paths[r] for r in rows], 32)
        torch_captions = in_batches(lambda b: text_student(**{k: v for k, v in tokenizer(
            b, padding=True, truncation=True, max_length=text_student.max_length, return_tensors="pt").items()
            if k in ("input_ids", "attention_mask")}).numpy(), [index.captions[i] for i in caption_rows], 256)
    image_at = {int(r): i for i, r in enumerate(rows)}  # dataset row -> row of torch_images
    caption_at = {int(r): i for i, r in enumerate(caption_rows)}
    models = {**codes, "fp32 text + teacher images": (teacher.images, codes["fp32"][1])}
    reports = {}
    for split, query in queries.items():
        query_captions = np.concatenate([index.captions_of[r] for r in query])
        mine_images = torch_images[[image_at[int(r)] for r in query]]
        mine_captions = torch_captions[[caption_at[int(r)] for r in query_captions]]
        report = {"split": split, "bit_agreement_with_torch": {}, "bit_agreement_with_teacher": {}, "figures": {}}
        for name in VARIANTS:
            images, captions = codes[name]
            report["bit_agreement_with_torch"][name] = {"image": bit_agreement(images[query], mine_images),
                                                        "text": bit_agreement(captions[query_captions], mine_captions)}
            report["bit_agreement_with_teacher"][name] = {
                "image": bit_agreement(images[query], teacher.images[query]),
                "text": bit_agreement(captions[query_captions], teacher.captions[query_captions])}
        db = index.database_rows(split)
        for name, (images, captions) in models.items():
            found = evaluate_rows(images, captions, index.labels, index.captions_of, query, db,
                                  class_names=list(index.dataset.classes) if name in ("teacher", "fp32") else None)
            report["figures"][name] = found["binary"]
            if "per_class" in found:
                report.setdefault("per_class", {})[name] = found["per_class"]
        teacher_figures = report["figures"]["teacher"]
        report["map_ratio"] = {name: {task: figures[task]["map_all"] / teacher_figures[task]["map_all"]
                                      for task in ("image_to_image", "text_to_image")}
                               for name, figures in report["figures"].items() if name != "teacher"}
        reports[split] = report
    return reports


# Val figures a registered model version carries (run metrics and model version tags), read by the
# promotion gates (serving/lifecycle/gates.py): the binary retrieval figures of these models, and parity.
VERSION_MODELS = ("teacher", "fp32", "int8")
VERSION_FIGURES = (("image_to_image", "map_all"), ("text_to_image", "map_all"), ("mr",))


def metric_name(key: str) -> str:
    """A report key as an MLflow metric or tag name: ``fp32 text + teacher images`` -> ``fp32_text_and_teacher_images``."""
    return key.replace(" ", "_").replace("+", "and")


def version_figures(report: dict, prefix: str = "val") -> dict[str, float]:
    """The figures of one split's report under flat names: ``val/fp32/image_to_image/map_all``,
    ``val/int8/mr``, ``val/teacher/...``, ``val_parity/bit_agreement/fp32/image`` (with the torch
    students), ``val_parity/teacher_agreement/fp32/image`` (with the teacher),
    ``val_parity/map_ratio/fp32/text_to_image`` ... (``prefix`` names the split)."""
    figures = {}
    for model in VERSION_MODELS:
        for path in VERSION_FIGURES:
            value = report["figures"][model]
            for part in path:
                value = value[part]
            figures["/".join((prefix, model, *path))] = float(value)
    for kind, name in (("bit_agreement_with_torch", "bit_agreement"), ("bit_agreement_with_teacher", "teacher_agreement"),
                       ("map_ratio", "map_ratio")):
        for model, values in report.get(kind, {}).items():
            for what, value in values.items():
                figures[f"{prefix}_parity/{name}/{metric_name(model)}/{what}"] = float(value)
    return figures


def in_batches(run, items: list, size: int) -> np.ndarray:
    return np.concatenate([run(items[i:i + size]) for i in range(0, len(items), size)])


def distinct_in_batches(run, texts: list[str], size: int) -> np.ndarray:
    """``in_batches`` over each distinct text once (UCM's 10,500 captions hold about 2,600), rows as ``texts``."""
    distinct, where = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    return in_batches(run, list(distinct), size)[where]


def format_parity(report: dict) -> str:
    lines = [f"bit agreement with the torch students ({report['split']} split):"]
    for name, values in report["bit_agreement_with_torch"].items():
        target = PARITY_TARGETS[name]
        lines += [f"  {name} {kind:<6}{value:>10.5f}  (target >= {target}: {'met' if value >= target else 'NOT met'})"
                  for kind, value in values.items()]
    lines.append(f"bit agreement with the teacher ({report['split']} split):")
    for name, values in report.get("bit_agreement_with_teacher", {}).items():
        lines += [f"  {name} {kind:<6}{value:>10.5f}" for kind, value in values.items()]
    lines.append(f"binary mAP@all relative to the teacher (target >= {PARITY_TARGETS['map_ratio']}):")
    for name, values in report["map_ratio"].items():
        lines += [f"  {name:<28}{task:<16}{value:>8.4f}" for task, value in values.items()]
    for name, figures in report["figures"].items():
        lines.append("")
        lines.append(format_table(figures, title=f"{name}:"))
    return "\n".join(lines)


