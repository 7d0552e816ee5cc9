"""The router against deployments that misbehave on purpose, over real Serve and HTTP.

A fake encoder and fake shard groups stand in for the real ones, each failing in one known way: slow
calls (the request's one deadline), an encoder that raises or returns NaN (a JSON 500 with a request
id), a replica that holds no verified shard (retried on the group's other replica).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve")
from ray import serve  # noqa: E402

from serving.app import IndexInfo  # noqa: E402
from serving.lifecycle.canary import Canary  # noqa: E402
from serving.index.refs import ImageRefs  # noqa: E402
from serving.runtime.router import Router  # noqa: E402
from serving.runtime.replicas import ShardNotReady  # noqa: E402
from tests.serving.test_app import call, post_json  # noqa: E402

BITS, ROWS = 16, 40
SLOW_S = 0.4


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.01})
class FakeEncoder:
    """Text encoder whose query says what goes wrong: "nan", "boom", "slow"; anything else a fixed code."""

    async def describe(self) -> dict:
        return {"model": "fake", "model_version": "fake", "registered": None, "variant": "fp32",
                "code_space": None, "bits": BITS, "image_size": 32}

    async def encode_text(self, text: str) -> np.ndarray:
        if text == "nan":
            return np.full(BITS, np.nan, np.float32)
        if text == "boom":
            raise ValueError("the encoder broke")
        if text == "slow":
            await asyncio.sleep(SLOW_S)
        return np.linspace(-1, 1, BITS).astype(np.float32)

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return np.linspace(-1, 1, BITS).astype(np.float32)


@serve.deployment(ray_actor_options={"num_cpus": 0.01})
class FakeShards:
    """One shard of ROWS random codes; ``slow`` delays every call; replica rank 0 of a ``half_bad``
    group holds no verified copy (it raises ShardNotReady, as a replica with a bad local copy does)."""

    def __init__(self, slow: bool = False, half_bad: bool = False):
        self.codes = np.random.default_rng(0).integers(0, 256, (ROWS, BITS // 8), dtype=np.uint8)
        self.slow = slow
        self.bad = half_bad and serve.get_replica_context().rank.rank == 0

    async def search(self, packed, k, with_codes=False, where=None):
        await self._misbehave()
        distances = np.unpackbits(self.codes ^ packed[0], axis=1).sum(1)
        rows = np.lexsort((np.arange(ROWS), distances))[:k]
        return {"distances": distances[rows][None].astype(np.int32), "rows": rows[None].astype(np.int64),
                "ids": np.array([f"img{r}" for r in rows], dtype=object)[None],
                "image_ids": np.array([f"img{r}" for r in rows], dtype=object)[None]}

    async def code_of(self, item_id):
        await self._misbehave()
        return self.codes[int(item_id[3:])] if item_id.startswith("img") else None

    async def _misbehave(self):
        if self.bad:
            raise ShardNotReady("replica 0 holds no verified copy (test)")
        if self.slow:
            await asyncio.sleep(SLOW_S)


def _info() -> dict:
    return {"index": "fake", "release": None, "model_version": "fake", "model": "fake", "code_space": None,
            "bits": BITS, "index_version": {"images": "v0001"}, "shards": {"images": ["images/v0001/shard-00000"]},
            "shard_count": {"images": 1}, "shards_per_replica": {"images": 1}, "groups": {"images": ["images-shard-00000"]},
            "refs": {"images": ImageRefs({"extra": {}}, "")}}


def _router(name: str, shards, **hot):
    """Run ``name`` (the router, on /name) with a fake encoder application and a fake index application."""
    serve.run(FakeEncoder.options(name="QueryEncoder").bind(), name=f"{name}-model", route_prefix=None)
    serve.run(IndexInfo.options(ray_actor_options={"num_cpus": 0.01}).bind(_info(), [shards], None),
              name=f"{name}-index", route_prefix=None)
    traffic = {"arms": [{"name": "main", "weight": 100.0, "model_app": f"{name}-model", "index_app": f"{name}-index"}]}
    config = {"max_query_chars": 100, "max_k": 20, "default_k": 5, "max_upload_bytes": 4_000_000,
              "max_image_pixels": 40_000_000, "rerank": "none", "rerank_depth": 20, "fusion": "average",
              "deadline_s": 5.0, "shard_timeout_s": 2.0, "shard_retries": 2, **hot, "traffic": traffic}
    canary = Canary.options(user_config={"enabled": False, "traffic": traffic},
                            ray_actor_options={"num_cpus": 0.01}).bind(name)
    serve.run(Router.options(user_config=config, ray_actor_options={"num_cpus": 0.01}).bind(
        canary, {"router_encodes_text": False, "decode_threads": 1}), name=name, route_prefix=f"/{name}")


def _wait_answers(url: str, timeout: float = 60.0) -> None:
    """Until the router has found its fake arm (no readiness reports here: the fakes have none)."""
    deadline = time.monotonic() + timeout
    while post_json(f"{url}/v1/search/text", {"query": "fine"})[0] != 200:
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.2)


def _shards(name: str, **options):
    return FakeShards.options(name="images-shard-00000", **options)


@pytest.fixture(scope="module")
def fake_apps(serve_app):
    """Three apps on the session's Serve: slow shards (deadline 1 s), a half-bad shard group, plain."""
    _router("slow", _shards("slow", num_replicas=1).bind(slow=True), deadline_s=1.0)
    _router("halfbad", _shards("halfbad", num_replicas=2).bind(half_bad=True))
    _router("plain", _shards("plain", num_replicas=1).bind())
    apps = ("slow", "halfbad", "plain")
    for name in apps:
        _wait_answers(f"{serve_app}/{name}")
    yield {name: f"{serve_app}/{name}" for name in apps}
    for name in apps:  # not waited for: the module's Serve shuts down right after (serve_app)
        for app in (name, f"{name}-model", f"{name}-index"):
            serve.delete(app, _blocking=False)


def test_one_deadline_covers_every_call_of_a_request(fake_apps):
    url = fake_apps["slow"]
    # Two slow calls in a row (lookup then search; encoder then search), 0.8 s of a 1 s deadline.
    assert call(f"{url}/v1/search/similar/img3?k=5")[0] == 200
    assert post_json(f"{url}/v1/search/text", {"query": "slow"})[0] == 200
    # A deadline shorter than the two calls but longer than each: the request runs out, not a call.
    _router("slow", _shards("slow", num_replicas=1).bind(slow=True), deadline_s=0.6)
    _wait_answers(url)
    # Each call fits the 0.6 s deadline, both do not: only a budget shared by every call runs out. (That
    # the answer comes at the deadline, not after the call in flight, is test_search.py's
    # test_a_call_that_never_answers_ends_at_the_request_deadline, on a call that never answers.)
    for path, payload in (("/v1/search/similar/img3?k=5", None), ("/v1/search/text", {"query": "slow"})):
        status, body = post_json(f"{url}{path}", payload) if payload else call(f"{url}{path}")
        assert status == 504 and body["error"]["code"] == "deadline_exceeded", body


def test_an_overloaded_replica_answers_a_json_503_at_once(fake_apps):
    """Past max_inflight a request is refused at once with a JSON 503 and Retry-After, not queued."""
    from concurrent.futures import ThreadPoolExecutor

    url = fake_apps["slow"]
    _router("slow", _shards("slow", num_replicas=1).bind(slow=True), deadline_s=1.0, max_inflight=1)
    _wait_answers(url)
    with ThreadPoolExecutor(4) as pool:  # each takes SLOW_S in the shard: the first holds the only place
        answers = list(pool.map(lambda _: post_json(f"{url}/v1/search/text", {"query": "slow"}), range(4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    assert {b["error"]["code"] for s, b in answers if s == 503} == {"overloaded"}


def test_encoder_failures_are_json_500s_with_a_request_id(fake_apps):
    for query, needle in (("boom", None), ("nan", None)):
        status, body = post_json(f"{fake_apps['plain']}/v1/search/text", {"query": query})
        assert status == 500 and body["error"]["code"] == "internal_error", body
        assert body["error"]["request_id"] and body["error"]["request_id"] in body["error"]["message"]
        assert "broke" not in body["error"]["message"] and "NaN" not in body["error"]["message"]  # no internals
    assert post_json(f"{fake_apps['plain']}/v1/search/text", {"query": "fine"})[0] == 200


def test_a_replica_without_a_verified_shard_is_routed_around(fake_apps):
    answers = [post_json(f"{fake_apps['halfbad']}/v1/search/text", {"query": "fine", "k": 5}) for _ in range(200)]
    assert [status for status, _ in answers] == [200] * 200
    assert len({str(body["results"]) for _, body in answers}) == 1


def test_only_accepted_image_formats_are_opened(monkeypatch):
    """An EPS upload never reaches Pillow's EPS plugin (which runs Ghostscript)."""
    from PIL import EpsImagePlugin

    from serving.runtime.api import ApiError, decode_image

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(ApiError) as err:
        decode_image(eps, 32, 1_000_000)
    assert err.value.status == 422 and "JPEG/PNG/TIFF/WEBP" in err.value.message and not opened
