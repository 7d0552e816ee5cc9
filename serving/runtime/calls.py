"""One request's budget and the fan-out helpers of the router (serving/runtime/router.py) and its views
(serving/runtime/views.py)."""

import asyncio
import time

import numpy as np

from serving.governance.keys import Identity


class Call:
    """One request's budget, the milliseconds spent per step, and what its audit entry records."""

    def __init__(self, deadline_s: float):
        self.deadline = time.monotonic() + deadline_s
        self.timings: dict[str, float] = {}
        self.who: Identity | None = None  # the caller (serving.runtime.access.Gate.identify)
        self.status, self.decision = 500, "error"
        self.query_sha256: str | None = None
        self.answered: dict = {}  # arm, versions and result count of a 200

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timer(self, name: str) -> "Timer":
        return Timer(self.timings, name)


class Timer:
    """Adds the milliseconds spent in a ``with`` block to ``timings[name]``."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + (time.perf_counter() - self.start) * 1000


async def awaited(response):
    """A Serve response (or any awaitable) as a coroutine, for asyncio.wait_for."""
    return await response


async def all_or_none(coroutines) -> list:
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


def finite(code: np.ndarray) -> np.ndarray:
    """``code``, or a RuntimeError when the encoder returned NaN or infinite values."""
    if not np.isfinite(code).all():
        raise RuntimeError("the encoder returned a code with NaN or infinite values")
    return code
