"""Serving encoders: no torch, preprocessing identical to training's, clear errors, bit packing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from serving.model.encoders import (EmptyTextError, ImageEncoder, InputError, InvalidImageError,  # noqa: E402
                              TextEncoder, load_encoder, preprocess_images)
from serving.model.codes import unpack_signs  # noqa: E402
from serving.model.spec import SpecError  # noqa: E402
from tests.training.test_export import exported_students  # noqa: E402
from serving.ingest.dataset import load_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_text_encoder, subset) -> dict:
    return exported_students(tmp_path_factory, tiny_text_encoder, subset)


@pytest.fixture(scope="module")
def records(subset):
    return load_dataset(subset).records


def test_serving_imports_no_torch():
    code = ("import sys, serving.model.encoders, serving.model.spec; "
            "bad = sorted(m for m in ('torch', 'timm', 'transformers', 'training') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_preprocessing_is_exactly_trainings(records):
    import torch

    from training.features import load_image, normalize

    paths = [r.path for r in records[:6]]
    for size in (64, 256, 300):  # smaller than, equal to, and larger than UCM's 256 pixels
        want = normalize(torch.from_numpy(np.stack([load_image(p, size) for p in paths])), (0.5, 0.4, 0.3),
                         (0.2, 0.25, 0.3)).numpy()
        got = preprocess_images(paths, size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        assert got.shape == want.shape == (6, 3, size, size)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_image_inputs_of_every_kind_give_the_same_codes(exported, records):
    from PIL import Image

    encoder = ImageEncoder(exported["image"])
    path = records[0].path
    with Image.open(path) as image:
        as_pil = image.copy()
    by_path = encoder.encode([str(path)])
    for other in (path.read_bytes(), as_pil, np.array(as_pil.convert("RGB"))):
        np.testing.assert_array_equal(encoder.encode([other]), by_path)
    packed = encoder.encode_packed([str(path)])
    assert packed.dtype == np.uint8 and packed.shape == (1, encoder.bits // 8)


def test_corrupt_images_raise_a_clear_value_error(exported, records):
    encoder = ImageEncoder(exported["image"])
    good = records[0].path.read_bytes()
    for bad in (b"not an image at all", good[: len(good) // 3]):
        with pytest.raises(InvalidImageError, match="cannot decode"):
            encoder.encode([bad])
    assert issubclass(InvalidImageError, ValueError)
    with pytest.raises(InputError, match="no images"):
        encoder.encode([])
    with pytest.raises(InputError, match="RGB uint8"):
        encoder.encode([np.zeros((4, 4), dtype=np.float32)])


def test_empty_text_raises_a_clear_value_error(exported):
    encoder = TextEncoder(exported["text"])
    for bad in ([""], ["a runway", "   "]):
        with pytest.raises(EmptyTextError, match="empty"):
            encoder.encode(bad)
    with pytest.raises(InputError, match="no texts"):
        encoder.encode([])
    with pytest.raises(InputError, match="list of strings"):
        encoder.encode("one string")
    assert issubclass(EmptyTextError, ValueError)


def test_tokenization_matches_the_training_tokenizer(exported, records, tiny_text_encoder):
    from transformers import AutoTokenizer

    captions = [c for r in records for c in r.captions][:40] + ["word " * 50]  # the last one is truncated
    encoder = TextEncoder(exported["text"])
    got = encoder.tokenize(captions)
    want = AutoTokenizer.from_pretrained(str(tiny_text_encoder))(captions, padding=True, truncation=True,
                                                                 max_length=16, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    # Padding is masked: a text's code does not depend on its batch mates.
    np.testing.assert_allclose(encoder.encode(captions[:1]), encoder.encode(captions)[:1], atol=1e-5)


def test_load_encoder_picks_the_kind_and_rejects_the_wrong_one(exported):
    assert isinstance(load_encoder(exported["text"]), TextEncoder)
    assert isinstance(load_encoder(exported["image_int8"]), ImageEncoder)
    with pytest.raises(SpecError, match="not a image"):
        ImageEncoder(exported["text"])


def test_packed_codes_are_the_signs_of_the_outputs(exported, records):
    encoder = TextEncoder(exported["text"])
    captions = [c for r in records for c in r.captions][:10]
    codes, packed = encoder.encode(captions), encoder.encode_packed(captions)
    assert packed.shape == (10, encoder.bits // 8)
    np.testing.assert_array_equal(unpack_signs(packed, encoder.bits), np.where(codes >= 0, 1, -1))
    first = int(packed[0, 0])  # output 0 is the most significant bit of byte 0
    assert (first >> 7) == int(codes[0, 0] >= 0) and (first & 1) == int(codes[0, 7] >= 0)
