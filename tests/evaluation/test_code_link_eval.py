"""Hash codes sent over the multi-hop radio link: the grid's points, and the command on exported students."""
import json

import numpy as np
import pytest


def class_codes(rng, labels: np.ndarray, centres: np.ndarray, flip: float = 0.1) -> np.ndarray:
    """+-1 codes: each its class centre with a share ``flip`` of bits flipped."""
    codes = centres[labels].copy()
    codes[rng.random(codes.shape) < flip] *= -1
    return codes


def test_link_points_on_class_structured_codes():
    from evaluation.code_link_eval import link_points

    rng = np.random.default_rng(0)
    centres = np.where(rng.random((5, 64)) < 0.5, -1.0, 1.0)
    q_labels, db_labels = np.repeat(np.arange(5), 8), np.repeat(np.arange(5), 30)
    queries = class_codes(rng, q_labels, centres) * rng.uniform(0.2, 1.0, (40, 64))  # continuous: signs are sent
    database = class_codes(rng, db_labels, centres)
    report = link_points(queries, q_labels, database, db_labels, hops=(1, 3), snrs_db=(20.0, -15.0),
                         uses=(32, 64, 4096), modulations=("bpsk", "qpsk"), seed=1)
    assert report["bits"] == 64 and 0 < report["map_all_clean"] <= 1
    points = {(p["modulation"], p["hops"], p["snr_db"], p["channel_uses"]): p for p in report["points"]}
    assert len(points) == 2 * 2 * 2 * 3
    assert points["bpsk", 3, 20.0, 32] == {"protocol": "code", "scheme": "repetition", "modulation": "bpsk", "hops": 3,
                                          "snr_db": 20.0, "channel_uses": 32, "carried": False}
    assert points["qpsk", 3, 20.0, 32]["carried"] and points["qpsk", 3, 20.0, 32]["repeats"] == 1
    for key, p in points.items():
        if not p["carried"]:
            continue
        assert p["map_ratio"] == pytest.approx(p["map_all"] / report["map_all_clean"])
        if key[2] == 20.0:  # a clean link gives back the clean code and its ranking
            assert p["bit_agreement"] == 1.0 and p["map_ratio"] == pytest.approx(1.0)
    # -15 dB with one copy of the code: near coin flips; 64 copies: most bits arrive
    assert points["bpsk", 3, -15.0, 64]["bit_agreement"] < 0.6 < points["bpsk", 3, -15.0, 4096]["bit_agreement"]
    assert points["bpsk", 3, -15.0, 64]["map_ratio"] < points["bpsk", 1, -15.0, 4096]["map_ratio"]
    # seeded: the same table again
    again = link_points(queries, q_labels, database, db_labels, hops=(1, 3), snrs_db=(20.0, -15.0),
                        uses=(32, 64, 4096), modulations=("bpsk", "qpsk"), seed=1)
    assert again == report


def test_learned_codecs_are_measured_beside_repetition(tmp_path):
    import torch

    from evaluation.code_link_eval import format_points, link_points
    from serving.model.learned_link import load_codecs
    from training.code_link import CodeLink, CodeLinkConfig, export_codec

    torch.manual_seed(0)
    for n in (16, 64):
        export_codec(CodeLink(64, n, hidden=16).eval(), CodeLinkConfig(uses=(16, 64)), tmp_path / f"n{n}")
    codecs = load_codecs(tmp_path)
    assert [c.uses for c in codecs] == [16, 64]
    rng = np.random.default_rng(0)
    centres = np.where(rng.random((3, 64)) < 0.5, -1.0, 1.0)
    q_labels, db_labels = np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 10)
    queries, database = class_codes(rng, q_labels, centres), class_codes(rng, db_labels, centres)
    report = link_points(queries, q_labels, database, db_labels, hops=(1, 3), snrs_db=(-5.0,), uses=(64,),
                         modulations=("bpsk",), learned=codecs)
    learned = [p for p in report["points"] if p["scheme"] == "learned"]
    assert [(p["hops"], p["channel_uses"]) for p in learned] == [(1, 16), (3, 16), (1, 64), (3, 64)]
    assert all(0 <= p["bit_agreement"] <= 1 and p["bit_agreement_theory"] is None for p in learned)
    assert "learned" in format_points({**report, "queries": 12, "database": {"images": 30},
                                       "student": {"quantization": "none"}})
    again = link_points(queries, q_labels, database, db_labels, hops=(1, 3), snrs_db=(-5.0,), uses=(64,),
                        modulations=("bpsk",), learned=codecs)
    assert again == report  # seeded per point


def test_command_on_exported_students(tmp_path_factory, tiny_text_encoder, subset, tmp_path, capsys):
    from evaluation.code_link_eval import main
    from tests.training.test_export import exported_students

    folder = exported_students(tmp_path_factory, tiny_text_encoder, subset)["image"].parent
    out = tmp_path / "link.json"
    assert main(["--model", str(folder), "--data", str(subset), "--hops", "3", "--snr", "-5", "--uses", "8", "32",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "int8" in report["student"]["quantization"]  # the field unit's student when the folder has one
    assert report["queries"] == 6 and report["database"]["images"] == 18  # 3 classes x 2 test; x (4 train + 2 val)
    assert report["bits"] == 16  # the tiny students' codes: BPSK needs 16 uses, QPSK 8
    assert [(p["modulation"], p["channel_uses"], p["carried"]) for p in report["points"]] == [
        ("bpsk", 8, False), ("bpsk", 32, True), ("qpsk", 8, True), ("qpsk", 32, True)]
    printed = capsys.readouterr().out
    assert "not carried" in printed and "clean mAP@all" in printed


def test_help_names_the_command(capsys):
    from evaluation.code_link_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out
