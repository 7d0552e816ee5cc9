"""The Ray Serve search app: query encoders, index shards and a FastAPI router, composed by ``build_app``.

Deployments (one app, built with ``.bind()``):

* ``QueryEncoder``: the model version's ONNX image and text students (onnxruntime), with request
  batching (``@serve.batch``); it returns continuous codes, so the router can pack them or re-rank
  asymmetrically. Image queries always go through it; text queries too when
  ``router_encodes_text`` is off (by default the router runs the small text student itself, which
  costs less than the call).
* ``<collection>-shard-XXXXX`` (or ``-shard-XXXXX-YYYYY`` for a group): the shards of the image index
  (and of the caption index when there is one), ``shards_per_replica`` shards per deployment (by
  default as many as spread them over the nodes), each with ``shard_replicas`` replicas, at most one
  per node. A shard whose files do not match the manifest is refused: the replica stays up but not
  ready, and says which shard and why (log and ``/v1/readyz``).
* ``Router``: the FastAPI ingress. It validates input, encodes, fans every query out to all shard
  deployments at once (a failed or slow call is retried within the request's deadline), merges with
  ``serving.index.merge_topk`` (order: distance, then row), optionally re-ranks, and answers JSON.
  Client errors are 4xx with ``{"error": {"code", "message"}}``.

Nothing here imports torch: the whole app runs from ``pip install terrahash[serve]``.
"""
import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from ray import serve
from ray.exceptions import RayError

from serving.codes import pack_signs, unpack_signs
from serving.index import MISSING_ROW, ShardIntegrityError, load_shard, merge_topk, read_manifest, stable_shard

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

RERANK_MODES = ("none", "asymmetric", "fusion")
FUSION_RULES = ("average", "max")
COLLECTIONS = ("images", "captions")


# --- settings ---------------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    """Everything the app is built from; ``from_dict`` refuses unknown keys."""

    index: str  # artifact root holding index/images (and optionally index/captions): a folder or s3://
    model: str | None = None  # model version folder (ONNX + specs); default: the image index's model_dir
    image_version: str | None = None  # index version of the images, default the latest
    caption_version: str | None = None  # of the captions; default the latest, or none if there are none
    encoder_variant: str = "fp32"  # "fp32" or "int8": which exported students to serve
    image_base: str | None = None  # prefix of image references; default: the dataset root the index was built from
    # Placement.
    shard_replicas: int = 2  # replicas per shard deployment
    # Shards held by one shard deployment (searched side by side, answered in one call). 0: as
    # many as spread the shards over the cluster's nodes, ceil(shards / nodes); on one node that
    # is every shard in one deployment, one call per query instead of one per shard.
    shards_per_replica: int = 0
    spread_shards: bool = True  # at most one replica of a shard per node (needs >= shard_replicas nodes)
    encoder_replicas: int = 1
    router_replicas: int = 1
    # Text queries encoded inside the router (the text student takes well under a millisecond,
    # a call to the encoder deployment several); images always go to the batching encoder.
    router_encodes_text: bool = True
    # Logical CPUs reserved per replica: searches are short, and a laptop must fit 2 collections x
    # 4 shards x 2 replicas on two cores.
    shard_num_cpus: float = 0.05
    encoder_num_cpus: float = 0.5
    router_num_cpus: float = 0.25
    encoder_threads: int = 1  # onnxruntime intra-op threads per encoder replica
    shard_threads: int = 1  # faiss OpenMP threads per shard replica: one query gains nothing from more,
    #                         and idle OpenMP threads spin, stealing cores from the other replicas
    # A log line per shard call in every shard replica: off by default, as the router's access log
    # already has every request and the lines cost CPU that the searches need under load.
    shard_access_log: bool = False
    # Ray runtime_env of every replica, e.g. {"env_vars": {"AWS_ENDPOINT_URL": ...}} for an S3-compatible
    # store (with `serve deploy`, the application's own runtime_env does the same).
    runtime_env: dict = field(default_factory=dict)
    router_resources: dict = field(default_factory=dict)  # custom Ray resources, e.g. to pin to a node
    encoder_resources: dict = field(default_factory=dict)
    shard_resources: dict = field(default_factory=dict)
    # Hot settings: sent as user_config, changed without restarting replicas (``reconfigure``).
    max_query_chars: int = 512
    max_k: int = 100
    default_k: int = 10
    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding
    rerank: str = "none"  # default re-ranking: "none", "asymmetric" or "fusion"
    rerank_depth: int = 100  # R: candidates re-ranked
    fusion: str = "average"  # "average" or "max" of the image-code and caption-code scores
    deadline_s: float = 5.0  # a request's whole budget, retries included
    shard_timeout_s: float = 2.0  # one shard call's budget before it is retried
    shard_retries: int = 2
    batch_max_size: int = 16  # encoder request batching
    batch_wait_s: float = 0.002

    HOT_ROUTER = ("max_query_chars", "max_k", "default_k", "max_upload_bytes", "max_image_pixels", "rerank",
                  "rerank_depth", "fusion", "deadline_s", "shard_timeout_s", "shard_retries")
    HOT_ENCODER = ("batch_max_size", "batch_wait_s")

    @classmethod
    def from_dict(cls, data: dict) -> "ServeSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        settings = cls(**data)
        settings.check()
        return settings

    def check(self) -> None:
        """ValueError for settings that cannot work."""
        if self.encoder_variant not in ("fp32", "int8"):
            raise ValueError(f"encoder_variant must be 'fp32' or 'int8', got {self.encoder_variant!r}")
        check_hot_settings(self.router_config())
        for name in ("shard_replicas", "encoder_replicas", "router_replicas", "batch_max_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.shards_per_replica) < 0:
            raise ValueError(f"shards_per_replica must be >= 0 (0: one group per node), got {self.shards_per_replica}")

    def router_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ROUTER}

    def encoder_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ENCODER}


def check_hot_settings(config: dict) -> dict:
    """Validate the router's user_config (also on every ``reconfigure``)."""
    unknown = sorted(set(config) - set(ServeSettings.HOT_ROUTER))
    if unknown:
        raise ValueError(f"unknown router settings {unknown}")
    if config["rerank"] not in RERANK_MODES:
        raise ValueError(f"rerank must be one of {RERANK_MODES}, got {config['rerank']!r}")
    if config["fusion"] not in FUSION_RULES:
        raise ValueError(f"fusion must be one of {FUSION_RULES}, got {config['fusion']!r}")
    if not 1 <= config["default_k"] <= config["max_k"]:
        raise ValueError(f"need 1 <= default_k <= max_k, got {config['default_k']} and {config['max_k']}")
    if config["shard_timeout_s"] <= 0 or config["deadline_s"] <= 0 or config["shard_retries"] < 0:
        raise ValueError("deadline_s and shard_timeout_s must be > 0 and shard_retries >= 0")
    return config


def load_settings(path: str | Path, **overrides) -> ServeSettings:
    """Settings from a YAML file (a mapping of ServeSettings fields), with ``overrides`` on top."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of serve settings")
    return ServeSettings.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})


# --- errors -----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200: HTTP status, a stable machine code and a message for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ShardNotReady(RuntimeError):
    """A shard replica that refused its shard (bad checksum, missing file): it never answers searches."""


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# --- request helpers (defined before the deployments: Serve pickles their classes by value when
# they are decorated, with the module globals that exist at that moment) ------------------------------


def _parse_k(value, config: dict) -> int:
    if value is None:
        return config["default_k"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ApiError(422, "k_out_of_range", f"k must be an integer from 1 to {config['max_k']}, got {value!r}")
    k = int(value)
    if not 1 <= k <= config["max_k"]:
        raise ApiError(422, "k_out_of_range", f"k must be from 1 to {config['max_k']}, got {k}")
    return k


def _parse_choice(value, choices, default, name):
    if value is None:
        return default
    if value not in choices:
        raise ApiError(422, f"invalid_{name}", f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_query(query, config: dict) -> str:
    if not isinstance(query, str):
        raise ApiError(422, "invalid_query", "query must be a string")
    if not query.strip():
        raise ApiError(422, "empty_query", "query is empty or only whitespace")
    if len(query) > config["max_query_chars"]:
        raise ApiError(422, "query_too_long", f"query has {len(query)} characters; the limit is "
                                              f"{config['max_query_chars']}")
    return query


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (size, size, 3), refusing bombs before decoding and broken data after."""
    from serving.encoders import InvalidImageError, decode_and_resize

    if not data:
        raise ApiError(422, "invalid_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"image refused as a decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many kinds for data that is not an image
        raise ApiError(422, "invalid_image", f"cannot decode the image: {err}") from None
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is "
                                               f"{max_pixels} (decompression-bomb guard)")
    try:
        return decode_and_resize(data, size)
    except InvalidImageError as err:
        raise ApiError(422, "invalid_image", str(err)) from None
    except Exception as err:  # a truncated or malformed stream can fail deeper inside PIL
        raise ApiError(422, "invalid_image", f"cannot decode the image: {err}") from None


class _Metrics:
    """Per-replica Prometheus metrics, in a registry of their own (no process-wide state)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("terrahash_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("terrahash_request_seconds", "server-side latency by endpoint", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.retries = Counter("terrahash_shard_retries", "shard calls retried", ["shard"], registry=self.registry)

    def render(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Timer:
    """Adds the milliseconds spent in a ``with`` block to ``timings[name]``."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + (time.perf_counter() - self.start) * 1000


async def _result(response):
    return await response


def _require_content_type(request: Request, accepted: tuple[str, ...]) -> str:
    """The accepted prefix the request's content type starts with, else 415."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    for prefix in accepted:
        if content_type.startswith(prefix):
            return prefix
    raise ApiError(415, "unsupported_media_type",
                   f"content type {content_type or 'none'!r} is not accepted here; use one of {list(accepted)}")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (the declared length first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body passed the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise ApiError(413, "payload_too_large", f"the image is {size} bytes; the limit is {limit}")


def _base64_limit(limit: int) -> int:
    return limit * 4 // 3 + 4096  # base64 grows data by 4/3; room for the other fields


def _b64(payload: dict, limit: int | None = None) -> bytes:
    text = payload.get("image_base64")
    if not isinstance(text, str) or not text:
        raise ApiError(422, "missing_image", 'the JSON body needs "image_base64" (or "image_id" for captions)')
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, "invalid_image", f"image_base64 is not valid base64: {err}") from None
    if limit is not None:
        _check_size(len(data), limit)
    return data


# --- merging and re-ranking (plain functions, tested without Ray) -------------------------------------


def merge_hits(answers: list[dict], k: int, bits: int, image_base: str, with_codes: bool = False) -> list[dict]:
    """Per-shard answers of one query -> the global top-k as result dicts, ordered by (distance, row)."""
    distances, rows = merge_topk([(a["distances"], a["rows"]) for a in answers], k)  # (1, k) each
    by_row = {}
    for a in answers:
        for j, row in enumerate(a["rows"][0].tolist()):
            if row != MISSING_ROW:
                by_row[row] = (a["ids"][0][j], a["image_ids"][0][j], a["codes"][0][j] if with_codes else None,
                               a["texts"][0][j] if "texts" in a else None)
    hits = []
    for distance, row in zip(distances[0].tolist(), rows[0].tolist()):
        if row == MISSING_ROW:
            break  # fewer than k items in the whole index
        item_id, image_id, code, text = by_row[row]
        hit = {"id": str(item_id), "row": int(row), "distance": int(distance), "score": 1.0 - distance / bits,
               "image_id": str(image_id), "image": _image_ref(image_base, str(image_id))}
        if text is not None:
            hit["text"] = str(text)  # a caption index's words
        if with_codes:
            hit["code"] = code
        hits.append(hit)
    return hits


def asymmetric_rerank(query: np.ndarray, hits: list[dict], bits: int) -> list[dict]:
    """Re-order hits by the asymmetric distance of the float query to each binary code.

    d_a(q, b) = sum_i (1 - q_i b_i) / 2 with b in {-1, +1}: the Hamming distance when q is binary.
    Ties by row. ``distance`` stays the Hamming distance; ``score`` becomes 1 - d_a / bits.
    """
    if not hits:
        return []
    signs = unpack_signs(np.stack([h.pop("code") for h in hits]), bits).astype(np.float32)  # (R, bits)
    d_a = (bits - signs @ query.astype(np.float32)) / 2  # (R,)
    for hit, d in zip(hits, d_a.tolist()):
        hit["asymmetric_distance"], hit["score"] = round(d, 4), 1.0 - d / bits
    return sorted(hits, key=lambda h: (h["asymmetric_distance"], h["row"]))


def fuse(images: list[dict], captions: list[dict], bits: int, rule: str, image_base: str) -> list[dict]:
    """Late fusion of image-code hits and caption-code hits into one image ranking.

    An image's caption score is the best score of its captions. An image missing from one list
    gets that list's lowest retrieved score (no unretrieved item can score higher). The fused
    score is the average or the maximum of the two; ties by image id.
    """
    image_scores = {h["image_id"]: h for h in images}
    caption_scores: dict[str, float] = {}
    for h in captions:
        caption_scores[h["image_id"]] = max(caption_scores.get(h["image_id"], -1.0), h["score"])
    floor_i = min((h["score"] for h in images), default=0.0)
    floor_c = min(caption_scores.values(), default=0.0)
    combine = (lambda a, b: (a + b) / 2) if rule == "average" else max
    fused = []
    for image_id in set(image_scores) | set(caption_scores):
        hit = image_scores.get(image_id)
        s_i = hit["score"] if hit else floor_i
        s_c = caption_scores.get(image_id, floor_c)
        fused.append({"id": image_id, "distance": hit["distance"] if hit else None, "image_score": s_i,
                      "caption_score": s_c, "score": combine(s_i, s_c), "image_id": image_id,
                      "image": _image_ref(image_base, image_id)})
    return sorted(fused, key=lambda h: (-h["score"], h["id"]))


def _image_ref(base: str, image_id: str) -> str:
    return f"{base.rstrip('/')}/{image_id}" if base else image_id


# --- deployments: shards ------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=32, health_check_period_s=2, health_check_timeout_s=10)
class ShardServer:
    """A group of shards of one index version (one shard by default), searched exactly (ties by row).

    Each shard is a serving.index.Shard; a group searches its shards side by side in threads (faiss
    releases the GIL) and answers its own top-k, merged as the router merges groups, so one call
    serves several shards. Grouping trades spreading for fewer calls per query: on one node, one
    group of every shard saves a Serve round trip per extra shard.
    """

    def __init__(self, root: str, collection: str, version: str, shard_names: list[str], threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.label = f"{collection}/{version}/{'+'.join(shard_names)}"
        self.labels = [f"{collection}/{version}/{name}" for name in shard_names]
        self.shards, self.problems = [], {}
        for name, label in zip(shard_names, self.labels):
            try:
                self.shards.append(load_shard(root, version, name, collection))
            except ShardIntegrityError as err:
                # Stay up but never ready: restarting would fail the same way, and readiness shows why.
                self.problems[label] = str(err)
                log.error("refusing shard %s: %s", label, err)
        if not self.problems:
            self.id_position = {name: (s, i) for s, shard in enumerate(self.shards)
                                for i, name in enumerate(shard.ids.tolist())}
            log.info("shards %s loaded: %s rows", self.label, [len(shard) for shard in self.shards])
        self.pool = None
        if len(shard_names) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=len(shard_names), thread_name_prefix="shard")

    def ready(self) -> list[dict]:
        """One {"shard", "ready", "rows", "problem"} per shard of the group (rows 0 while not serving)."""
        rows = [len(shard) for shard in self.shards] if not self.problems else [0] * len(self.labels)
        return [{"shard": label, "ready": label not in self.problems, "rows": n, "problem": self.problems.get(label)}
                for label, n in zip(self.labels, rows)]

    def search(self, queries: np.ndarray, k: int, with_codes: bool = False) -> dict:
        """Top-k of packed ``queries`` (Q, bytes) over the group: distances, rows, ids, image ids (and
        codes), each (Q, k), ordered by (distance, row)."""
        shards = self._loaded()
        per_shard = ([shards[0].search(queries, k)] if self.pool is None  # (distances, rows) (Q, k) each
                     else list(self.pool.map(lambda shard: shard.search(queries, k), shards)))
        distances, rows = per_shard[0] if len(per_shard) == 1 else merge_topk(per_shard, k)
        ids = np.full(rows.shape, "", dtype=object)
        image_ids = np.full(rows.shape, "", dtype=object)
        texts = np.full(rows.shape, "", dtype=object) if shards[0].texts is not None else None
        codes = np.zeros(rows.shape + (shards[0].codes.shape[1],), np.uint8) if with_codes else None
        for shard in shards:
            positions = shard.positions(rows)  # -1 where the row is another shard's, or padding
            found = positions >= 0
            take = positions[found]
            ids[found], image_ids[found] = shard.ids[take], shard.image_ids[take]
            if texts is not None:
                texts[found] = shard.texts[take]
            if with_codes:
                codes[found] = shard.codes[take]  # padded places hold a zero code
        out = {"distances": distances, "rows": rows, "ids": ids, "image_ids": image_ids}
        if texts is not None:
            out["texts"] = texts
        if with_codes:
            out["codes"] = codes
        return out

    def code_of(self, item_id: str):
        """The packed code (bytes,) of an indexed id, or None if this group does not hold it."""
        shards = self._loaded()
        where = self.id_position.get(item_id)
        return None if where is None else shards[where[0]].codes[where[1]]

    def _loaded(self) -> list:
        if self.problems:
            raise ShardNotReady("; ".join(f"shard {label} is not serving: {problem}"
                                          for label, problem in self.problems.items()))
        return self.shards


# --- deployments: the query encoder -------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    """The text and image students of one model version, batched across concurrent requests."""

    def __init__(self, image_spec: str, text_spec: str | None, threads: int = 1):
        """``text_spec`` None: text is encoded by the router (router_encodes_text), so not loaded here."""
        from serving.encoders import ImageEncoder, TextEncoder

        self.image = ImageEncoder(image_spec, threads)
        self.text = TextEncoder(text_spec, threads) if text_spec is not None else None

    def reconfigure(self, config: dict) -> None:
        """Hot batching settings: {"batch_max_size", "batch_wait_s"}."""
        for method in (self.encode_text, self.encode_image):
            method.set_max_batch_size(int(config["batch_max_size"]))
            method.set_batch_wait_timeout_s(float(config["batch_wait_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_text(self, texts: list[str]) -> list[np.ndarray]:
        """Texts -> continuous codes, one (bits,) float32 array per text (validated by the router)."""
        return list(self.text.encode(texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_image(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded RGB uint8 (S, S, 3) images -> continuous codes (bits,) each."""
        return list(self.image.encode(pixels))


# --- the router ------------------------------------------------------------------------------------


api = FastAPI(title="TerraHash search", version="1",
              description="Text to image, image to image and image to text search over binary hash codes.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return error_response(err.status, err.code, err.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(api)
class Router:
    """HTTP ingress: validate, encode, scatter to every shard, merge the top-k, re-rank, answer."""

    def __init__(self, encoder, image_shards: list, caption_shards: list, meta: dict, text_spec: str | None = None,
                 threads: int = 1):
        self.encoder = encoder
        self.shards = {"images": list(image_shards), "captions": list(caption_shards)}  # one handle per group
        self.meta = meta  # model_version, versions, bits, image_size, image_base, shard_count, shards_per_replica
        self.text = None
        if text_spec is not None:  # router_encodes_text
            from serving.encoders import TextEncoder

            self.text = TextEncoder(text_spec, threads)
        self.config = None
        self.metrics = _Metrics()

    def reconfigure(self, config: dict) -> None:
        """Hot limits and defaults (ServeSettings.HOT_ROUTER)."""
        self.config = check_hot_settings(dict(config))

    # --- endpoints ---

    @api.get("/v1/healthz")
    async def healthz(self):
        """Liveness: the router answers."""
        return {"status": "ok"}

    @api.get("/v1/readyz")
    async def readyz(self):
        """Readiness: every shard replica reached holds a verified shard (503 with the reasons otherwise)."""
        groups = await asyncio.gather(*[self._ready(c, h) for c in COLLECTIONS for h in self.shards[c]])
        reports = [report for group in groups for report in group]
        ready = all(r["ready"] for r in reports)
        body = {"ready": ready, "shards": reports, "model_version": self.meta["model_version"],
                "index_version": self.meta["index_version"]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self):
        """Prometheus metrics of this router replica."""
        return self.metrics.render()

    @api.post("/v1/search/text")
    async def search_text(self, request: Request):
        """Text to image. JSON body: {"query": str, "k": int, "rerank": "none"|"asymmetric"|"fusion",
        "fusion": "average"|"max"}."""
        return await self._timed("text", request, self._search_text)

    @api.post("/v1/search/image")
    async def search_image(self, request: Request):
        """Image to image: multipart (file field "image", fields k, rerank, fusion), JSON
        {"image_base64", "k", ...}, or a raw image/* body (k etc. in the query string)."""
        return await self._timed("image", request, self._search_image)

    @api.get("/v1/search/similar/{image_id:path}")
    async def search_similar(self, image_id: str, request: Request):
        """Images most similar to an indexed image (itself left out); ``k`` in the query string."""
        return await self._timed("similar", request, lambda r, t: self._search_similar(image_id, r, t))

    @api.post("/v1/captions")
    async def captions(self, request: Request):
        """Image to text: rank the indexed captions for an uploaded image or {"image_id": ...} (JSON)."""
        return await self._timed("captions", request, self._captions)

    # --- request handling ---

    async def _timed(self, endpoint: str, request: Request, handler):
        start = time.perf_counter()
        timings: dict = {}
        status = 200
        try:
            body = await handler(request, timings)
            total = (time.perf_counter() - start) * 1000
            body.update({"model_version": self.meta["model_version"], "index_version": self.meta["index_version"],
                         "latency_ms": round(total, 3), "timings_ms": {k: round(v, 3) for k, v in timings.items()}})
            return JSONResponse(body)
        except ApiError as err:
            status = err.status
            if status >= 500:
                log.warning("%s: %s", endpoint, err.message)
            return error_response(err.status, err.code, err.message)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _search_text(self, request: Request, timings: dict) -> dict:
        payload = await self._json(request, self.config["max_query_chars"] * 4 + 4096)
        query = _check_query(payload.get("query"), self.config)
        k, rerank, fusion = self._options(payload)
        with _Timer(timings, "encode"):
            if self.text is not None:
                code = self.text.encode([query])[0]  # (bits,) float32
            else:
                code = await self.encoder.encode_text.remote(query)
        return await self._rank(code, k, rerank, fusion, timings)

    async def _search_image(self, request: Request, timings: dict) -> dict:
        data, params = await self._image_upload(request)
        k, rerank, fusion = self._options(params)
        code = await self._encode_image(data, timings)
        return await self._rank(code, k, rerank, fusion, timings)

    async def _search_similar(self, image_id: str, request: Request, timings: dict) -> dict:
        k = _parse_k(request.query_params.get("k"), self.config)
        packed = await self._indexed_code(image_id, timings)
        hits = await self._search("images", packed[None], k + 1, timings)
        results = [h for h in hits if h["id"] != image_id][:k]  # exact: self removed from the top k+1
        return {"query": {"image_id": image_id}, "k": k, "rerank": "none", "results": results}

    async def _captions(self, request: Request, timings: dict) -> dict:
        if not self.shards["captions"]:
            raise ApiError(404, "no_caption_index", "this deployment has no caption index")
        if request.headers.get("content-type", "").startswith("application/json"):
            payload = await self._json(request, _base64_limit(self.config["max_upload_bytes"]))
            params = payload
            if "image_id" in payload:
                k = _parse_k(payload.get("k"), self.config)
                packed = await self._indexed_code(str(payload["image_id"]), timings)
                hits = await self._search("captions", packed[None], k, timings)
                return {"query": {"image_id": payload["image_id"]}, "k": k, "results": hits}
            data = _b64(payload)
        else:
            data, params = await self._image_upload(request)
        k = _parse_k(params.get("k"), self.config)
        code = await self._encode_image(data, timings)
        hits = await self._search("captions", pack_signs(code[None]), k, timings)
        return {"query": {"image": "upload"}, "k": k, "results": hits}

    def _options(self, params: dict) -> tuple[int, str, str]:
        k = _parse_k(params.get("k"), self.config)
        rerank = _parse_choice(params.get("rerank"), RERANK_MODES, self.config["rerank"], "rerank")
        fusion = _parse_choice(params.get("fusion"), FUSION_RULES, self.config["fusion"], "fusion")
        if rerank == "fusion" and not self.shards["captions"]:
            raise ApiError(422, "invalid_rerank", "fusion needs a caption index, and this deployment has none")
        return k, rerank, fusion

    async def _encode_image(self, data: bytes, timings: dict) -> np.ndarray:
        with _Timer(timings, "decode"):
            pixels = decode_image(data, self.meta["image_size"], self.config["max_image_pixels"])
        with _Timer(timings, "encode"):
            return await self.encoder.encode_image.remote(pixels)

    async def _indexed_code(self, image_id: str, timings: dict) -> np.ndarray:
        """The stored code of an indexed image: asked of the one shard that holds it by the sharding rule."""
        shard = stable_shard(image_id, self.meta["shard_count"]["images"])
        handle = self.shards["images"][shard // self.meta["shards_per_replica"]["images"]]
        with _Timer(timings, "lookup"):
            code = await self._call(handle, "code_of", image_id)
        if code is None:
            raise ApiError(404, "unknown_id", f"no indexed image has id {image_id!r}")
        return code

    # --- searching ---

    async def _rank(self, code: np.ndarray, k: int, rerank: str, fusion: str, timings: dict) -> dict:
        packed = pack_signs(code[None])  # (1, bytes)
        if rerank == "none":
            results = await self._search("images", packed, k, timings)
        elif rerank == "asymmetric":
            depth = max(k, self.config["rerank_depth"])
            hits = await self._search("images", packed, depth, timings, with_codes=True)
            with _Timer(timings, "rerank"):
                results = asymmetric_rerank(code, hits, self.meta["bits"])[:k]
        else:
            depth = max(k, self.config["rerank_depth"])
            images, captions = await asyncio.gather(self._search("images", packed, depth, timings),
                                                    self._search("captions", packed, depth, timings))
            with _Timer(timings, "rerank"):
                results = fuse(images, captions, self.meta["bits"], fusion, self.meta["image_base"])[:k]
        return {"k": k, "rerank": rerank, "fusion": fusion if rerank == "fusion" else None, "results": results}

    async def _search(self, collection: str, packed: np.ndarray, k: int, timings: dict,
                      with_codes: bool = False) -> list[dict]:
        """Scatter one query to every shard of ``collection`` at once, merge the top-k (distance, row)."""
        start = time.perf_counter()
        answers = await asyncio.gather(*[self._call(h, "search", packed, k, with_codes)
                                         for h in self.shards[collection]])
        timings["search"] = timings.get("search", 0.0) + (time.perf_counter() - start) * 1000
        with _Timer(timings, "merge"):
            return merge_hits(answers, k, self.meta["bits"], self.meta["image_base"], with_codes)

    async def _call(self, handle, method: str, *args):
        """One call to a shard deployment, retried on a lost replica or a timeout within the deadline."""
        deadline = time.monotonic() + self.config["deadline_s"]
        attempts = self.config["shard_retries"] + 1
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(_result(response), min(remaining, self.config["shard_timeout_s"]))
            except ShardNotReady as err:
                raise ApiError(503, "shard_not_ready", str(err)) from None
            except (RayError, asyncio.TimeoutError) as err:
                response.cancel()
                self.metrics.retries.labels(handle.deployment_name).inc()
                log.warning("%s.%s failed (attempt %d of %d): %s", handle.deployment_name, method, attempt + 1,
                            attempts, type(err).__name__)
                await asyncio.sleep(0.02 * (attempt + 1))  # let the handle learn of a dead replica
        raise ApiError(503, "shard_unavailable", f"{handle.deployment_name} did not answer within the deadline")

    async def _ready(self, collection: str, handle) -> list[dict]:
        try:
            return await asyncio.wait_for(_result(handle.ready.remote()), self.config["shard_timeout_s"])
        except (RayError, asyncio.TimeoutError) as err:
            return [{"shard": handle.deployment_name, "ready": False, "rows": 0,
                     "problem": f"unreachable ({type(err).__name__})"}]

    # --- request bodies ---

    async def _json(self, request: Request, limit: int) -> dict:
        _require_content_type(request, ("application/json",))
        body = await _read_limited(request, limit)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return payload

    async def _image_upload(self, request: Request) -> tuple[bytes, dict]:
        """(image bytes, other parameters) from a multipart form, JSON with base64, or a raw image body."""
        limit = self.config["max_upload_bytes"]
        kind = _require_content_type(request, ("multipart/form-data", "application/json", "image/"))
        if kind == "application/json":
            payload = await self._json(request, _base64_limit(limit))
            return _b64(payload, limit), payload
        body = await _read_limited(request, limit + 64 * 1024)  # room for the form's own fields
        if kind == "image/":
            _check_size(len(body), limit)
            return body, dict(request.query_params)
        request._body = body  # starlette parses the form from the body already read (and size-checked)
        try:
            form = await request.form()
        except Exception as err:  # malformed multipart
            raise ApiError(400, "invalid_form", f"cannot parse the multipart form: {err}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_image", 'the form needs a file field named "image"')
        data = await upload.read()
        _check_size(len(data), limit)
        return data, {k: v for k, v in form.items() if k != "image"}


# --- building the app ------------------------------------------------------------------------------


def _versions(settings: ServeSettings) -> dict:
    """The manifests served: images always, captions when present (or asked for)."""
    from serving.index import IndexVersionError, latest_version

    manifests = {"images": read_manifest(settings.index, settings.image_version or
                                         latest_version(settings.index, "images"), "images")}
    try:
        version = settings.caption_version or latest_version(settings.index, "captions")
    except IndexVersionError:
        version = None  # no caption index: text/image search still work, fusion and /v1/captions do not
    if version:
        manifests["captions"] = read_manifest(settings.index, version, "captions")
        if manifests["captions"]["model_version"] != manifests["images"]["model_version"]:
            raise ValueError(f"caption index {version} was built with model {manifests['captions']['model_version']!r}, "
                             f"the image index with {manifests['images']['model_version']!r}; they cannot be fused")
    return manifests


def build_app(settings: ServeSettings | dict):
    """The Serve application for ``settings``: encoder, shard deployments and router, bound together."""
    from serving.build import find_spec
    from serving.spec import load_spec

    settings = settings if isinstance(settings, ServeSettings) else ServeSettings.from_dict(settings)
    settings.check()
    manifests = _versions(settings)
    images = manifests["images"]
    model_dir = Path(settings.model or images["extra"].get("model_dir") or "")
    if not model_dir.is_dir():
        raise ValueError(f"model version folder {str(model_dir)!r} not found (give model in the settings)")
    image_spec = find_spec(model_dir, "image", settings.encoder_variant)
    text_spec = find_spec(model_dir, "text", settings.encoder_variant)
    spec = load_spec(image_spec)
    if spec.bits != images["bits"]:
        raise ValueError(f"the model's codes have {spec.bits} bits, index {images['version']} holds {images['bits']}")
    encoder = QueryEncoder.options(
        num_replicas=settings.encoder_replicas, user_config=settings.encoder_config(),
        ray_actor_options=_actor_options(settings, settings.encoder_num_cpus, settings.encoder_resources),
    ).bind(str(image_spec), None if settings.router_encodes_text else str(text_spec), settings.encoder_threads)
    per_replica = {name: shards_per_replica(settings, len(m["shards"])) for name, m in manifests.items()}
    shards = {name: [_shard_deployment(settings, manifest, group)
                     for group in _groups([e["name"] for e in manifest["shards"]], per_replica[name])]
              for name, manifest in manifests.items()}
    meta = {"model_version": images["model_version"], "bits": images["bits"], "image_size": spec.image["size"],
            "index_version": {name: m["version"] for name, m in manifests.items()},
            "shard_count": {name: len(m["shards"]) for name, m in manifests.items()}, "shards_per_replica": per_replica,
            "image_base": settings.image_base if settings.image_base is not None else images["extra"].get("image_root", "")}
    return Router.options(
        num_replicas=settings.router_replicas, user_config=settings.router_config(),
        ray_actor_options=_actor_options(settings, settings.router_num_cpus, settings.router_resources),
    ).bind(encoder, shards["images"], shards.get("captions", []), meta,
           str(text_spec) if settings.router_encodes_text else None, settings.encoder_threads)


def shards_per_replica(settings: ServeSettings, shards: int) -> int:
    """Shards per shard deployment: the setting, or with 0 ceil(shards / alive nodes) (1 without Ray)."""
    if settings.shards_per_replica:
        return min(int(settings.shards_per_replica), max(shards, 1))
    import ray

    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else shards
    return max(1, -(-shards // max(nodes, 1)))


def _groups(names: list[str], size: int) -> list[list[str]]:
    """Consecutive shards in groups of ``size``: shard i is in group i // size (the router relies on it)."""
    return [names[i:i + size] for i in range(0, len(names), size)]


def _shard_deployment(settings: ServeSettings, manifest: dict, shard_names: list[str]):
    suffix = shard_names[0] if len(shard_names) == 1 else f"{shard_names[0]}-{shard_names[-1].rsplit('-', 1)[-1]}"
    options = {"name": f"{manifest['collection']}-{suffix}", "num_replicas": settings.shard_replicas,
               "ray_actor_options": _actor_options(settings, settings.shard_num_cpus, settings.shard_resources),
               "logging_config": {"enable_access_log": bool(settings.shard_access_log)}}
    if settings.spread_shards:
        options["max_replicas_per_node"] = 1  # a node lost takes at most one replica of each shard
    return ShardServer.options(**options).bind(settings.index, manifest["collection"], manifest["version"], shard_names,
                                           settings.shard_threads)


def _actor_options(settings: ServeSettings, num_cpus: float, resources: dict) -> dict:
    return {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {}),
            **({"runtime_env": dict(settings.runtime_env)} if settings.runtime_env else {})}


def app_builder(args: dict):
    """Application builder for ``serve deploy`` / ``serve run``: ``args`` are ServeSettings fields."""
    return build_app(ServeSettings.from_dict(dict(args)))


def run_local(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, name: str = "terrahash",
              blocking: bool = True):
    """Start Ray (or join $RAY_ADDRESS) and Serve, deploy the app, and block until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto" if _ray_address_set() else None, configure_logging=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if settings.spread_shards and len(nodes) < settings.shard_replicas:
        log.warning("%d node(s) cannot spread %d replicas per shard one per node; placing them freely",
                    len(nodes), settings.shard_replicas)
        settings = dataclasses.replace(settings, spread_shards=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=name, route_prefix="/", blocking=blocking)


def _ray_address_set() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
