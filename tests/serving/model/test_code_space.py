"""Code spaces: the id of the image student whose codes an index holds, and the check that an encoder speaks it."""
import json
import logging
from pathlib import Path

import pytest

from serving.model.spec import (CodeSpaceError, ModelSpec, SpecError, check_code_space, code_space_id, load_spec,
                          spec_code_space)


def image_spec_data(model_sha="a" * 64, bits=64, **more) -> dict:
    return {"format_version": 1, "kind": "image", "model_file": "image_student.onnx", "model_sha256": model_sha,
            "bits": bits, "bit_order": "msb-first", "binarize": "bit = 1 where the code is >= 0",
            "quantization": "none", "output": {"name": "codes"}, **more}


def spec(data: dict, name="image_student.spec.json") -> ModelSpec:
    return ModelSpec(Path("/models/m") / name, data)


def manifest(code_space, bits=64, version="v0003") -> dict:
    return {"collection": "images", "version": version, "bits": bits, "bit_order": "msb-first",
            "code_space": code_space}


def test_the_id_depends_on_the_weights_and_the_layout_only():
    base = code_space_id(image_spec_data())
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    assert code_space_id(image_spec_data(image={"size": 224})) == base  # preprocessing is not part of it
    assert code_space_id(image_spec_data(model_sha="b" * 64)) != base
    assert code_space_id(image_spec_data(bits=32)) != base
    with pytest.raises(SpecError, match="fp32 image spec"):
        code_space_id({**image_spec_data(), "quantization": "static int8"})


def test_recorded_ids_win_and_older_fp32_image_specs_are_computed():
    fp32 = image_spec_data()
    assert spec_code_space(fp32) == code_space_id(fp32)  # written before the field existed
    assert spec_code_space({**fp32, "code_space": "sha256:x"}) == "sha256:x"
    assert spec_code_space({"kind": "text"}) is None
    assert spec_code_space({**fp32, "quantization": "dynamic int8"}) is None  # cannot tell its fp32 parent


def test_a_different_code_space_is_refused_naming_both_ids_and_files():
    mine = spec(image_spec_data(code_space="sha256:mine"))
    with pytest.raises(CodeSpaceError) as err:
        check_code_space(mine, manifest("sha256:index"))
    text = str(err.value)
    assert "sha256:mine" in text and "sha256:index" in text
    assert "/models/m/image_student.spec.json" in text and "index/images/v0003/manifest.json" in text
    assert isinstance(err.value, ValueError)
    assert check_code_space(mine, manifest("sha256:mine")) is True


def test_the_text_tower_speaks_the_image_students_space():
    text = spec({"kind": "text", "bits": 64, "bit_order": "msb-first", "code_space": "sha256:mine"},
                "text_student.spec.json")
    assert check_code_space(text, manifest("sha256:mine"))
    with pytest.raises(CodeSpaceError, match="text_student.spec.json"):
        check_code_space(text, manifest("sha256:other"))


def test_bits_are_still_compared():
    with pytest.raises(CodeSpaceError, match="64-bit codes .* 32-bit codes"):
        check_code_space(spec(image_spec_data(code_space="sha256:x")), manifest("sha256:x", bits=32))


def test_files_without_ids_fall_back_to_bits_with_a_warning_or_are_refused(caplog):
    old_text = spec({"kind": "text", "bits": 64, "bit_order": "msb-first"}, "text_student.spec.json")
    with caplog.at_level(logging.WARNING, logger="serving.model.spec"):
        assert check_code_space(old_text, manifest("sha256:x")) is False
    assert "text_student.spec.json records no code-space id" in caplog.text and "Rebuild the index" in caplog.text
    with caplog.at_level(logging.WARNING, logger="serving.model.spec"):
        assert check_code_space(spec(image_spec_data()), manifest(None)) is False  # an index built before ids
    assert "index/images/v0003/manifest.json records no code-space id" in caplog.text
    with pytest.raises(CodeSpaceError, match="re-export the model and rebuild the index"):
        check_code_space(old_text, manifest("sha256:x"), require=True)


def test_release_records_name_themselves_in_messages():
    release = {"release": "r0002", "bits": 64, "bit_order": "msb-first", "code_space": "sha256:index"}
    with pytest.raises(CodeSpaceError, match="release r0002"):
        check_code_space(spec(image_spec_data(code_space="sha256:mine")), release)


def test_exported_specs_share_the_image_students_id(model_dir):
    """training/export.py writes the id into the fp32 and int8 image specs and into the text specs."""
    specs = {path.name: load_spec(path) for path in Path(model_dir).glob("*.spec.json")}
    fp32 = specs["image_student.spec.json"]
    expected = code_space_id(fp32.data)
    assert fp32.data["code_space"] == expected
    assert {name: s.data.get("code_space") for name, s in specs.items()} == {name: expected for name in specs}
    assert len(specs) == 4  # image and text, fp32 and int8
    on_disk = json.loads((Path(model_dir) / "text_student.int8.spec.json").read_text())
    assert on_disk["code_space"] == expected
