"""Model versions as serving finds them: a folder of exported students, a run under ``runs/``, an
``s3://`` folder or a registered ``models:/`` version, and the spec files of each student in it.

A version's label (``<name or folder>@<image model sha256[:12]>``) names the indexes built with it;
``served_model`` reads back from a release which model an index was built with, and ``publish_model``
keeps a copy of an unregistered model in the index's artifact root so that every node finds it.
"""
from __future__ import annotations

import re
from pathlib import Path

from serving.model.spec import CodeSpaceError, load_spec, spec_code_space

SPEC_GLOB = "*.spec.json"
VARIANTS = {"fp32": lambda q: q == "none", "int8": lambda q: "int8" in q}  # spec "quantization" per variant


def resolve_model(version_or_dir: str | Path, models_root: str | Path = "runs") -> Path:
    """A model version folder: ``version_or_dir`` itself if it is a folder (or an ``s3://`` folder of
    the artifact root, fetched and checked), else the exported students of run ``<models_root>/<version>``
    (``students/onnx``, the export's default place)."""
    if str(version_or_dir).startswith("s3://"):
        from serving.model.registry import fetch_model

        return fetch_model(str(version_or_dir))
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


def model_version_label(model_dir: Path, image_spec: Path, name: str | None = None) -> str:
    """``<name or folder>@<image model sha256[:12]>`` (a registered version's name is ``NAME/VERSION``):
    two models never share a label, so never an index."""
    return f"{name or model_dir.name}@{load_spec(image_spec).data['model_sha256'][:12]}"


MODELS = "models"  # where an index root keeps copies of the unregistered models its indexes were built with


def publish_model(out: str, model_dir: Path, label: str) -> str:
    """Copy a model folder into the index's artifact root (``models/<sha>/<name>``, once per model: the
    folder keeps its name, which is part of the model version's label) and return its key there, so
    that every node that reads the index finds its model too."""
    from serving.storage import MANIFEST, open_root

    name, _, digest = label.rpartition("@")
    key = f"{MODELS}/{digest}/{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}"
    root = open_root(out)
    if not root.exists(f"{key}/{MANIFEST}"):
        root.put_dir(model_dir, key)
    return key


def served_model(release_or_manifests: dict, root: str | None = None) -> str:
    """What serving loads when no model is given: ``models:/NAME/VERSION`` when the release (or its image
    manifest) records a registered version, else the copy of the model in the index's artifact ``root``
    (``extra.model_files``), else the model folder an older index recorded. Takes a release file,
    resolve_release's answer, or {"images": manifest, ...}."""
    record = release_or_manifests
    model = record.get("model")
    images = record.get("images") if isinstance(record.get("images"), dict) else None
    if not model and images is not None and "extra" in images:  # a manifest, not a release's collection entry
        model = images["extra"].get("model")
    if model:
        return model["uri"]
    key = images.get("extra", {}).get("model_files") if images is not None else None
    if key:
        if root is None:
            raise ValueError("the index keeps its model in its artifact root: say which root")
        from serving.storage import open_root

        return f"{open_root(root).uri}/{key}"
    folder = images.get("extra", {}).get("model_dir") if images is not None else None
    if not folder:
        raise ValueError(f"release {record.get('release', '?')} records neither a registered model nor a model "
                         f"folder; give the model to serve")
    return folder


def fetch_version(model, tracking_uri: str | None, cache_dir) -> tuple[Path, dict | None, object]:
    """(local folder, the manifests' ``extra.model`` record or None, the registry ModelRef or None) of a
    folder, a run name under runs/ (``resolve_model``) or a ``models:/`` URI."""
    from serving.model.registry import fetch_model, parse_model_uri, resolve_model as resolve_registered

    if parse_model_uri(model) is None:
        return resolve_model(model), None, None
    ref = resolve_registered(model, tracking_uri)
    folder = fetch_model(ref, cache_dir, tracking_uri)
    return folder, {"uri": ref.version_uri, "name": ref.name, "version": ref.version}, ref


def model_code_space(model_dir: Path, image_spec: Path) -> str:
    """The code space of a model folder's image codes: the image spec's, or for an int8 spec exported
    before code spaces were recorded, that of the fp32 image spec beside it."""
    space = spec_code_space(load_spec(image_spec))
    if space is None:
        space = spec_code_space(load_spec(find_spec(model_dir, "image", "fp32")))
    return space


def check_text_space(text_spec: Path, code_space: str) -> None:
    """Refuse a text student whose spec says it was trained into another image student's codes."""
    theirs = load_spec(text_spec).code_space
    if theirs is not None and theirs != code_space:
        raise CodeSpaceError(f"text student {text_spec} has code space {theirs}, the image student beside it "
                             f"{code_space}: the caption codes would not be comparable with the image codes")
