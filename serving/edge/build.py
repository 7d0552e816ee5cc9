"""Writing a bundle from an index release (``terrahash bundle``): the release's codes with their rows, ids,
footprints, times and properties, the text student (and the image student) it was built with, optional
thumbnails, in one file (serving.edge.container).

This side reads the index as the service does (serving.index.releases: every manifest and shard checked)
and so needs the service's install; reading a bundle (serving.edge.searcher) does not.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.index.crypto import Cipher, IndexKeyError, load_key
from serving.index.items import BBOX_FIELDS, TIME_FIELDS, empty_columns
from serving.index.refs import ImageRefs
from serving.index.releases import load_index, resolve_release
from serving.model.codes import BIT_ORDER, SIGN_RULE
from serving.model.spec import check_code_space, load_spec
from serving.runtime.query_encoder import DEFAULT_MODEL_CACHE, load_model
from serving.runtime.ranking import item_image
from serving.runtime.thumbnails import make_thumbnail

from .collection import add_strings, joined
from .container import npy_bytes, write_container

log = logging.getLogger(__name__)

VARIANTS = ("int8", "fp32")
MODEL_FOLDER = "model"


def write_bundle(index: str, out: str | Path, *, release: str | None = None, model: str | None = None,
                 variant: str = "int8", with_image_encoder: bool = False, captions: bool = True,
                 thumbnails: int | None = None, encrypt: bool = False, key_file: str | None = None,
                 tracking_uri: str | None = None, cache_dir: str = DEFAULT_MODEL_CACHE) -> dict:
    """Write the bundle of ``release`` (default: the latest) of the index at ``index`` to ``out``; returns
    its manifest. ``variant``: the students' variant ("int8", the small one; "fp32" answers exactly as a
    service serving fp32 students). ``thumbnails``: the side in pixels of a JPEG per image, None for none.
    ``encrypt``: seal every member with the index key (``key_file`` or $TERRAHASH_INDEX_KEY); an encrypted
    index needs that key to be read at all."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if thumbnails is not None and not 8 <= thumbnails <= 512:
        raise ValueError(f"thumbnails must be a side from 8 to 512 pixels, got {thumbnails}")
    cipher = _cipher(encrypt, key_file)
    served = resolve_release(index, release)
    images = served["images"]
    loaded = load_model(model, index, served.get("release"), variant, tracking_uri, cache_dir)
    members: dict[str, bytes] = {}
    encoders = {"text": _encoder(Path(loaded["text_spec"]), images, members)}
    if with_image_encoder:
        encoders["image"] = _encoder(Path(loaded["image_spec"]), images, members)
    collections, items = {}, {}
    for name in ("images", "captions"):
        if name in served and (captions or name == "images"):
            collections[name], items[name] = _collection(index, name, served[name], members, key_file)
    registered = loaded.get("registered")
    manifest = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "release": served.get("release"), "model_version": loaded["model_version"],
                "model": f"models:/{registered['name']}/{registered['version']}" if registered else loaded["model_version"],
                "variant": variant, "code_space": images.get("code_space"), "bits": int(images["bits"]),
                "bit_order": BIT_ORDER, "sign_rule": SIGN_RULE, "encoders": encoders, "collections": collections,
                "thumbnails": _thumbnails(collections["images"], items["images"], members, thumbnails) if thumbnails else None}
    return write_container(out, manifest, members, cipher)


def _cipher(encrypt: bool, key_file: str | None) -> Cipher | None:
    if not encrypt:
        return None
    key = load_key(key_file)
    if key is None:
        raise IndexKeyError("--encrypt needs the index key: --key-file, $TERRAHASH_INDEX_KEY or "
                            "$TERRAHASH_INDEX_KEY_FILE (`terrahash index keygen FILE` makes one)")
    return Cipher(key)


def _encoder(spec_path: Path, manifest: dict, members: dict) -> dict:
    """Add a student's spec, ONNX file and tokenizer to ``members``; its entry in the manifest's ``encoders``."""
    spec = load_spec(spec_path)
    check_code_space(spec, manifest, require=True)
    folder = spec_path.parent
    entry = {"spec": f"{MODEL_FOLDER}/{spec_path.name}", "model": f"{MODEL_FOLDER}/{spec.data['model_file']}",
             "files": {}}
    members[entry["spec"]] = spec_path.read_bytes()
    members[entry["model"]] = spec.model_path.read_bytes()
    if spec.kind == "text":
        name = spec.text["tokenizer_file"]
        entry["files"][name] = f"{MODEL_FOLDER}/{name}"
        members[entry["files"][name]] = (folder / name).read_bytes()
    return entry


def _collection(index: str, name: str, manifest: dict, members: dict, key_file: str | None) -> tuple[dict, dict]:
    """Add a collection's codes and columns, in row order, to ``members``: (its manifest entry, its rows,
    image ids and properties for the thumbnails)."""
    shards = [s for s in load_index(index, manifest["version"], name, key_file=key_file).shards if len(s.rows)]
    rows = np.concatenate([s.rows for s in shards] or [np.empty(0, np.int64)])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]

    def joined(values) -> np.ndarray:
        return np.concatenate(values)[order] if values else np.empty(0, dtype=str)

    codes = (np.concatenate([s.codes for s in shards])[order] if shards
             else np.empty((0, manifest["bits"] // 8), np.uint8))
    ids, image_ids = joined([s.ids for s in shards]), joined([s.image_ids for s in shards])
    prefix = f"{name}/"
    entry_members = {"codes": prefix + "codes.npy"}
    members[prefix + "codes.npy"] = npy_bytes(codes)
    if not np.array_equal(rows, np.arange(len(rows))):  # after adds and removals: keep the rows themselves
        entry_members["rows"] = prefix + "rows.npy"
        members[prefix + "rows.npy"] = npy_bytes(rows)
    strings = {"ids": ids}
    if not np.array_equal(image_ids, ids):
        strings["image_ids"] = image_ids
    if any(s.texts is not None for s in shards):
        strings["texts"] = joined([s.texts if s.texts is not None else np.full(len(s.rows), "") for s in shards])
    props = np.full(len(rows), "", dtype=object)
    if any(s.meta is not None for s in shards):
        # a release whose first items were indexed without metadata and later ones with it: those items' hits
        # carry no bbox, datetime or properties in the service's answers, and are flagged so here
        metas = [s.meta if s.meta is not None else empty_columns(len(s.rows)) for s in shards]
        strings["props"] = props = joined([m["props"] for m in metas])
        for field in (*BBOX_FIELDS, *TIME_FIELDS):
            entry_members[field] = f"{prefix}{field}.npy"
            members[entry_members[field]] = npy_bytes(joined([m[field] for m in metas]).astype(np.float64))
        described = joined([np.full(len(s.rows), s.meta is not None) for s in shards])
        if not described.all():
            entry_members["described"] = prefix + "described.npy"
            members[prefix + "described.npy"] = npy_bytes(described)
    for field, values in strings.items():
        add_strings(members, entry_members, prefix, field, values)
    refs = {key: manifest[key] for key in ("image_roots", "next_row") if key in manifest}
    refs["extra"] = {"image_root": manifest.get("extra", {}).get("image_root")}
    return {"version": manifest["version"], "code_space": manifest.get("code_space"), "rows": int(len(rows)),
            "filterable": manifest.get("filterable") or {"bbox": 0, "datetime": 0},
            "drift": manifest.get("extra", {}).get("drift") if name == "images" else None,
            "refs": refs, "members": entry_members}, {"rows": rows, "image_ids": image_ids, "props": props}


def _thumbnails(images: dict, items: dict, members: dict, side: int) -> dict:
    """A JPEG of each image (longer side ``side``) concatenated, their offsets, and the positions in id order."""
    refs = ImageRefs(images["refs"])
    blobs, missing = [], 0
    for row, image_id, props in tqdm(zip(items["rows"].tolist(), items["image_ids"], items["props"]),
                                     total=len(items["rows"]), desc="thumbnails", unit="image", leave=False):
        properties = json.loads(str(props) or "{}")
        try:
            blobs.append(make_thumbnail(item_image({"row": row, "image_id": str(image_id), "properties": properties},
                                                   refs), properties, side))
        except (OSError, ValueError) as err:
            missing += 1
            log.warning("no thumbnail for %s: %s", image_id, err)
            blobs.append(b"")
    blob, offsets = joined(blobs)
    names = {"data": "thumbnails/jpeg.bin", "offsets": "thumbnails/offsets.npy", "order": "thumbnails/order.npy"}
    members[names["data"]], members[names["offsets"]] = blob, npy_bytes(offsets)
    members[names["order"]] = npy_bytes(np.argsort(items["image_ids"], kind="stable").astype(np.uint32))
    return {"side": side, "format": "JPEG", "missing": missing, "members": names}
