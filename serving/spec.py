"""Model specs: the JSON file beside each exported ONNX encoder, and the code layout it promises.

A spec says everything serving needs to turn an input into a code: the ONNX file and its
sha256, input and output names, bits and bit order, and the preprocessing (image size, mean/std,
resize rule; or tokenizer files and maximum length). It is written by code at export
(``training/export.py``) and checked against the ONNX graph at load: a spec that does not fit
its model fails here, with both file names in the message. No torch is imported here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.artifacts import sha256_file

from . import codes

SPEC_FORMAT_VERSION = 1
SPEC_SUFFIX = ".spec.json"  # model.onnx -> model.spec.json
KINDS = ("image", "text")
# The code layout is serving/codes.py's, the one index manifests record: output dimension i is
# bit 7 - i % 8 of byte i // 8 (np.packbits' MSB-first order), bit 1 where the output is >= 0.
BIT_ORDER = codes.BIT_ORDER
BINARIZE_RULE = codes.SIGN_RULE
# How images are decoded and resized: exactly training.features.load_image (a test pins the two together).
RESIZE_RULE = {"library": "PIL", "convert": "RGB", "method": "bicubic", "crop": "none",
               "when": "only if the decoded size differs from (size, size)"}


class SpecError(ValueError):
    """A spec file that is malformed or does not match its ONNX model."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec; ``data`` is the JSON as written, ``path`` the spec file it came from."""

    path: Path
    data: dict

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def bits(self) -> int:
        return int(self.data["bits"])

    @property
    def model_path(self) -> Path:
        return self.path.parent / self.data["model_file"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.data["inputs"]]

    @property
    def output_name(self) -> str:
        return self.data["output"]["name"]

    @property
    def image(self) -> dict:
        return self.data["image"]

    @property
    def text(self) -> dict:
        return self.data["text"]


_REQUIRED = {"format_version": int, "kind": str, "model_file": str, "model_sha256": str, "bits": int,
             "bit_order": str, "inputs": list, "output": dict}
_REQUIRED_BY_KIND = {"image": {"size": int, "mean": list, "std": list, "resize": dict},
                     "text": {"tokenizer_file": str, "max_length": int, "pad_id": int, "pad_token": str}}


def spec_path_for(onnx_path: str | Path) -> Path:
    """The spec file that belongs to an ONNX file: ``x.onnx`` -> ``x.spec.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + SPEC_SUFFIX)


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a spec file (not yet against its model: see ``check_spec_against_model``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not valid JSON: {err}") from None
    _check_fields(path, data, _REQUIRED, "")
    if data["format_version"] != SPEC_FORMAT_VERSION:
        raise SpecError(f"{path}: format_version {data['format_version']} is not supported "
                        f"(this serving reads version {SPEC_FORMAT_VERSION})")
    if data["kind"] not in KINDS:
        raise SpecError(f"{path}: kind {data['kind']!r}; expected one of {list(KINDS)}")
    try:
        codes.validate_bits(data["bits"])
    except codes.BitLengthError as err:
        raise SpecError(f"{path}: {err}") from None
    if data["bit_order"] != BIT_ORDER:
        raise SpecError(f"{path}: bit_order {data['bit_order']!r} is not the one this serving packs with "
                        f"({BIT_ORDER!r})")
    section = data.get(data["kind"])
    if not isinstance(section, dict):
        raise SpecError(f"{path}: missing the {data['kind']!r} section")
    _check_fields(path, section, _REQUIRED_BY_KIND[data["kind"]], f"{data['kind']}.")
    if data["kind"] == "image" and section["resize"] != RESIZE_RULE:
        raise SpecError(f"{path}: image.resize {section['resize']} is not a rule this serving implements "
                        f"({RESIZE_RULE})")
    return ModelSpec(path, data)


def _check_fields(path: Path, data: dict, required: dict, prefix: str) -> None:
    for key, kind in required.items():
        if key not in data:
            raise SpecError(f"{path}: missing field {prefix}{key}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise SpecError(f"{path}: field {prefix}{key} should be {kind.__name__}, got {data[key]!r}")


def check_spec_against_model(spec: ModelSpec, session) -> None:
    """Raise SpecError unless the onnxruntime ``session``'s graph is what ``spec`` says it is:
    input names, output name, output width == bits, image input size."""
    where = f"spec {spec.path.name} vs model {spec.model_path.name}"
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if sorted(inputs) != sorted(spec.input_names):
        raise SpecError(f"{where}: the spec names inputs {spec.input_names}, the model has {sorted(inputs)}")
    if spec.output_name not in outputs:
        raise SpecError(f"{where}: the spec names output {spec.output_name!r}, the model has {sorted(outputs)}")
    width = outputs[spec.output_name].shape[-1]
    if width != spec.bits:
        raise SpecError(f"{where}: the spec says {spec.bits} bits, the model's output {spec.output_name!r} "
                        f"has {width} values per code")
    if spec.kind == "image":
        shape = inputs[spec.input_names[0]].shape  # (batch, 3, size, size)
        size = spec.image["size"]
        if list(shape[1:]) != [3, size, size]:
            raise SpecError(f"{where}: the spec says {size}x{size} RGB images, the model's input "
                            f"{spec.input_names[0]!r} has shape {shape}")


def open_model(spec_path: str | Path, threads: int = 0):
    """(spec, onnxruntime session) for a spec file: checksum and graph checked against the spec."""
    import onnxruntime as ort

    spec = load_spec(spec_path)
    model = spec.model_path
    if not model.is_file():
        raise SpecError(f"{spec.path}: its model file {model.name} is missing from {model.parent}")
    actual = sha256_file(model)
    if actual != spec.data["model_sha256"]:
        raise SpecError(f"{spec.path}: model {model.name} has sha256 {actual[:12]}..., the spec says "
                        f"{spec.data['model_sha256'][:12]}... (the model was replaced without its spec)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    check_spec_against_model(spec, session)
    return spec, session
