"""Index build over a dataset: encode images (and captions) with an exported model version in Ray tasks.

``build_indexes`` encodes every image of a Karpathy-style dataset with the model version's ONNX
image student, in parallel Ray tasks over batches (a progress bar follows them), and writes an
index version of the ``images`` collection with serving.index.versions.build_index; the captions, encoded
with the text student, become a ``captions`` index (each caption carries its image's id) for late
fusion and image-to-text search. ``add_images`` encodes new imagery and adds it with
serving.index.versions.add_to_index, leaving the other shards' files as they are. Each build or add
publishes one release naming both versions (serving.index.releases.publish_release), last.

Ids: an image's id is its file path relative to the dataset root (``images/beach/beach00.jpg``;
relative to the images' common folder when the JSON points outside its own folder), a caption's id
is ``<image id>#<n>``. That root is recorded for the rows it wrote (``image_roots``), so the items of
an add keep the root of their own dataset. Manifests and releases record the model's code space
(serving.model.spec). No torch: images are decoded with serving.model.encoders.

Model: a folder of exported students, or a registered version (``models:/NAME/VERSION`` or
``models:/NAME@ALIAS``), fetched from the registry (serving.model.registry.fetch_model). A registered
version is recorded in the manifests' ``extra.model`` and the release's ``model`` as
``{"uri": "models:/NAME/VERSION", "name", "version"}`` (the number, even when asked by alias), and the
version is tagged with the release (``terrahash.index_releases``). serving.model.versions.served_model tells
serving which model a release was built with; ``index add`` fetches it from the registry the same way.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import numpy as np

from serving.index.drift import index_detector
from serving.index.releases import add_release, publish_release, resolve_release
from serving.index.versions import build_index
from serving.ingest.items import Items, dataset_items
from serving.model.codes import unpack_signs
from serving.model.spec import check_code_space, load_spec
from serving.model.versions import (check_text_space, fetch_version, find_spec, model_code_space, model_version_label,
                                    publish_model, served_model)

log = logging.getLogger(__name__)

SKIPPED_LISTED = 1000  # skipped images listed in a manifest (all are counted)
PLACE_AND_TIME = ("bbox", "datetime", "start_datetime", "end_datetime", "source")  # what captions inherit


# --- encoding in Ray tasks ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _encoder(spec_path: str, threads: int):
    """One encoder per worker process and spec, reused by every task the worker runs."""
    from serving.model.encoders import load_encoder

    return load_encoder(spec_path, threads)


def _encode_batch(spec_path: str, inputs: list, threads: int = 1) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Packed codes (B', bits // 8) of a batch of image paths or texts, and (position, reason) of each
    input that could not be decoded (left out of the codes, which keep the others' order)."""
    from serving.ingest.archive import read_source
    from serving.model.encoders import InvalidImageError

    encoder = _encoder(spec_path, threads)
    fetched, bad = [], []  # (position, what the encoder takes), (position, reason)
    for position, item in enumerate(inputs):  # an archive's s3:// images and chips are read here, in the task
        try:
            fetched.append((position, read_source(item)))
        except OSError as err:
            bad.append((position, f"cannot read it: {err}"))
    if not bad:
        try:
            return encoder.encode_packed([item for _, item in fetched]), []
        except InvalidImageError:
            pass  # find the bad ones: one at a time, only in a batch that has one
    codes = []
    for position, item in fetched:
        try:
            codes.append(encoder.encode_packed([item])[0])
        except InvalidImageError as err:
            bad.append((position, str(err)))
    bad.sort()
    width = encoder.bits // 8
    return (np.stack(codes) if codes else np.empty((0, width), np.uint8)), bad


def encode_all(spec_path: Path, inputs: list, batch_size: int = 64, desc: str = "encoding",
               num_cpus: float = 1, skip_bad: bool = False) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Encode ``inputs`` in parallel Ray tasks of ``batch_size``: (packed codes of the good inputs in
    input order, [(position, reason)] of the inputs that could not be decoded). Bad inputs are a
    ValueError listing them unless ``skip_bad``."""
    import ray
    from tqdm import tqdm

    if not inputs:
        raise ValueError(f"{desc}: nothing to encode")
    task = ray.remote(num_cpus=num_cpus, max_retries=2)(_encode_batch)
    if any(str(x).startswith("s3://") for x in inputs):  # an object's URI, or a chip of a scene on S3
        from serving.ingest.archive import s3_env

        task = task.options(runtime_env={"env_vars": s3_env()})  # the tasks read the objects themselves
    starts = list(range(0, len(inputs), batch_size))
    pending = {task.remote(str(spec_path), inputs[s:s + batch_size]): s for s in starts}
    done: dict[int, tuple] = {}
    with tqdm(total=len(inputs), desc=desc, unit="item") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            start = pending.pop(ready[0])
            done[start] = ray.get(ready[0])
            bar.update(min(batch_size, len(inputs) - start))
    bad = [(start + position, reason) for start in starts for position, reason in done[start][1]]
    if bad and not skip_bad:
        listing = "; ".join(f"{inputs[i]}: {why}" for i, why in bad[:5])
        raise ValueError(f"{desc}: {len(bad)} input(s) cannot be encoded ({listing}{' ...' if len(bad) > 5 else ''}); "
                         f"--skip-bad-images leaves them out")
    if len(bad) == len(inputs):
        raise ValueError(f"{desc}: none of the {len(inputs)} inputs could be encoded (first: {inputs[0]}: {bad[0][1]})")
    return np.concatenate([done[s][0] for s in starts]), bad


def _ensure_ray(address: str | None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a Ray of our own: a bare ray.init() joins whatever
    cluster ``ray start`` left on the machine, and fails with it when that one stops."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", configure_logging=False,
                 log_to_driver=False)


# --- commands ------------------------------------------------------------------------------------


def _encode_items(image_spec: Path, items: Items, batch_size: int, skip_bad_images: bool) -> tuple[np.ndarray, Items, list]:
    """Image codes of ``items``; bad images (undecodable, missing) raise, or with ``skip_bad_images`` are
    left out with their captions, counted and logged: (codes, the items kept, [[path, reason], ...])."""
    codes, bad = encode_all(image_spec, items.image_paths, batch_size, "images", skip_bad=skip_bad_images)
    skipped = list(items.skipped) + [[str(items.image_paths[i]), why] for i, why in bad]
    if skipped:
        log.warning("left out %d image(s) that cannot be read or decoded, first: %s", len(skipped), skipped[0])
    if bad:
        items = items.without(i for i, _ in bad)
    return codes, items, skipped


def _items(data, splits, images, sidecar, skip_bad_images: bool, chips=None, stac=None,
           stac_asset=None) -> tuple[Items, str, bool]:
    """(the items to index, where they come from, whether bad images are skipped): a Karpathy
    dataset's, or with ``images`` an archive's and with ``stac`` a STAC catalog's, whose unreadable
    files are always skipped and reported."""
    if sum(x is not None for x in (data, images, stac)) > 1:
        raise ValueError("give only one of: a dataset (data), an archive (images), a STAC catalog (stac)")
    if stac is not None:
        from serving.ingest.stac import catalog_items

        if sidecar is not None:
            raise ValueError("a sidecar goes with an archive (images); a STAC catalog carries its own metadata")
        return catalog_items(stac, chips, stac_asset), str(Path(stac).resolve()), True
    if images is not None:
        from serving.ingest.archive import archive_items

        items = archive_items(images, sidecar, chips)
        return items, str(items.image_root), True
    if sidecar is not None:
        raise ValueError("a sidecar goes with an archive (images), not a dataset")
    if data is None:
        raise ValueError("nothing to index: give a dataset (data), an archive (images) or a STAC catalog (stac)")
    return dataset_items(data, splits), str(Path(data).resolve()), skip_bad_images


def _image_metadata(items: Items) -> list[dict] | None:
    """Each image's metadata for the index (serving.index.items): its class and its other fields; None when no
    image has either (a plain dataset without classes)."""
    labels = list(items.labels) or [""] * len(items.image_ids)
    metadata = list(items.metadata) or [{}] * len(items.image_ids)
    if not any(labels) and not any(metadata):
        return None
    return [{**({"class": label} if label else {}), **meta} for label, meta in zip(labels, metadata)]


def _caption_metadata(items: Items) -> list[dict] | None:
    """Each caption's place and time: its image's, so filters apply to caption searches alike."""
    if not any(items.metadata):
        return None
    where = {image_id: {k: v for k, v in meta.items() if k in PLACE_AND_TIME}
             for image_id, meta in zip(items.image_ids, items.metadata)}
    return [where[image_id] for image_id in items.caption_image_ids]


def _skipped(skipped: list) -> dict:
    """The manifest's record of the images the run that wrote it left out (an add's replaces its base's)."""
    return {"skipped_images": len(skipped), "skipped_listed": skipped[:SKIPPED_LISTED]}


def build_indexes(model: str | Path, data: str | Path | None, n_shards: int, out: str, *, factory: str = "BFlat",
                  variant: str = "fp32", captions: bool = True, batch_size: int = 64,
                  address: str | None = None, splits: tuple[str, ...] | None = None,
                  skip_bad_images: bool = False, tracking_uri: str | None = None,
                  model_cache: str | Path | None = None, images: str | None = None,
                  sidecar: str | Path | None = None, chips=None, stac: str | Path | None = None,
                  stac_asset: str | None = None, encrypt: bool = False, key_file: str | None = None) -> dict:
    """Encode a dataset, write index versions of ``images`` (and ``captions``) to ``out`` and publish a
    release naming them. Returns {"release": release, "images": manifest, "captions": manifest or None}.

    ``model``: a folder, a run name under runs/, or ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``
    (fetched into ``model_cache``, default serving.model.registry.DEFAULT_CACHE, from the registry at
    ``tracking_uri``), which is recorded in the manifests and the release and tagged with the release.
    ``skip_bad_images``: images that cannot be decoded are left out (with their captions), counted
    and listed in the image manifest's extra, instead of failing the build.
    ``images``: index an archive instead of ``data`` (a folder or ``s3://`` prefix of image files,
    serving.ingest.archive, with an optional ``sidecar`` of classes, captions and metadata; its GeoTIFF
    scenes are cut into chips by ``chips``, a serving.ingest.geo.ChipConfig); unreadable files are always
    left out and reported that way. ``stac``: index a static STAC catalog instead (serving.ingest.stac: each
    item's image asset, or ``stac_asset``, with its bbox, datetime and properties as metadata).
    ``encrypt``: the shard files are encrypted at rest (serving.index.crypto) with the key of ``key_file`` or
    the environment, which is never stored beside the index.
    """
    from serving.model.registry import DEFAULT_CACHE, add_index_release_tag

    cipher = _cipher(out, key_file) if encrypt else None
    model_dir, registered, ref = fetch_version(model, tracking_uri, model_cache or DEFAULT_CACHE)
    image_spec = find_spec(model_dir, "image", variant)
    code_space = model_code_space(model_dir, image_spec)
    text_spec = find_spec(model_dir, "text", variant) if captions else None
    if text_spec is not None:
        check_text_space(text_spec, code_space)
    items, source, skip_bad_images = _items(data, splits, images, sidecar, skip_bad_images, chips, stac, stac_asset)
    label = model_version_label(model_dir, image_spec, registered and f"{registered['name']}/{registered['version']}")
    bits = load_spec(image_spec).bits
    _ensure_ray(address)
    codes, items, skipped = _encode_items(image_spec, items, batch_size, skip_bad_images)
    # where the model is for later steps (index add, serving) on any node: the registry, else a copy in the root
    where = {"model": registered} if registered else {"model_files": publish_model(out, model_dir, label)}
    extra = {"image_spec": image_spec.name, "dataset": source, "image_root": str(items.image_root), **where,
             "drift": index_detector(unpack_signs(codes, bits))}  # the router's drift gauge compares queries with it
    common = {"model_version": label, "code_space": code_space, "image_root": str(items.image_root), "cipher": cipher}
    manifests = {"images": build_index(codes, items.image_ids, bits, n_shards, out, factory, collection="images",
                                       extra={**extra, **items.extra, **_skipped(skipped)},
                                       metadata=_image_metadata(items), **common),
                 "captions": None}
    if text_spec is not None and items.captions:
        text_codes, _ = encode_all(text_spec, items.captions, batch_size * 4, "captions")
        manifests["captions"] = build_index(text_codes, items.caption_ids, bits, n_shards, out, factory,
                                            collection="captions", image_ids=items.caption_image_ids,
                                            texts=items.captions, extra={**extra, "text_spec": text_spec.name},
                                            metadata=_caption_metadata(items), **common)
    release = publish_release(out, manifests)
    if ref is not None:
        from serving.storage import open_root

        add_index_release_tag(ref, open_root(out).uri, release["release"], tracking_uri)
    return {"release": release, **manifests}


def _cipher(out: str, key_file: str | None):
    """The cipher of a new encrypted index in ``out``: its key found, and not kept inside ``out``."""
    import os

    from serving.index.crypto import KEY_ENV, KEY_FILE_ENV, Cipher, IndexKeyError, check_key_outside, load_key

    key = load_key(key_file)
    if key is None:
        raise IndexKeyError(f"an encrypted index needs a key: give a key file (`terrahash index keygen FILE` makes "
                            f"one) or set ${KEY_ENV} / ${KEY_FILE_ENV}")
    check_key_outside(key_file or os.environ.get(KEY_FILE_ENV), out)
    return Cipher(key)


def add_images(data: str | Path | None, out: str, *, base_release: str | None = None, captions: bool = True,
               batch_size: int = 64, address: str | None = None, splits: tuple[str, ...] | None = None,
               skip_bad_images: bool = False, tracking_uri: str | None = None,
               model_cache: str | Path | None = None, images: str | None = None,
               sidecar: str | Path | None = None, chips=None, stac: str | Path | None = None,
               stac_asset: str | None = None, key_file: str | None = None) -> dict:
    """Add a dataset's images (and captions) to the image and caption versions of release
    ``base_release`` (default: the latest), with the model the index was built with, and publish a
    new release (serving.index.releases.add_release: concurrent adds to the latest all land in it). Returns
    {"release": release, "images": manifest, "captions": manifest or None}.

    The new items are referenced from their own dataset's image root. The base's caption index is
    carried over unchanged when the captions are not added (``captions`` False). The model is the
    base's registered version (``extra.model``), fetched from the registry at ``tracking_uri`` into
    ``model_cache``, so an add works on any machine; an index built from a folder uses that folder.
    The new release is tagged on the registered version. ``images`` and ``sidecar`` (an archive) or
    ``stac`` (a catalog) instead of ``data``, as for ``build_indexes``. An encrypted index needs its key
    (``key_file`` or the environment, serving.index.crypto.load_key).
    """
    from serving.model.registry import DEFAULT_CACHE, add_index_release_tag

    base = resolve_release(out, base_release)
    manifest = base["images"]
    registered = manifest["extra"].get("model")
    ref = None
    if registered:
        model_dir, _, ref = fetch_version(registered["uri"], tracking_uri, model_cache or DEFAULT_CACHE)
    else:
        from serving.model.registry import fetch_model

        model_dir = fetch_model(served_model(base, out), model_cache or DEFAULT_CACHE)
    image_spec = model_dir / manifest["extra"]["image_spec"]
    name = registered and f"{registered['name']}/{registered['version']}"
    if model_version_label(model_dir, image_spec, name) != manifest["model_version"]:
        raise ValueError(f"the model in {model_dir} is no longer the one index {manifest['version']} was built with "
                         f"({manifest['model_version']}); build a new index")
    check_code_space(image_spec, manifest)
    items, _, skip_bad_images = _items(data, splits, images, sidecar, skip_bad_images, chips, stac, stac_asset)
    _ensure_ray(address)
    codes, items, skipped = _encode_items(image_spec, items, batch_size, skip_bad_images)
    additions = {"images": {"codes": codes, "ids": items.image_ids, "metadata": _image_metadata(items)}}
    if captions and "captions" in base and items.captions:
        text_spec = model_dir / base["captions"]["extra"]["text_spec"]
        check_code_space(text_spec, base["captions"])
        text_codes, _ = encode_all(text_spec, items.captions, batch_size * 4, "captions")
        additions["captions"] = {"codes": text_codes, "ids": items.caption_ids, "image_ids": items.caption_image_ids,
                                 "texts": items.captions, "metadata": _caption_metadata(items)}
    result = add_release(out, additions, base_release=base["release"] if base_release else None,
                         model_version=manifest["model_version"], code_space=manifest.get("code_space"),
                         image_root=str(items.image_root), extra={**items.extra, **_skipped(skipped)},
                         key_file=key_file)
    if ref is not None:
        from serving.storage import open_root

        add_index_release_tag(ref, open_root(out).uri, result["release"]["release"], tracking_uri)
    return result
