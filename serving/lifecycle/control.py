"""Changing a running app's split: read the Serve config it was deployed from, change the traffic in the
router's and the canary's ``user_config``, apply it again.

Serve reconfigures replicas in place when only a ``user_config`` changes, and leaves an application
untouched when its import path, args and runtime_env are unchanged: a new weight restarts nothing, a
new arm only adds its applications. The app must have been deployed from a config (``terrahash serve``
and ``serve deploy`` do; ``serving.app.run_apps`` does not).
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

_lock = threading.Lock()  # one change at a time from this process
SPLIT_DEPLOYMENTS = ("Router", "Canary")


class NotDeclarative(RuntimeError):
    """The app was not deployed from a Serve config, so its split cannot change in place."""


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def apply_config(config: dict) -> None:
    """Apply a whole Serve config (``serve deploy`` format); applications left out are removed."""
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate(config))


def current_config() -> dict:
    """The Serve config of every application deployed from a config, as applied."""
    details = _client().get_serve_details()
    apps = [copy.deepcopy(app["deployed_app_config"]) for app in details.get("applications", {}).values()
            if app.get("deployed_app_config") and app.get("source") != "imperative"]
    kept = ("host", "port", "ssl_certfile", "ssl_keyfile", "ssl_ca_certs")
    http = {k: v for k, v in (details.get("http_options") or {}).items() if k in kept and v is not None}
    return {"proxy_location": details.get("proxy_location") or "EveryNode", "http_options": http,
            "applications": apps}


def router_app_config(config: dict, app_name: str) -> dict:
    for app in config["applications"]:
        if app["name"] == app_name:
            return app
    names = [a["name"] for a in config["applications"]]
    raise NotDeclarative(f"no application {app_name!r} deployed from a config (deployed from one: {names}); "
                         f"`terrahash serve` and `serve deploy` deploy that way")


def current_traffic(app_name: str = "terrahash") -> dict:
    app = router_app_config(current_config(), app_name)
    for deployment in app.get("deployments", []):
        if deployment["name"] == "Router":
            return deployment["user_config"]["traffic"]
    raise NotDeclarative(f"application {app_name!r} has no Router user_config")


def wait_applied(app_name: str, revision: int, timeout: float = 60.0) -> None:
    """Until every running router replica of ``app_name`` reports (to the canary controller) a split of at
    least ``revision``: a changed split has then reached every replica."""
    import time

    from ray import serve

    canary = serve.get_deployment_handle("Canary", app_name)
    deadline = time.monotonic() + timeout
    while True:
        router = serve.status().applications[app_name].deployments["Router"]
        running = int(router.replica_states.get("RUNNING", 0))
        revisions = canary.revisions.remote().result(timeout_s=10)
        if running and len([r for r in revisions.values() if r >= revision]) >= running:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the split of {app_name!r} (revision {revision}) has not reached every router replica "
                               f"after {timeout:.0f} s: {revisions}, {running} running")
        time.sleep(0.2)


def update_traffic(app_name: str, change: Callable[[dict], dict], wait: bool = True) -> dict:
    """Apply ``change(traffic) -> traffic`` to the running app's split; returns the new split once every
    router replica has it (``wait``)."""
    from serving.runtime.traffic import check_traffic

    with _lock:
        config = current_config()
        app = router_app_config(config, app_name)
        deployments = {d["name"]: d for d in app.get("deployments", [])}
        if "Router" not in deployments:
            raise NotDeclarative(f"application {app_name!r} has no Router user_config")
        old = deployments["Router"]["user_config"]["traffic"]
        changed = change(copy.deepcopy(old))
        changed["revision"] = int(old.get("revision", 0)) + 1
        new = check_traffic(changed).model_dump(mode="json")
        for name in SPLIT_DEPLOYMENTS:
            if name in deployments:
                deployments[name]["user_config"] = {**deployments[name].get("user_config", {}), "traffic": new}
        apply_config(config)
    if wait:
        wait_applied(app_name, new["revision"])
    return new


def update_canary(app_name: str, changes: dict) -> dict:
    """Change the canary controller's hot settings (serving.runtime.settings.CanaryConfig) in place."""
    from serving.runtime.settings import CanaryConfig

    with _lock:
        config = current_config()
        app = router_app_config(config, app_name)
        [deployment] = [d for d in app.get("deployments", []) if d["name"] == "Canary"]
        current = dict(deployment["user_config"])
        traffic = current.pop("traffic")
        checked = CanaryConfig.model_validate({**current, **changes}).model_dump(mode="json")
        deployment["user_config"] = {**checked, "traffic": traffic}
        apply_config(config)
    return checked


def apply_new_config(config: dict, app_name: str = "terrahash", wait: bool = True) -> None:
    """Apply a whole Serve config written from settings (arms added or removed) to a running app: its split
    gets the next revision, and with ``wait`` this returns once every router replica has it."""
    try:
        revision = int(current_traffic(app_name).get("revision", 0)) + 1
    except NotDeclarative:
        revision = 0  # not running yet: a first deployment
    app = router_app_config(config, app_name)
    for deployment in app.get("deployments", []):
        if deployment["name"] in SPLIT_DEPLOYMENTS:
            deployment["user_config"]["traffic"]["revision"] = revision
    apply_config(config)
    if wait and revision:
        wait_applied(app_name, revision, timeout=600)  # new arms' applications may take minutes to build


def update_access(app_name: str, change: Callable[[dict], dict]) -> dict:
    """Apply ``change(access) -> access`` to the router's hot access settings (serving.runtime.access.AccessConfig:
    auth, the policy, rate limits) in place; returns the new settings. Replicas are reconfigured, none
    restarts."""
    from serving.runtime.access import AccessConfig

    with _lock:
        config = current_config()
        app = router_app_config(config, app_name)
        [deployment] = [d for d in app.get("deployments", []) if d["name"] == "Router"]
        current = dict(deployment["user_config"])
        access = AccessConfig.check(change(copy.deepcopy(current.get("access") or {}))).model_dump(mode="json")
        deployment["user_config"] = {**current, "access": access}
        apply_config(config)
    return access
