"""A transfer set made from local data: one split's images re-cut as another sensor and another
scale would see them, written as an image-only labelled set in the class-folder layout
(``OUT/<class>/<image>.png``, read by ``serving.ingest.dataset.load_dataset`` and so by ``terrahash eval``).

Each image gets its own transform, drawn from a generator seeded by ``--seed`` and the image's
path in the source dataset (so an image's transform does not depend on which others are in the
set). Every parameter is always drawn and only the chosen transforms (``--transforms``) are applied,
in this order:

``zoom``    zoom in (crop a random 50-80% box of the image's shape and resize it back to the
            source size) or out (mirror the image outwards to 1.5x its size, resize down), one or
            the other with even odds;
``rotate``  by an angle that is no multiple of 90 degrees (5 to 85 degrees off one), cropped to the
            largest centred box of the image's shape that holds no corner, resized back;
``colour``  white balance (a gain per channel, 0.85-1.15), saturation (x0.6-1.4), gamma (0.7-1.4);
``size``    the shorter side resized to one of ``--sizes`` (default 224 or 320 px);
``blur``    the delivery's loss: Gaussian blur (radius 0.8-2 px) or JPEG recompression (quality
            15-45), one or the other with even odds.

Images are written as PNG (lossless: what the transforms made, JPEG artefacts included). The
folder's ``manifest.json`` lists each output file with its source image and the parameters applied,
so the set can be inspected and regenerated (same source, seed and options: byte-identical files).
The source dataset is never written to.

``python -m evaluation.transfer_set --data DIR --split test --out OUT [--seed 0] [--transforms ...]``
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

TRANSFORMS = ("zoom", "rotate", "colour", "size", "blur")  # the order they are applied in
DEFAULT_SIZES = (224, 320)
MANIFEST = "manifest.json"
GENERATOR = "evaluation.transfer_set"
ZOOM_IN = (0.5, 0.8)  # share of each side kept
ZOOM_OUT = 1.5  # the mirrored canvas, in image sizes
ANGLE_OFF_AXIS = (5.0, 85.0)  # degrees from the nearest multiple of 90 below
GAIN, SATURATION, GAMMA = (0.85, 1.15), (0.6, 1.4), (0.7, 1.4)
BLUR_RADIUS, JPEG_QUALITY = (0.8, 2.0), (15, 45)
# Pixels given up on each side inside the exact corner-free box, against rounding. Pillow fills only
# the output pixels whose source point lies outside the image (its bicubic sampling clamps at the
# edges), so the exact box already holds no fill; one pixel more holds none (a pixel less would).
ROTATE_MARGIN = 1


class TransferSetError(ValueError):
    """Options or an output folder that cannot be used, with the reason."""


# --- drawing ------------------------------------------------------------------------------------


def image_rng(seed: int, source: str) -> np.random.Generator:
    """The generator of one image: from the seed and the image's path in its dataset."""
    digest = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, digest])


def draw(rng: np.random.Generator, sizes: Sequence[int] = DEFAULT_SIZES) -> dict:
    """Parameters of every transform (rounded, so that the manifest's values are the ones used),
    drawn in a fixed order whichever transforms are applied."""
    zoom_in = bool(rng.random() < 0.5)
    keep, x, y = rng.uniform(*ZOOM_IN), rng.random(), rng.random()
    quarter = int(rng.integers(4))
    angle = (90.0 * quarter + rng.uniform(*ANGLE_OFF_AXIS)) % 360.0
    gains, saturation, gamma = rng.uniform(*GAIN, size=3), rng.uniform(*SATURATION), rng.uniform(*GAMMA)
    size = int(sizes[int(rng.integers(len(sizes)))])
    blurred = bool(rng.random() < 0.5)
    radius, quality = rng.uniform(*BLUR_RADIUS), int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    zoomed = ({"mode": "in", "keep": round(float(keep), 3), "x": round(float(x), 3), "y": round(float(y), 3)}
              if zoom_in else {"mode": "out", "factor": ZOOM_OUT})
    return {
        "zoom": zoomed,
        "rotate": {"angle": round(float(angle), 2)},
        "colour": {"gains": [round(float(g), 3) for g in gains], "saturation": round(float(saturation), 3),
                   "gamma": round(float(gamma), 3)},
        "size": {"short_side": size},
        "blur": {"kind": "blur", "radius": round(float(radius), 2)} if blurred else {"kind": "jpeg", "quality": quality},
    }


# --- the transforms -----------------------------------------------------------------------------


def zoom(image: Image.Image, params: dict) -> Image.Image:
    """Zoom in (a ``keep`` share of each side at relative offset ``x``, ``y``) or out (mirrored to
    ``factor`` times the size); the result has the source's size."""
    w, h = image.size
    if params["mode"] == "in":
        cw, ch = max(1, round(w * params["keep"])), max(1, round(h * params["keep"]))
        left, top = round((w - cw) * params["x"]), round((h - ch) * params["y"])
        return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    pad_w, pad_h = round(w * (params["factor"] - 1) / 2), round(h * (params["factor"] - 1) / 2)
    mirrored = np.pad(np.asarray(image), ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="symmetric")
    return Image.fromarray(mirrored).resize((w, h), Image.Resampling.LANCZOS)


def corner_free_box(width: int, height: int, angle: float) -> tuple[int, int, int, int]:
    """The largest centred box of the image's shape inside the image rotated by ``angle`` (about
    its centre, on a canvas of its size), less ``ROTATE_MARGIN`` px a side: (left, top, right, bottom)."""
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    scale = min(width / (width * c + height * s), height / (width * s + height * c))
    bw = max(1, math.floor(width * scale) - 2 * ROTATE_MARGIN)
    bh = max(1, math.floor(height * scale) - 2 * ROTATE_MARGIN)
    left, top = (width - bw) // 2, (height - bh) // 2
    return left, top, left + bw, top + bh


def rotate(image: Image.Image, angle: float) -> Image.Image:
    """``image`` rotated by ``angle`` degrees (counter-clockwise), cropped so that no corner of the
    canvas remains, resized back to its size."""
    turned = image.rotate(angle, resample=Image.Resampling.BICUBIC)
    return turned.crop(corner_free_box(*image.size, angle)).resize(image.size, Image.Resampling.BICUBIC)


def colour(image: Image.Image, params: dict) -> Image.Image:
    """White balance (a gain per channel), saturation (around the Rec. 601 luma), then gamma."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    x = np.clip(x * np.asarray(params["gains"]), 0.0, 1.0)
    luma = (x @ np.asarray([0.299, 0.587, 0.114]))[..., None]
    x = np.clip(luma + params["saturation"] * (x - luma), 0.0, 1.0)
    x = x ** params["gamma"]
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8))


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """``image`` with its shorter side ``short_side`` px, its shape kept."""
    w, h = image.size
    scale = short_side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def degrade(image: Image.Image, params: dict) -> Image.Image:
    """Gaussian blur of ``radius`` px, or a round trip through JPEG at ``quality``."""
    if params["kind"] == "blur":
        return image.filter(ImageFilter.GaussianBlur(params["radius"]))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=params["quality"])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def apply(image: Image.Image, params: dict, transforms: Sequence[str] = TRANSFORMS) -> Image.Image:
    """The chosen ``transforms`` of ``params`` (``draw``) applied to an RGB image, in ``TRANSFORMS`` order."""
    steps = {"zoom": lambda im: zoom(im, params["zoom"]), "rotate": lambda im: rotate(im, params["rotate"]["angle"]),
             "colour": lambda im: colour(im, params["colour"]),
             "size": lambda im: resize_short_side(im, params["size"]["short_side"]),
             "blur": lambda im: degrade(im, params["blur"])}
    for name in TRANSFORMS:
        if name in transforms:
            image = steps[name](image)
    return image


# --- the set ------------------------------------------------------------------------------------


def parse_transforms(text: str) -> tuple[str, ...]:
    """``zoom,rotate,...`` (or ``all``, or ``none`` for a plain copy) as a tuple in ``TRANSFORMS`` order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return TRANSFORMS
    if names == ["none"]:
        return ()
    unknown = sorted(set(names) - set(TRANSFORMS))
    if unknown or not names:
        raise TransferSetError(f"--transforms: unknown {unknown or 'empty list'}; choose from {','.join(TRANSFORMS)} "
                               "(or all, or none)")
    return tuple(n for n in TRANSFORMS if n in names)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _dataset_root(dataset) -> Path:
    from serving.ingest.dataset import CLASS_FOLDERS

    return Path(dataset.json_path if dataset.layout == CLASS_FOLDERS else dataset.json_path.parent).resolve()


def _check_out(out: Path, sources: list[Path], root: Path, overwrite: bool) -> None:
    """Refuse an output folder that would write into the source data or over files this tool did
    not write."""
    target = out.resolve()
    # The dataset's folder and every folder its images are in (a JSON may point outside its own).
    folders = {root} | {source.resolve().parent for source in sources}
    for folder in sorted(folders):
        if _inside(target, folder) or _inside(folder, target):
            raise TransferSetError(f"{out}: inside or above {folder}, a folder of the source dataset; the source is "
                                   "never written to")
    if not target.exists():
        return
    if not target.is_dir():
        raise TransferSetError(f"{out}: exists and is not a folder")
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() or p.is_symlink()}
    if not present:
        return
    manifest = target / MANIFEST
    written = None
    if manifest.is_file():
        try:
            document = json.loads(manifest.read_text())
            if isinstance(document, dict) and document.get("generator") == GENERATOR:
                written = {e["file"] for e in document["images"]} | {MANIFEST}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            written = None
    if written is None:
        raise TransferSetError(f"{out}: not empty and not a set written by {GENERATOR}; give an empty or new folder")
    if not overwrite:
        raise TransferSetError(f"{out}: already holds a transfer set; give --overwrite to replace it")
    extra = sorted(present - written)
    if extra:
        raise TransferSetError(f"{out}: holds {len(extra)} file(s) the set's manifest does not list ({extra[:3]}); "
                               "not replacing it")


def build_transfer_set(data: str | Path, out: str | Path, split: str = "test", seed: int = 0,
                       transforms: Sequence[str] = TRANSFORMS, sizes: Sequence[int] = DEFAULT_SIZES,
                       overwrite: bool = False) -> dict:
    """Write the transfer set of ``split`` (``all``: every image) of the dataset in ``data`` to
    ``out`` (module docstring); returns the manifest."""
    from serving.ingest.dataset import DatasetError, load_dataset

    if seed < 0:
        raise TransferSetError(f"--seed must be 0 or more, not {seed}")
    if not sizes or any(int(s) < 8 for s in sizes):
        raise TransferSetError(f"--sizes must be pixel sizes of 8 or more, not {list(sizes)}")
    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown:
        raise TransferSetError(f"unknown transforms {unknown}; known: {list(TRANSFORMS)}")
    transforms = tuple(n for n in TRANSFORMS if n in transforms)
    dataset = load_dataset(data)
    if not dataset.classes:
        raise DatasetError(f"{dataset.json_path}: has no classes; a transfer set is labelled by them")
    if split == "all":
        records = list(dataset.records)
    elif not dataset.has_splits:
        raise DatasetError(f"{dataset.json_path}: has no splits; give --split all")
    else:
        records = dataset.split(split)
    if not records:
        raise DatasetError(f"{dataset.json_path}: split {split!r} has no images")
    root = _dataset_root(dataset)
    out = Path(out)
    _check_out(out, [Path(r.path) for r in records], root, overwrite)

    names, entries = set(), []
    for record in records:
        path = Path(record.path).resolve()
        source = path.relative_to(root).as_posix() if root in path.parents else path.as_posix()
        name = f"{record.label}/{path.stem}.png"
        if name in names:  # the same file name in two folders of one class
            name = f"{record.label}/{path.stem}_{record.index}.png"
        names.add(name)
        entries.append((record, source, name))

    # Written next to ``out`` and moved in when complete: a failed run leaves no half set behind.
    staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    images = []
    try:
        for record, source, name in entries:
            params = draw(image_rng(seed, source), sizes)
            with Image.open(record.path) as opened:
                original = opened.convert("RGB")
            result = apply(original, params, transforms)
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            result.save(staging / name, format="PNG")
            images.append({"file": name, "class": record.label, "source": source,
                           "source_size": list(original.size), "size": list(result.size),
                           "transforms": {n: params[n] for n in transforms}})
        manifest = {"generator": GENERATOR,
                    "source": {"data": str(root), "dataset": dataset.name, "fingerprint": dataset.fingerprint(),
                               "split": split},
                    "seed": seed, "transforms": list(transforms), "sizes": [int(s) for s in sizes],
                    "classes": list(dataset.classes), "images": images}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # _check_out made sure it holds nothing but the old set
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.transfer_set",
        description="Write a labelled image-only transfer set in the class-folder layout: the images of one split "
                    "re-cut as another sensor and scale would see them (zoom, rotation, colour, size, blur or JPEG; "
                    "one seeded draw per image), with a manifest.json of every file's source and parameters. "
                    "Evaluate a model on it with `terrahash eval --model RUN --data OUT`.")
    parser.add_argument("--data", required=True, help="source dataset folder (a dataset*.json, or class folders)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="the split whose images are re-cut; all: every image (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (new or empty; never inside the source)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the transforms' draws (default: %(default)s)")
    parser.add_argument("--transforms", default="all",
                        help=f"comma-separated transforms to apply, of {','.join(TRANSFORMS)}, or all, or none (a "
                             "PNG copy: the baseline to compare with); the others are drawn but not applied "
                             "(default: all)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="output sizes (shorter side, px) the size transform draws from (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a transfer set already in --out (only one this tool wrote)")
    args = parser.parse_args(argv)
    try:
        transforms = parse_transforms(args.transforms)
        try:
            sizes = tuple(int(s) for s in args.sizes.split(","))
        except ValueError:
            raise TransferSetError(f"--sizes: expected comma-separated pixel sizes, not {args.sizes!r}") from None
        manifest = build_transfer_set(args.data, args.out, args.split, args.seed, transforms, sizes, args.overwrite)
    except ValueError as err:  # TransferSetError, DatasetError
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest['images'])} images of {len(manifest['classes'])} classes to {args.out} "
          f"(split {args.split} of {manifest['source']['dataset']}; transforms: "
          f"{','.join(manifest['transforms']) or 'none'}; seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
