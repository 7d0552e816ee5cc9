"""ONNX export of students: torch parity on real images and captions, int8, specs written from configs."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from serving.model.encoders import ImageEncoder, TextEncoder, preprocess_images  # noqa: E402
from serving.model.spec import BIT_ORDER, RESIZE_RULE, SpecError, load_spec, open_model  # noqa: E402
from training.config import TextTowerConfig  # noqa: E402
from serving.ingest.dataset import load_dataset  # noqa: E402
from training.export import (OPSET, STATIC_VARIANTS, ExportError, _verify, export_image_student,  # noqa: E402
                             export_text_student, quantize_image_student, quantize_text_student)
from training.models import HashHead, TextEncoder as TorchTextEncoder  # noqa: E402
from training.students import ImageStudent, ImageStudentConfig, TextStudentConfig, build_text_student  # noqa: E402

BITS = 16
IMAGE_CONFIG = ImageStudentConfig(backbone="test_efficientnet", weights="none", image_size=64, pool_levels=(1,),
                                  head_hidden=(32,))


def tiny_students(text_folder: Path, bits: int = BITS):
    """A random image student and a text student cut from the tiny BERT (1 of its 2 layers)."""
    torch.manual_seed(0)
    image = ImageStudent(IMAGE_CONFIG, bits).eval()
    teacher = TorchTextEncoder(TextTowerConfig(encoder=str(text_folder), max_length=16))
    text = build_text_student(TextStudentConfig(num_layers=1), teacher, HashHead(teacher.feature_dim, bits, (16,)))
    return image, text.eval(), teacher.tokenizer


def exported_students(tmp_path_factory, text_folder: Path, subset: Path) -> dict:
    """Export the tiny students once per test session (a folder under the session's base temp dir),
    so the export and the serving tests share one export."""
    out = tmp_path_factory.getbasetemp() / "exported_students"
    done = out / "done.json"
    if not done.exists():
        image, text, tokenizer = tiny_students(text_folder)
        records = load_dataset(subset).records
        paths = [str(r.path) for r in records]
        pixels = preprocess_images(paths, IMAGE_CONFIG.image_size, IMAGE_CONFIG.mean, IMAGE_CONFIG.std)
        image_spec = export_image_student(image, out, pixels[:4])
        text_spec = export_text_student(text, tokenizer, out)
        int8_image, scores = quantize_image_student(image_spec, pixels[:12], pixels[12:])
        int8_text = quantize_text_student(text_spec)
        torch.save({"image": image.state_dict(), "text": text.state_dict()}, out / "torch_students.pt")
        done.write_text(json.dumps({"image": str(image_spec), "text": str(text_spec), "image_int8": str(int8_image),
                                    "text_int8": str(int8_text), "scores": scores}))
    return {k: (Path(v) if isinstance(v, str) else v) for k, v in json.loads(done.read_text()).items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_text_encoder, subset) -> dict:
    return exported_students(tmp_path_factory, tiny_text_encoder, subset)


@pytest.fixture(scope="module")
def torch_students(exported, tiny_text_encoder):
    image, text, tokenizer = tiny_students(tiny_text_encoder)
    state = torch.load(exported["image"].parent / "torch_students.pt", weights_only=True)
    image.load_state_dict(state["image"])
    text.load_state_dict(state["text"])
    return image, text, tokenizer


@pytest.fixture(scope="module")
def real(subset):
    """The subset's real image paths (24) and captions (120)."""
    records = load_dataset(subset).records
    return [str(r.path) for r in records], [c for r in records for c in r.captions]


def _agreement(a, b) -> float:
    return float(np.mean((np.asarray(a) >= 0) == (np.asarray(b) >= 0)))


def test_fp32_image_student_matches_torch_on_real_images(exported, torch_students, real):
    image, _, _ = torch_students
    onnx = ImageEncoder(exported["image"])
    pixels = onnx.preprocess(real[0])  # (24, 3, 64, 64)
    with torch.no_grad():
        want = image(torch.from_numpy(pixels)).numpy()
    got = onnx.encode(real[0])
    assert got.shape == (len(real[0]), BITS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert _agreement(got, want) >= 0.999


def test_fp32_text_student_matches_torch_on_real_captions(exported, torch_students, real):
    _, text, tokenizer = torch_students
    captions = real[1]
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=text.max_length, return_tensors="pt")
    with torch.no_grad():
        want = text(tokens["input_ids"], tokens["attention_mask"]).numpy()
    got = TextEncoder(exported["text"]).encode(captions)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert _agreement(got, want) >= 0.999


def test_int8_students_keep_most_bits(exported, real):
    for kind, queries in (("image", real[0]), ("text", real[1])):
        fp32 = (ImageEncoder if kind == "image" else TextEncoder)(exported[kind])
        int8 = (ImageEncoder if kind == "image" else TextEncoder)(exported[f"{kind}_int8"])
        assert int8.spec.data["quantization"].endswith("int8")
        assert int8.spec.model_path.stat().st_size < fp32.spec.model_path.stat().st_size
        # Tiny random models have many codes near 0; the real students are held to 99% (see the benchmark).
        assert _agreement(int8.encode(queries), fp32.encode(queries)) >= 0.9, kind
    assert set(exported["scores"]) == {*STATIC_VARIANTS, "dynamic"}


def test_batch_axis_is_dynamic_and_opset_pinned(exported, real):
    import onnx

    encoder = ImageEncoder(exported["image"])
    one, five = encoder.encode(real[0][:1]), encoder.encode(real[0][:5])
    np.testing.assert_allclose(one, five[:1], atol=1e-5)
    for kind in ("image", "text"):
        model = onnx.load(str(load_spec(exported[kind]).model_path))
        assert {o.domain: o.version for o in model.opset_import}[""] == OPSET


def test_specs_are_written_from_the_configs(exported, torch_students):
    image, text, tokenizer = torch_students
    spec = load_spec(exported["image"]).data
    assert spec["bits"] == BITS and spec["bit_order"] == BIT_ORDER
    assert spec["image"]["size"] == IMAGE_CONFIG.image_size
    assert spec["image"]["mean"] == list(IMAGE_CONFIG.mean) and spec["image"]["resize"] == RESIZE_RULE
    assert spec["inputs"][0]["shape"] == ["batch", 3, 64, 64] and spec["output"]["name"] == "codes"
    text_spec = load_spec(exported["text"])
    assert text_spec.text["max_length"] == text.max_length == 16
    assert text_spec.text["pad_id"] == tokenizer.pad_token_id
    for file in text_spec.text["tokenizer_files"]:
        assert (text_spec.path.parent / file).is_file()
    assert load_spec(exported["text_int8"]).text == text_spec.text  # the int8 model shares the tokenizer


def _copy(exported: dict, kind: str, tmp_path: Path) -> Path:
    """A private copy of one exported model and its spec (and tokenizer) to tamper with."""
    spec = load_spec(exported[kind])
    for path in spec.path.parent.iterdir():
        if path.is_dir():
            shutil.copytree(path, tmp_path / path.name)
        else:
            shutil.copy(path, tmp_path / path.name)
    return tmp_path / spec.path.name


def _edit(spec_path: Path, change) -> None:
    data = json.loads(spec_path.read_text())
    change(data)
    spec_path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(bits=24), "says 24 bits"),
    (lambda d: d["image"].update(size=96), "96x96"),
    (lambda d: d["output"].update(name="embedding"), "'embedding'"),
    (lambda d: d["inputs"][0].update(name="pixels"), "inputs ['pixels']"),
])
def test_spec_model_mismatch_fails_at_load_with_both_files_named(exported, tmp_path, change, message):
    spec_path = _copy(exported, "image", tmp_path)
    open_model(spec_path)  # the untouched copy loads
    _edit(spec_path, change)
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        ImageEncoder(spec_path)
    assert "image_student.spec.json" in str(err.value) and "image_student.onnx" in str(err.value)


def test_text_spec_mismatch_and_replaced_model_fail(exported, tmp_path):
    spec_path = _copy(exported, "text", tmp_path)
    _edit(spec_path, lambda d: d.update(bits=32))
    with pytest.raises(SpecError, match="32 bits"):
        TextEncoder(spec_path)
    _edit(spec_path, lambda d: d.update(bits=BITS))
    shutil.copy(load_spec(exported["text_int8"]).model_path, tmp_path / "text_student.onnx")  # another model
    with pytest.raises(SpecError, match="sha256"):
        TextEncoder(spec_path)


def test_malformed_specs_fail_clearly(exported, tmp_path):
    spec_path = _copy(exported, "image", tmp_path)
    _edit(spec_path, lambda d: d.pop("bit_order"))
    with pytest.raises(SpecError, match="missing field bit_order"):
        load_spec(spec_path)
    spec_path.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(spec_path)
    with pytest.raises(SpecError, match="no such spec"):
        load_spec(tmp_path / "absent.spec.json")


def test_verify_catches_a_model_that_differs_from_torch(exported, torch_students):
    image, _, _ = torch_students
    other = ImageStudent(IMAGE_CONFIG, BITS).eval()  # other random weights than the exported ones
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert _verify(load_spec(exported["image"]).model_path, image, {"images": pixels}) < 1e-4
    with pytest.raises(ExportError, match="differ from torch"):
        _verify(load_spec(exported["image"]).model_path, other, {"images": pixels})


def test_a_named_int8_method_makes_only_that_variant(exported, real, tmp_path):
    spec = load_spec(exported["image"])
    for path in (exported["image"], spec.model_path):
        shutil.copy(path, tmp_path / path.name)
    pixels = preprocess_images(real[0], IMAGE_CONFIG.image_size, IMAGE_CONFIG.mean, IMAGE_CONFIG.std)
    int8, scores = quantize_image_student(tmp_path / exported["image"].name, pixels[:12], pixels[12:], "static-bc-stem")
    assert list(scores) == ["static-bc-stem"] and 0.9 <= scores["static-bc-stem"] <= 1.0
    assert load_spec(int8).data["quantization"] == "static-bc-stem int8"
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted([spec.model_path.name,
                                                                      load_spec(int8).model_path.name])
    # The search made this variant too, from the same images: the same bits on the held-out ones.
    assert scores["static-bc-stem"] == exported["scores"]["static-bc-stem"]
    with pytest.raises(ValueError, match="int8 method 'fp16'"):
        quantize_image_student(tmp_path / exported["image"].name, pixels[:12], pixels[12:], "fp16")


def test_int8_method_is_checked_in_the_config():
    from training.config import ConfigError
    from training.students import distill_config_from_dict

    assert distill_config_from_dict({"image": {"int8": "static-bc"}}).image.int8 == "static-bc"
    assert distill_config_from_dict({}).image.int8 == "search"
    with pytest.raises(ConfigError, match="int8"):
        distill_config_from_dict({"image": {"int8": "fp16"}})


def test_channel_means_of_a_pruned_graph_equal_the_whole_graph_s(exported, real):
    """Bias correction reads one convolution's output at a time from a graph cut down to what computes it."""
    import onnx
    import onnxruntime as ort

    from training.export import _channel_means

    model = onnx.load(str(load_spec(exported["image"]).model_path))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    pixels = preprocess_images(real[0][:6], IMAGE_CONFIG.image_size, IMAGE_CONFIG.mean, IMAGE_CONFIG.std)
    whole = onnx.ModelProto.FromString(model.SerializeToString())
    whole.graph.output.extend(onnx.helper.make_empty_tensor_value_info(c.output[0]) for c in convs)
    session = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([c.output[0] for c in convs], {"images": pixels})
    for conv, value in zip([convs[0], convs[len(convs) // 2], convs[-1]], [values[0], values[len(convs) // 2], values[-1]]):
        got = _channel_means(model, [conv.name], pixels)[conv.name]
        np.testing.assert_allclose(got, value.mean(axis=(2, 3)).mean(axis=0), rtol=1e-4, atol=1e-5)
