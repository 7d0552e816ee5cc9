"""``terrahash report``: one page that compares trained models, their students, baselines and peer
indexes on the same split, so that an operator can choose a code length on evidence.

The protocol is ``terrahash eval``'s: the test split's images and captions are the queries, train +
val the database, relevance by class. Each model is a ``terrahash train`` folder (its s3:// copy,
or ``runs:/<id>`` of a tracked run); when ``terrahash distill`` wrote students beside it
(``RUN/students/onnx``), their fp32 and int8 ONNX codes are measured too. Features of frozen
encoders come from the feature cache, so a report over runs trained here recomputes none.

Sections of ``report.json`` (all figures are what the page shows, ``evaluation.report_html``):

- ``code_length``: per model, binary / asymmetric / float figures, PR curve, per-class AP, students;
- ``baselines``: LSH, ITQ, float cosine and PQ on the frozen image features; the multimodal paper's
  per-modality PQ indexes fused by average or maximum (AP@50), and our own codes fused the same way;
- ``pareto``: mAP against bytes per item, measured latency and energy per 1,000 queries;
- ``fairness``: per-class AP, worst class and gap of every model and baseline; top-10 confusion;
- ``robustness`` and ``drift``: corrupted queries of one model, the fp32 image student of the first
  run that has students, else the first run's teacher (``evaluation.robustness``), and the drift
  detector (``serving.index.drift``) on clean and corrupted windows;
- ``examples``: top-5 results of a few text and image queries per model;
- ``peers``: ``evaluation.bench_peers`` (its JSON with ``--peers``; else run here at 100k codes).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import report_sections as sections
from .ceiling import recall_ceiling
from .retrieval import choose_rows, evaluate_rows, signs

log = logging.getLogger(__name__)

PARETO_DATABASE = 100_000  # items of the database the latency and energy are measured on
PARETO_QUERIES = 1_000
ROBUSTNESS_PER_CLASS = 10  # test images per class corrupted
DRIFT_WINDOW = 32
DEMO_QUERY = "many planes parked next to a long building"


@dataclass
class Encoded:
    """Continuous codes of every image (N, bits) and caption (M, bits) by one encoder pair, and how
    it encodes new images (RGB uint8 arrays) and texts."""

    images: np.ndarray
    captions: np.ndarray
    encode_images: object
    encode_texts: object


@dataclass
class Model:
    name: str
    folder: Path
    config: str
    bits: int
    image_size: int
    teacher: Encoded
    students: dict[str, Encoded] = field(default_factory=dict)


def model_name(folder: Path, taken: set[str]) -> str:
    """The run folder's name, without dots (they separate the page's JSON paths), made unique."""
    base = folder.name.replace(".", "_") or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _teacher(model, config, encoders, device) -> Encoded:
    from training.features import array_features
    from training.train import dataset_codes, head_codes, text_codes

    images, captions = dataset_codes(encoders)
    image = config.image

    def encode_images(arrays):
        views = array_features(model.image_encoder, list(arrays), image.mean, image.std, views=image.encode_views,
                               device=device)
        return np.mean([head_codes(model.image_head, v, device) for v in views], axis=0)

    return Encoded(images, captions, encode_images, lambda texts: text_codes(model, list(texts), device))


def _students(folder: Path, paths: list[str], captions: list[str]) -> dict[str, Encoded]:
    """The fp32 and int8 ONNX students beside the run, with their codes of the whole dataset."""
    from serving.model.encoders import ImageEncoder, TextEncoder
    from training.export import ONNX_DIR

    from training.parity import VARIANTS, in_batches

    onnx = folder / "students" / ONNX_DIR
    out = {}
    if not onnx.is_dir():
        return out
    for variant, suffix in VARIANTS.items():
        image = ImageEncoder(onnx / f"image_student{suffix}.spec.json")
        text = TextEncoder(onnx / f"text_student{suffix}.spec.json")
        out[variant] = Encoded(in_batches(image.encode, paths, 32),
                               in_batches(text.encode, captions, 256) if captions else np.zeros((0, image.bits)),
                               lambda arrays, e=image: in_batches(e.encode, list(arrays), 32), text.encode)
    return out


def load_models(runs, index, cache_dir, device) -> tuple[list[Model], np.ndarray, np.ndarray | None]:
    """The models, and the frozen image (N, D) and caption (M, D') features of the first one."""
    from training.distill_job import resolve_teacher
    from training.features import FeatureCache
    from training.train import Encoders, load_trained

    models, features = [], None
    paths = [str(r.path) for r in index.dataset.records]
    for run in tqdm(runs, desc="models", unit="model"):
        folder = resolve_teacher(run)
        model, config, _ = load_trained(folder, device)
        encoders = Encoders(model, config, index, FeatureCache(cache_dir), device)
        if features is None:
            features = (encoders.image_features((0,))[0],
                        encoders.text_features() if index.captions else None)
        models.append(Model(model_name(folder, {m.name for m in models}), folder, config.name, config.train.bits,
                            config.image.image_size, _teacher(model, config, encoders, device), _students(folder, paths, index.captions)))
    return models, features[0], features[1]


def code_length(models: list[Model], index, q_rows, db_rows) -> dict:
    classes = list(index.dataset.classes)
    out = {"order": [m.name for m in models], "models": {}}
    for m in tqdm(models, desc="code length", unit="model"):
        found = evaluate_rows(m.teacher.images, m.teacher.captions, index.labels, index.captions_of, q_rows, db_rows,
                              pr_curve=True, asymmetric=True, class_names=classes)
        entry = {"run": str(m.folder), "config": m.config, "bits": m.bits, "bytes_per_item": m.bits // 8,
                 "binary": found["binary"], "asymmetric": found["asymmetric"], "float": found["float"],
                 "pr_curve": found["pr_curve"], "per_class": found["per_class"], "students": {}}
        for variant, student in m.students.items():
            s = evaluate_rows(student.images, student.captions, index.labels, index.captions_of, q_rows, db_rows,
                              class_names=classes)
            entry["students"][variant] = {"binary": s["binary"], "per_class": s["per_class"]}
        out["models"][m.name] = entry
    query_captions = [c for r in q_rows for c in index.captions_of[r]]
    if query_captions:
        out["recall_ceiling"] = recall_ceiling([index.captions[c] for c in query_captions],
                                               index.caption_owner[query_captions].tolist())
    return out


def own_fusion(models: list[Model], index, q_rows, db_rows) -> dict:
    """Our late fusion: per model, an image-code index and a caption-code index (each image's mean
    caption code), queries = test images with their captions, scores fused as the paper's."""
    q_labels, db_labels, classes = index.labels[q_rows], index.labels[db_rows], list(index.dataset.classes)
    out = {}
    for m in models:
        t = m.teacher
        image = sections.hamming_similarity(t.images[q_rows], t.images[db_rows])
        text = sections.hamming_similarity(sections.mean_caption_codes(t.captions, index.captions_of, q_rows),
                                           sections.mean_caption_codes(t.captions, index.captions_of, db_rows))
        out[m.name] = sections.fusion_figures(image, text, q_labels, db_labels, classes)
    return out


def build(runs, data_dir, peers: str | Path | None = None, cache_dir=None, device: str = "auto", seed: int = 0,
          pareto_database: int = PARETO_DATABASE, pareto_queries: int = PARETO_QUERIES,
          robustness_per_class: int = ROBUSTNESS_PER_CLASS, peer_codes: int = 100_000,
          links: str | Path | None = None) -> tuple[dict, list]:
    """The report's JSON and the models (for the page's thumbnails); ``links``: a ``terrahash jscc eval
    --json`` file whose code links get a section (evaluation/field_links.py)."""
    from serving.ingest.dataset import load_dataset
    from training.features import default_device, load_image
    from training.train import DatasetIndex

    from .robustness import robustness

    torch_device = default_device(device)
    dataset = load_dataset(data_dir)
    index = DatasetIndex.build(dataset)
    q_rows, db_rows, database = choose_rows(index.rows("test"), index.database_rows("test"), len(index.labels), "test")
    classes = list(dataset.classes)
    models, image_features, text_features = load_models(runs, index, cache_dir, torch_device)
    report = {"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(), "classes": classes,
              "database": {**database, "queries": int(len(q_rows))}, "seed": seed}
    report["code_length"] = code_length(models, index, q_rows, db_rows)

    caption_means = (sections.mean_caption_codes(text_features, index.captions_of, np.arange(len(index.labels)))
                     if text_features is not None else None)
    base = sections.baselines(image_features, caption_means, q_rows, db_rows, index.labels,
                              [m.bits for m in models], classes, seed=seed)
    if caption_means is not None:
        base["fusion_codes"] = own_fusion(models, index, q_rows, db_rows)
    report["baselines"] = base

    report["pareto"] = pareto(models, report, image_features, q_rows, db_rows, seed, pareto_database, pareto_queries)
    report["fairness"] = fairness(models, report, index, q_rows, db_rows)

    target = next((m for m in models if "fp32" in m.students), models[0])  # serving's encoder where there is one
    encoder_name, encoder = (f"{target.name}/fp32", target.students["fp32"]) if "fp32" in target.students else \
        (target.name, target.teacher)
    train_rows, val_rows = index.rows("train"), index.rows("val")
    picked = robustness_rows(index.labels, q_rows, robustness_per_class, seed)
    window = max(2, min(DRIFT_WINDOW, len(val_rows) // 2, len(picked) // 2))
    detector, report["drift"] = sections.drift(signs(encoder.images[train_rows]), signs(encoder.images[val_rows]),
                                               signs(encoder.images[q_rows]), window)
    images = [load_image(index.dataset.records[r].path, target.image_size) for r in picked]
    found = robustness(encoder.encode_images, images, index.labels[picked], signs(encoder.images[db_rows]),
                       index.labels[db_rows], detector, window, seed=seed)
    report["robustness"] = {"model": target.name, "encoder": encoder_name, "rows": picked.tolist(), **found}
    report["drift"].update(model=target.name, encoder=encoder_name, alarm_rate={
        **report["drift"]["alarm_rate"],
        "corruptions": {k: {s: v["alarm_rate"] for s, v in by.items()} for k, by in found["corruptions"].items()}})
    report["examples"] = examples(models, index, q_rows, db_rows)
    report["peers"] = peers_section(peers, models[0], db_rows, peer_codes, seed)
    if links is not None:
        from .field_links import summary

        report["field_links"] = summary(json.loads(Path(links).read_text()), str(links))
    return report, models


def robustness_rows(labels: np.ndarray, q_rows: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` query rows of each class, drawn with ``seed``, in row order."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(q_rows[labels[q_rows] == c])[:per_class] for c in np.unique(labels[q_rows])]
    return np.sort(np.concatenate(picked))


def pareto(models, report, image_features, q_rows, db_rows, seed, size, n_queries) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time on one core, as a router replica serves it
    entries = report["code_length"]["models"]
    points = []
    for m in models:
        entry = entries[m.name]
        points.append({"name": m.name, "family": "model", "bits": m.bits, "index": f"binary-{m.bits}",
                       "bytes_per_item": m.bits // 8, "map_all": entry["binary"]["image_to_image"]["map_all"],
                       "map_all_float": entry["float"]["image_to_image"]["map_all"]})
        for variant, s in entry["students"].items():
            points.append({"name": f"{m.name}/{variant}", "family": "student", "bits": m.bits,
                           "index": f"binary-{m.bits}", "bytes_per_item": m.bits // 8,
                           "map_all": s["binary"]["image_to_image"]["map_all"]})
    for name, method in report["baselines"]["methods"].items():
        kind = method["kind"]
        points.append({"name": name, "family": "baseline", "bits": method["bits"],
                       "index": f"binary-{method['bits']}" if kind in ("lsh", "itq") else kind,
                       "bytes_per_item": method["bytes_per_item"], "map_all": method["map_all"]})
    rng = np.random.default_rng(seed)
    picks = q_rows[rng.integers(0, len(q_rows), n_queries)]
    costs = {}
    first_of_bits = {}  # the codes a binary index of that length is grown from (LSH/ITQ share the models' lengths)
    for m in models:
        first_of_bits.setdefault(m.bits, m)
    pq = report["baselines"]["methods"]["pq"]
    for key in tqdm(sorted({p["index"] for p in points}), desc="latency and energy", unit="index"):
        if key.startswith("binary-"):
            bits = int(key.split("-")[1])
            kind, vectors = "binary", signs(first_of_bits[bits].teacher.images)
        else:
            kind, vectors = key, image_features
        db = sections.grow(vectors[db_rows], size, seed, binary=kind == "binary")
        index = sections.build_index(kind, db, seed=seed, m=pq.get("m", 16), nbits=pq.get("nbits", 8))
        costs[key] = sections.search_cost(index, sections.query_vectors(kind, vectors[picks]))
        del index, db
    return {"database_size": size, "queries": n_queries, "k": 10, "threads": 1,
            **sections.pareto(points, costs), "costs": costs}


def fairness(models: list[Model], report: dict, index, q_rows, db_rows) -> dict:
    entries = report["code_length"]["models"]
    per_class = {}
    for m in models:
        per_class[m.name] = entries[m.name]["per_class"]["image_to_image"]
        for variant, s in entries[m.name]["students"].items():
            per_class[f"{m.name}/{variant}"] = s["per_class"]["image_to_image"]
    for name, method in report["baselines"]["methods"].items():
        per_class[name] = method["per_class"]
    classes = list(index.dataset.classes)
    confusion = {m.name: sections.confusion(m.teacher.images[q_rows], m.teacher.images[db_rows],
                                            index.labels[q_rows], index.labels[db_rows], classes)
                 for m in models}
    return {"task": "image_to_image", "figure": "map_all", "entries": sections.fairness(per_class),
            "confusion": confusion}


def examples(models: list[Model], index, q_rows, db_rows, n_text: int = 2, n_image: int = 2, k: int = 5) -> dict:
    """Top-``k`` results of a few queries per model: the demo's text query and one test caption per
    picked class, and test images of other classes."""
    classes = list(index.dataset.classes)
    spread = q_rows[np.linspace(0, len(q_rows) - 1, n_text + n_image).round().astype(int)]
    texts = []
    if index.captions:
        texts.append({"text": DEMO_QUERY, "label": "airplane" if "airplane" in classes else None})
        texts += [{"text": index.captions[index.captions_of[r][0]], "label": classes[index.labels[r]]}
                  for r in spread[:n_text]]
    images = [{"row": int(r), "path": str(index.dataset.records[r].path), "label": classes[index.labels[r]]}
              for r in spread[n_text:]]

    def described(results, label):
        for hit in results:
            hit["class"] = classes[index.labels[hit["row"]]]
            hit["path"] = str(index.dataset.records[hit["row"]].path)
            hit["correct"] = label is not None and hit["class"] == label
        return results

    out = {"k": k, "models": {}}
    for m in models:
        db_codes = m.teacher.images[db_rows]
        queries = []
        if texts:
            codes = m.teacher.encode_texts([t["text"] for t in texts])
            for t, results in zip(texts, sections.top_results(codes, db_codes, db_rows, k)):
                queries.append({"kind": "text", **t, "results": described(results, t["label"])})
        rows = np.asarray([q["row"] for q in images], dtype=np.int64)
        for q, results in zip(images, sections.top_results(m.teacher.images[rows], db_codes, db_rows, k)):
            queries.append({"kind": "image", **q, "results": described(results, q["label"])})
        out["models"][m.name] = queries
    return out


def peers_section(peers, model: Model, db_rows, n: int, seed: int) -> dict:
    if peers:
        return {"source": str(peers), **json.loads(Path(peers).read_text())}
    from .bench_peers import run_peers

    return {"source": f"run here at {n:,} codes", **run_peers(signs(model.teacher.images[db_rows]), n, seed=seed)}


def write_report(runs, data_dir, out_dir, peers=None, cache_dir=None, device="auto", **options) -> dict:
    """Compute the report, write ``report.json``, the PNG plots and ``report.html`` to ``out_dir``."""
    from .report_html import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, _ = build(runs, data_dir, peers, cache_dir, device, **options)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    html, plots = render(report)
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "report.html").write_text(html)
    return report
