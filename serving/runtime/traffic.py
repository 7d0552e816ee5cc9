"""Traffic arms: which model version and index answer a request, sticky per client, and how two arms compare.

An arm is a model version and an index release that can answer queries. The router's hot settings
(its Serve ``user_config``) carry ``traffic``: the arms with their weights, a salt, the primary arm.

* Live arms (``shadow: false``) share live traffic by ``weight`` (percent; they sum to 100). A request
  with a client id (``X-Client-Id``) is hashed with the salt into a bucket in [0, 100): the live arms
  other than the primary take consecutive ranges from 0 in the order they are listed, and the primary
  takes the rest. So a client keeps its arm while the weights hold still, and raising a challenger's
  weight moves clients from the primary to it, never back. A request without a client id is placed at
  random. ``X-TerraHash-Arm`` forces an arm.
* Shadow arms (``shadow: true``) get a copy of ``weight`` percent of the requests; their answers are
  compared with the client's (``overlap_at_k``, ``rank_correlation``) and never returned.
* ``fault`` injects errors, delay or garbage codes into an arm (as a service mesh's fault injection
  does), for drills and tests of the rollback path.
"""
from __future__ import annotations

import hashlib
import random
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.runtime.settings import Fault
from serving.validation import describe

_STRICT = ConfigDict(extra="forbid", strict=True)
ARM_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
BUCKETS = 100.0


class ArmRoute(BaseModel):
    """One arm as the router sees it: where its encoder and index live (Serve applications) and its share."""

    model_config = _STRICT

    name: str = Field(pattern=ARM_NAME)
    weight: float = Field(ge=0, le=100)  # percent of live traffic, or of requests mirrored to a shadow arm
    shadow: bool = False
    model_app: str  # the Serve application of the arm's QueryEncoder
    index_app: str  # the Serve application of the arm's shards (shared by arms of one code space and index)
    model: str | None = None  # what the arm serves: models:/NAME/VERSION, models:/NAME@ALIAS or a folder
    alias: str | None = None  # the registry alias the arm stands for (rolled back with it)
    serving: str | None = None  # models:/NAME/VERSION: the version of a model given by alias that the arm
    #                             serves, set by the canary controller's roll-outs (None: the alias as resolved
    #                             when the arm's backend was loaded)
    since: str | None = None  # when the arm started serving ``serving`` (ISO 8601)
    fault: Fault | None = None


class Traffic(BaseModel):
    """The split: arms, the assignment salt (a new salt reshuffles every client), the primary arm."""

    model_config = _STRICT

    arms: list[ArmRoute] = Field(min_length=1)
    salt: str = "terrahash"
    primary: str | None = None  # default: the first live arm
    arm_timeout_s: float = Field(1.0, gt=0, le=600)  # a non-primary arm's budget before its client is
    #                                                  answered by the primary instead
    shadow_timeout_s: float = Field(2.0, gt=0, le=600)
    revision: int = Field(0, ge=0)  # raised by every change, so a change can be seen to have reached each replica

    @model_validator(mode="after")
    def _consistent(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        live = [a for a in self.arms if not a.shadow]
        if not live:
            raise ValueError("traffic needs at least one live (non-shadow) arm")
        total = sum(a.weight for a in live)
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"the weights of the live arms must sum to 100, got {total:g} "
                             f"({', '.join(f'{a.name}={a.weight:g}' for a in live)})")
        if self.primary is None:
            self.primary = live[0].name
        elif self.primary not in {a.name for a in live}:
            raise ValueError(f"primary {self.primary!r} is not a live arm ({[a.name for a in live]})")
        return self

    def arm(self, name: str) -> ArmRoute:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def live(self) -> list[ArmRoute]:
        return [a for a in self.arms if not a.shadow]

    @property
    def shadows(self) -> list[ArmRoute]:
        return [a for a in self.arms if a.shadow and a.weight > 0]


def check_traffic(data: dict) -> Traffic:
    try:
        return Traffic.model_validate(data)
    except ValidationError as err:
        raise ValueError(describe(err, "traffic")) from None


def bucket(salt: str, client_id: str) -> float:
    """The client's place in [0, 100): a stable hash of salt and id."""
    digest = hashlib.sha256(f"{salt}\x00{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 * BUCKETS


def ranges(traffic: Traffic) -> list[tuple[str, float, float]]:
    """(arm, start, end) per live arm with weight: the others stacked from 0 in listed order, the primary last."""
    out, start = [], 0.0
    for arm in traffic.live:
        if arm.name != traffic.primary and arm.weight > 0:
            out.append((arm.name, start, start + arm.weight))
            start += arm.weight
    out.append((traffic.primary, start, BUCKETS))
    return out


def assign(traffic: Traffic, client_id: str | None, rng: random.Random | None = None) -> str:
    """The live arm of a request: by the client's bucket, or at random without a client id."""
    point = bucket(traffic.salt, client_id) if client_id else (rng or random).random() * BUCKETS
    for name, start, end in ranges(traffic):
        if start <= point < end:
            return name
    return traffic.primary


def mirrored(traffic: Traffic, rng: random.Random | None = None) -> list[ArmRoute]:
    """The shadow arms that get a copy of this request."""
    rng = rng or random
    return [arm for arm in traffic.shadows if rng.random() * BUCKETS < arm.weight]


def overlap_at_k(a: list[str], b: list[str], k: int) -> float:
    """|top-k of a & top-k of b| / k."""
    if k <= 0:
        return 1.0
    return len(set(a[:k]) & set(b[:k])) / k


def rank_correlation(a: list[str], b: list[str]) -> float | None:
    """Spearman's rho of the ranks the two lists give their common ids (None with fewer than 2 in common)."""
    common = [x for x in a if x in set(b)]
    n = len(common)
    if n < 2:
        return None
    rank_b = {x: i for i, x in enumerate(x for x in b if x in set(common))}
    d2 = sum((i - rank_b[x]) ** 2 for i, x in enumerate(common))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def parse_weights(text: str) -> dict[str, float]:
    """``"champion=90,challenger=10"`` -> {"champion": 90.0, "challenger": 10.0}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected NAME=PERCENT, got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"weight of {name.strip()!r} is not a number: {value!r}") from None
    return out


def with_weights(traffic: dict, weights: dict[str, float] | None = None,
                 shadow: dict[str, float] | None = None) -> dict:
    """A copy of a traffic mapping with new live weights and shadow percentages, checked."""
    arms = {a["name"]: dict(a) for a in traffic["arms"]}
    for kind, values in (("live", weights or {}), ("shadow", shadow or {})):
        for name, value in values.items():
            if name not in arms:
                raise ValueError(f"no arm named {name!r}; arms: {sorted(arms)}")
            arms[name]["weight"] = value
            arms[name]["shadow"] = kind == "shadow"
    if weights:
        for name, arm in arms.items():  # live arms left out of --weights get 0
            if not arm.get("shadow") and name not in weights:
                arm["weight"] = 0.0
    updated = {**traffic, "arms": list(arms.values())}
    check_traffic(updated)
    return updated

