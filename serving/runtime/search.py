"""The search pipeline: one query on one traffic arm, from its code to the merged top-k.

Encode (the arm's text student in process, or its query encoder deployment), fan out to every shard group
of the arm's index at once, merge the exact top-k (distance, then row), re-rank (asymmetric distances, or
late fusion with the caption index), filter by place and time. Every call to another deployment runs
inside the request's one budget (serving.runtime.calls.Call): a lost replica or a timeout is retried
``shard_retries`` times, a ``ShardNotReady`` at once on whichever replica Serve picks next.

A plain object over asyncio: the router (serving/runtime/router.py) holds one, and a test drives it with
stand-in deployment handles, without FastAPI or Serve.
"""
import asyncio
import json
import logging
import time
from concurrent.futures import Executor

import numpy as np
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serving.index.drift import QueryWindow
from serving.index.shards import stable_shard
from serving.model.codes import pack_signs
from serving.runtime.api import decode_in_pool
from serving.runtime.checks import ApiError, check_filterable
from serving.runtime.arms import Arm, garbage_code
from serving.runtime.calls import Call, all_or_none, awaited, finite
from serving.runtime.ranking import asymmetric_rerank, fuse, merge_hits, public_hit
from serving.runtime.replicas import ShardNotReady

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

NOT_READY_TRIES = 16  # calls that met a replica without a verified copy before answering 503
# A lost or overloaded replica: worth another try within the deadline (Serve may pick another replica).
RETRYABLE = (RayError, asyncio.TimeoutError, BackPressureError, ReplicaUnavailableError, DeploymentUnavailableError)


class SearchPipeline:
    """Encode, fan out, merge, re-rank and filter one query on one arm (see the module docstring)."""

    def __init__(self, metrics, decoder: Executor):
        """``metrics``: the router's serving.runtime.metrics.RouterMetrics (retries, drift gauges);
        ``decoder``: the thread pool uploads are decoded in. The hot settings come with ``configure``."""
        self.metrics, self.decoder = metrics, decoder
        self.config: dict | None = None
        self.drift_windows: dict[tuple, QueryWindow] = {}  # (arm, index version) -> its recent image queries

    def configure(self, config: dict) -> None:
        """The router's checked hot settings (serving.runtime.settings.RouterConfig): k, depths, timeouts."""
        self.config = config

    async def text_code(self, arm: Arm, text: str, call: Call) -> np.ndarray:
        """The query's code: by the router's own text student (in its pool) or the arm's encoder."""
        return finite(await self.remote(arm.backend.text or arm.backend.encoder, "encode_text", call, text))

    def text_run(self, query: str, k: int, rerank: str, fusion: str, where):
        async def run(arm: Arm, call: Call) -> dict:
            with call.timer("encode"):
                code = await self.text_code(arm, query, call)  # (bits,) float32
            return await self.rank(arm, self.faulty(arm, code, query), k, rerank, fusion, call, where)
        return run

    def image_run(self, data: bytes, k: int, rerank: str, fusion: str, where, observe_drift: bool = True):
        async def run(arm: Arm, call: Call) -> dict:
            code = await self.encode_image(arm, data, call)
            drift = self.observe_drift(arm, code) if observe_drift else None
            mode = rerank
            if drift is not None and drift["alarm"] and rerank == "none" and self.config["drift_fallback"] == "asymmetric":
                mode = "asymmetric"
            answer = await self.rank(arm, code, k, mode, fusion, call, where)
            if drift is not None:
                answer["drift"] = {**drift, "fallback": mode if mode != rerank else None}
            return answer
        return run

    def observe_drift(self, arm: Arm, code: np.ndarray) -> dict | None:
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

    def faulty(self, arm: Arm, code: np.ndarray, seed_text: str) -> np.ndarray:
        fault = arm.route.fault
        return garbage_code(code.shape[-1], seed_text) if fault is not None and fault.garbage else code

    async def encode_image(self, arm: Arm, data: bytes, call: Call) -> np.ndarray:
        with call.timer("decode"):
            pixels = await decode_in_pool(self.decoder, data, arm.backend.model["image_size"],
                                          self.config["max_image_pixels"])
        with call.timer("encode"):
            code = finite(await self.remote(arm.backend.encoder, "encode_image", call, pixels))
        return self.faulty(arm, code, str(len(data)) + str(data[-64:]))

    async def indexed_code(self, arm: Arm, image_id: str, call: Call) -> np.ndarray:
        """The stored code of an indexed image."""
        return await self.ask_holder(arm, "code_of", image_id, call)

    async def ask_holder(self, arm: Arm, method: str, image_id: str, call: Call):
        """``method(image_id)`` of the one shard group that holds the image; 404 when it does not know it."""
        index = arm.backend.index
        shard = stable_shard(image_id, index["shard_count"]["images"])
        handle = arm.backend.shards["images"][shard // index["shards_per_replica"]["images"]]
        with call.timer("lookup"):
            found = await self.remote(handle, method, call, image_id)
        if found is None:
            raise ApiError(404, "unknown_id", f"no indexed image has id {image_id!r}")
        return found

    async def rank(self, arm: Arm, code: np.ndarray, k: int, rerank: str, fusion: str, call: Call,
                    where=None) -> dict:
        packed = pack_signs(code[None])  # (1, bytes)
        bits = arm.backend.index["bits"]
        if rerank == "none":
            results = await self.search(arm, "images", packed, k, call, where=where)
        elif rerank == "asymmetric":
            depth = max(k, self.config["rerank_depth"])
            hits = await self.search(arm, "images", packed, depth, call, with_codes=True, where=where)
            with call.timer("rerank"):
                results = asymmetric_rerank(code, hits, bits)[:k]
        else:
            if not arm.backend.shards["captions"]:
                raise ApiError(422, "invalid_rerank", "fusion needs a caption index, and this deployment has none")
            depth = max(k, self.config["rerank_depth"])
            images, captions = await all_or_none([self.search(arm, "images", packed, depth, call, where=where),
                                                   self.search(arm, "captions", packed, depth, call, where=where)])
            with call.timer("rerank"):
                results = fuse(images, captions, bits, fusion)[:k]
        return {"k": k, "rerank": rerank, "fusion": fusion if rerank == "fusion" else None, "results": results}

    async def search(self, arm: Arm, collection: str, packed: np.ndarray, k: int, call: Call,
                      with_codes: bool = False, where=None) -> list[dict]:
        """Scatter one query to every shard group of ``collection`` at once, merge the top-k (distance, row);
        with ``where`` (serving.index.items.ItemFilter), the top-k among the items that pass it."""
        check_filterable(arm.backend.index, where)
        start = time.perf_counter()
        args = (packed, k, with_codes) + ((where,) if where is not None else ())  # unfiltered: the old call
        answers = await all_or_none([self.remote(h, "search", call, *args) for h in arm.backend.shards[collection]])
        call.timings["search"] = call.timings.get("search", 0.0) + (time.perf_counter() - start) * 1000
        with call.timer("merge"):
            hits = merge_hits(answers, k, arm.backend.index["bits"], arm.backend.index["refs"][collection], with_codes)
        return [public_hit(hit) for hit in hits]

    async def remote(self, handle, method: str, call: Call, *args):
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
