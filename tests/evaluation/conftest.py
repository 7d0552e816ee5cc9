"""Tiny trained models shared by the evaluation tests (a few real UCM images, random towers)."""
from __future__ import annotations

import pytest

from tests.conftest import train_tiny


@pytest.fixture(scope="session")
def trained_other(subset, tiny_text_encoder, tmp_path_factory):
    """Another tiny model on the same data, from another seed."""
    return train_tiny(subset, tiny_text_encoder, tmp_path_factory.mktemp("trained_other"), seed=7)


@pytest.fixture(scope="session")
def written_report(trained, trained_other, subset, tiny_text_encoder, tmp_path_factory):
    """``terrahash report`` over both tiny models, the second with tiny ONNX students beside it (as
    ``terrahash distill`` leaves them), on small Pareto and peer databases: (out folder, report)."""
    import shutil

    from evaluation.report import write_report
    from tests.training.test_export import exported_students
    from training.export import ONNX_DIR

    with_students = tmp_path_factory.mktemp("with_students") / "run"
    shutil.copytree(trained_other / "run", with_students)
    onnx = exported_students(tmp_path_factory, tiny_text_encoder, subset)["image"].parent
    shutil.copytree(onnx, with_students / "students" / ONNX_DIR)
    out = tmp_path_factory.mktemp("report")
    report = write_report([trained / "run", with_students], subset, out, cache_dir=trained / "cache",
                          device="cpu", pareto_database=3000, pareto_queries=60, peer_codes=3000)
    return out, report
