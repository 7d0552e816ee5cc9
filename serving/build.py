"""Index build over a dataset: encode images (and captions) with an exported model version in Ray tasks.

``build_indexes`` encodes every image of a Karpathy-style dataset with the model version's ONNX
image student, in parallel Ray tasks over batches (a progress bar follows them), and writes an
index version of the ``images`` collection with serving.index.build_index; the captions, encoded
with the text student, become a ``captions`` index (each caption carries its image's id) for late
fusion and image-to-text search. ``add_images`` encodes new imagery and adds it with
serving.index.add_to_index, leaving the other shards' files as they are.

Ids: an image's id is its file path relative to the dataset root (``images/beach/beach00.jpg``;
relative to the images' common folder when the JSON points outside its own folder), a caption's id
is ``<image id>#<n>``. No torch: images are decoded with serving.encoders.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.index import add_to_index, build_index, latest_version, read_manifest
from serving.spec import load_spec

log = logging.getLogger(__name__)

SPEC_GLOB = "*.spec.json"
VARIANTS = {"fp32": lambda q: q == "none", "int8": lambda q: "int8" in q}  # spec "quantization" per variant


# --- model versions ------------------------------------------------------------------------------


def resolve_model(version_or_dir: str | Path, models_root: str | Path = "runs") -> Path:
    """A model version folder: ``version_or_dir`` itself if it is a folder, else the exported students
    of run ``<models_root>/<version>`` (``students/onnx``, the export's default place)."""
    path = Path(version_or_dir)
    candidates = [path, Path(models_root) / str(version_or_dir) / "students" / "onnx",
                  Path(models_root) / str(version_or_dir)]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob(SPEC_GLOB)):
            return candidate.resolve()
    raise FileNotFoundError(f"no model version {version_or_dir!r}: none of {[str(c) for c in candidates]} "
                            f"holds exported students (*{SPEC_GLOB[1:]})")


def find_spec(model_dir: str | Path, kind: str, variant: str = "fp32") -> Path:
    """The one spec file of ``kind`` ("image" or "text") and ``variant`` ("fp32" or "int8") in a model folder."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    found = []
    for path in sorted(Path(model_dir).glob(SPEC_GLOB)):
        spec = load_spec(path)
        if spec.kind == kind and VARIANTS[variant](str(spec.data.get("quantization", "none"))):
            found.append(path)
    if len(found) != 1:
        raise FileNotFoundError(f"{model_dir}: expected one {variant} {kind} spec, found {[p.name for p in found]}")
    return found[0]


def model_version_label(model_dir: Path, image_spec: Path) -> str:
    """``<folder>@<image model sha256[:12]>``: two models never share a label, so never an index."""
    return f"{model_dir.name}@{load_spec(image_spec).data['model_sha256'][:12]}"


# --- the dataset ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Items:
    """What gets indexed: image ids and files, and the captions with their image ids."""

    image_root: Path
    image_ids: list[str]
    image_paths: list[str]
    caption_ids: list[str]
    caption_image_ids: list[str]
    captions: list[str]


def dataset_items(data: str | Path, splits: tuple[str, ...] | None = None) -> Items:
    """Read a Karpathy-style dataset (training.data's reader, which imports no torch)."""
    from training.data import load_dataset

    dataset = load_dataset(data, check_images=False)
    records = dataset.split(*splits) if splits else list(dataset.records)
    files = [Path(r.path).resolve() for r in records]
    root = dataset.json_path.parent.resolve()
    if not all(root in f.parents for f in files):  # a JSON that points elsewhere (absolute filepaths)
        root = Path(os.path.commonpath([f.parent for f in files])) if files else root
    image_ids, paths, caption_ids, caption_image_ids, captions = [], [], [], [], []
    for record, file in zip(records, files):
        image_id = file.relative_to(root).as_posix()
        image_ids.append(image_id)
        paths.append(str(record.path))
        for n, caption in enumerate(record.captions):
            caption_ids.append(f"{image_id}#{n}")
            caption_image_ids.append(image_id)
            captions.append(caption)
    return Items(root, image_ids, paths, caption_ids, caption_image_ids, captions)


# --- encoding in Ray tasks ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _encoder(spec_path: str, threads: int):
    """One encoder per worker process and spec, reused by every task the worker runs."""
    from serving.encoders import load_encoder

    return load_encoder(spec_path, threads)


def _encode_batch(spec_path: str, inputs: list, threads: int = 1) -> np.ndarray:
    """Packed codes (B, bits // 8) of a batch of image paths or texts."""
    return _encoder(spec_path, threads).encode_packed(inputs)


def encode_all(spec_path: Path, inputs: list, batch_size: int = 64, desc: str = "encoding",
               num_cpus: float = 1) -> np.ndarray:
    """Encode ``inputs`` in parallel Ray tasks of ``batch_size``; packed codes in input order."""
    import ray
    from tqdm import tqdm

    if not inputs:
        raise ValueError(f"{desc}: nothing to encode")
    task = ray.remote(num_cpus=num_cpus, max_retries=2)(_encode_batch)
    starts = list(range(0, len(inputs), batch_size))
    pending = {task.remote(str(spec_path), inputs[s:s + batch_size]): s for s in starts}
    done: dict[int, np.ndarray] = {}
    with tqdm(total=len(inputs), desc=desc, unit="item") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            start = pending.pop(ready[0])
            done[start] = ray.get(ready[0])
            bar.update(len(done[start]))
    return np.concatenate([done[s] for s in starts])


def _ensure_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False, log_to_driver=False)


# --- commands ------------------------------------------------------------------------------------


def build_indexes(model: str | Path, data: str | Path, n_shards: int, out: str, *, factory: str = "BFlat",
                  variant: str = "fp32", captions: bool = True, batch_size: int = 64,
                  address: str | None = None, splits: tuple[str, ...] | None = None) -> dict:
    """Encode a dataset and write index versions of ``images`` (and ``captions``) to ``out``.

    Returns {"images": manifest, "captions": manifest or None}.
    """
    model_dir = resolve_model(model)
    image_spec = find_spec(model_dir, "image", variant)
    items = dataset_items(data, splits)
    extra = {"model_dir": str(model_dir), "image_spec": image_spec.name, "dataset": str(Path(data).resolve()),
             "image_root": str(items.image_root)}
    label = model_version_label(model_dir, image_spec)
    bits = load_spec(image_spec).bits
    _ensure_ray(address)
    codes = encode_all(image_spec, items.image_paths, batch_size, "images")
    manifests = {"images": build_index(codes, items.image_ids, bits, n_shards, out, factory,
                                       model_version=label, collection="images", extra=extra),
                 "captions": None}
    if captions:
        text_spec = find_spec(model_dir, "text", variant)
        text_codes = encode_all(text_spec, items.captions, batch_size * 4, "captions")
        manifests["captions"] = build_index(text_codes, items.caption_ids, bits, n_shards, out, factory,
                                            model_version=label, collection="captions",
                                            image_ids=items.caption_image_ids, texts=items.captions,
                                            extra={**extra, "text_spec": text_spec.name})
    return manifests


def add_images(data: str | Path, out: str, *, base_version: str | None = None, captions: bool = True,
               batch_size: int = 64, address: str | None = None, splits: tuple[str, ...] | None = None) -> dict:
    """Add a dataset's images (and captions) to the latest (or ``base_version``) index, with the model
    the index was built with. Returns {"images": manifest, "captions": manifest or None}."""
    base = read_manifest(out, base_version or latest_version(out, "images"), "images")
    model_dir = Path(base["extra"]["model_dir"])
    image_spec = model_dir / base["extra"]["image_spec"]
    if model_version_label(model_dir, image_spec) != base["model_version"]:
        raise ValueError(f"the model in {model_dir} is no longer the one index {base['version']} was built with "
                         f"({base['model_version']}); build a new index")
    items = dataset_items(data, splits)
    _ensure_ray(address)
    codes = encode_all(image_spec, items.image_paths, batch_size, "images")
    manifests = {"images": add_to_index(out, base["version"], codes, items.image_ids, collection="images",
                                        model_version=base["model_version"]), "captions": None}
    if captions and items.captions:
        caption_base = read_manifest(out, latest_version(out, "captions"), "captions")
        text_spec = model_dir / caption_base["extra"]["text_spec"]
        text_codes = encode_all(text_spec, items.captions, batch_size * 4, "captions")
        manifests["captions"] = add_to_index(out, caption_base["version"], text_codes, items.caption_ids,
                                             collection="captions", new_image_ids=items.caption_image_ids,
                                             new_texts=items.captions if caption_base.get("has_texts") else None,
                                             model_version=base["model_version"])
    return manifests
