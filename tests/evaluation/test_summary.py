"""`terrahash summarize` over reports of every kind: full, image-only transfer, older ones."""
from __future__ import annotations

from evaluation.summary import markdown_table


def figures(scale: float) -> dict:
    return {"image_to_image": {"map_all": 0.9 * scale, "map_50": 0.8 * scale, "p_at_10": 0.7 * scale},
            "text_to_image": {"map_all": 0.6 * scale, "r1": 10.0, "r5": 50.0, "r10": 90.0},
            "image_to_text": {"map_all": 0.5 * scale, "r1": 11.0, "r5": 21.0, "r10": 31.0}, "mr": 35.5}


def test_rows_for_full_image_only_and_older_reports():
    full = {"config": "a", "bits": 32, "dataset": "ucm", "split": "test", **figures(1.0), "float": figures(1.0),
            "recall_ceiling": {"r1": 38.29, "r5": 84.76, "r10": 100.0},
            "free_text": {"binary": {"map_all": 0.7962}}}
    image_only = {"config": "a", "bits": 64, "dataset": "other", "split": "test", "transfer": True,
                  "image_to_image": {"map_all": 0.5, "map_50": 0.4, "p_at_10": 0.3},
                  "text_to_image": None, "image_to_text": None, "mr": None,
                  "float": {"image_to_image": {}, "text_to_image": None, "image_to_text": None, "mr": None},
                  "recall_ceiling": None}
    older = {"config": "b", "bits": 16, **figures(0.5), "float": figures(0.5)}  # before transfer and free text
    lines = markdown_table([older, image_only, full]).splitlines()
    assert lines[0] == "t2i R@1/5/10 cannot exceed 38.3/84.8/100.0 on ucm test (identical captions get identical codes)"
    header = lines[2].split(" | ")
    rows = [line.split(" | ") for line in lines[4:]]
    assert [r[0] for r in rows] == ["| a", "| a (transfer: on other test)", "| b"]
    column = {name: i for i, name in enumerate(header)}
    assert rows[0][column["free-text t2i mAP@all"]] == "0.7962" and rows[2][column["free-text t2i mAP@all"]] == "-"
    assert rows[1][column["i2i mAP@all"]] == "0.5000"
    assert rows[1][column["t2i mAP@all"]] == rows[1][column["t2i R@1/5/10"]] == rows[1][column["mR"]] == "-"
    assert rows[1][-1] == "- |" and rows[0][-1] == "35.5 |"


def test_no_free_text_no_column_and_no_ceiling_no_note():
    older = {"config": "b", "bits": 16, **figures(0.5), "float": figures(0.5)}
    lines = markdown_table([older]).splitlines()
    assert lines[0].startswith("| config") and "free-text" not in lines[0]
