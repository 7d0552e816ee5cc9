"""The router: the app's FastAPI ingress. It validates, encodes, scatters to every shard group, merges, answers.

Every request gets one budget, ``deadline_s``, that covers all of it: reading the body, decoding,
the encoder call, the id lookup, the fan-out and every retry; past it the answer is a JSON 504.
A call to another deployment is retried within that budget when the replica was lost or slow, and a
``ShardNotReady`` (a replica without a verified copy) is retried at once, as another replica of the
group may hold one. Every answer is JSON; an unexpected error is a 500 carrying the request id, whose
traceback is in the replica's log. Request counts and latencies go to Ray's metrics (see serving/README).
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serving.api import (CAPTION_BODY, IMAGE_BODY, TEXT_BODY, ApiError, CaptionSearch, ImageSearch, TextSearch,
                         check_query, decode_in_pool, error_response, image_upload, parse_body,
                         parse_choice, parse_k, read_json)
from serving.codes import pack_signs
from serving.index import stable_shard
from serving.ranking import asymmetric_rerank, fuse, merge_hits
from serving.settings import FUSION_RULES, RERANK_MODES, check_hot_settings
from serving.shards import ShardNotReady

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

COLLECTIONS = ("images", "captions")
NOT_READY_TRIES = 16  # calls that met a replica without a verified copy before answering 503
# A lost or overloaded replica: worth another try within the deadline (Serve may pick another replica).
RETRYABLE = (RayError, asyncio.TimeoutError, BackPressureError, ReplicaUnavailableError, DeploymentUnavailableError)
LATENCY_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)


class RouterMetrics:
    """Request counts by endpoint and status, latency, and retries, as Ray Serve metrics.

    Ray exports them with every replica's tags from each node's metrics endpoint, so one Prometheus
    job over Ray's service-discovery file sums them across router replicas and nodes.
    """

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("terrahash_requests", description="HTTP requests by endpoint and status",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("terrahash_request_seconds", description="server-side latency by endpoint",
                                         boundaries=list(LATENCY_BUCKETS), tag_keys=("endpoint",))
        self.retries = metrics.Counter("terrahash_call_retries", description="calls to other deployments retried",
                                       tag_keys=("callee", "reason"))

    def count(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.inc(1, tags={"endpoint": endpoint, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"endpoint": endpoint})


_metrics: list[RouterMetrics] = []  # one per process, made in the replica (metrics need a running Ray)


def metrics() -> RouterMetrics:
    if not _metrics:
        _metrics.append(RouterMetrics())
    return _metrics[0]


def request_id() -> str:
    """Serve's id of the current request (also its X-Request-ID response header)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or "unknown"


class Call:
    """One request's budget and the milliseconds spent per step."""

    def __init__(self, deadline_s: float):
        self.deadline = time.monotonic() + deadline_s
        self.timings: dict[str, float] = {}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timer(self, name: str) -> "_Timer":
        return _Timer(self.timings, name)


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


async def _all_or_none(coroutines) -> list:
    """The results of ``coroutines`` run at once; when one fails, the others are cancelled (no call keeps
    retrying for a request that has already failed)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _finite(code: np.ndarray) -> np.ndarray:
    if not np.isfinite(code).all():
        raise RuntimeError("the encoder returned a code with NaN or infinite values")
    return code


api = FastAPI(title="TerraHash search", version="1",
              description="Text to image, image to image and image to text search over binary hash codes. "
                          'Errors are JSON: {"error": {"code", "message"}}; a 500 also carries "request_id".')


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return error_response(err.status, err.code, err.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    metrics().count("unmatched", 422)
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException):
    """Unknown paths and methods: the same JSON error shape as every other answer."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    metrics().count("unmatched", err.status_code)
    return error_response(err.status_code, codes.get(err.status_code, "http_error"), str(err.detail))


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(api)
class Router:
    """HTTP ingress: validate, encode, scatter to every shard group, merge the top-k, re-rank, answer."""

    def __init__(self, encoder, image_shards: list, caption_shards: list, meta: dict, reports=None,
                 text_spec: str | None = None, threads: int = 1, decode_threads: int = 2):
        self.encoder, self.reports = encoder, reports
        self.shards = {"images": list(image_shards), "captions": list(caption_shards)}  # one handle per group
        self.meta = meta  # model_version, versions, shard labels, bits, image_size, image_base, shard counts
        self.text = None
        if text_spec is not None:  # router_encodes_text
            from serving.encoders import TextEncoder

            self.text = TextEncoder(text_spec, threads)
        self.decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self.config = None
        self.metrics = metrics()

    def reconfigure(self, config: dict) -> None:
        """Hot limits, defaults and the deadline (serving.settings.RouterConfig)."""
        self.config = check_hot_settings(dict(config))

    # --- endpoints ---

    @api.get("/v1/healthz")
    async def healthz(self):
        """Liveness: the router answers."""
        return {"status": "ok"}

    @api.get("/v1/readyz")
    async def readyz(self):
        """Readiness: every shard is held, verified, by at least one replica; lists every shard replica's
        own report and the reasons of recent replacements (503 when a shard has no ready replica)."""
        return await self._timed("readyz", None, lambda request, call: self._readiness(call), wrap=False)

    @api.post("/v1/search/text", openapi_extra=TEXT_BODY)
    async def search_text(self, request: Request):
        """Text to image: a JSON body {"query", "k", "rerank", "fusion"}."""
        return await self._timed("text", request, self._search_text)

    @api.post("/v1/search/image", openapi_extra=IMAGE_BODY)
    async def search_image(self, request: Request):
        """Image to image: multipart (file field "image", fields k, rerank, fusion), JSON
        {"image_base64", "k", ...}, or a raw image/* body (k etc. in the query string)."""
        return await self._timed("image", request, self._search_image)

    @api.get("/v1/search/similar/{image_id:path}")
    async def search_similar(self, image_id: str, request: Request, k: str | None = None):
        """Images most similar to an indexed image (itself left out); ``k`` in the query string."""
        return await self._timed("similar", request, lambda r, call: self._search_similar(image_id, r, call))

    @api.post("/v1/captions", openapi_extra=CAPTION_BODY)
    async def captions(self, request: Request):
        """Image to text: rank the indexed captions for an uploaded image or {"image_id": ...} (JSON)."""
        return await self._timed("captions", request, self._captions)

    # --- request handling ---

    async def _timed(self, endpoint: str, request: Request | None, handler, wrap: bool = True):
        """Run ``handler`` within the request's deadline; every outcome a JSON answer, counted by status."""
        start = time.perf_counter()
        call = Call(self.config["deadline_s"])
        status = 500
        try:
            try:
                answer = await asyncio.wait_for(handler(request, call), timeout=max(call.remaining(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(504, "deadline_exceeded",
                               f"the request did not finish within its deadline of {self.config['deadline_s']} s") from None
            if isinstance(answer, JSONResponse):
                status = answer.status_code
                return answer
            total = (time.perf_counter() - start) * 1000
            if wrap:
                answer.update({"model_version": self.meta["model_version"],
                               "index_version": self.meta["index_version"], "latency_ms": round(total, 3),
                               "timings_ms": {k: round(v, 3) for k, v in call.timings.items()}})
            response = JSONResponse(answer)
            status = 200
            return response
        except ApiError as err:
            status = err.status
            if status >= 500:
                log.warning("%s: %s", endpoint, err.message)
            return error_response(err.status, err.code, err.message)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code): not a server error
            raise
        except Exception:
            rid = request_id()
            log.exception("%s: unexpected error in request %s", endpoint, rid)
            return error_response(500, "internal_error", f"the server failed on this request; quote request id "
                                                         f"{rid} when reporting it", rid)
        finally:
            self.metrics.count(endpoint, status, time.perf_counter() - start)

    async def _search_text(self, request: Request, call: Call) -> dict:
        body = parse_body(TextSearch, await read_json(request, self.config["max_query_chars"] * 4 + 4096))
        query = check_query(body.query, self.config)
        k, rerank, fusion = self._options(body.model_dump())
        with call.timer("encode"):
            if self.text is not None:
                code = self.text.encode([query])[0]  # (bits,) float32
            else:
                code = await self._call(self.encoder, "encode_text", call, query)
        return await self._rank(_finite(code), k, rerank, fusion, call)

    async def _search_image(self, request: Request, call: Call) -> dict:
        data, params = await image_upload(request, self.config["max_upload_bytes"], ImageSearch)
        k, rerank, fusion = self._options(params)
        code = await self._encode_image(data, call)
        return await self._rank(code, k, rerank, fusion, call)

    async def _search_similar(self, image_id: str, request: Request, call: Call) -> dict:
        k = parse_k(request.query_params.get("k"), self.config)
        packed = await self._indexed_code(image_id, call)
        hits = await self._search("images", packed[None], k + 1, call)
        results = [h for h in hits if h["id"] != image_id][:k]  # exact: self removed from the top k+1
        return {"query": {"image_id": image_id}, "k": k, "rerank": "none", "results": results}

    async def _captions(self, request: Request, call: Call) -> dict:
        if not self.shards["captions"]:
            raise ApiError(404, "no_caption_index", "this deployment has no caption index")
        data, params = await image_upload(request, self.config["max_upload_bytes"], CaptionSearch)
        k = parse_k(params.get("k"), self.config)
        if data is None:  # {"image_id": ...}
            packed = await self._indexed_code(params["image_id"], call)
            hits = await self._search("captions", packed[None], k, call)
            return {"query": {"image_id": params["image_id"]}, "k": k, "results": hits}
        code = await self._encode_image(data, call)
        hits = await self._search("captions", pack_signs(code[None]), k, call)
        return {"query": {"image": "upload"}, "k": k, "results": hits}

    def _options(self, params: dict) -> tuple[int, str, str]:
        k = parse_k(params.get("k"), self.config)
        rerank = parse_choice(params.get("rerank"), RERANK_MODES, self.config["rerank"], "rerank")
        fusion = parse_choice(params.get("fusion"), FUSION_RULES, self.config["fusion"], "fusion")
        if rerank == "fusion" and not self.shards["captions"]:
            raise ApiError(422, "invalid_rerank", "fusion needs a caption index, and this deployment has none")
        return k, rerank, fusion

    async def _encode_image(self, data: bytes, call: Call) -> np.ndarray:
        with call.timer("decode"):
            pixels = await decode_in_pool(self.decoder, data, self.meta["image_size"], self.config["max_image_pixels"])
        with call.timer("encode"):
            return _finite(await self._call(self.encoder, "encode_image", call, pixels))

    async def _indexed_code(self, image_id: str, call: Call) -> np.ndarray:
        """The stored code of an indexed image: asked of the one shard group that holds it."""
        shard = stable_shard(image_id, self.meta["shard_count"]["images"])
        handle = self.shards["images"][shard // self.meta["shards_per_replica"]["images"]]
        with call.timer("lookup"):
            code = await self._call(handle, "code_of", call, image_id)
        if code is None:
            raise ApiError(404, "unknown_id", f"no indexed image has id {image_id!r}")
        return code

    # --- searching ---

    async def _rank(self, code: np.ndarray, k: int, rerank: str, fusion: str, call: Call) -> dict:
        packed = pack_signs(code[None])  # (1, bytes)
        if rerank == "none":
            results = await self._search("images", packed, k, call)
        elif rerank == "asymmetric":
            depth = max(k, self.config["rerank_depth"])
            hits = await self._search("images", packed, depth, call, with_codes=True)
            with call.timer("rerank"):
                results = asymmetric_rerank(code, hits, self.meta["bits"])[:k]
        else:
            depth = max(k, self.config["rerank_depth"])
            images, captions = await _all_or_none([self._search("images", packed, depth, call),
                                                   self._search("captions", packed, depth, call)])
            with call.timer("rerank"):
                results = fuse(images, captions, self.meta["bits"], fusion)[:k]
        return {"k": k, "rerank": rerank, "fusion": fusion if rerank == "fusion" else None, "results": results}

    async def _search(self, collection: str, packed: np.ndarray, k: int, call: Call,
                      with_codes: bool = False) -> list[dict]:
        """Scatter one query to every shard group of ``collection`` at once, merge the top-k (distance, row)."""
        start = time.perf_counter()
        answers = await _all_or_none([self._call(h, "search", call, packed, k, with_codes)
                                      for h in self.shards[collection]])
        call.timings["search"] = call.timings.get("search", 0.0) + (time.perf_counter() - start) * 1000
        with call.timer("merge"):
            return merge_hits(answers, k, self.meta["bits"], self.meta["refs"][collection], with_codes)

    async def _call(self, handle, method: str, call: Call, *args):
        """One call to another deployment within the request's budget: a lost replica or a timeout is
        retried ``shard_retries`` times, a ShardNotReady at once on whichever replica Serve picks next."""
        retries = not_ready = 0
        name = handle.deployment_name
        while True:
            remaining = call.remaining()
            if remaining <= 0:
                raise ApiError(504, "deadline_exceeded", f"{name} did not answer within the request's deadline")
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(_result(response), min(remaining, self.config["shard_timeout_s"]))
            except ShardNotReady as err:
                not_ready += 1
                self.metrics.retries.inc(1, tags={"callee": name, "reason": "not_ready"})
                if not_ready >= NOT_READY_TRIES:
                    raise ApiError(503, "shard_not_ready", str(err)) from None
                await asyncio.sleep(min(0.001 * not_ready, max(call.remaining(), 0)))  # spread over replicas' loads
            except RayTaskError:
                raise  # the replica's own code failed: not a lost replica, retrying would fail the same way
            except RETRYABLE as err:
                response.cancel()
                retries += 1
                self.metrics.retries.inc(1, tags={"callee": name, "reason": type(err).__name__})
                log.warning("%s.%s failed (attempt %d of %d): %s", name, method, retries,
                            self.config["shard_retries"] + 1, type(err).__name__)
                if retries > self.config["shard_retries"]:
                    raise ApiError(503, f"{'encoder' if handle is self.encoder else 'shard'}_unavailable",
                                   f"{name} did not answer after {retries} attempts") from None
                await asyncio.sleep(min(0.02 * retries, max(call.remaining(), 0)))  # let the handle learn of a loss

    async def _readiness(self, call: Call) -> JSONResponse:
        try:
            snapshot = await self._call(self.reports, "snapshot", call)
        except ApiError as err:
            return JSONResponse({"ready": False, "problem": f"no readiness reports: {err.message}"}, status_code=503)
        per_shard: dict[str, list[dict]] = {label: [] for c in COLLECTIONS for label in self.meta["shards"].get(c, [])}
        for replica in snapshot["replicas"]:
            for shard in replica["shards"]:
                if shard["shard"] in per_shard:
                    per_shard[shard["shard"]].append({**shard, "replica": replica["replica"]})
        shards = []
        for label, held in per_shard.items():
            ready = [r for r in held if r["ready"]]
            problems = [f"replica {r['replica']}: {r['problem']}" for r in held if not r["ready"]]
            shards.append({"shard": label, "ready": bool(ready), "replicas": len(held), "ready_replicas": len(ready),
                           "rows": ready[0]["rows"] if ready else 0,
                           "problem": "; ".join(problems) or (None if held else "no replica has reported")})
        mine = set(per_shard)
        replicas = [r for r in snapshot["replicas"] if any(s["shard"] in mine for s in r["shards"])]
        replaced = [r for r in snapshot["replaced"] if any(s["shard"] in mine for s in r["shards"])]
        ready = all(s["ready"] for s in shards)
        body = {"ready": ready, "degraded": any(not s["ready"] for r in replicas for s in r["shards"]),
                "shards": shards, "replicas": replicas, "replaced": replaced,
                "model_version": self.meta["model_version"], "index_version": self.meta["index_version"]}
        return JSONResponse(body, status_code=200 if ready else 503)
