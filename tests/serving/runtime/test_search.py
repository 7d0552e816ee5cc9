"""The search pipeline and the arm dispatcher as plain objects: stand-in deployment handles, no FastAPI or Serve.

The shard groups are real serving.index shards (faiss) behind handles whose ``.remote()`` returns a
coroutine, as a Serve handle's response is awaitable; what misbehaves does so on a counter or an event,
never on the clock.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.index.refs import ImageRefs
from serving.model.codes import pack_signs, unpack_signs
from serving.runtime.checks import ApiError
from serving.runtime.arms import Arm, Backend
from serving.runtime.calls import Call
from serving.runtime.dispatch import ArmDispatcher
from serving.runtime.replicas import ShardNotReady
from serving.runtime.search import SearchPipeline
from serving.runtime.traffic import ArmRoute, check_traffic

BITS, ROWS, GROUPS = 32, 60, 3
CONFIG = {"rerank_depth": 20, "shard_timeout_s": 5.0, "shard_retries": 2, "max_image_pixels": 10**6,
          "drift_fallback": "none"}


class Counter:
    def __init__(self):
        self.counts: dict[tuple, float] = {}

    def inc(self, n=1, tags=None):
        key = tuple(sorted((tags or {}).items()))
        self.counts[key] = self.counts.get(key, 0) + n

    observe = set = inc

    def total(self) -> float:
        return sum(self.counts.values())


class Metrics:
    """What the pipeline and the dispatcher count, as plain counters (Ray's metrics need a running Ray)."""

    def __init__(self):
        for name in ("retries", "drift", "drift_alarm", "arm_requests", "arm_latency", "fallbacks",
                     "shadow_overlap", "shadow_rank"):
            setattr(self, name, Counter())


class Response:
    """What ``.remote()`` gives, as a Serve response: awaitable, and cancelled when the caller gives up."""

    def __init__(self, coroutine):
        self.task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.task.cancel()


class Method:
    """``handle.method.remote(*args)``: a Response of ``fn(*args)``."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return Response(self.fn(*args))


class ShardGroup:
    """Rows ``start`` to ``stop`` of the codes, searched exactly (distance, then row), as a shard replica does."""

    deployment_name = "images-shard"

    def __init__(self, codes: np.ndarray, start: int, stop: int, not_ready: int = 0, lost: int = 0, hang=None):
        self.codes, self.start, self.stop = codes, start, stop
        self.not_ready, self.lost, self.hang = not_ready, lost, hang  # calls that fail that way first
        self.calls = 0
        self.search = Method(self._search)

    async def _search(self, packed, k, with_codes=False, where=None):
        self.calls += 1
        if self.hang is not None:
            await self.hang.wait()  # never set: the call outlives any budget
        if self.not_ready:
            self.not_ready -= 1
            raise ShardNotReady("this replica holds no verified copy")
        if self.lost:
            self.lost -= 1
            raise asyncio.TimeoutError()
        rows = np.arange(self.start, self.stop)
        distances = np.unpackbits(self.codes[rows] ^ packed[0], axis=1).sum(1)
        order = np.lexsort((rows, distances))[:k]
        ids = np.array([f"img{r}" for r in rows[order]], dtype=object)[None]
        answer = {"distances": distances[order][None].astype(np.int32), "rows": rows[order][None].astype(np.int64),
                  "ids": ids, "image_ids": ids}
        if with_codes:
            answer["codes"] = self.codes[rows[order]][None]
        return answer


class Encoder:
    """A query encoder that answers ``code`` for any text or image."""

    deployment_name = "QueryEncoder"

    def __init__(self, code: np.ndarray):
        async def encode(_):
            return code
        self.encode_text = self.encode_image = Method(encode)


def arm(name: str, groups: list, code: np.ndarray) -> Arm:
    """An arm whose encoder answers ``code`` and whose index is ``groups``."""
    backend = Backend("m", "i")
    backend.ready, backend.problem = True, None
    backend.encoder = Encoder(code)
    backend.index = {"bits": BITS, "refs": {"images": ImageRefs({"extra": {}}, "")}, "filterable": {}}
    backend.model = {"model_version": name, "image_size": 32}
    backend.shards = {"images": groups, "captions": []}
    return Arm(ArmRoute(name=name, weight=100, model_app="m", index_app="i"), backend)


@pytest.fixture
def codes():
    return np.random.default_rng(0).integers(0, 256, (ROWS, BITS // 8), dtype=np.uint8)


def groups_of(codes, **first_group_faults) -> list[ShardGroup]:
    cuts = np.linspace(0, ROWS, GROUPS + 1).astype(int)
    return [ShardGroup(codes, a, b, **(first_group_faults if n == 0 else {})) for n, (a, b) in
            enumerate(zip(cuts[:-1], cuts[1:]))]


def pipeline(metrics=None) -> SearchPipeline:
    found = SearchPipeline(metrics or Metrics(), ThreadPoolExecutor(1))
    found.configure(CONFIG)
    return found


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_text_query_is_the_exact_global_top_k_over_every_shard_group(codes):
    query = np.random.default_rng(1).standard_normal(BITS).astype(np.float32)
    answer = run(pipeline().text_run("a query", 10, "none", "average", None)(arm("main", groups_of(codes), query),
                                                                             Call(5.0)))
    distances = np.unpackbits(codes ^ pack_signs(query[None])[0], axis=1).sum(1)
    expected = np.lexsort((np.arange(ROWS), distances))[:10]  # distance, then row
    assert [h["row"] for h in answer["results"]] == expected.tolist()
    assert [h["distance"] for h in answer["results"]] == distances[expected].tolist()


def test_asymmetric_rerank_orders_the_depth_by_the_float_query(codes):
    query = np.random.default_rng(2).standard_normal(BITS).astype(np.float32)
    answer = run(pipeline().text_run("q", 5, "asymmetric", "average", None)(arm("main", groups_of(codes), query),
                                                                            Call(5.0)))
    signs = unpack_signs(codes, BITS).astype(np.float32)
    d_a = (BITS - signs @ query) / 2
    depth = np.lexsort((np.arange(ROWS), np.unpackbits(codes ^ pack_signs(query[None])[0], axis=1).sum(1)))[:20]
    expected = sorted(depth.tolist(), key=lambda r: (d_a[r], r))[:5]
    assert [h["row"] for h in answer["results"]] == expected


def test_a_replica_without_a_copy_and_a_lost_one_are_retried_within_the_budget(codes):
    metrics = Metrics()
    groups = groups_of(codes, not_ready=3, lost=1)
    query = np.ones(BITS, np.float32)
    answer = run(pipeline(metrics).text_run("q", 5, "none", "average", None)(arm("main", groups, query), Call(5.0)))
    assert len(answer["results"]) == 5 and groups[0].calls == 5  # 3 not ready + 1 lost + the answer
    assert metrics.retries.counts == {(("callee", "images-shard"), ("reason", "not_ready")): 3,
                                      (("callee", "images-shard"), ("reason", "TimeoutError")): 1}


def test_too_many_lost_calls_are_a_503_naming_the_callee(codes):
    groups = groups_of(codes, lost=10)
    with pytest.raises(ApiError) as err:
        run(pipeline().text_run("q", 5, "none", "average", None)(arm("main", groups, np.ones(BITS, np.float32)),
                                                                 Call(5.0)))
    assert err.value.status == 503 and err.value.code == "shard_unavailable"
    assert groups[0].calls == CONFIG["shard_retries"] + 1


def test_a_call_that_never_answers_ends_at_the_request_deadline(codes):
    async def scenario():
        never = asyncio.Event()
        groups = groups_of(codes, hang=never)
        with pytest.raises(ApiError) as err:
            await pipeline().text_run("q", 5, "none", "average", None)(arm("main", groups, np.ones(BITS, np.float32)),
                                                                       Call(0.2))
        return err.value, groups[0].calls

    err, calls = run(scenario())
    assert (err.status, err.code) == (504, "deadline_exceeded") and calls >= 1


def test_a_failing_challenger_is_answered_by_the_primary_and_counted():
    async def scenario():
        metrics = Metrics()
        dispatcher = ArmDispatcher(metrics)
        traffic = check_traffic({"arms": [{"name": "main", "weight": 0, "model_app": "m", "index_app": "i"},
                                          {"name": "new", "weight": 100, "model_app": "m", "index_app": "i"}],
                                 "primary": "main"})
        dispatcher.traffic = traffic
        dispatcher.arms = {route.name: Arm(route, Backend("m", "i")) for route in traffic.arms}
        for a in dispatcher.arms.values():
            a.backend.ready = True

        async def work(arm: Arm, call: Call) -> dict:
            if arm.name == "new":
                raise RuntimeError("the challenger broke")
            return {"results": [{"id": "img1"}]}

        answer = await dispatcher.dispatch(Call(5.0), work, client="someone")
        return answer, metrics, dispatcher.stats.drain()

    answer, metrics, stats = run(scenario())
    assert answer["arm"] == "main" and answer["fallback_from"] == "new"
    assert metrics.fallbacks.counts == {(("arm", "new"), ("reason", "RuntimeError")): 1}
    assert [s[0] for s in stats["live"]["new"]] == [False] and [s[0] for s in stats["live"]["main"]] == [True]


def test_a_refusal_by_an_arms_own_model_goes_to_the_primary_and_counts_against_no_arm():
    """A code of another code space refused by the challenger and by a shadow (``arm_specific``): the primary
    answers, and neither arm is recorded as failing (the canary must not roll back a model for it)."""
    from serving.runtime.jscc import ReceivedError

    async def scenario():
        metrics = Metrics()
        dispatcher = ArmDispatcher(metrics)
        traffic = check_traffic({"arms": [{"name": "main", "weight": 0, "model_app": "m", "index_app": "i"},
                                          {"name": "new", "weight": 100, "model_app": "m", "index_app": "i"},
                                          {"name": "shadow", "weight": 100, "shadow": True, "model_app": "m",
                                           "index_app": "i"}], "primary": "main"})
        dispatcher.traffic = traffic
        dispatcher.arms = {route.name: Arm(route, Backend("m", "i")) for route in traffic.arms}
        for a in dispatcher.arms.values():
            a.backend.ready = True

        async def work(arm: Arm, call: Call) -> dict:
            if arm.name != "main":
                raise ReceivedError("code_space_mismatch", "not this arm's space", status=409, arm_specific=True)
            return {"results": [{"id": "img1"}]}

        answer = await dispatcher.dispatch(Call(5.0), work, client="someone")
        shadow = await dispatcher.shadow(dispatcher.arms["shadow"], work, answer)
        with pytest.raises(ApiError) as forced:  # asked for by name, the arm's own answer stands
            await dispatcher.dispatch(Call(5.0), work, forced="new")
        return answer, shadow, forced.value, dispatcher.stats.drain()

    answer, shadow, forced, stats = run(scenario())
    assert answer["arm"] == "main" and answer["fallback_from"] == "new" and shadow is None
    assert "new" not in stats["live"] and not stats["shadow"] and [s[0] for s in stats["live"]["main"]] == [True]
    assert (forced.status, forced.code) == (409, "code_space_mismatch")


def test_a_shadow_copy_is_compared_with_the_client_answer_and_never_changes_it():
    async def scenario():
        metrics = Metrics()
        dispatcher = ArmDispatcher(metrics)
        traffic = check_traffic({"arms": [{"name": "main", "weight": 100, "model_app": "m", "index_app": "i"},
                                          {"name": "shadow", "weight": 100, "shadow": True, "model_app": "m",
                                           "index_app": "i"}]})
        dispatcher.traffic = traffic
        dispatcher.arms = {route.name: Arm(route, Backend("m", "i")) for route in traffic.arms}
        for a in dispatcher.arms.values():
            a.backend.ready = True
        shadow_started, release = asyncio.Event(), asyncio.Event()

        async def work(arm: Arm, call: Call) -> dict:
            if arm.name == "shadow":
                shadow_started.set()
                await release.wait()  # the client's answer is back before the shadow's
                return {"k": 2, "results": [{"id": "b"}, {"id": "c"}]}
            return {"k": 2, "results": [{"id": "a"}, {"id": "b"}]}

        answer = await dispatcher.dispatch(Call(5.0), work)
        await shadow_started.wait()
        assert answer["results"] == [{"id": "a"}, {"id": "b"}] and "fallback_from" not in answer
        release.set()
        await asyncio.gather(*dispatcher._background)
        return dispatcher.stats.drain()

    stats = run(scenario())
    (ok, _, overlap, _), = stats["shadow"]["shadow"]
    assert ok and overlap == 0.5


def test_an_upload_is_decoded_off_the_event_loop(codes, monkeypatch):
    """While one query's upload decodes, the event loop answers another query: the decode runs in the
    decoder pool, held there until the other answer is back (if it ran on the loop, nothing could release it)."""
    import threading

    import serving.runtime.api as api

    decoding, release = threading.Event(), threading.Event()

    def held_decode(data, size, max_pixels):
        decoding.set()
        if not release.wait(60):
            raise AssertionError("the event loop never answered while the upload was decoding")
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(api, "decode_image", held_decode)

    async def scenario():
        found = pipeline()
        main = arm("main", groups_of(codes), np.ones(BITS, np.float32))
        upload = asyncio.ensure_future(found.encode_image(main, b"an image", Call(60)))
        assert await asyncio.to_thread(decoding.wait, 60)  # the decode has started, in the pool
        answer = await found.text_run("q", 5, "none", "average", None)(main, Call(60))
        still_decoding = not upload.done()
        release.set()
        return answer, still_decoding, await upload

    answer, still_decoding, code = run(scenario())
    assert len(answer["results"]) == 5 and still_decoding and code.shape == (BITS,)
