"""The router: the app's FastAPI ingress. It validates, picks the traffic arm, encodes, scatters to every
shard group of the arm's index, merges, answers.

Each request is answered by one arm (serving/runtime/traffic.py: sticky per ``X-Client-Id``, forced by
``X-TerraHash-Arm``); the answer says which (``"arm"`` and the ``X-TerraHash-Arm`` header) with its
model and index versions. A non-primary arm that fails (5xx, an exception) or exceeds ``arm_timeout_s``
is answered by the primary within the same deadline (``"fallback_from"``). Shadow arms get copies in
the background, compared with the client's answer. Per-arm figures go to Ray's metrics and, every
second, to the canary controller (serving/lifecycle/canary.py).

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
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from serving.governance.policy import SEARCH_ENDPOINTS, coarsen
from serving.governance.query_log import AuditBuffer, audit_entry, sha256_of
from serving.governance.roles import ARM_OVERRIDE
from serving.model.codes import pack_signs
from serving.runtime.access import Gate
from serving.runtime.api import (CAPTION_BODY, EXPLAIN_BODY, IMAGE_BODY, ITEMS_BODY, RECEIVED_BODY, TEXT_BODY,
                                 CaptionSearch, ImageSearch, ReceivedSearch, TextSearch, error_response, image_upload,
                                 parse_body, read_json, wants_stac)
from serving.runtime.checks import ApiError, base64_limit, check_query, parse_filter, parse_k, parse_options
from serving.runtime.arms import Arm, Backends
from serving.runtime.calls import Call, finite
from serving.runtime.dispatch import ArmDispatcher
from serving.runtime.metrics import metrics
from serving.runtime.openapi_docs import install as install_openapi_docs
from serving.runtime.search import SearchPipeline
from serving.runtime.settings import check_hot_settings
from serving.runtime.stac import item_collection
from serving.runtime.stac_api import ITEMS_FIELDS, SEARCH_FIELDS, openapi_body, openapi_query
from serving.runtime.stac_views import StacViews
from serving.runtime.thumbnails import ThumbnailCache
from serving.runtime.traffic import Traffic, check_traffic
from serving.runtime.views import OperatorViews

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file



def request_id() -> str:
    """Serve's id of the current request (also its X-Request-ID response header)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or "unknown"


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): the encoder's input size, by the spec's resize rule."""
    from serving.model.encoders import decode_and_resize

    return pixels if pixels.shape[:2] == (size, size) else decode_and_resize(pixels, size)


api = FastAPI(title="TerraHash search", version="1",
              description="Text to image, image to image and image to text search over binary hash codes. "
                          'Errors are JSON: {"error": {"code", "message"}}; a 500 also carries "request_id".')
install_openapi_docs(api)  # permissions, examples, errors and headers of every route (serving/runtime/openapi_docs.py)


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


# Serve lets more in than max_inflight (a hot setting), so that an overloaded replica answers a JSON 503 at once
@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(api)
class Router(OperatorViews, StacViews):
    """HTTP ingress: validate, pick the arm, encode, scatter to every shard group, merge the top-k, answer."""

    def __init__(self, canary, options: dict, limiter=None, audit=None):
        """``options``: encoder_threads, decode_threads, router_encodes_text, tracking_uri, model_cache_dir,
        app_name. ``limiter``: the app's serving.governance.ratelimit.RateLimiter; ``audit``: its
        serving.governance.query_log.AuditWriter (None: no audit trail). The split, the limits and the access
        settings come with ``reconfigure``."""
        self.canary, self.options = canary, dict(options)
        self.limiter = limiter
        self.audit = None if audit is None else AuditBuffer(audit)  # entries handed to the writer in batches
        self.gate = Gate()
        # in-process encoding and searching (co-located, or the router's text student), off the event loop
        self.pool = ThreadPoolExecutor(max_workers=int(options.get("router_threads", 4)), thread_name_prefix="local")
        self.backends = Backends(self.options, self.pool)
        self.decoder = ThreadPoolExecutor(max_workers=int(options.get("decode_threads", 2)),
                                          thread_name_prefix="decode")
        self.config = None
        self.metrics = metrics()
        self.pipeline = SearchPipeline(self.metrics, self.decoder)
        self.dispatcher = ArmDispatcher(self.metrics)
        self.thumbnails = ThumbnailCache()
        self.stac_extents: dict[tuple, dict] = {}  # (arm, index version) -> its items' extent (STAC collections)
        self.received = None  # serving.runtime.jscc.ReceivedDecoder of options["jscc_model"], loaded at first use
        self.code_receiver = None  # serving.runtime.code_received.CodeReceiver of options["code_link_model"]
        self.inflight = 0  # requests this replica is answering now

    @property
    def arms(self) -> dict[str, Arm]:
        return self.dispatcher.arms

    @property
    def traffic(self) -> Traffic | None:
        return self.dispatcher.traffic

    async def reconfigure(self, config: dict) -> None:
        """Hot limits, defaults, the deadline (serving.runtime.settings.RouterConfig) and the split ("traffic",
        serving.runtime.traffic.Traffic): new arms are resolved in the background, removed ones dropped."""
        config = dict(config)
        if "traffic" not in config:
            raise ValueError("router settings: traffic: missing (the arms; see serving.runtime.serve_config.traffic)")
        traffic = check_traffic(config.pop("traffic"))
        access = config.pop("access", None)
        self.config = check_hot_settings(config)
        self.pipeline.configure(self.config)
        await self.gate.configure(access)
        self.dispatcher.arms = self.backends.arms(traffic.arms)
        self.dispatcher.traffic = traffic
        from ray.serve import get_replica_context

        # tells the canary at once which revision of the split this replica has
        self.dispatcher.start_reports(self.canary, get_replica_context().replica_tag)

    async def __del__(self):
        """Serve's graceful shutdown: the audit entries still waiting go to the writer."""
        if getattr(self, "audit", None) is not None:
            await self.audit.hand_over()

    async def check_health(self) -> None:
        """Serve's health check: fails while a shard group held here has a bad node-local copy (Serve then
        replaces this replica, and the new one fetches the copy again)."""
        bad = [g for g in self.backends.local_groups() if not g.healthy]
        if bad:
            raise RuntimeError("; ".join(p for g in bad for p in g.problems.values()))

    async def arm_model(self, arm: str) -> dict:
        """What the arm's encoder serves (serving.runtime.local.described), {} while it is not resolved."""
        found = self.arms.get(arm)
        return dict(found.backend.model) if found is not None and found.ready else {}

    # --- endpoints ---

    @api.get("/v1/healthz")
    async def healthz(self):
        """Liveness: the router answers."""
        return {"status": "ok"}

    @api.get("/v1/readyz")
    async def readyz(self, request: Request):
        """Readiness: every live arm's backend is resolved and every shard of its index is held, verified,
        by at least one replica (503 when a live arm or a shard is not ready). The status is open to
        anyone; the details (every shard replica's own report, the reasons of recent replacements, each
        arm's state) need permission ``ready_details`` when auth is on."""
        return await self._timed("readyz", request, lambda request, call: self._readiness(call), wrap=False)

    @api.get("/v1/traffic")
    async def traffic_status(self, request: Request):
        """The split and, per arm, its share, requests, errors, latency, probe and shadow figures and verdict."""
        return await self._timed("traffic", request, lambda request, call: self._traffic_status(call), wrap=False)

    @api.get("/v1/keys")
    async def keys(self, request: Request):
        """The API keys (names, roles, ids, creation and revocation times; never a key or its hash)."""
        return await self._timed("keys", request, lambda request, call: self._keys(), wrap=False)

    @api.post("/v1/search/text", openapi_extra=TEXT_BODY)
    async def search_text(self, request: Request):
        """Text to image: a JSON body {"query", "k", "rerank", "fusion"}."""
        return await self._timed("text", request, self._search_text)

    @api.post("/v1/search/image", openapi_extra=IMAGE_BODY)
    async def search_image(self, request: Request):
        """Image to image: multipart (file field "image", fields k, rerank, fusion), JSON
        {"image_base64", "k", ...}, or a raw image/* body (k etc. in the query string)."""
        return await self._timed("image", request, self._search_image)

    @api.post("/v1/search/received", openapi_extra=RECEIVED_BODY)
    async def search_received(self, request: Request):
        """An image sent over a radio link: the last hop's DeepJSCC symbols (JSON {"symbols", "snr_db",
        "model_version", "source_hash", "k"}), decoded by the deployment's link and searched as an image."""
        return await self._timed("received", request, self._search_received)

    @api.get("/v1/search/similar/{image_id:path}")
    async def search_similar(self, image_id: str, request: Request, k: str | None = None):
        """Images most similar to an indexed image (itself left out); ``k`` in the query string."""
        return await self._timed("similar", request, lambda r, call: self._search_similar(image_id, r, call))

    @api.post("/v1/captions", openapi_extra=CAPTION_BODY)
    async def captions(self, request: Request):
        """Image to text: rank the indexed captions for an uploaded image or {"image_id": ...} (JSON)."""
        return await self._timed("captions", request, self._captions)

    @api.post("/v1/search/items", openapi_extra=ITEMS_BODY)
    async def search_items(self, request: Request):
        """The indexed items in a box and interval (JSON {"bbox", "datetime", "limit", "token", "format"}),
        ordered by id, a page at a time: "next" is the token of the next page, "matched" counts them all."""
        return await self._timed("items", request, self._search_items)

    @api.get("/v1/items/{item_id:path}/thumbnail")
    async def thumbnail(self, item_id: str, request: Request):
        """A small JPEG of an indexed image (made from the archive on first request, then cached)."""
        return await self._timed("thumbnail", request, lambda request, call: self._thumbnail(item_id, call),
                                 wrap=False)

    @api.post("/v1/explain", openapi_extra=EXPLAIN_BODY)
    async def explain(self, request: Request):
        """Why ``result_id`` answers a query: the occlusion map of the result image (which cells, masked,
        move its code furthest from the query's: Hamming and cosine changes per cell, the strongest cell,
        a PNG overlay) and, for a text query, the bits each word's removal flips."""
        return await self._timed("explain", request, self._explain)

    @api.get("/v1/models/{version:path}/card")
    async def model_card(self, version: str, request: Request):
        """The model card of a served model version: JSON, or Markdown with ``Accept: text/markdown``.
        ``version`` is the ``model_version`` answers carry, ``NAME/VERSION`` of a registered one, or an arm."""
        return await self._timed("card", request, lambda request, call: self._card(version, request, call),
                                 wrap=False)

    # --- STAC API (serving/runtime/stac_views.py, stac_api.py) ---

    @api.get("/v1")
    async def stac_landing(self, request: Request):
        """STAC API landing page: a Catalog with conformsTo and links to conformance, collections and search."""
        return await self._timed("stac_landing", request, self._stac_landing)

    @api.get("/v1/conformance")
    async def stac_conformance(self, request: Request):
        """The STAC API and OGC API Features conformance classes served."""
        return await self._timed("stac_conformance", request, self._stac_conformance)

    @api.get("/v1/collections")
    async def stac_collections(self, request: Request):
        """The STAC collections: one, the served image index, with its items' extent."""
        return await self._timed("stac_collections", request, self._stac_collections)

    @api.get("/v1/collections/{collection_id}")
    async def stac_collection(self, collection_id: str, request: Request):
        """One STAC collection."""
        return await self._timed("stac_collections", request,
                                 lambda request, call: self._stac_collections(request, call, collection_id))

    @api.get("/v1/collections/{collection_id}/items", openapi_extra=openapi_query(ITEMS_FIELDS))
    async def stac_items(self, collection_id: str, request: Request):
        """The collection's items in a box and interval, by id, a page at a time (a STAC ItemCollection)."""
        return await self._timed("stac_items", request,
                                 lambda request, call: self._stac_items(collection_id, request, call))

    @api.get("/v1/collections/{collection_id}/items/{item_id:path}")
    async def stac_item(self, collection_id: str, item_id: str, request: Request):
        """One item as a STAC Item."""
        return await self._timed("stac_item", request,
                                 lambda request, call: self._stac_item(collection_id, item_id, request, call))

    @api.get("/v1/search", openapi_extra=openapi_query(SEARCH_FIELDS))
    async def stac_search_get(self, request: Request):
        """STAC item search: bbox, datetime, ids, collections, limit, token; q ranks by text (free-text)."""
        return await self._timed("stac_search", request, self._stac_search)

    @api.post("/v1/search", openapi_extra=openapi_body(SEARCH_FIELDS))
    async def stac_search_post(self, request: Request):
        """STAC item search with a JSON body (the GET parameters, arrays as JSON arrays)."""
        return await self._timed("stac_search", request, self._stac_search)

    async def probe(self, arm: str, kind: str, payload, k: int) -> list[str]:
        """One probe query of the canary controller on ``arm`` (no fallback): the top-k ids. ``kind`` "text"
        (payload: the query) or "image" (payload: the image file's bytes)."""
        call = Call(self.config["deadline_s"])
        if arm not in self.arms:
            raise KeyError(f"no arm {arm!r}")
        if kind == "text":
            run = self.pipeline.text_run(payload, k, "none", "average", None)
        else:
            run = self.pipeline.image_run(payload, k, "none", "average", None, observe_drift=False)  # not user traffic
        answer = await asyncio.wait_for(self.dispatcher.on_arm(self.arms[arm], run, call), call.remaining())
        return [hit["id"] for hit in answer["results"]]

    # --- request handling ---

    async def _timed(self, endpoint: str, request: Request, handler, wrap: bool = True):
        """Admit the request, run ``handler`` within its deadline, answer in JSON whatever happens, record it
        in the audit trail, count it by status."""
        start = time.perf_counter()
        call = Call(self.config["deadline_s"])
        self.inflight += 1
        try:
            if self.inflight > self.config["max_inflight"] and endpoint not in ("healthz", "readyz"):
                call.status, call.decision = 503, "overloaded"  # at once, not after queueing for seconds
                response = error_response(503, "overloaded", f"this replica has {self.config['max_inflight']} "
                                          "requests in flight; retry shortly", headers={"Retry-After": "1"})
            else:
                response = await self._answer(endpoint, request, handler, call, wrap, start)
            response = await self._audited(endpoint, request, call, response)
        except asyncio.CancelledError:
            call.status, call.decision = 499, "cancelled"  # the client went away (nginx's code): not a server error
            self.dispatcher.in_background(self._audited(endpoint, request, call, None))
            raise
        finally:
            self.inflight -= 1
            self.metrics.count(endpoint, call.status, time.perf_counter() - start)
        return response

    async def _answer(self, endpoint: str, request: Request, handler, call: Call, wrap: bool, start: float):
        try:
            try:
                call.who = self.gate.identify(request.headers, endpoint)
                await self.gate.take_token(self.limiter, call)
                answer = await asyncio.wait_for(handler(request, call), timeout=max(call.remaining(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(504, "deadline_exceeded",
                               f"the request did not finish within its deadline of {self.config['deadline_s']} s") from None
            call.decision = "allowed"
            if isinstance(answer, Response):
                call.status = answer.status_code
                return answer
            call.answered = {"results": len(answer.get("results", [])),
                             **{k: answer.get(k) for k in ("arm", "model_version", "index_version")}}
            headers = {}
            if endpoint in SEARCH_ENDPOINTS and self.gate.coarsened(call.who):
                answer = coarsen(answer, self.gate.policy.coarsening)
            elif wrap:
                total = (time.perf_counter() - start) * 1000
                answer.update({"latency_ms": round(total, 3),
                               "timings_ms": {k: round(v, 3) for k, v in call.timings.items()}})
                headers["X-TerraHash-Arm"] = answer["arm"]
            call.status = 200
            return JSONResponse(answer, headers=headers)
        except ApiError as err:
            call.status = err.status
            call.decision = err.decision or ("rejected" if err.status < 500 else "error")
            if err.status >= 500:
                log.warning("%s: %s", endpoint, err.message)
            return error_response(err.status, err.code, err.message, headers=err.headers)
        except Exception:
            rid = request_id()
            log.exception("%s: unexpected error in request %s", endpoint, rid)
            call.status = 500
            return error_response(500, "internal_error", f"the server failed on this request; quote request id "
                                                         f"{rid} when reporting it", rid)

    async def _audited(self, endpoint: str, request: Request, call: Call, response):
        """``response`` once the request's entry is in the audit writer's hands (serving.runtime.access.Gate.audited).
        Load balancers' probes (healthz, readyz) are not recorded."""
        if self.audit is None or not self.gate.config.audit or endpoint == "readyz":
            return response
        from ray.serve import get_replica_context

        entry = audit_entry(call.who, endpoint, call.query_sha256, call.answered, call.status, call.decision,
                            request_id(), get_replica_context().replica_tag)
        return await self.gate.audited(self.audit, entry, call, response, self.metrics.audit_failures)

    def _admit(self, call: Call, endpoint: str, k: int, text: str | None = None) -> int:
        """The policy's decision on the query (403 naming the rule), before anything is encoded; returns
        ``k`` capped for a role with coarsened answers."""
        if call.who is None:  # a probe of the canary controller
            return k
        self.gate.check_query(call.who, endpoint, text, k)
        return min(k, self.gate.policy.coarsening.max_k) if self.gate.coarsened(call.who) else k

    async def _dispatch(self, request: Request, call: Call, run, sticky: str | None = None) -> dict:
        """``run`` on the request's arm (serving.runtime.dispatch): sticky per ``X-Client-Id`` (else per
        ``sticky``, so that every page of one search meets the same arm), or the one ``X-TerraHash-Arm``
        names, which needs permission ``arm_override``."""
        forced = request.headers.get("x-terrahash-arm") if request is not None else None
        if forced is not None:
            self.gate.require(call.who, ARM_OVERRIDE, "choose the arm (X-TerraHash-Arm)")
        client = request.headers.get("x-client-id") if request is not None else None
        return await self.dispatcher.dispatch(call, run, forced, client or sticky)

    # --- the endpoints' work, per arm ---

    async def _search_text(self, request: Request, call: Call) -> dict:
        body = parse_body(TextSearch, await read_json(request, self.config["max_query_chars"] * 4 + 4096))
        params = body.model_dump()
        return self._formatted(request, params, await self._ranked_text(request, call, params), call=call)

    async def _ranked_text(self, request: Request, call: Call, params: dict, sticky: str | None = None) -> dict:
        """The answer of /v1/search/text to ``params`` (TextSearch's fields) on the request's arm."""
        query = check_query(params["query"], self.config)
        k, rerank, fusion = parse_options(params, self.config)
        call.query_sha256 = sha256_of(query)
        k = self._admit(call, "text", k, query)
        run = self.pipeline.text_run(query, k, rerank, fusion, parse_filter(params))
        return await self._dispatch(request, call, run, sticky)

    async def _search_image(self, request: Request, call: Call) -> dict:
        data, params = await image_upload(request, self.config["max_upload_bytes"], ImageSearch)
        k, rerank, fusion = parse_options(params, self.config)
        call.query_sha256 = sha256_of(data)
        k = self._admit(call, "image", k)
        answer = await self._dispatch(request, call, self.pipeline.image_run(data, k, rerank, fusion, parse_filter(params)))
        return self._formatted(request, params, answer, call=call)

    async def _search_received(self, request: Request, call: Call) -> dict:
        from serving.runtime.jscc import ReceivedDecoder, source_bits

        body = parse_body(ReceivedSearch, await read_json(request, base64_limit(self.config["max_upload_bytes"])))
        if body.link is not None:
            return await self._search_code_received(request, call, body)
        if not self.options.get("jscc_model"):
            raise ApiError(404, "not_configured", "this deployment decodes no radio-link images (serve it with "
                                                  "jscc_model: an exported link of `terrahash jscc train`)")
        if body.model_version is None:
            raise ApiError(422, "missing_model_version", "the body needs 'model_version' (the pixel link's decoder) "
                                                         "or 'link' (a code link)")
        if self.received is None:
            self.received = await asyncio.to_thread(ReceivedDecoder, self.options["jscc_model"])
        symbols = self.received.symbols(body.symbols, body.model_version)
        k = parse_k(body.k, self.config)
        call.query_sha256 = sha256_of(body.symbols)
        k = self._admit(call, "received", k)
        with call.timer("jscc_decode"):
            pixels = await asyncio.get_running_loop().run_in_executor(self.decoder, self.received.image, symbols,
                                                                      body.snr_db)
        link = {**self.received.describe(), "snr_db_received": body.snr_db, "hops_received": body.hops}

        async def run(arm: Arm, call: Call) -> dict:
            source = source_bits(body.source_hash, arm.backend.index["bits"])
            with call.timer("encode"):
                code = finite(await self.pipeline.remote(arm.backend.encoder, "encode_image", call,
                                                _resized(pixels, arm.backend.model["image_size"])))
            answer = await self.pipeline.rank(arm, code, k, "none", self.config["fusion"], call)
            answer["received"] = {**link, "bit_agreement": None if source is None else
                                  float(((code >= 0).astype(np.uint8) == source).mean())}
            return answer
        return await self._dispatch(request, call, run)

    async def _search_code_received(self, request: Request, call: Call, body: ReceivedSearch) -> dict:
        """A hash code received over a code link: decoded (serving/runtime/code_received.py), then ranked."""
        from serving.runtime.code_received import CodeReceiver
        from serving.runtime.jscc import source_bits

        if self.code_receiver is None:
            self.code_receiver = CodeReceiver(self.options.get("code_link_model"))
        k = parse_k(body.k, self.config)
        call.query_sha256 = sha256_of(body.symbols)
        k = self._admit(call, "received", k)

        async def run(arm: Arm, call: Call) -> dict:
            bits = arm.backend.index["bits"]
            source = source_bits(body.source_hash, bits)
            with call.timer("link_decode"):
                soft, link = await asyncio.get_running_loop().run_in_executor(
                    self.decoder, self.code_receiver.decode, body.link, body.symbols, body.snr_db, bits,
                    arm.backend.model.get("code_space"))
            answer = await self.pipeline.rank(arm, soft, k, body.rerank or "none", self.config["fusion"], call)
            answer["received"] = {**link, "code_space": body.link.code_space, "snr_db_received": body.snr_db,
                                  "hops_received": body.hops, "bit_agreement": None if source is None else
                                  float(((soft >= 0).astype(np.uint8) == source).mean())}
            return answer
        return await self._dispatch(request, call, run)

    async def _search_similar(self, image_id: str, request: Request, call: Call) -> dict:
        params = dict(request.query_params)
        k, where = parse_k(params.get("k"), self.config), parse_filter(params)
        call.query_sha256 = sha256_of(image_id)
        k = self._admit(call, "similar", k)

        async def run(arm: Arm, call: Call) -> dict:
            packed = await self.pipeline.indexed_code(arm, image_id, call)
            hits = await self.pipeline.search(arm, "images", packed[None], k + 1, call, where=where)
            results = [h for h in hits if h["id"] != image_id][:k]  # exact: self removed from the top k+1
            return {"query": {"image_id": image_id}, "k": k, "rerank": "none", "results": results}
        return self._formatted(request, params, await self._dispatch(request, call, run), call=call)

    async def _captions(self, request: Request, call: Call) -> dict:
        data, params = await image_upload(request, self.config["max_upload_bytes"], CaptionSearch)
        k, where = parse_k(params.get("k"), self.config), parse_filter(params)
        call.query_sha256 = sha256_of(data if data is not None else params.get("image_id") or "")
        k = self._admit(call, "captions", k)

        async def run(arm: Arm, call: Call) -> dict:
            if not arm.backend.shards["captions"]:
                raise ApiError(404, "no_caption_index", "this deployment has no caption index")
            if data is None:  # {"image_id": ...}
                packed = await self.pipeline.indexed_code(arm, params["image_id"], call)
                hits = await self.pipeline.search(arm, "captions", packed[None], k, call, where=where)
                return {"query": {"image_id": params["image_id"]}, "k": k, "results": hits}
            code = await self.pipeline.encode_image(arm, data, call)
            hits = await self.pipeline.search(arm, "captions", pack_signs(code[None]), k, call, where=where)
            return {"query": {"image": "upload"}, "k": k, "results": hits}
        return await self._dispatch(request, call, run)


    def _formatted(self, request: Request, params: dict, answer: dict, next_body: dict | None = None,
                   call: Call | None = None) -> dict:
        """The answer as asked: as it is, or as a STAC ItemCollection (format "stac" or Accept GeoJSON)."""
        if not wants_stac(request, params):
            return answer
        if call is not None and call.who is not None and self.gate.coarsened(call.who):
            raise ApiError(403, "forbidden", f"role {call.who.role!r} gets coarsened JSON answers; STAC items, "
                                             f"which link the images, are not available to it", decision="forbidden")
        return item_collection(answer, str(request.base_url), next_body)

    # --- searching ---



