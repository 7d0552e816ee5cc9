"""Query-template rules per role, and the coarsened answers of roles without full results.

A policy file (YAML; ``serving/policy.yaml`` is the shipped example):

    coarsening: {distance_step: 8, max_k: 10, location_step_deg: 0.1}
    roles:
      restricted:
        default: allow            # when no rule matches
        rules:
        - id: no-military         # what a denied request is told (never the rule's text)
          effect: deny
          endpoints: [text]       # default: every search endpoint
          words: [military, barracks]
        - id: no-coordinates
          effect: deny
          pattern: '\\d+\\.\\d+\\s*,\\s*\\d+\\.\\d+'
        - id: small-image-queries
          effect: deny
          endpoints: [image, similar, captions]
          k_over: 5

Rules are evaluated in order, before anything is encoded; the first whose every condition holds decides.
Conditions: ``endpoints`` (the query's endpoint is one of them), ``words`` (the text has one of these
words, case-insensitive, whole words), ``pattern`` (a regular expression found in the text,
case-insensitive), ``k_over`` (more results asked for than this). A rule with a text condition never
matches a query without text. The policy travels in the router's ``user_config``
(``terrahash policy apply``), so a new one takes effect without restarting anything.
"""
from __future__ import annotations

import math
import re
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.governance.roles import ENDPOINTS

_STRICT = ConfigDict(extra="forbid", frozen=True)
SEARCH_ENDPOINTS = tuple(e for e, p in ENDPOINTS.items() if p == "search")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


class Coarsening(BaseModel):
    """What a coarsened answer keeps: distances rounded down to ``distance_step`` bits, footprints
    widened to a ``location_step_deg`` grid, at most ``max_k`` results."""

    model_config = _STRICT

    distance_step: int = Field(8, ge=1, le=4096)
    max_k: int = Field(10, ge=1, le=10_000)
    location_step_deg: float = Field(0.1, gt=0, le=180)


class Rule(BaseModel):
    model_config = _STRICT

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    effect: Literal["allow", "deny"]
    endpoints: tuple[str, ...] | None = None
    words: tuple[str, ...] | None = None
    pattern: str | None = None
    k_over: int | None = Field(None, ge=0)

    @field_validator("endpoints")
    @classmethod
    def _known_endpoints(cls, value):
        unknown = [e for e in value or () if e not in SEARCH_ENDPOINTS]
        if unknown:
            raise ValueError(f"unknown endpoint(s) {unknown}; rules apply to {list(SEARCH_ENDPOINTS)}")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return value

    @cached_property
    def _compiled(self):
        return re.compile(self.pattern, re.IGNORECASE) if self.pattern is not None else None

    @cached_property
    def _words(self) -> frozenset[str]:
        return frozenset(w.casefold() for w in self.words or ())

    def matches(self, endpoint: str, text: str | None, k: int | None, words: frozenset[str]) -> bool:
        if self.endpoints is not None and endpoint not in self.endpoints:
            return False
        if (self.words is not None or self.pattern is not None) and text is None:
            return False
        if self.words is not None and not (self._words & words):
            return False
        if self._compiled is not None and not self._compiled.search(text):
            return False
        return self.k_over is None or (k is not None and k > self.k_over)


class RolePolicy(BaseModel):
    model_config = _STRICT

    default: Literal["allow", "deny"] = "allow"
    rules: tuple[Rule, ...] = ()


class Policy(BaseModel):
    model_config = _STRICT

    coarsening: Coarsening = Field(default_factory=Coarsening)
    roles: dict[str, RolePolicy] = Field(default_factory=dict)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value):
        from serving.governance.roles import ROLES

        unknown = [r for r in value if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; roles: {list(ROLES)}")
        return value

    def decide(self, role: str, endpoint: str, text: str | None = None, k: int | None = None) -> str | None:
        """The id of the rule that denies this query, or None when it is allowed. A role's ``default:
        deny`` with no rule matching denies as ``default``."""
        policy = self.roles.get(role)
        if policy is None:
            return None
        words = frozenset(w.casefold() for w in _WORD.findall(text)) if text is not None else frozenset()
        for rule in policy.rules:
            if rule.matches(endpoint, text, k, words):
                return None if rule.effect == "allow" else rule.id
        return None if policy.default == "allow" else "default"


def check_policy(data: dict | None, source: str = "policy") -> Policy:
    """A Policy from its mapping; ValueError naming each bad or unknown key and ``source``."""
    from serving.validation import describe

    try:
        return Policy.model_validate(data or {})
    except ValidationError as err:
        raise ValueError(describe(err, source)) from None


def load_policy(path: str) -> dict:
    """A policy file's checked content (as JSON-ready data, for the router's user_config)."""
    import yaml

    from serving.storage import open_root

    parent, _, name = str(path).rstrip("/").rpartition("/")
    if str(path).startswith("s3://"):
        text = open_root(parent).read_bytes(name).decode()
    else:
        with open(path) as f:
            text = f.read()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'coarsening' and 'roles'")
    return check_policy(data, str(path)).model_dump(mode="json", exclude_none=True)


# --- coarsened answers ---------------------------------------------------------------------------


def _coarse_bbox(bbox: list[float], step: float) -> list[float]:
    west, south, east, north = bbox
    snap_down, snap_up = (lambda v: math.floor(v / step) * step), (lambda v: math.ceil(v / step) * step)
    return [round(snap_down(west), 6), round(snap_down(south), 6), round(snap_up(east), 6), round(snap_up(north), 6)]


def coarse_result(hit: dict, coarsening: Coarsening) -> dict:
    """Only the id, the class, a distance rounded down to the step, and a coarse place: the footprint
    widened to the grid, or the scene a chip was cut from. No image reference, code, score or caption."""
    properties = hit.get("properties") or {}
    out = {"id": hit["id"]}
    if properties.get("class") is not None:
        out["class"] = properties["class"]
    if hit.get("distance") is not None:
        step = coarsening.distance_step
        out["distance"] = int(hit["distance"]) // step * step
    if hit.get("bbox"):
        out["bbox"] = _coarse_bbox(hit["bbox"], coarsening.location_step_deg)
    if properties.get("scene") is not None:
        out["scene"] = properties["scene"]
    return out


def coarsen(answer: dict, coarsening: Coarsening) -> dict:
    """A coarsened copy of a search answer: the query as asked, k, the coarse results, and nothing about
    models, arms or timings."""
    out = {key: answer[key] for key in ("query", "k", "limit", "matched", "next") if key in answer}
    out["results"] = [coarse_result(hit, coarsening) for hit in answer.get("results", [])]
    out["coarsened"] = {"distance_step": coarsening.distance_step, "max_k": coarsening.max_k}
    return out
