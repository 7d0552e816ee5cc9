"""Export of distilled students to ONNX, their spec files, and their int8 variants.

Each student becomes one ONNX graph from input to continuous codes (dynamic batch axis, pinned
opset), checked against torch with onnxruntime, with a spec JSON written here from the student's
config (never by hand) that serving reads back (``serving/model/spec.py``). Every spec records the code
space of its codes (``serving.model.spec.code_space_id`` of the fp32 image student): the image student's
own, shared by its int8 variant and by the text student exported beside it. Int8 variants come from
onnxruntime's quantization tools: dynamic for text; for images, a few static variants (calibrated
on real images, some bias-corrected) and dynamic, keeping whichever keeps most bits on held-out images.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from serving.model.spec import (BINARIZE_RULE, BIT_ORDER, RESIZE_RULE, SPEC_FORMAT_VERSION, code_space_id, spec_code_space,
                          spec_path_for)
from serving.storage import sha256_file

from .students import INT8_IMAGE_METHODS, ImageStudent, TextStudent, load_image_student, load_text_student

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"  # export_students' default output folder, inside the students folder
OPSET = 18  # pinned: the oldest opset torch's exporter writes; onnxruntime >= 1.14 runs it
IMAGE_INPUT, TEXT_INPUTS, OUTPUT = "images", ("input_ids", "attention_mask"), "codes"
IMAGE_MODEL, TEXT_MODEL = "image_student.onnx", "text_student.onnx"
TOKENIZER_FILES = "text_student.tokenizer"  # folder of tokenizer files beside the text model
INT8_SUFFIX = ".int8"  # image_student.onnx -> image_student.int8.onnx
VERIFY_ATOL = 1e-4  # onnxruntime vs torch, continuous codes in (-1, 1)


class ExportError(RuntimeError):
    """An exported model that does not reproduce its torch source."""


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], dynamic: dict, path: Path,
            output_name: str = OUTPUT) -> None:
    """torch.export-based ONNX export of ``module`` in eval mode, one self-contained file."""
    import warnings

    module = module.eval()
    # The exporter's graph passes log a line per deduplicated initializer (hundreds) at INFO, and
    # its optimizer a line per folded constant and rewrite pass.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad(), warnings.catch_warnings():
        # Inputs that share one batch dimension get a UserWarning each that the name is kept once.
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=[output_name], dynamic_shapes=dynamic, external_data=False,
                                    verbose=False)
    program.save(str(path))


def _verify(path: Path, module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> float:
    """Max |onnxruntime - torch| on ``feeds``; ExportError beyond VERIFY_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], feeds)[0]
    with torch.no_grad():
        want = module.eval()(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    error = float(np.abs(got - want).max())
    if error > VERIFY_ATOL:
        raise ExportError(f"{path}: onnxruntime codes differ from torch by up to {error:.2e} (> {VERIFY_ATOL})")
    return error


def export_image_student(student: ImageStudent, out_dir: str | Path, check_images: np.ndarray | None = None) -> Path:
    """Write ``image_student.onnx`` and its spec to ``out_dir``; returns the spec path.

    ``check_images`` (B, 3, S, S) float32, real preprocessed images if given, are what torch and
    onnxruntime are compared on (random inputs otherwise).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = student.config.image_size
    path = out / IMAGE_MODEL
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised as a constant
    batch = torch.export.Dim("batch", min=1)
    _export(student, (example,), [IMAGE_INPUT], {"images": {0: batch}}, path)
    if check_images is None:
        check_images = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    error = _verify(path, student, {IMAGE_INPUT: check_images})
    log.info("exported %s (max |ort - torch| %.2e)", path, error)
    return write_spec(path, image_spec(student, path))


def image_spec(student: ImageStudent, model_path: Path, quantization: str = "none") -> dict:
    """The spec of an exported image student, from its config."""
    c = student.config
    spec = {**_common_spec(model_path, "image", student.bits, quantization),
            "inputs": [{"name": IMAGE_INPUT, "dtype": "float32", "shape": ["batch", 3, c.image_size, c.image_size]}],
            "image": {"size": c.image_size, "mean": list(c.mean), "std": list(c.std), "resize": RESIZE_RULE,
                      "scale": "pixel / 255, then (x - mean) / std per RGB channel", "layout": "NCHW, RGB"},
            "source": {"backbone": c.backbone, "pool_levels": list(c.pool_levels)}}
    if quantization == "none":  # a quantized variant keeps the id of the fp32 model it came from (_int8_spec)
        spec["code_space"] = code_space_id(spec)
    return spec


def export_text_student(student: TextStudent, tokenizer, out_dir: str | Path,
                        check_texts: list[str] | None = None, code_space: str | None = None) -> Path:
    """Write ``text_student.onnx``, its tokenizer files and its spec to ``out_dir``; returns the spec path.

    ``code_space``: the code space the text codes were trained into; by default that of the fp32
    image student already exported in ``out_dir`` (its students come from one teacher's codes).
    """
    out = Path(out_dir)
    code_space = code_space or _exported_code_space(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TEXT_MODEL
    example = tokenizer(["a short one", "a longer example sentence here"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=student.max_length)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    _export(student, (example["input_ids"], example["attention_mask"]), list(TEXT_INPUTS), dynamic, path)
    texts = check_texts or ["many buildings and a parking lot", "a river", "green trees beside a road " * 3]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=student.max_length, return_tensors="np")
    error = _verify(path, student, {name: tokens[name].astype(np.int64) for name in TEXT_INPUTS})
    log.info("exported %s (max |ort - torch| %.2e)", path, error)
    tokenizer_dir = out / TOKENIZER_FILES
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_dir}: the tokenizer wrote no tokenizer.json (a fast tokenizer is needed)")
    return write_spec(path, text_spec(student, tokenizer, path, tokenizer_dir, code_space=code_space))


def _exported_code_space(out: Path) -> str | None:
    """The code space of the fp32 image student exported in ``out``, or None (with a warning)."""
    image = spec_path_for(out / IMAGE_MODEL)
    if image.is_file():
        return spec_code_space(json.loads(image.read_text()))
    log.warning("%s: no image student exported here, so the text student's spec records no code space; "
                "serving will only check its code length against an index", out)
    return None


def text_spec(student: TextStudent, tokenizer, model_path: Path, tokenizer_dir: Path,
              quantization: str = "none", code_space: str | None = None) -> dict:
    """The spec of an exported text student, from its config and tokenizer; ``code_space`` is the
    image student's whose codes it was trained into."""
    files = sorted(p.name for p in tokenizer_dir.iterdir())
    rel = tokenizer_dir.relative_to(model_path.parent)
    return {**_common_spec(model_path, "text", student.bits, quantization),
            **({"code_space": code_space} if code_space else {}),
            "inputs": [{"name": name, "dtype": "int64", "shape": ["batch", "sequence"]} for name in TEXT_INPUTS],
            "text": {"tokenizer_file": f"{rel}/tokenizer.json", "tokenizer_files": [f"{rel}/{f}" for f in files],
                     "max_length": student.max_length, "truncation": "longest_first at max_length",
                     "padding": "to the longest text of the batch (padded tokens are masked)",
                     "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token),
                     "pooling": "mean over unmasked tokens (inside the graph)"},
            "source": {"layers": student.model.config.num_hidden_layers,
                       "hidden_size": student.model.config.hidden_size}}


def _common_spec(model_path: Path, kind: str, bits: int, quantization: str) -> dict:
    return {"format_version": SPEC_FORMAT_VERSION, "kind": kind, "model_file": model_path.name,
            "model_sha256": sha256_file(model_path), "opset": OPSET, "bits": bits, "bit_order": BIT_ORDER,
            "binarize": BINARIZE_RULE, "quantization": quantization,
            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", bits],
                       "meaning": "continuous codes in (-1, 1); the binary code is their sign"}}


def write_spec(model_path: Path, spec: dict) -> Path:
    path = spec_path_for(model_path)
    path.write_text(json.dumps(spec, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# int8


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantization tools log hundreds of INFO lines per model through the root logger
    (one per tensor or rescaled weight); hold the root at WARNING while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def int8_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + INT8_SUFFIX + model_path.suffix)


def _preprocessed(model_path: Path) -> Path:
    """The model after onnxruntime's recommended pre-processing (shape inference, graph fusion)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(tempfile.mkdtemp(prefix="terrahash-q-")) / model_path.name
    # Symbolic shape inference cannot follow the exporter's attention-mask arithmetic; ONNX's own
    # shape inference and the graph optimisation still run.
    with _quiet_root_logger():
        quant_pre_process(str(model_path), str(out), skip_symbolic_shape=True)
    return out


def head_nodes(model_path: Path, prefix: str = "head.") -> list[str]:
    """Nodes that use the hash head's weights. They stay fp32 when a model is quantized: the head
    is a small share of the compute, and its last layer decides the signs, so rounding there
    flips the bits of every code near 0."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if i.name.startswith(prefix)}
    return [node.name for node in graph.node if weights.intersection(node.input)]


def quantize_dynamic_int8(model_path: Path, out_path: Path) -> Path:
    """Weights int8 ahead of time, activations quantized on the fly (MatMul, Gather, Conv)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _preprocessed(model_path)
    with _quiet_root_logger():
        quantize_dynamic(str(source), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=head_nodes(source))
    shutil.rmtree(source.parent)
    return out_path


class _ImageCalibration:
    """onnxruntime CalibrationDataReader over preprocessed real images (N, 3, S, S)."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self.batches = iter([{IMAGE_INPUT: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def tail_nodes(model_path: Path) -> list[str]:
    """Nodes after the backbone's last convolutions: global pooling, the reshapes and concatenation of
    pooled levels, and the head (its activations included, which ``head_nodes`` misses). Neither a
    convolution, nor fed by one (the activation fused into a convolution stays with it), nor feeding
    one. Kept fp32 they hand the head unrounded pooled features, for almost no compute."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    feeds_conv, todo = set(), [node for node in graph.node if node.op_type == "Conv"]
    while todo:  # every ancestor of a convolution
        for name in todo.pop().input:
            node = producer.get(name)
            if node is not None and node.name not in feeds_conv:
                feeds_conv.add(node.name)
                todo.append(node)
    return [node.name for node in graph.node if node.op_type != "Conv" and node.name not in feeds_conv
            and not any(producer.get(i) is not None and producer[i].op_type == "Conv" for i in node.input)]


def stem_nodes(model_path: Path) -> list[str]:
    """Convolutions on the model input: the stem, which sees the image itself. Kept fp32, the pixels
    are not rounded to 8 bits before the first layer (a small share of the compute)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    return [node.name for node in graph.node if node.op_type == "Conv" and node.input[0] in inputs]


# Static variants tried for the image student: name -> quantize_static_int8 options. Plain min/max
# calibration alone loses ~1% of the bits of the fast-64 student (mostly through shifted channel
# means, see _correct_biases); the corrected ones lose ~0.5% or less.
STATIC_VARIANTS = {
    "static": {},
    "static-bc": {"fp32": ("tail",), "bias_correction": True},
    "static-bc-stem": {"fp32": ("tail", "stem"), "mean_ranges": True, "bias_correction": True},
}
FP32_PARTS = {"tail": tail_nodes, "stem": stem_nodes}
assert set(INT8_IMAGE_METHODS) == {*STATIC_VARIANTS, "dynamic"}, "students.INT8_IMAGE_METHODS names these variants"


def quantize_static_int8(model_path: Path, out_path: Path, calibration: np.ndarray, fp32: tuple[str, ...] = (),
                         mean_ranges: bool = False, bias_correction: bool = False) -> Path:
    """QDQ int8: per-channel weights, activations from min/max over real calibration images.

    The hash head stays fp32, and so do the ``fp32`` parts (names of FP32_PARTS). ``mean_ranges``:
    each activation's range is the mean over calibration batches of the batch's min/max instead of
    the extremes over all images, so rare outliers take fewer of the 256 levels. ``bias_correction``:
    see _correct_biases (on the calibration images).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = _preprocessed(model_path)
    keep = head_nodes(source) + [node for part in fp32 for node in FP32_PARTS[part](source)]
    with _quiet_root_logger():
        quantize_static(str(source), str(out_path), _ImageCalibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sorted(set(keep)),
                        extra_options={"CalibMovingAverage": True} if mean_ranges else {})
    if bias_correction:
        _correct_biases(out_path, source, calibration)
    shutil.rmtree(source.parent)
    return out_path


def _correct_biases(qdq_path: Path, fp32_path: Path, images: np.ndarray) -> None:
    """Empirical bias correction (Nagel et al. 2019, "Data-free quantization through weight
    equalization and bias correction") of a QDQ model, in place.

    Rounding activations to 8-bit steps (ReLU6 outputs most) and weights (depthwise filters have
    9 per channel) shifts the mean of each channel of a convolution's output. The shifts add up
    through the blocks and move the codes, flipping the bits near 0: on the fast-64 student they
    cost more bits than the rounding noise itself. Each quantized convolution, in graph order, has
    its int32 bias moved by the mean difference per channel between its output and the fp32 model's
    on ``images``; one at a time, since each correction changes what the later ones see.
    ``fp32_path`` is the model that was quantized (same node names).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path))
    biases = _quantized_biases(model)
    want = _channel_means(onnx.load(str(fp32_path)), list(biases), images)
    initializers = {i.name: i for i in model.graph.initializer}
    limits = np.iinfo(np.int32)
    for conv, (bias, scale) in biases.items():
        shift = _channel_means(model, [conv], images)[conv] - want[conv]
        steps = shift / numpy_helper.to_array(initializers[scale]).astype(np.float64)
        corrected = numpy_helper.to_array(initializers[bias]).astype(np.int64) - np.round(steps).astype(np.int64)
        initializers[bias].CopyFrom(numpy_helper.from_array(np.clip(corrected, limits.min, limits.max)
                                                            .astype(np.int32), bias))
    onnx.save(model, str(qdq_path))


def _quantized_biases(model) -> dict[str, tuple[str, str]]:
    """Quantized convolutions of a QDQ model, in graph order: name -> (int32 bias initializer, its scale)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        dequantize = producer.get(node.input[2]) if node.op_type == "Conv" and len(node.input) > 2 else None
        if dequantize is not None and dequantize.op_type == "DequantizeLinear" and dequantize.input[0] in initializers:
            found[node.name] = (dequantize.input[0], dequantize.input[1])
    return found


def _channel_means(model, convs: list[str], images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Mean per channel of the outputs of convolutions ``convs`` over ``images``. Graph optimisations
    are off: the QDQ nodes run as written (fake quantization) and nothing fused hides an output."""
    import onnx
    import onnxruntime as ort

    if not convs:
        return {}
    model = onnx.ModelProto.FromString(model.SerializeToString())
    wanted = [node for node in model.graph.node if node.name in set(convs)]
    outputs = [node.output[0] for node in wanted]
    _prune_to(model.graph, outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums = [0.0] * len(outputs)
    for i in range(0, len(images), batch):
        values = session.run(outputs, {IMAGE_INPUT: images[i:i + batch]})  # each (B, C, ...)
        sums = [s + v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2).sum(axis=0) for s, v in zip(sums, values)]
    return {node.name: s / len(images) for node, s in zip(wanted, sums)}


def _prune_to(graph, outputs: list[str]) -> None:
    """Keep only what computes ``outputs`` (now the graph's only outputs): the nodes they depend on and
    the initializers those read. Bias correction asks for one convolution at a time, mostly early ones."""
    import onnx

    producer = {out: node for node in graph.node for out in node.output}
    needed, todo = set(), list(outputs)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    kept = [node for node in graph.node if id(node) in needed]
    used = {name for node in kept for name in node.input}
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.node[:], graph.output[:], graph.initializer[:]
    graph.node.extend(kept)
    graph.initializer.extend(initializers)
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)


def _run(model_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run([OUTPUT], feeds)[0]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a >= 0) == (b >= 0)))


def quantize_image_student(spec_path: Path, calibration: np.ndarray, held_out: np.ndarray,
                           method: str = "search") -> tuple[Path, dict]:
    """Int8 image student made by ``method`` (one of INT8_IMAGE_METHODS), or by each of them for "search":
    the one whose bits agree most with the fp32 model on ``held_out`` images is kept (the others deleted; ties
    go to the earlier, simpler one, dynamic last as the slowest on CPU). Static variants are calibrated on
    ``calibration``. Images are preprocessed float32 (N, 3, S, S). Returns (int8 spec path, agreement per
    method made)."""
    if method not in (*INT8_IMAGE_METHODS, "search"):
        raise ValueError(f"int8 method {method!r}: expected one of {[*INT8_IMAGE_METHODS, 'search']}")
    spec = json.loads(Path(spec_path).read_text())
    model = Path(spec_path).parent / spec["model_file"]
    reference = _run(model, {IMAGE_INPUT: held_out})
    methods = INT8_IMAGE_METHODS if method == "search" else (method,)
    candidates = {m: model.with_name(f"{model.stem}.{m}.onnx") for m in methods}
    for m, path in candidates.items():
        if m == "dynamic":
            quantize_dynamic_int8(model, path)
        else:
            quantize_static_int8(model, path, calibration, **STATIC_VARIANTS[m])
    scores = {m: _agreement(_run(p, {IMAGE_INPUT: held_out}), reference) for m, p in candidates.items()}
    method = max(scores, key=scores.get)
    log.info("image int8 bit agreement with fp32 on %d held-out images: %s; keeping %s", len(held_out), scores, method)
    final = int8_path(model)
    candidates[method].replace(final)
    for path in candidates.values():
        path.unlink(missing_ok=True)
    return _int8_spec(spec, Path(spec_path), final, f"{method} int8"), scores


def quantize_text_student(spec_path: Path) -> Path:
    """Int8 text student by dynamic quantization; returns its spec path (tokenizer files shared)."""
    spec = json.loads(Path(spec_path).read_text())
    model = Path(spec_path).parent / spec["model_file"]
    final = quantize_dynamic_int8(model, int8_path(model))
    return _int8_spec(spec, Path(spec_path), final, "dynamic int8")


def _int8_spec(spec: dict, spec_path: Path, model: Path, quantization: str) -> Path:
    """The fp32 spec with the int8 file, its checksum and how it was quantized."""
    derived = {**spec, "model_file": model.name, "model_sha256": sha256_file(model), "quantization": quantization}
    return write_spec(model, derived)


# ----------------------------------------------------------------------------------------------
# Everything at once: what `terrahash distill` calls after training.


def export_students(students_dir: str | Path, out_dir: str | Path | None = None, calibration_images: list[Path] | None = None,
                    held_out_images: list[Path] | None = None, check_texts: list[str] | None = None) -> dict:
    """Export every student checkpoint in ``students_dir`` to ``out_dir`` (default ``students_dir/onnx``),
    fp32 and int8, each with its spec.

    ``calibration_images`` (e.g. train-split files) calibrate the static int8 image models;
    ``held_out_images`` (e.g. val-split files) pick among the int8 variants and check the
    fp32 export. Both are needed when an image student is present; the int8 image student is made as its
    config's ``int8`` says. Returns the spec paths and the quantization scores.
    """
    from serving.model.encoders import preprocess_images  # calibration sees exactly what serving will send

    students_dir = Path(students_dir)
    out = Path(out_dir) if out_dir is not None else students_dir / ONNX_DIR
    result: dict = {}
    if (students_dir / "image_student.pt").exists():
        if not calibration_images or not held_out_images:
            raise ValueError("exporting an image student needs calibration_images and held_out_images")
        student, _ = load_image_student(students_dir)
        c = student.config

        def preprocess(paths):  # (N, 3, S, S) float32
            return preprocess_images(paths, c.image_size, c.mean, c.std)
        held_out = preprocess(held_out_images)
        spec = export_image_student(student, out, held_out[:8])
        int8, scores = quantize_image_student(spec, preprocess(calibration_images), held_out, c.int8)
        result["image"] = {"spec": spec, "int8_spec": int8, "int8_agreement": scores}
    if (students_dir / "text_student.pt").exists():
        student, tokenizer, _ = load_text_student(students_dir)
        image_space = spec_code_space(json.loads(result["image"]["spec"].read_text())) if "image" in result else None
        spec = export_text_student(student, tokenizer, out, check_texts, code_space=image_space)
        result["text"] = {"spec": spec, "int8_spec": quantize_text_student(spec)}
    if not result:
        raise FileNotFoundError(f"{students_dir}: no student checkpoints (image_student.pt, text_student.pt)")
    return result
