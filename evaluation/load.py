"""Load for the serving benchmarks: an asyncio open loop over keep-alive connections, and where the CPU goes.

``sequential`` sends one query after another on one keep-alive connection; ``open_loop`` sends at a fixed
rate whatever the answers' speed (a coroutine per request, not a thread: the client stays far from being
the bottleneck, and its own CPU is measured beside the server's). ``CpuMeter`` reads the CPU time of every
process of the server (Ray's and Serve's by their process titles, HAProxy, a plain server by its pid)
before and after a run, and gives CPU milliseconds per request for each kind of process.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np

# Ray sets a worker's process title to "ray::<actor class>"; a Serve replica's is
# "ray::ServeReplica:<app>:<deployment>".
SERVE_KINDS = (("ProxyActor", "proxy"), ("ServeController", "controller"), (":Router", "router"),
               ("-shard", "shard group"), (":QueryEncoder", "encoder"), (":Canary", "canary"),
               (":AuditWriter", "audit writer"), (":RateLimiter", "rate limiter"))


def process_kind(cmdline: list[str], name: str) -> str | None:
    """The kind of a server process, or None when it is not one."""
    title = " ".join(cmdline) if cmdline else name
    if name == "haproxy" or title.startswith(("haproxy", "/usr/sbin/haproxy")):
        return "proxy"
    if title.startswith("ray::"):
        for mark, kind in SERVE_KINDS:
            if mark in title:
                return kind
        return "other"
    if any(part in title for part in ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor",
                                      "ray/_private", "monitor.py")):
        return "other"
    return None


class CpuMeter:
    """CPU seconds of the server's processes by kind, between ``start()`` and ``stop()``; ``pids`` adds
    processes that are not Ray's (a plain server) under the kind ``server``. This process is ``client``."""

    def __init__(self, pids: list[int] | None = None):
        self.pids = list(pids or [])

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        found = {}
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                pid = proc.info["pid"]
                kind = ("client" if pid == os.getpid() else "server" if pid in self.pids
                        else process_kind(proc.info["cmdline"] or [], proc.info["name"] or ""))
                if kind is not None:
                    times = proc.cpu_times()
                    found[pid] = (kind, times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def start(self) -> None:
        self.before, self.started = self._sample(), time.perf_counter()

    def stop(self, requests: int) -> dict:
        """{"wall_s", "cpu_ms_per_request": {kind: ms}, "server_cpu_ms_per_request", "server_cores"}."""
        after, wall = self._sample(), time.perf_counter() - self.started
        by_kind: dict[str, float] = {}
        for pid, (kind, seconds) in after.items():
            by_kind[kind] = by_kind.get(kind, 0.0) + seconds - self.before.get(pid, (kind, 0.0))[1]
        server = sum(v for k, v in by_kind.items() if k != "client")
        n = max(requests, 1)
        return {"wall_s": round(wall, 2), "cpu_ms_per_request": {k: round(v * 1000 / n, 3) for k, v in sorted(by_kind.items())},
                "server_cpu_ms_per_request": round(server * 1000 / n, 3), "server_cores": round(server / wall, 3)}


async def _post(session, url: str, body: bytes, headers: dict) -> tuple[float, dict | None, str | None]:
    """(client seconds, answer or None, error or None) of one request."""
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as answer:
            payload = await answer.read()
            if answer.status != 200:
                return time.perf_counter() - start, None, f"HTTP {answer.status}: {payload[:200]!r}"
            return time.perf_counter() - start, json.loads(payload), None
    except Exception as err:  # noqa: BLE001 - every failure is what the run counts
        return time.perf_counter() - start, None, f"{type(err).__name__}: {err}"


def _bodies(queries: list[str], k: int) -> list[bytes]:
    return [json.dumps({"query": q, "k": k}).encode() for q in queries]


def sequential(url: str, queries: list[str], k: int, n: int, headers: dict | None = None) -> list:
    """``n`` queries one after another on one keep-alive connection."""
    async def run():
        import aiohttp

        bodies, sent = _bodies(queries, k), []
        head = {"Content-Type": "application/json", **(headers or {})}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for i in range(n):
                sent.append(await _post(session, url, bodies[i % len(bodies)], head))
        return sent
    return asyncio.run(run())


def open_loop(url: str, queries: list[str], k: int, qps: float, seconds: float, headers: dict | None = None) -> list:
    """Queries sent at ``qps`` for ``seconds`` whatever the answers' speed (keep-alive connections, as many
    as are in flight)."""
    async def run():
        import aiohttp

        bodies, tasks = _bodies(queries, k), []
        head = {"Content-Type": "application/json", **(headers or {})}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()
            for i in range(int(qps * seconds)):
                delay = start + i / qps - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(_post(session, url, bodies[i % len(bodies)], head)))
            return list(await asyncio.gather(*tasks))
    return asyncio.run(run())


def summarize(results: list, seconds: float | None = None) -> dict:
    """Client latency percentiles, the rate achieved, errors, and the server-side breakdown (medians, ms)."""
    ok = [(t, b) for t, b, e in results if e is None]
    errors = [e for _, _, e in results if e is not None]
    out = {"n": len(results), "errors": len(errors), "first_errors": errors[:3]}
    if seconds:
        out["achieved_qps"] = rounded(len(ok) / seconds)
    if not ok:
        return out
    client = np.array([t for t, _ in ok]) * 1000
    server = np.array([b.get("latency_ms", 0.0) for _, b in ok])
    parts = {name: float(np.median([b.get("timings_ms", {}).get(name, 0.0) for _, b in ok]))
             for name in ("encode", "search", "merge")}
    return {**out, "p50_ms": rounded(np.percentile(client, 50)), "p99_ms": rounded(np.percentile(client, 99)),
            "server_p50_ms": rounded(np.median(server)),
            "breakdown_p50_ms": {**{k: rounded(v) for k, v in parts.items()},
                                 "server_other": rounded(np.median(server) - sum(parts.values())),
                                 "http_and_serve_overhead": rounded(np.median(client - server))}}


def answers_digest(results: list) -> str | None:
    """sha256 of every answer's (id, distance) list, in order: equal digests, equal answers (None after an error)."""
    import hashlib

    if any(e is not None for _, _, e in results):
        return None
    pairs = [[(h["id"], h["distance"]) for h in body["results"]] for _, body, _ in results]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def rounded(value: float) -> float:
    """A figure as the reports print it: three decimals."""
    return round(float(value), 3)
