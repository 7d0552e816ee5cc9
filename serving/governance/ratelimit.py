"""Per-key rate limits: a token bucket per API key, held by one small deployment that every router replica
draws from, so that a key's budget is one budget however many replicas its requests reach.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second; a request takes one.
An empty bucket answers how long until the next token, which the router returns as a 429 with
``Retry-After`` (whole seconds, rounded up). The rate and burst are the deployment's (``rate_limit``
in the serve settings), or a key's own (``terrahash keys create --rate --burst``).

A router replica does not ask for every request: it leases tokens at once, as many as it spent in the
last lease's time (``Leases``), at most ``lease_size(rate, burst)`` (a tenth of a second of the key's
rate), spends them locally and asks again before they run out. Tokens leased and not spent within ``LEASE_S`` expire, never return: every replica together
admits at most what the shared bucket grants (``burst + rate * t``), and at most one lease per replica
and key goes unused. A key slow enough to lease one token at a time is asked for each request, exactly.
"""
from __future__ import annotations

import time

from ray import serve

MAX_BUCKETS = 100_000  # idle full buckets are forgotten past this many keys (they refill to full anyway)
LEASE_S = 0.1  # a lease is this long a stretch of the key's rate, and expires unspent after it


def lease_size(rate: float, burst: float) -> int:
    """Tokens a router replica leases at once: a tenth of a second of the rate, within 1 and the burst."""
    return max(1, min(int(burst), int(rate * LEASE_S)))


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

    def take_many(self, now: float, wanted: int) -> tuple[int, float]:
        """(tokens taken, up to ``wanted``; 0.0 when all were, else the seconds until ``wanted`` are there
        again: the lessee asks no sooner, so that a key over its rate costs a call a lease, not a request)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        wanted = int(min(wanted, self.burst))
        taken = min(wanted, int(self.tokens))
        self.tokens -= taken
        return taken, 0.0 if taken == wanted else (wanted - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Buckets:
    """Token buckets by key name; a key whose rate or burst changed gets a new, full bucket."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, rate: float, burst: float) -> float:
        now = self.clock()
        return self._bucket(key, rate, burst, now).take(now)

    def lease(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        now = self.clock()
        return self._bucket(key, rate, burst, now).take_many(now, wanted)

    def _bucket(self, key: str, rate: float, burst: float, now: float) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None or (bucket.rate, bucket.burst) != (float(rate), float(burst)):
            if len(self.buckets) >= MAX_BUCKETS:
                self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}
            bucket = self.buckets[key] = TokenBucket(rate, burst, now)
        return bucket


class Leases:
    """A router replica's leased tokens per key: (tokens, expiry); spent locally, never returned.

    The size of the next lease follows the replica's own demand: it doubles when a lease was spent before
    it expired and halves when one expired unspent, within 1 and ``lease_size`` of the key's limits, so
    that a replica leases about what it spends in ``LEASE_S`` and the bucket loses little to expiry."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.held: dict[str, list[float]] = {}
        self.sizes: dict[str, int] = {}
        self.empty: dict[str, float] = {}  # key -> when the shared bucket said its next token is due

    def size(self, key: str, largest: int) -> int:
        """Tokens to lease next for ``key``: the demand seen so far, at most ``largest``."""
        return max(1, min(self.sizes.get(key, 1), largest))

    def wait(self, key: str) -> float:
        """Seconds until the shared bucket has a token for ``key``, as it last said (0: ask it)."""
        due = self.empty.get(key)
        if due is None:
            return 0.0
        left = due - self.clock()
        if left <= 0:
            del self.empty[key]
            return 0.0
        return left

    def refused(self, key: str, wait: float) -> None:
        """The shared bucket has no lease for ``key`` for ``wait`` seconds: refuse locally until then."""
        self.empty[key] = self.clock() + wait
        if len(self.empty) > MAX_BUCKETS:
            now = self.clock()
            self.empty = {k: due for k, due in self.empty.items() if due > now}

    def spend(self, key: str) -> float | None:
        """Tokens left after spending one of ``key``'s, or None when it holds none (or they expired)."""
        held = self.held.get(key)
        if held is None:
            return None
        if held[1] <= self.clock():
            if held[0] >= 1:  # leased more than was spent in time: lease less
                self.sizes[key] = max(1, self.sizes.get(key, 1) // 2)
            del self.held[key]
            return None
        if held[0] < 1:
            return None
        held[0] -= 1
        return held[0]

    def add(self, key: str, tokens: int) -> None:
        """``tokens`` more for ``key``, all expiring ``LEASE_S`` from now (what was left is kept with them)."""
        now = self.clock()
        held = self.held.get(key)
        left = held[0] if held is not None and held[1] > now else 0
        if held is not None and held[1] > now and held[0] < self.sizes.get(key, 1) / 2:
            self.sizes[key] = 2 * self.sizes.get(key, 1)  # spent (most of) a lease in time: lease more
        self.held[key] = [left + tokens, now + LEASE_S]
        if len(self.held) > MAX_BUCKETS:
            self.held = {k: h for k, h in self.held.items() if h[1] > now and h[0] >= 1}


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class RateLimiter:
    """The router application's token buckets (one replica: every router replica shares them)."""

    def __init__(self):
        self.buckets = Buckets()

    async def take(self, key: str, rate: float, burst: float) -> float:
        return self.buckets.take(key, rate, burst)

    async def lease(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        """Up to ``wanted`` tokens at once: (taken, 0.0 when all were, else seconds until ``wanted`` are)."""
        return self.buckets.lease(key, rate, burst, wanted)
