"""Settings checked by pydantic, reported as people read them: one line per problem, naming the key and
where it came from (the serve settings, the traffic, the access rules, a policy file)."""
from __future__ import annotations

from pydantic import ValidationError


def describe(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: message``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)
