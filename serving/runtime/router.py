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
import json
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serving.runtime.access import Gate
from serving.runtime.api import (CAPTION_BODY, EXPLAIN_BODY, IMAGE_BODY, ITEMS_BODY, RECEIVED_BODY, TEXT_BODY, ApiError,
                         CaptionSearch, ImageSearch, ReceivedSearch, TextSearch, base64_limit, check_filterable,
                         check_query, decode_in_pool, error_response, image_upload, parse_body, parse_choice,
                         parse_filter, parse_k, read_json, wants_stac)
from serving.governance.policy import SEARCH_ENDPOINTS, coarsen
from serving.governance.query_log import audit_entry, sha256_of
from serving.governance.roles import ARM_OVERRIDE
from serving.index.drift import QueryWindow
from serving.index.shards import stable_shard
from serving.model.codes import pack_signs
from serving.runtime.arms import Arm, ArmStats, Backends, garbage_code
from serving.runtime.calls import Call, all_or_none, awaited, finite
from serving.runtime.ranking import asymmetric_rerank, fuse, merge_hits
from serving.runtime.replicas import ShardNotReady
from serving.runtime.settings import FUSION_RULES, RERANK_MODES, check_hot_settings
from serving.runtime.stac import item_collection
from serving.runtime.thumbnails import ThumbnailCache
from serving.runtime.traffic import Traffic, assign, check_traffic, mirrored, overlap_at_k, rank_correlation
from serving.runtime.views import OperatorViews

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

NOT_READY_TRIES = 16  # calls that met a replica without a verified copy before answering 503
# A lost or overloaded replica: worth another try within the deadline (Serve may pick another replica).
RETRYABLE = (RayError, asyncio.TimeoutError, BackPressureError, ReplicaUnavailableError, DeploymentUnavailableError)
LATENCY_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
REPORT_PERIOD_S = 1.0
LIMITER_TIMEOUT_S = 1.0  # a rate limiter slower than this lets the request through
AUDIT_TIMEOUT_S = 2.0  # an audit writer slower than this fails the request closed (or lets it through: open)


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
        self.arm_requests = metrics.Counter("terrahash_arm_requests", description="requests per traffic arm by "
                                            "outcome (ok, a failure's reason, shadow_*)", tag_keys=("arm", "outcome"))
        self.arm_latency = metrics.Histogram("terrahash_arm_request_seconds", description="latency of an arm's answers",
                                             boundaries=list(LATENCY_BUCKETS), tag_keys=("arm",))
        self.fallbacks = metrics.Counter("terrahash_arm_fallbacks", description="requests of an arm answered by the "
                                         "primary instead", tag_keys=("arm", "reason"))
        self.shadow_overlap = metrics.Histogram("terrahash_shadow_overlap", description="overlap@k of a shadow arm's "
                                                "top-k with the client's answer", boundaries=[.1, .2, .3, .4, .5, .6,
                                                                                             .7, .8, .9, .99],
                                                tag_keys=("arm",))
        # Prometheus histogram buckets must be positive: the rank correlation rho (in [-1, 1]) is exported
        # as (1 + rho) / 2, 1 for the same order, 0 for the reverse.
        self.shadow_rank = metrics.Histogram("terrahash_shadow_rank_agreement", description="(1 + Spearman's rho) "
                                             "/ 2 of the common ids of a shadow arm's and the client's top-k",
                                             boundaries=[.1, .25, .5, .75, .9, .95, .99], tag_keys=("arm",))
        self.drift = metrics.Gauge("terrahash_query_drift", description="drift statistic D of this replica's last "
                                   "window of image query codes against the index's reference (serving/index/drift.py)",
                                   tag_keys=("arm",))
        self.drift_alarm = metrics.Gauge("terrahash_query_drift_alarm", description="1 while D is above the "
                                         "index's threshold, else 0", tag_keys=("arm",))
        self.audit_failures = metrics.Counter("terrahash_audit_failures", description="requests whose audit entry "
                                              "the audit writer did not take")

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


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): the encoder's input size, by the spec's resize rule."""
    from serving.model.encoders import decode_and_resize

    return pixels if pixels.shape[:2] == (size, size) else decode_and_resize(pixels, size)


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
class Router(OperatorViews):
    """HTTP ingress: validate, pick the arm, encode, scatter to every shard group, merge the top-k, answer."""

    def __init__(self, canary, options: dict, limiter=None, audit=None):
        """``options``: encoder_threads, decode_threads, router_encodes_text, tracking_uri, model_cache_dir,
        app_name. ``limiter``: the app's serving.governance.ratelimit.RateLimiter; ``audit``: its
        serving.governance.query_log.AuditWriter (None: no audit trail). The split, the limits and the access
        settings come with ``reconfigure``."""
        self.canary, self.options = canary, dict(options)
        self.limiter, self.audit = limiter, audit
        self.gate = Gate()
        self.backends = Backends(self.options)
        self.arms: dict[str, Arm] = {}
        self.traffic: Traffic | None = None
        self.decoder = ThreadPoolExecutor(max_workers=int(options.get("decode_threads", 2)),
                                          thread_name_prefix="decode")
        self.config = None
        self.metrics = metrics()
        self.stats = ArmStats()
        self.rng = random.Random()
        self._background: set[asyncio.Task] = set()
        self._reporter: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.thumbnails = ThumbnailCache()
        self.drift_windows: dict[tuple, QueryWindow] = {}  # (arm, index version) -> its recent image queries
        self.received = None  # serving.runtime.jscc.ReceivedDecoder of options["jscc_model"], loaded at first use

    async def reconfigure(self, config: dict) -> None:
        """Hot limits, defaults, the deadline (serving.runtime.settings.RouterConfig) and the split ("traffic",
        serving.runtime.traffic.Traffic): new arms are resolved in the background, removed ones dropped."""
        config = dict(config)
        if "traffic" not in config:
            raise ValueError("router settings: traffic: missing (the arms; see serving.runtime.serve_config.traffic)")
        traffic = check_traffic(config.pop("traffic"))
        access = config.pop("access", None)
        self.config = check_hot_settings(config)
        await self.gate.configure(access)
        self.arms = self.backends.arms(traffic.arms)
        self.traffic = traffic
        if self._reporter is None or self._reporter.done():
            self._wake = asyncio.Event()
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        self._wake.set()  # tell the canary at once which revision of the split this replica has

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

    async def probe(self, arm: str, kind: str, payload, k: int) -> list[str]:
        """One probe query of the canary controller on ``arm`` (no fallback): the top-k ids. ``kind`` "text"
        (payload: the query) or "image" (payload: the image file's bytes)."""
        call = Call(self.config["deadline_s"])
        if arm not in self.arms:
            raise KeyError(f"no arm {arm!r}")
        if kind == "text":
            run = self._text_run(payload, k, "none", "average", None)
        else:
            run = self._image_run(payload, k, "none", "average", None, observe_drift=False)  # not user traffic
        answer = await asyncio.wait_for(self._on_arm(self.arms[arm], run, call), call.remaining())
        return [hit["id"] for hit in answer["results"]]

    # --- request handling ---

    async def _timed(self, endpoint: str, request: Request, handler, wrap: bool = True):
        """Admit the request, run ``handler`` within its deadline, answer in JSON whatever happens, record it
        in the audit trail, count it by status."""
        start = time.perf_counter()
        call = Call(self.config["deadline_s"])
        try:
            response = await self._answer(endpoint, request, handler, call, wrap, start)
            response = await self._audited(endpoint, request, call, response)
        except asyncio.CancelledError:
            call.status, call.decision = 499, "cancelled"  # the client went away (nginx's code): not a server error
            self._in_background(self._audited(endpoint, request, call, None))
            raise
        finally:
            self.metrics.count(endpoint, call.status, time.perf_counter() - start)
        return response

    async def _answer(self, endpoint: str, request: Request, handler, call: Call, wrap: bool, start: float):
        try:
            try:
                call.who = self.gate.identify(request.headers, endpoint)
                await self._take_token(call)
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

    async def _take_token(self, call: Call) -> None:
        """429 with Retry-After when the caller's key is over its rate (a bucket shared by every router
        replica, serving.governance.ratelimit). A limiter that does not answer lets the request through."""
        limits = self.gate.rate(call.who)
        if limits is None or self.limiter is None:
            return
        try:
            wait = await asyncio.wait_for(awaited(self.limiter.take.remote(call.who.name, *limits)),
                                          min(LIMITER_TIMEOUT_S, max(call.remaining(), 0.001)))
        except Exception as err:  # noqa: BLE001 - rate limits are not worth refusing service over
            log.warning("the rate limiter did not answer (request let through): %s", type(err).__name__)
            return
        if wait > 0:
            raise ApiError(429, "rate_limited", f"key {call.who.name!r} is over its rate of {limits[0]:g} requests/s "
                                                f"(burst {limits[1]:g}); retry in {wait:.2f} s",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))}, decision="rate_limited")

    async def _audited(self, endpoint: str, request: Request, call: Call, response):
        """``response`` once the request's entry is in the audit writer's hands; when the writer cannot
        take it, a 503 instead (``on_failure: closed``, the default) or the answer anyway (``open``).
        Load balancers' probes (healthz, readyz) are not recorded."""
        if self.audit is None or not self.gate.config.audit or endpoint == "readyz":
            return response
        from ray.serve import get_replica_context

        entry = audit_entry(call.who, endpoint, call.query_sha256, call.answered, call.status, call.decision,
                            request_id(), get_replica_context().replica_tag)
        try:
            await asyncio.wait_for(awaited(self.audit.append.remote(entry)), AUDIT_TIMEOUT_S)
            return response
        except Exception as err:  # noqa: BLE001 - whatever keeps the entry from the writer
            self.metrics.audit_failures.inc(1)
            log.warning("the audit writer did not take the entry of request %s: %s", entry["request_id"],
                        type(err).__name__)
            if self.gate.config.on_failure == "open" or response is None:
                return response
            call.status = 503
            return error_response(503, "audit_unavailable", "the audit trail cannot record this request, so it is "
                                                            "refused (audit.on_failure: closed)")

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _admit(self, call: Call, endpoint: str, k: int, text: str | None = None) -> int:
        """The policy's decision on the query (403 naming the rule), before anything is encoded; returns
        ``k`` capped for a role with coarsened answers."""
        if call.who is None:  # a probe of the canary controller
            return k
        self.gate.check_query(call.who, endpoint, text, k)
        return min(k, self.gate.policy.coarsening.max_k) if self.gate.coarsened(call.who) else k


    async def _text_code(self, arm: Arm, text: str, call: Call) -> np.ndarray:
        if arm.backend.text is not None:
            return finite(arm.backend.text.encode([text])[0])
        return finite(await self._call(arm.backend.encoder, "encode_text", call, text))


    async def _dispatch(self, request: Request, call: Call, run) -> dict:
        """Answer with the request's arm, or with the primary when that arm fails or is too slow; mirror
        copies to the shadow arms in the background. ``run(arm, call)`` does the arm-specific work."""
        traffic = self.traffic
        primary = self.arms[traffic.primary]
        forced = request.headers.get("x-terrahash-arm") if request is not None else None
        if forced is not None:
            self.gate.require(call.who, ARM_OVERRIDE, "choose the arm (X-TerraHash-Arm)")
            if forced not in self.arms:
                raise ApiError(422, "unknown_arm", f"X-TerraHash-Arm: no arm {forced!r} (arms: {sorted(self.arms)})")
            return await self._on_arm(self.arms[forced], run, call)
        client = request.headers.get("x-client-id") if request is not None else None
        arm = self.arms[assign(traffic, client or None, self.rng)]
        answer = None
        if arm is not primary:
            start = time.perf_counter()
            reason = "not_ready"
            if arm.ready:
                try:
                    answer = await asyncio.wait_for(self._on_arm(arm, run, call),
                                                    max(min(traffic.arm_timeout_s, call.remaining()), 0.001))
                except ApiError as err:
                    if err.status < 500:
                        raise  # the client's mistake: the primary would refuse it too
                    reason = err.code
                except asyncio.TimeoutError:
                    reason = "timeout"
                except Exception as err:  # noqa: BLE001 - any failure of a challenger falls back
                    reason = type(err).__name__
                    log.warning("arm %s failed, answered by %s: %s", arm.name, primary.name, err)
            self.stats.record(arm.name, answer is not None, time.perf_counter() - start,
                              fallback=answer is None)
            self.metrics.arm_requests.inc(1, tags={"arm": arm.name, "outcome": "ok" if answer else reason})
            if answer is None:
                self.metrics.fallbacks.inc(1, tags={"arm": arm.name, "reason": reason})
                answer = await self._counted(primary, run, call)
                answer["fallback_from"] = arm.name
        else:
            answer = await self._counted(primary, run, call)
        for shadow in mirrored(traffic, self.rng):
            if shadow.name in self.arms and self.arms[shadow.name].ready:
                self._in_background(self._shadow(self.arms[shadow.name], run, answer))
        return answer

    async def _counted(self, arm: Arm, run, call: Call) -> dict:
        start = time.perf_counter()
        try:
            answer = await self._on_arm(arm, run, call)
        except BaseException as err:
            client_error = isinstance(err, ApiError) and err.status < 500
            self.stats.record(arm.name, client_error, time.perf_counter() - start)
            self.metrics.arm_requests.inc(1, tags={"arm": arm.name, "outcome": "ok" if client_error else "error"})
            raise
        seconds = time.perf_counter() - start
        self.stats.record(arm.name, True, seconds)
        self.metrics.arm_requests.inc(1, tags={"arm": arm.name, "outcome": "ok"})
        self.metrics.arm_latency.observe(seconds, tags={"arm": arm.name})
        return answer

    async def _on_arm(self, arm: Arm, run, call: Call) -> dict:
        """``run`` on one arm, with the arm's injected faults; the answer names the arm and its versions."""
        if not await arm.backend.wait_ready(call.remaining() - 0.05):
            raise ApiError(503, "arm_not_ready", f"arm {arm.name}: {arm.backend.problem}")
        fault = arm.route.fault
        if fault is not None:
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.error_rate and self.rng.random() < fault.error_rate:
                raise RuntimeError(f"fault injected into arm {arm.name}")
        answer = await run(arm, call)
        answer.update(arm.versions())
        return answer

    async def _shadow(self, arm: Arm, run, client_answer: dict) -> None:
        """A mirrored copy on a shadow arm, with its own budget; compared with the client's answer."""
        start = time.perf_counter()
        call = Call(self.traffic.shadow_timeout_s)
        try:
            answer = await asyncio.wait_for(self._on_arm(arm, run, call), self.traffic.shadow_timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - a shadow's failure is only counted
            self.stats.record(arm.name, False, time.perf_counter() - start, shadow=True)
            self.metrics.arm_requests.inc(1, tags={"arm": arm.name, "outcome": f"shadow_{type(err).__name__}"})
            return
        mine = [h["id"] for h in client_answer.get("results", [])]
        theirs = [h["id"] for h in answer.get("results", [])]
        k = int(client_answer.get("k") or len(mine) or 1)
        overlap, rank = overlap_at_k(mine, theirs, k), rank_correlation(mine, theirs)
        self.stats.record(arm.name, True, time.perf_counter() - start, shadow=True, overlap=overlap, rank=rank)
        self.metrics.arm_requests.inc(1, tags={"arm": arm.name, "outcome": "shadow_ok"})
        self.metrics.shadow_overlap.observe(overlap, tags={"arm": arm.name})
        if rank is not None:
            self.metrics.shadow_rank.observe((1 + rank) / 2, tags={"arm": arm.name})

    async def _report_loop(self) -> None:
        """Every second (and at once after a reconfigure), this replica's per-arm figures and the revision of
        the split it has, to the canary controller (a lost report is only lost)."""
        from ray.serve import get_replica_context

        replica = get_replica_context().replica_tag
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), REPORT_PERIOD_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            report = {**self.stats.drain(), "revision": self.traffic.revision}
            try:
                await asyncio.wait_for(awaited(self.canary.report.remote(replica, report)), 5.0)
            except Exception as err:  # noqa: BLE001
                log.warning("canary report failed: %s", type(err).__name__)

    # --- the endpoints' work, per arm ---

    async def _search_text(self, request: Request, call: Call) -> dict:
        body = parse_body(TextSearch, await read_json(request, self.config["max_query_chars"] * 4 + 4096))
        query = check_query(body.query, self.config)
        params = body.model_dump()
        k, rerank, fusion = self._options(params)
        call.query_sha256 = sha256_of(query)
        k = self._admit(call, "text", k, query)
        answer = await self._dispatch(request, call, self._text_run(query, k, rerank, fusion, parse_filter(params)))
        return self._formatted(request, params, answer, call=call)

    def _text_run(self, query: str, k: int, rerank: str, fusion: str, where):
        async def run(arm: Arm, call: Call) -> dict:
            with call.timer("encode"):
                code = await self._text_code(arm, query, call)  # (bits,) float32
            return await self._rank(arm, self._faulty(arm, code, query), k, rerank, fusion, call, where)
        return run

    async def _search_image(self, request: Request, call: Call) -> dict:
        data, params = await image_upload(request, self.config["max_upload_bytes"], ImageSearch)
        k, rerank, fusion = self._options(params)
        call.query_sha256 = sha256_of(data)
        k = self._admit(call, "image", k)
        answer = await self._dispatch(request, call, self._image_run(data, k, rerank, fusion, parse_filter(params)))
        return self._formatted(request, params, answer, call=call)

    def _image_run(self, data: bytes, k: int, rerank: str, fusion: str, where, observe_drift: bool = True):
        async def run(arm: Arm, call: Call) -> dict:
            code = await self._encode_image(arm, data, call)
            drift = self._observe_drift(arm, code) if observe_drift else None
            mode = rerank
            if drift is not None and drift["alarm"] and rerank == "none" and self.config["drift_fallback"] == "asymmetric":
                mode = "asymmetric"
            answer = await self._rank(arm, code, k, mode, fusion, call, where)
            if drift is not None:
                answer["drift"] = {**drift, "fallback": mode if mode != rerank else None}
            return answer
        return run

    def _observe_drift(self, arm: Arm, code: np.ndarray) -> dict | None:
        """Add an image query's code to the arm's window; D, the threshold and the alarm once it is full
        (None before, or when the index records no detector), also set as the arm's gauges."""
        recorded = arm.backend.index.get("drift")
        if not recorded:
            return None
        key = (arm.name, json.dumps(arm.backend.index.get("index_version"), sort_keys=True))
        window = self.drift_windows.get(key)
        if window is None:
            window = self.drift_windows[key] = QueryWindow(recorded)
        found = window.observe(code)
        if found is not None:
            self.metrics.drift.set(found["statistic"], tags={"arm": arm.name})
            self.metrics.drift_alarm.set(float(found["alarm"]), tags={"arm": arm.name})
        return found

    async def _search_received(self, request: Request, call: Call) -> dict:
        from serving.runtime.jscc import ReceivedDecoder, source_bits

        if not self.options.get("jscc_model"):
            raise ApiError(404, "not_configured", "this deployment decodes no radio-link symbols (serve it with "
                                                  "jscc_model: an exported link of `terrahash jscc train`)")
        if self.received is None:
            self.received = await asyncio.to_thread(ReceivedDecoder, self.options["jscc_model"])
        body = parse_body(ReceivedSearch, await read_json(request, base64_limit(self.config["max_upload_bytes"])))
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
                code = finite(await self._call(arm.backend.encoder, "encode_image", call,
                                                _resized(pixels, arm.backend.model["image_size"])))
            answer = await self._rank(arm, code, k, "none", self.config["fusion"], call)
            answer["received"] = {**link, "bit_agreement": None if source is None else
                                  float(((code >= 0).astype(np.uint8) == source).mean())}
            return answer
        return await self._dispatch(request, call, run)

    async def _search_similar(self, image_id: str, request: Request, call: Call) -> dict:
        params = dict(request.query_params)
        k, where = parse_k(params.get("k"), self.config), parse_filter(params)
        call.query_sha256 = sha256_of(image_id)
        k = self._admit(call, "similar", k)

        async def run(arm: Arm, call: Call) -> dict:
            packed = await self._indexed_code(arm, image_id, call)
            hits = await self._search(arm, "images", packed[None], k + 1, call, where=where)
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
                packed = await self._indexed_code(arm, params["image_id"], call)
                hits = await self._search(arm, "captions", packed[None], k, call, where=where)
                return {"query": {"image_id": params["image_id"]}, "k": k, "results": hits}
            code = await self._encode_image(arm, data, call)
            hits = await self._search(arm, "captions", pack_signs(code[None]), k, call, where=where)
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

    def _options(self, params: dict) -> tuple[int, str, str]:
        k = parse_k(params.get("k"), self.config)
        rerank = parse_choice(params.get("rerank"), RERANK_MODES, self.config["rerank"], "rerank")
        fusion = parse_choice(params.get("fusion"), FUSION_RULES, self.config["fusion"], "fusion")
        return k, rerank, fusion

    def _faulty(self, arm: Arm, code: np.ndarray, seed_text: str) -> np.ndarray:
        fault = arm.route.fault
        return garbage_code(code.shape[-1], seed_text) if fault is not None and fault.garbage else code

    async def _encode_image(self, arm: Arm, data: bytes, call: Call) -> np.ndarray:
        with call.timer("decode"):
            pixels = await decode_in_pool(self.decoder, data, arm.backend.model["image_size"],
                                          self.config["max_image_pixels"])
        with call.timer("encode"):
            code = finite(await self._call(arm.backend.encoder, "encode_image", call, pixels))
        return self._faulty(arm, code, str(len(data)) + str(data[-64:]))

    async def _indexed_code(self, arm: Arm, image_id: str, call: Call) -> np.ndarray:
        """The stored code of an indexed image."""
        return await self._ask_holder(arm, "code_of", image_id, call)

    async def _ask_holder(self, arm: Arm, method: str, image_id: str, call: Call):
        """``method(image_id)`` of the one shard group that holds the image; 404 when it does not know it."""
        index = arm.backend.index
        shard = stable_shard(image_id, index["shard_count"]["images"])
        handle = arm.backend.shards["images"][shard // index["shards_per_replica"]["images"]]
        with call.timer("lookup"):
            found = await self._call(handle, method, call, image_id)
        if found is None:
            raise ApiError(404, "unknown_id", f"no indexed image has id {image_id!r}")
        return found

    # --- searching ---

    async def _rank(self, arm: Arm, code: np.ndarray, k: int, rerank: str, fusion: str, call: Call,
                    where=None) -> dict:
        packed = pack_signs(code[None])  # (1, bytes)
        bits = arm.backend.index["bits"]
        if rerank == "none":
            results = await self._search(arm, "images", packed, k, call, where=where)
        elif rerank == "asymmetric":
            depth = max(k, self.config["rerank_depth"])
            hits = await self._search(arm, "images", packed, depth, call, with_codes=True, where=where)
            with call.timer("rerank"):
                results = asymmetric_rerank(code, hits, bits)[:k]
        else:
            if not arm.backend.shards["captions"]:
                raise ApiError(422, "invalid_rerank", "fusion needs a caption index, and this deployment has none")
            depth = max(k, self.config["rerank_depth"])
            images, captions = await all_or_none([self._search(arm, "images", packed, depth, call, where=where),
                                                   self._search(arm, "captions", packed, depth, call, where=where)])
            with call.timer("rerank"):
                results = fuse(images, captions, bits, fusion)[:k]
        return {"k": k, "rerank": rerank, "fusion": fusion if rerank == "fusion" else None, "results": results}

    async def _search(self, arm: Arm, collection: str, packed: np.ndarray, k: int, call: Call,
                      with_codes: bool = False, where=None) -> list[dict]:
        """Scatter one query to every shard group of ``collection`` at once, merge the top-k (distance, row);
        with ``where`` (serving.index.items.ItemFilter), the top-k among the items that pass it."""
        check_filterable(arm.backend.index, where)
        start = time.perf_counter()
        args = (packed, k, with_codes) + ((where,) if where is not None else ())  # unfiltered: the old call
        answers = await all_or_none([self._call(h, "search", call, *args) for h in arm.backend.shards[collection]])
        call.timings["search"] = call.timings.get("search", 0.0) + (time.perf_counter() - start) * 1000
        with call.timer("merge"):
            return merge_hits(answers, k, arm.backend.index["bits"], arm.backend.index["refs"][collection], with_codes)

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
                return await asyncio.wait_for(awaited(response), min(remaining, self.config["shard_timeout_s"]))
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
                    raise ApiError(503, f"{'encoder' if name == 'QueryEncoder' else 'shard'}_unavailable",
                                   f"{name} did not answer after {retries} attempts") from None
                await asyncio.sleep(min(0.02 * retries, max(call.remaining(), 0)))  # let the handle learn of a loss
