"""Model specs: the JSON file beside each exported ONNX encoder, and the code layout it promises.

A spec says everything serving needs to turn an input into a code: the ONNX file and its
sha256, input and output names, bits and bit order, and the preprocessing (image size, mean/std,
resize rule; or tokenizer files and maximum length). It is written by code at export
(``training/export.py``) and checked against the ONNX graph at load: a spec that does not fit
its model fails here, with both file names in the message. No torch is imported here.

Code space: the codes an index holds are comparable only with codes of the model that wrote them,
whatever their length. Every spec written since code spaces exist carries ``code_space``, the id of
the image student whose codes define the space (``code_space_id``: sha256 over its fp32 ONNX file's
sha256 and the layout fields of its spec). The int8 variant of that student carries the same id,
and so does the text student exported beside it, whose codes were trained into the same space.
Index manifests and releases record the id of the model they were built with, and
``check_code_space`` compares the two before an encoder queries an index.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from serving.storage import sha256_file

from . import codes

log = logging.getLogger(__name__)

SPEC_FORMAT_VERSION = 1
SPEC_SUFFIX = ".spec.json"  # model.onnx -> model.spec.json
KINDS = ("image", "text")
# The code layout is serving/model/codes.py's, the one index manifests record: output dimension i is
# bit 7 - i % 8 of byte i // 8 (np.packbits' MSB-first order), bit 1 where the output is >= 0.
BIT_ORDER = codes.BIT_ORDER
BINARIZE_RULE = codes.SIGN_RULE
# How images are decoded and resized: exactly training.features.load_image (a test pins the two together).
RESIZE_RULE = {"library": "PIL", "convert": "RGB", "method": "bicubic", "crop": "none",
               "when": "only if the decoded size differs from (size, size)"}


class SpecError(ValueError):
    """A spec file that is malformed or does not match its ONNX model."""


class CodeSpaceError(ValueError):
    """An encoder whose codes are not in the code space of the index it would query."""


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
    def code_space(self) -> str | None:
        """The id of the code space this model's codes live in (see ``spec_code_space``)."""
        return spec_code_space(self)

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
    return parse_spec(data, path)


def parse_spec(data, path: str | Path) -> ModelSpec:
    """Validate a spec's JSON value; ``path`` is where it came from (its model file is beside it)."""
    path = Path(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a JSON object, got {type(data).__name__}")
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
    if "code_space" in data and not (isinstance(data["code_space"], str) and data["code_space"]):
        raise SpecError(f"{path}: field code_space should be a non-empty string, got {data['code_space']!r}")
    if data["kind"] == "image" and section["resize"] != RESIZE_RULE:
        raise SpecError(f"{path}: image.resize {section['resize']} is not a rule this serving implements "
                        f"({RESIZE_RULE})")
    return ModelSpec(path, data)


# --- code spaces ---------------------------------------------------------------------------------

# What fixes an image student's code space: its fp32 weights (the ONNX file's sha256) and how its
# outputs become bits. Preprocessing is not in it: it changes how well codes match, not what they mean.
CODE_SPACE_FIELDS = ("model_sha256", "bits", "bit_order", "binarize", "output_name")


def code_space_id(image_spec: dict) -> str:
    """The code-space id of an fp32 image student, from its spec: ``sha256:<hex>`` over the JSON of
    CODE_SPACE_FIELDS (the ONNX file's sha256, bits, bit order, binarize rule, output name)."""
    if image_spec.get("kind") != "image" or image_spec.get("quantization", "none") != "none":
        raise SpecError(f"a code-space id is computed from an fp32 image spec, not a "
                        f"{image_spec.get('quantization', 'none')} {image_spec.get('kind')} one")
    fields = {"model_sha256": image_spec["model_sha256"], "bits": int(image_spec["bits"]),
              "bit_order": image_spec["bit_order"], "binarize": image_spec.get("binarize", BINARIZE_RULE),
              "output_name": image_spec["output"]["name"]}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def spec_code_space(spec: ModelSpec | dict) -> str | None:
    """The code space of a spec's codes: its ``code_space`` field; for an fp32 image spec written
    before the field existed, computed from it (``code_space_id``); None for such older int8 and
    text specs, which cannot tell which image student they belong to."""
    data = spec.data if isinstance(spec, ModelSpec) else spec
    if data.get("code_space"):
        return str(data["code_space"])
    if data.get("kind") == "image" and data.get("quantization", "none") == "none":
        return code_space_id(data)
    return None


def check_code_space(spec: ModelSpec | str | Path, manifest: dict, *, manifest_file: str | None = None,
                     require: bool = False) -> bool:
    """Refuse an encoder whose codes are not in the code space of an index version.

    ``spec``: the encoder's spec (ModelSpec or its path); ``manifest``: an index manifest (or a
    release, which records the same fields); ``manifest_file`` names it in messages (default
    ``index/<collection>/<version>/manifest.json``). Raises CodeSpaceError (a ValueError) naming both
    files when the bits or bit order differ, or when both carry code-space ids and they differ.

    Older files without an id (specs exported, indexes built, before ids were recorded): with
    ``require`` that is a CodeSpaceError too; otherwise only bits and bit order are compared, a
    warning says so and tells to rebuild the index, and False is returned. True means the ids matched.
    """
    spec = spec if isinstance(spec, ModelSpec) else load_spec(spec)
    where = manifest_file or (f"index/{manifest.get('collection', '?')}/{manifest.get('version', '?')}/manifest.json"
                              if "version" in manifest else f"release {manifest.get('release', '?')}")
    if int(manifest["bits"]) != spec.bits or manifest.get("bit_order", BIT_ORDER) != spec.data["bit_order"]:
        raise CodeSpaceError(f"encoder {spec.path} writes {spec.bits}-bit codes ({spec.data['bit_order']}), index "
                             f"{where} holds {manifest['bits']}-bit codes ({manifest.get('bit_order', BIT_ORDER)})")
    mine, theirs = spec_code_space(spec), manifest.get("code_space")
    if mine and theirs:
        if mine != theirs:
            raise CodeSpaceError(f"encoder {spec.path} has code space {mine}, index {where} was built in code space "
                                 f"{theirs}: its codes would be compared with codes of an unrelated model; serve "
                                 f"the model the index was built with, or build an index with this one")
        return True
    missing = " and ".join(name for name, value in ((str(spec.path), mine), (where, theirs)) if not value)
    message = (f"{missing} records no code-space id (written before code spaces were recorded), so it cannot be "
               f"proved that encoder {spec.path} speaks the codes of index {where}")
    if require:
        raise CodeSpaceError(f"{message}; re-export the model and rebuild the index with `terrahash index build`")
    log.warning("%s; only the code length (%d bits) was checked. Rebuild the index with `terrahash index build` "
                "(and re-export older models) to have it checked", message, spec.bits)
    return False


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
    spec = load_spec(spec_path)
    model = spec.model_path
    if not model.is_file():
        raise SpecError(f"{spec.path}: its model file {model.name} is missing from {model.parent}")
    _check_model_sha256(spec, sha256_file(model))
    return spec, _session(spec, str(model), threads)


def open_model_bytes(spec: ModelSpec, model: bytes, threads: int = 0):
    """(spec, onnxruntime session) for a parsed spec and its ONNX file's bytes (held in memory, as an edge
    bundle's member): checksum and graph checked against the spec."""
    _check_model_sha256(spec, hashlib.sha256(model).hexdigest())
    return spec, _session(spec, model, threads)


def _check_model_sha256(spec: ModelSpec, actual: str) -> None:
    if actual != spec.data["model_sha256"]:
        raise SpecError(f"{spec.path}: model {spec.model_path.name} has sha256 {actual[:12]}..., the spec says "
                        f"{spec.data['model_sha256'][:12]}... (the model was replaced without its spec)")


def _session(spec: ModelSpec, model: str | bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    check_spec_against_model(spec, session)
    return session
