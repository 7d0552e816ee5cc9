"""Per-key rate limits: a token bucket per API key, held by one small deployment that every router replica
asks, so that a key's budget is one budget however many replicas its requests reach.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second; a request takes one.
An empty bucket answers how long until the next token, which the router returns as a 429 with
``Retry-After`` (whole seconds, rounded up). The rate and burst are the deployment's (``rate_limit``
in the serve settings), or a key's own (``terrahash keys create --rate --burst``).
"""
from __future__ import annotations

import time

from ray import serve

MAX_BUCKETS = 100_000  # idle full buckets are forgotten past this many keys (they refill to full anyway)


class TokenBucket:
    """``take()`` -> 0.0 when a token was taken, else the seconds until one will be there."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Buckets:
    """Token buckets by key name; a key whose rate or burst changed gets a new, full bucket."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, rate: float, burst: float) -> float:
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None or (bucket.rate, bucket.burst) != (float(rate), float(burst)):
            if len(self.buckets) >= MAX_BUCKETS:
                self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}
            bucket = self.buckets[key] = TokenBucket(rate, burst, now)
        return bucket.take(now)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class RateLimiter:
    """The router application's token buckets (one replica: every router replica shares them)."""

    def __init__(self):
        self.buckets = Buckets()

    async def take(self, key: str, rate: float, burst: float) -> float:
        return self.buckets.take(key, rate, burst)
