"""The choice of traffic arm for each request: the client's sticky arm (or a forced one), the primary when
that arm fails or is too slow, copies to the shadow arms compared with the client's answer, and each
arm's figures, counted for Ray's metrics and reported every second to the canary controller
(serving/lifecycle/canary.py).

A plain object over asyncio (the router holds one); a test drives it with its own ``run`` coroutines.
"""
import asyncio
import logging
import random
import time

from serving.runtime.checks import ApiError
from serving.runtime.arms import Arm, ArmStats
from serving.runtime.calls import Call, awaited
from serving.runtime.traffic import Traffic, assign, mirrored, overlap_at_k, rank_correlation

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

REPORT_PERIOD_S = 1.0


class ArmDispatcher:
    """Runs each request on its arm, falls back to the primary, mirrors to shadows (see the module docstring)."""

    def __init__(self, metrics, rng: random.Random | None = None):
        """``metrics``: the router's serving.runtime.metrics.RouterMetrics (per-arm counts and latencies)."""
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.stats = ArmStats()
        self.arms: dict[str, Arm] = {}
        self.traffic: Traffic | None = None
        self._background: set[asyncio.Task] = set()
        self._reporter: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    async def dispatch(self, call: Call, run, forced: str | None = None, client: str | None = None) -> dict:
        """Answer with the arm of ``client`` (sticky; None: a random one by weight), or ``forced`` (an arm's
        name), or with the primary when that arm fails or is too slow; mirror copies to the shadow arms in
        the background. ``run(arm, call)`` does the arm-specific work."""
        traffic = self.traffic
        primary = self.arms[traffic.primary]
        if forced is not None:
            if forced not in self.arms:
                raise ApiError(422, "unknown_arm", f"X-TerraHash-Arm: no arm {forced!r} (arms: {sorted(self.arms)})")
            return await self.on_arm(self.arms[forced], run, call)
        arm = self.arms[assign(traffic, client or None, self.rng)]
        answer = None
        if arm is not primary:
            start = time.perf_counter()
            reason = "not_ready"
            if arm.ready:
                try:
                    answer = await asyncio.wait_for(self.on_arm(arm, run, call),
                                                    max(min(traffic.arm_timeout_s, call.remaining()), 0.001))
                except ApiError as err:
                    if err.arm_specific:  # only this arm's model refuses it: the primary answers, nobody failed
                        self.metrics.fallbacks.inc(1, tags={"arm": arm.name, "reason": err.code})
                        answer = await self.counted(primary, run, call)
                        answer["fallback_from"] = arm.name
                        return answer
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
                answer = await self.counted(primary, run, call)
                answer["fallback_from"] = arm.name
        else:
            answer = await self.counted(primary, run, call)
        for shadow in mirrored(traffic, self.rng):
            if shadow.name in self.arms and self.arms[shadow.name].ready:
                self.in_background(self.shadow(self.arms[shadow.name], run, answer))
        return answer

    async def counted(self, arm: Arm, run, call: Call) -> dict:
        start = time.perf_counter()
        try:
            answer = await self.on_arm(arm, run, call)
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

    async def on_arm(self, arm: Arm, run, call: Call) -> dict:
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

    async def shadow(self, arm: Arm, run, client_answer: dict) -> None:
        """A mirrored copy on a shadow arm, with its own budget; compared with the client's answer."""
        start = time.perf_counter()
        call = Call(self.traffic.shadow_timeout_s)
        try:
            answer = await asyncio.wait_for(self.on_arm(arm, run, call), self.traffic.shadow_timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - a shadow's failure is only counted
            if not getattr(err, "arm_specific", False):  # a refusal by the shadow's model alone is not a failure
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

    def start_reports(self, canary, replica: str) -> None:
        """Report to ``canary`` (its handle) every second from now on, and at once (the split changed)."""
        if self._reporter is None or self._reporter.done():
            self._wake = asyncio.Event()
            self._reporter = asyncio.get_running_loop().create_task(self.report_loop(canary, replica))
        self._wake.set()

    async def report_loop(self, canary, replica: str) -> None:
        """Every second (and at once after a reconfigure), this replica's per-arm figures, the revision of the
        split it has and the model each arm serves, to the canary controller (a lost report is only lost)."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), REPORT_PERIOD_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            report = {**self.stats.drain(), "revision": self.traffic.revision,
                      "serving": {name: arm.serving() for name, arm in self.arms.items()}}
            try:
                await asyncio.wait_for(awaited(canary.report.remote(replica, report)), 5.0)
            except Exception as err:  # noqa: BLE001
                log.warning("canary report failed: %s", type(err).__name__)

    def in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
