"""``EdgeSearcher``: the service's text and image searches over one bundle, in this process, with the same
answers (serving.runtime.search): the same encoders, the same exact top-k (distance, then row), the same
re-ranking (asymmetric, fusion), filters, drift check and hit fields. Requests are checked by the same
rules (serving.runtime.checks), so a bad one fails here with the status and code the service would give.

What the service adds and a bundle has no use for (keys and roles, traffic arms, audit, STAC pages,
lookups by indexed id) is not here. A bundle answers as arm ``"edge"``.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.index.drift import QueryWindow
from serving.model.codes import pack_signs
from serving.model.encoders import ImageEncoder, TextEncoder
from serving.model.spec import CodeSpaceError, SpecError, check_code_space, parse_spec
from serving.runtime.calls import Timer
from serving.runtime.checks import (ApiError, check_filterable, check_query, check_size, decode_image, parse_filter,
                                    parse_options)
from serving.runtime.ranking import asymmetric_rerank, fuse, merge_hits, public_hit

from .collection import Collection, offsets_fit
from .container import MANIFEST, BundleError, Container

ARM = "edge"


@dataclass(frozen=True)
class Limits:
    """The service's request limits and defaults (serving.runtime.settings.RouterConfig's defaults)."""

    default_k: int = 10
    max_k: int = 100
    max_query_chars: int = 512
    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    rerank_depth: int = 100
    rerank: str = "none"
    fusion: str = "average"
    drift_fallback: str = "asymmetric"

    def as_config(self) -> dict:
        return dict(self.__dict__)


class EdgeSearcher:
    """An opened bundle, ready to answer. ``threads``: onnxruntime threads per query (1 suits a small machine);
    ``code_space``: refuse a bundle whose codes are not of this code space (an id, ``sha256:...``)."""

    def __init__(self, path: str | Path, key_file: str | Path | None = None, threads: int = 1,
                 code_space: str | None = None, limits: Limits | None = None):
        self.container = Container(path, key_file)
        self.manifest = manifest = check_manifest(self.container.manifest, self.container.path)
        self.config = (limits or Limits()).as_config()
        self.bits = manifest["bits"]
        if code_space is not None and manifest.get("code_space") != code_space:
            raise BundleError(f"{self.container.path} holds codes of code space {manifest.get('code_space')}, not "
                              f"{code_space}: they cannot be compared with that model's codes")
        self.collections = {}
        for name, entry in manifest["collections"].items():
            if entry.get("code_space") != manifest.get("code_space"):
                raise BundleError(f"{self.container.path}: its {name} codes are of code space {entry.get('code_space')}"
                                  f", the bundle's of {manifest.get('code_space')}")
            try:
                self.collections[name] = Collection(self.container, name, entry, self.bits)
            except ValueError as err:
                raise BundleError(str(err)) from None
        self.images = self.collections["images"]
        self.encoders = {kind: self._encoder(kind, threads) for kind in manifest["encoders"]}
        self._thumbnails = self._check_thumbnails()
        drift = self.images.entry.get("drift")
        self._drift = QueryWindow(drift) if drift else None
        self._drift_lock = threading.Lock()

    def _encoder(self, kind: str, threads: int):
        entry = self.manifest["encoders"][kind]
        where = self.container.path / entry["spec"]
        try:
            spec = parse_spec(json.loads(self.container.read(entry["spec"])), where)
            check_code_space(spec, self.manifest, manifest_file=f"{self.container.path} ({MANIFEST})", require=True)
            files = {name: self.container.read(member) for name, member in entry.get("files", {}).items()}
            cls = TextEncoder if kind == "text" else ImageEncoder
            return cls.from_memory(spec, self.container.read(entry["model"]), files, threads)
        except (BundleError, SpecError, CodeSpaceError) as err:
            raise BundleError(str(err) if isinstance(err, BundleError) else f"{where}: {err}") from None
        except Exception as err:  # a bad spec, ONNX graph or tokenizer: onnxruntime and tokenizers raise their own kinds
            raise BundleError(f"{where}: cannot load the {kind} encoder: {err}") from None

    # --- what the bundle is ---

    def describe(self) -> dict:
        """What ``terrahash-edge FILE --info`` prints: release, model, code space, collections, encoders."""
        m = self.manifest
        return {"bundle": str(self.container.path), "release": m.get("release"), "model_version": m.get("model_version"),
                "code_space": m.get("code_space"), "bits": self.bits, "encrypted": bool(m.get("encryption")),
                "collections": {name: c.size for name, c in self.collections.items()},
                "encoders": {kind: e.spec.data.get("quantization", "none") for kind, e in self.encoders.items()},
                "thumbnails": bool(m.get("thumbnails"))}

    # --- searching ---

    def search_text(self, params: dict) -> dict:
        """/v1/search/text: ``params`` holds ``query`` and optionally k, rerank, fusion, bbox, datetime."""
        start, timings = time.perf_counter(), {}
        query = check_query(params["query"], self.config)
        k, rerank, fusion = parse_options(params, self.config)
        where = parse_filter(params)
        with Timer(timings, "encode"):
            code = self.encoders["text"].encode([query])[0]
        return self._envelope(self._rank(code, k, rerank, fusion, where, timings), start, timings)

    def search_image(self, data: bytes, params: dict) -> dict:
        """/v1/search/image: ``data`` an image file's bytes; ``params`` as for text, without ``query``."""
        start, timings = time.perf_counter(), {}
        encoder = self.encoders.get("image")
        if encoder is None:
            raise ApiError(422, "no_image_encoder", f"bundle {self.container.path.name} has no image encoder (write "
                                                    f"it with `terrahash bundle --with-image-encoder`)")
        k, rerank, fusion = parse_options(params, self.config)
        where = parse_filter(params)
        check_size(len(data), self.config["max_upload_bytes"])
        with Timer(timings, "decode"):
            pixels = decode_image(data, encoder.spec.image["size"], self.config["max_image_pixels"])
        with Timer(timings, "encode"):
            code = encoder.encode([pixels])[0]
        drift = self._observe_drift(code)
        mode = rerank
        if drift is not None and drift["alarm"] and rerank == "none" and self.config["drift_fallback"] == "asymmetric":
            mode = "asymmetric"
        answer = self._rank(code, k, mode, fusion, where, timings)
        if drift is not None:
            answer["drift"] = {**drift, "fallback": mode if mode != rerank else None}
        return self._envelope(answer, start, timings)

    def _observe_drift(self, code: np.ndarray) -> dict | None:
        if self._drift is None:
            return None
        with self._drift_lock:
            return self._drift.observe(code)

    def _rank(self, code: np.ndarray, k: int, rerank: str, fusion: str, where, timings: dict) -> dict:
        """serving.runtime.search.SearchPipeline.rank over the bundle's collections."""
        if not np.all(np.isfinite(code)):  # as the service's calls.finite: a broken encoder is the server's fault
            raise ApiError(500, "non_finite_code", "the encoder returned a code that is not finite")
        packed = pack_signs(code[None])[0]
        if rerank == "none":
            results = self._search("images", packed, k, timings, where=where)
        elif rerank == "asymmetric":
            hits = self._search("images", packed, max(k, self.config["rerank_depth"]), timings, True, where)
            with Timer(timings, "rerank"):
                results = asymmetric_rerank(code, hits, self.bits)[:k]
        else:
            if "captions" not in self.collections:
                raise ApiError(422, "invalid_rerank", "fusion needs a caption index, and this bundle has none")
            depth = max(k, self.config["rerank_depth"])
            images = self._search("images", packed, depth, timings, where=where)
            captions = self._search("captions", packed, depth, timings, where=where)
            with Timer(timings, "rerank"):
                results = fuse(images, captions, self.bits, fusion)[:k]
        return {"k": k, "rerank": rerank, "fusion": fusion if rerank == "fusion" else None, "results": results}

    def _search(self, name: str, packed: np.ndarray, k: int, timings: dict, with_codes: bool = False,
                where=None) -> list[dict]:
        collection = self.collections[name]
        check_filterable(self.images.entry, where)  # as the service: what the image index can filter by
        with Timer(timings, "search"):
            answer = collection.answer(packed, k, with_codes, where)
        with Timer(timings, "merge"):
            hits = merge_hits([answer], k, self.bits, collection.refs, with_codes)
        return [public_hit(hit) for hit in hits]

    def _envelope(self, answer: dict, start: float, timings: dict) -> dict:
        m = self.manifest
        answer.update({"arm": ARM, "model_version": m.get("model_version"), "model": m.get("model"),
                       "index_version": {name: c.entry.get("version") for name, c in self.collections.items()},
                       "release": m.get("release"), "latency_ms": round((time.perf_counter() - start) * 1000, 3),
                       "timings_ms": {key: round(value, 3) for key, value in timings.items()}})
        return answer

    # --- thumbnails ---

    def _check_thumbnails(self) -> tuple | None:
        """(JPEG blob, offsets, positions in id order) of the bundle's thumbnails, checked; None without."""
        thumbnails = self.manifest.get("thumbnails")
        if not thumbnails:
            return None
        members, size = thumbnails["members"], self.images.size
        blob = self.container.bytes_view(members["data"])
        offsets, order = self.container.array(members["offsets"]), self.container.array(members["order"])
        if (not offsets_fit(offsets, size, len(blob)) or order.shape != (size,) or order.dtype.kind != "u"
                or (size and int(order.max()) >= size)):
            raise BundleError(f"{self.container.path}: its thumbnails do not fit its {size} images")
        return blob, offsets, order

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored thumbnail (JPEG) of an image id, None when the bundle has none for it."""
        if self._thumbnails is None:
            return None
        blob, offsets, order = self._thumbnails
        ids = self.images.strings.get("image_ids", self.images.strings["ids"])
        low, high = 0, len(order)  # a binary search through the ids in sorted order
        while low < high:
            middle = (low + high) // 2
            if ids[int(order[middle])] < image_id:
                low = middle + 1
            else:
                high = middle
        if low == len(order) or ids[int(order[low])] != image_id:
            return None
        position = int(order[low])
        return bytes(blob[int(offsets[position]):int(offsets[position + 1])]) or None


def check_manifest(manifest: dict, path: Path) -> dict:
    """``bundle.json``'s fields a searcher relies on, checked: BundleError naming the first one missing or wrong."""
    def need(value, kind, what):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{path}: {MANIFEST} is malformed: {what} should be {kind.__name__}, got {value!r}")
        return value

    need(manifest.get("bits"), int, "bits")
    need(manifest.get("code_space"), str, "code_space")
    collections = need(manifest.get("collections"), dict, "collections")
    need(collections.get("images"), dict, "collections.images")
    for name, entry in collections.items():
        need(entry, dict, f"collections.{name}")
        members = need(entry.get("members"), dict, f"collections.{name}.members")
        need(members.get("codes"), str, f"collections.{name}.members.codes")
        need(entry.get("refs"), dict, f"collections.{name}.refs")
        need(entry.get("filterable", {}), dict, f"collections.{name}.filterable")
    encoders = need(manifest.get("encoders"), dict, "encoders")
    need(encoders.get("text"), dict, "encoders.text")
    for kind, entry in encoders.items():
        if kind not in ("text", "image"):
            raise BundleError(f"{path}: {MANIFEST} is malformed: unknown encoder {kind!r}")
        need(entry, dict, f"encoders.{kind}")
        for field in ("spec", "model"):
            need(entry.get(field), str, f"encoders.{kind}.{field}")
        need(entry.get("files", {}), dict, f"encoders.{kind}.files")
    thumbnails = manifest.get("thumbnails")
    if thumbnails is not None:
        members = need(need(thumbnails, dict, "thumbnails").get("members"), dict, "thumbnails.members")
        for field in ("data", "offsets", "order"):
            need(members.get(field), str, f"thumbnails.members.{field}")
    return manifest
