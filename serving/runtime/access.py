"""The router's gate: who sent a request (API keys), whether the role may use the endpoint (serving.governance.roles),
whether the policy allows the query (serving.governance.policy), and how the answer is coarsened.

Its settings are the router's hot ``access`` user_config (``AccessConfig``), written from the serve
settings' ``auth``, ``rate_limit`` and ``audit``. The key file is read when the config changes and again
every ``keys_reload_s`` (off the request path), so a revoked key stops working within that time and a
new one starts, with no restart. Failures are JSON: 401 (no key, a wrong or revoked one, with
``WWW-Authenticate: Bearer``), 403 (the role lacks the permission, or a rule denies the query: its id,
never its text), 503 while the key file has never been read.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.governance.keys import Identity, KeyFile, KeyRing
from serving.governance.policy import Policy, check_policy
from serving.governance.ratelimit import Leases, lease_size
from serving.governance.roles import ANONYMOUS, ENDPOINTS, FULL, OPEN, allows
from serving.runtime.api import error_response
from serving.runtime.checks import ApiError
from serving.runtime.calls import Call, awaited

log = logging.getLogger("ray.serve")

LIMITER_TIMEOUT_S = 1.0  # a rate limiter slower than this lets the request through


class RateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    rate: float = Field(10.0, gt=0, le=1_000_000)  # tokens (requests) a second, per key
    burst: float = Field(20.0, ge=1, le=1_000_000)  # the bucket's size: requests at once after a quiet spell


class AccessConfig(BaseModel):
    """The router's hot access settings (its user_config's ``access``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    keys: str | None = None
    keys_reload_s: float = Field(5.0, gt=0, le=3600)
    policy: dict | None = None  # serving.governance.policy.Policy, as data
    rate: RateConfig = Field(default_factory=RateConfig)
    audit: bool = False  # whether an AuditWriter takes every request's entry
    on_failure: Literal["closed", "open"] = "closed"  # of the audit writer: refuse requests, or answer them

    @classmethod
    def check(cls, data: dict | None) -> "AccessConfig":
        from serving.validation import describe

        try:
            config = cls.model_validate(data or {})
        except ValidationError as err:
            raise ValueError(describe(err, "router settings: access")) from None
        if config.enabled and not config.keys:
            raise ValueError("router settings: access: auth is enabled but no key file is given (auth.keys)")
        check_policy(config.policy, "router settings: access.policy")
        return config


class Gate:
    """Identify, authorise, apply the policy; one per router replica."""

    def __init__(self):
        self.config = AccessConfig()
        self.policy = Policy()
        self.ring: KeyRing | None = None
        self.problem: str | None = None  # why the key file could not be read last time
        self._reloader: asyncio.Task | None = None
        self.leases = Leases()  # rate-limit tokens leased from the shared limiter, spent here
        self._leasing: dict[str, asyncio.Task] = {}  # keys whose next lease is being asked for

    async def configure(self, data: dict | None) -> None:
        config = AccessConfig.check(data)
        keys_changed = config.keys != self.config.keys
        self.config, self.policy = config, check_policy(config.policy)
        if config.enabled and (keys_changed or self.ring is None):
            self.ring = None
            await self.reload()
        if config.enabled and (self._reloader is None or self._reloader.done()):
            self._reloader = asyncio.get_running_loop().create_task(self._reload_loop())

    async def reload(self) -> None:
        """Read the key file again; a read that fails keeps the keys read before (and says why)."""
        try:
            content = await asyncio.to_thread(KeyFile(self.config.keys).read)
            self.ring, self.problem = KeyRing(content), None
        except Exception as err:  # noqa: BLE001 - an unreadable file keeps the last good keys
            self.problem = f"{self.config.keys}: {err}"
            log.warning("cannot read the key file (keeping the keys read before, if any): %s", self.problem)

    async def _reload_loop(self) -> None:
        while self.config.enabled:
            await asyncio.sleep(self.config.keys_reload_s)
            await self.reload()

    def identify(self, headers, endpoint: str) -> Identity:
        """The caller of ``endpoint``, checked against the permission it needs (401 / 403 / 503)."""
        if not self.config.enabled:
            return Identity(ANONYMOUS, OPEN)
        permission = ENDPOINTS[endpoint]
        header = headers.get("authorization")
        if header is None:
            if permission is None:
                return Identity(ANONYMOUS, ANONYMOUS)
            raise _unauthenticated("missing_key", "this endpoint needs an API key: send 'Authorization: Bearer KEY'")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            if permission is None:
                return Identity(ANONYMOUS, ANONYMOUS)
            raise _unauthenticated("invalid_key", "the Authorization header must be 'Bearer KEY'")
        if self.ring is None:
            raise ApiError(503, "keys_unavailable", "the key file has not been read yet; try again shortly")
        who = self.ring.identify(key.strip())
        if who is None:
            if permission is None:
                return Identity(ANONYMOUS, ANONYMOUS)
            raise _unauthenticated("invalid_key", "the API key is unknown or revoked")
        if not allows(who.role, permission):
            raise ApiError(403, "forbidden", f"role {who.role!r} may not use this endpoint (it needs permission "
                                             f"{permission!r})", decision="forbidden")
        return who

    def require(self, who: Identity, permission: str, what: str) -> None:
        """403 unless ``who``'s role has ``permission`` (for ``what``, as the message says)."""
        if not allows(who.role, permission):
            raise ApiError(403, "forbidden", f"role {who.role!r} may not {what} (it needs permission "
                                             f"{permission!r})", decision="forbidden")

    def check_query(self, who: Identity, endpoint: str, text: str | None = None, k: int | None = None) -> None:
        """403 naming the rule when the policy denies the query (evaluated before any encoding)."""
        rule = self.policy.decide(who.role, endpoint, text, k)
        if rule is not None:
            raise ApiError(403, "denied_by_policy", f"this query is not allowed for role {who.role!r} (rule {rule})",
                           decision=f"denied:{rule}")

    def coarsened(self, who: Identity) -> bool:
        return not allows(who.role, FULL)

    def rate(self, who: Identity) -> tuple[float, float] | None:
        """(rate, burst) of ``who``'s bucket, or None when requests of ``who`` are not limited."""
        if not self.config.enabled or not self.config.rate.enabled or who.role in (OPEN, ANONYMOUS):
            return None
        return (who.rate or self.config.rate.rate, who.burst or self.config.rate.burst)


    async def take_token(self, limiter, call: Call) -> None:
        """429 with Retry-After when the caller's key is over its rate (a bucket shared by every router
        replica, serving.governance.ratelimit.RateLimiter ``limiter``, drawn from in leases: a remote
        call every ``lease_size`` requests, the next lease asked for before this one runs out). A limiter
        that does not answer lets the request through."""
        limits = self.rate(call.who)
        if limits is None or limiter is None:
            return
        key = call.who.name
        size = self.leases.size(key, lease_size(*limits))
        left = self.leases.spend(key)
        if left is not None:
            if left < size / 2 and key not in self._leasing and not self.leases.wait(key):
                self._leasing[key] = asyncio.get_running_loop().create_task(self._lease(limiter, key, limits, size))
            return
        wait = self.leases.wait(key)  # refused a moment ago: refused here until the bucket's next token
        if not wait:
            taken, wait = await self._lease(limiter, key, limits, size, call)
            if taken:
                self.leases.spend(key)
                return
        if wait > 0:
            raise ApiError(429, "rate_limited", f"key {call.who.name!r} is over its rate of {limits[0]:g} requests/s "
                                                f"(burst {limits[1]:g}); retry in {wait:.2f} s",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))}, decision="rate_limited")

    async def _lease(self, limiter, key: str, limits: tuple[float, float], size: int,
                     call: Call | None = None) -> tuple[int, float]:
        """Lease up to ``size`` tokens of ``key`` into ``self.leases``: (taken, wait). A limiter that does not
        answer (within ``LIMITER_TIMEOUT_S`` and the request's budget) counts as one token taken."""
        timeout = LIMITER_TIMEOUT_S if call is None else min(LIMITER_TIMEOUT_S, max(call.remaining(), 0.001))
        try:
            taken, wait = await asyncio.wait_for(awaited(limiter.lease.remote(key, *limits, size)), timeout)
        except Exception as err:  # noqa: BLE001 - rate limits are not worth refusing service over
            log.warning("the rate limiter did not answer (request let through): %s", type(err).__name__)
            taken, wait = (1, 0.0) if call is not None else (0, 0.0)
        finally:
            if call is None:
                self._leasing.pop(key, None)
        if taken:
            self.leases.add(key, taken)
        if wait > 0 and lease_size(*limits) > 1:  # not a full lease: ask again once there is one (a slow key: each time)
            self.leases.refused(key, wait)
        return taken, wait

    async def audited(self, buffer, entry: dict, call: Call, response, failures):
        """``response`` once ``entry`` is in the replica's audit buffer (serving.governance.query_log.AuditBuffer);
        when the trail cannot take it (the writer fails, or the backlog is at its bound), a 503 instead
        (``on_failure: closed``, the default) or the answer anyway (``open``). ``failures``: the counter of
        entries the trail could not take."""
        if await buffer.add(entry):
            return response
        failures.inc(1)
        if self.config.on_failure == "open" or response is None:
            return response
        call.status = 503
        return error_response(503, "audit_unavailable", "the audit trail cannot record this request, so it is "
                                                        "refused (audit.on_failure: closed)")


def _unauthenticated(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="terrahash"'},
                    decision="unauthenticated")
