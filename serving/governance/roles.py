"""Roles, their permissions, and the permission each HTTP endpoint needs.

| role         | search | full results | explain | traffic, arm override, readiness details | keys |
|--------------|--------|--------------|---------|------------------------------------------|------|
| `restricted` | yes (template rules apply) | no: coarsened answers, `k` capped | no | no | no |
| `reader`     | yes    | yes          | yes     | no                                       | no   |
| `operator`   | yes    | yes          | yes     | yes                                      | no   |
| `admin`      | yes    | yes          | yes     | yes                                      | yes  |

With auth off every request acts as ``open``, a role with every permission that no key can hold.
Policy rules (serving.governance.policy) may apply to any role; the shipped policy gives them to ``restricted``.
"""
from __future__ import annotations

SEARCH, FULL, EXPLAIN, CARDS = "search", "full_results", "explain", "model_cards"
TRAFFIC, ARM_OVERRIDE, READY_DETAILS, KEYS = "traffic", "arm_override", "ready_details", "keys"

_READER = frozenset({SEARCH, FULL, EXPLAIN, CARDS})
_OPERATOR = _READER | {TRAFFIC, ARM_OVERRIDE, READY_DETAILS}
ROLES: dict[str, frozenset[str]] = {
    "restricted": frozenset({SEARCH, CARDS}),
    "reader": _READER,
    "operator": _OPERATOR,
    "admin": _OPERATOR | {KEYS},
}
OPEN = "open"  # auth off
ANONYMOUS = "anonymous"  # auth on, no key: only the open endpoints
ALL = frozenset().union(*ROLES.values())

# The permission an endpoint needs; None: open to anyone (load balancers' probes).
ENDPOINTS: dict[str, str | None] = {
    "healthz": None, "readyz": None, "traffic": TRAFFIC, "keys": KEYS,
    "text": SEARCH, "image": SEARCH, "similar": SEARCH, "captions": SEARCH, "items": SEARCH, "received": SEARCH,
    "thumbnail": FULL, "explain": EXPLAIN, "card": CARDS,
    # STAC API: the catalogue as item listing (search); items themselves are refused to coarsened roles
    "stac_landing": SEARCH, "stac_conformance": SEARCH, "stac_collections": SEARCH, "stac_items": SEARCH,
    "stac_item": SEARCH, "stac_search": SEARCH,
}


def permissions(role: str) -> frozenset[str]:
    if role == OPEN:
        return ALL
    return ROLES.get(role, frozenset())


def allows(role: str, permission: str | None) -> bool:
    return permission is None or permission in permissions(role)
