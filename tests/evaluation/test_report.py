"""terrahash report on two tiny trained models: every section is written, and its figures are the
ones a direct computation gives (terrahash eval, the baselines' reference code, the detector)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import metrics
from evaluation.baselines import fuse, mean_caption_vectors, pq_scores
from evaluation.pareto import non_dominated
from evaluation.report import robustness_rows

SECTIONS = ("code_length", "baselines", "pareto", "fairness", "robustness", "drift", "peers")


def test_report_json_has_every_section_and_the_page_every_plot(written_report):
    out, report = written_report
    assert set(SECTIONS) <= set(json.loads((out / "report.json").read_text()))
    page = (out / "report.html").read_text()
    for plot in ("code_length", "pr_curves", "pareto", "fairness", "robustness"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page  # nothing to fetch when it opens
    assert page.count("data:image/png;base64,") == 5


def test_code_length_figures_are_terrahash_evals(written_report, trained, subset):
    from evaluation.evaluate import evaluate_model

    _, report = written_report
    mine = evaluate_model(trained / "run", subset, "test", cache_dir=trained / "cache", device="cpu")
    entry = report["code_length"]["models"]["run"]
    assert report["code_length"]["order"] == ["run", "run-2"]  # the same folder name twice: made unique
    for task in ("image_to_image", "text_to_image", "image_to_text"):
        assert entry["binary"][task]["map_all"] == pytest.approx(mine[task]["map_all"])
        assert entry["float"][task]["map_all"] == pytest.approx(mine["float"][task]["map_all"])
        assert entry["asymmetric"][task]["map_all"] == pytest.approx(mine["asymmetric"][task]["map_all"])
    assert entry["binary"]["mr"] == pytest.approx(mine["mr"])
    assert entry["per_class"] == mine["per_class"]


def _index(subset):
    from serving.ingest.dataset import load_dataset
    from training.train import DatasetIndex

    index = DatasetIndex.build(load_dataset(subset))
    return index, index.rows("test"), index.database_rows("test")


def test_pq_fusion_is_the_papers_method_by_hand(written_report, trained, subset):
    """AP@50 of the average and the maximum of the per-modality PQ scores, recomputed from the cached features."""
    from training.features import FeatureCache, default_device
    from training.train import Encoders, load_trained

    _, report = written_report
    index, q, db = _index(subset)
    device = default_device("cpu")
    model, config, _ = load_trained(trained / "run", device)
    encoders = Encoders(model, config, index, FeatureCache(trained / "cache"), device)
    image = encoders.image_features((0,))[0]
    text = mean_caption_vectors(encoders.text_features(), index.captions_of, np.arange(len(index.labels)))
    found = report["baselines"]["fusion_pq"]
    nbits = report["baselines"]["methods"]["pq"]["nbits"]
    image_scores = pq_scores(image[q], image[db], m=report["baselines"]["methods"]["pq"]["m"], nbits=nbits)
    text_scores = pq_scores(text[q], text[db], m=16 if text.shape[1] % 16 == 0 else 8, nbits=nbits)
    relevance = metrics.relevance_from_labels(index.labels[q], index.labels[db])
    for how in ("average", "maximum"):
        fused = fuse(image_scores, text_scores, how)
        assert found[how]["map_50"] == pytest.approx(metrics.mean_average_precision(
            fused, relevance, k=min(50, len(db)), descending=True))
    assert found["image"]["map_all"] == pytest.approx(report["baselines"]["methods"]["pq"]["map_all"])


def test_pareto_front_is_the_non_dominated_points_with_measured_costs(written_report):
    _, report = written_report
    points = report["pareto"]["points"]
    assert [p["on_front"] for p in points] == non_dominated(points)
    assert any(p["on_front"] for p in points)
    for p in points:
        assert p["latency_ms_p50"] > 0 and p["latency_ms_p99"] >= p["latency_ms_p50"]
    names = {p["name"] for p in points}
    assert {"run", "run-2", "run-2/fp32", "run-2/int8", "lsh-16", "itq-16", "cosine", "pq"} <= names
    binary = [p for p in points if p["index"] == "binary-16"]
    assert len({p["latency_ms_p50"] for p in binary}) == 1  # one index, measured once, for every 16-bit config


def test_fairness_worst_class_and_gap(written_report):
    _, report = written_report
    for name, entry in report["fairness"]["entries"].items():
        values = entry["per_class"]
        assert entry["worst_ap"] == min(values.values())
        assert entry["gap"] == pytest.approx(np.mean(list(values.values())) - entry["worst_ap"])
    confusion = np.asarray(report["fairness"]["confusion"]["run"]["matrix"])
    assert confusion.sum(axis=1) == pytest.approx(np.ones(len(report["classes"])))


def test_robustness_and_drift_use_the_same_detector_on_the_picked_queries(written_report, subset):
    _, report = written_report
    index, q, _ = _index(subset)
    rows = robustness_rows(index.labels, q, 10, seed=0)
    assert report["robustness"]["rows"] == rows.tolist()
    assert report["robustness"]["encoder"] == "run-2/fp32"  # the first run with students: its image student
    for kind, by in report["robustness"]["corruptions"].items():
        assert set(by) == {"1", "2", "3"}
        assert report["drift"]["alarm_rate"]["corruptions"][kind] == {s: v["alarm_rate"] for s, v in by.items()}
    assert 0.0 <= report["drift"]["alarm_rate"]["clean_val"] <= 1.0


def test_examples_are_ranked_by_distance_and_marked_by_class(written_report):
    _, report = written_report
    for queries in report["examples"]["models"].values():
        assert {q["kind"] for q in queries} == {"text", "image"}
        for query in queries:
            keys = [(h["distance"], h["row"]) for h in query["results"]]
            assert keys == sorted(keys)
            for hit in query["results"]:
                assert hit["correct"] == (query["label"] is not None and hit["class"] == query["label"])


def test_peers_compare_every_index_on_both_code_sets(written_report):
    _, report = written_report
    for name in ("uniform", "structured"):
        found = report["peers"]["sets"][name]["indexes"]
        assert found["faiss-flat"]["recall_at_10"] == 1.0
        assert found["milvus-lite"]["recall_at_10"] == 1.0  # +-1 floats with inner product rank as Hamming
        assert 0.0 < found["usearch-hnsw"]["recall_at_10"] <= 1.0


def test_students_are_measured_from_their_onnx_codes(written_report, subset):
    """The fp32 and int8 rows are the ONNX students' own figures, recomputed here from their encoders."""
    from serving.model.encoders import ImageEncoder
    from training.export import ONNX_DIR

    out, report = written_report
    index, q, db = _index(subset)
    folder = report["code_length"]["models"]["run-2"]["run"]
    assert report["code_length"]["models"]["run"]["students"] == {}
    paths = [str(r.path) for r in index.dataset.records]
    for variant, suffix in (("fp32", ""), ("int8", ".int8")):
        codes = ImageEncoder(f"{folder}/students/{ONNX_DIR}/image_student{suffix}.spec.json").encode(paths)
        signs = np.where(codes >= 0, 1, -1)
        mine = metrics.mean_average_precision(metrics.hamming_distances(signs[q], signs[db]),
                                              metrics.relevance_from_labels(index.labels[q], index.labels[db]))
        found = report["code_length"]["models"]["run-2"]["students"][variant]["binary"]
        assert found["image_to_image"]["map_all"] == pytest.approx(mine)
    assert "run-2/fp32" in report["fairness"]["entries"]
