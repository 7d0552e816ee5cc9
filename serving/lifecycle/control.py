"""Changing a running app's split: read the Serve config it was deployed from, change the traffic in the
router's and the canary's ``user_config``, apply it again.

Serve reconfigures replicas in place when only a ``user_config`` changes, and leaves an application
untouched when its import path, args and runtime_env are unchanged: a new weight restarts nothing, a
new arm only adds its applications. The app must have been deployed from a config (``terrahash serve``
and ``serve deploy`` do; ``serving.app.run_apps`` does not).

A roll-out (``roll_out``, by the canary controller when an arm's alias moves) points the arm at a model
version: its route's ``serving`` and, in the split layout, a model application of that version started
beside the old one; ``drop_unused_model_apps`` stops the old one once every router has switched.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import time
import uuid
from typing import Callable

_local = threading.Lock()  # one change at a time from this process
SPLIT_DEPLOYMENTS = ("Router", "Canary")
LOCK_ACTOR = "terrahash-config-lock"
LOCK_LEASE_S = 120.0  # a holder that died releases the lock by then
LOCK_WAIT_S = 180.0


class _ConfigLock:
    """One change of the Serve config at a time across processes (the CLI, the canary controller, tests):
    each change reads the config, edits it and applies it whole, so two at once would lose one. A lease,
    so that a holder that died does not block the others for ever. Runs as a detached Ray actor."""

    def __init__(self):
        self.holder, self.until = None, 0.0

    async def acquire(self, token: str) -> bool:
        import asyncio

        deadline = time.monotonic() + LOCK_WAIT_S
        while self.holder is not None and time.monotonic() < self.until:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        self.holder, self.until = token, time.monotonic() + LOCK_LEASE_S
        return True

    def release(self, token: str) -> None:
        if self.holder == token:
            self.holder = None


@contextlib.contextmanager
def changing():
    """Hold the config lock of this process and, within a Ray cluster, the cluster's."""
    import ray

    with _local:
        if not ray.is_initialized():
            yield
            return
        actor = ray.remote(num_cpus=0, max_concurrency=100)(_ConfigLock).options(
            name=LOCK_ACTOR, namespace="serve", lifetime="detached", get_if_exists=True).remote()
        token = uuid.uuid4().hex
        if not ray.get(actor.acquire.remote(token), timeout=LOCK_WAIT_S + 10):
            raise TimeoutError(f"another change of the Serve config held its lock for {LOCK_WAIT_S:.0f} s")
        try:
            yield
        finally:
            actor.release.remote(token)


class NotDeclarative(RuntimeError):
    """The app was not deployed from a Serve config, so its split cannot change in place."""


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def apply_config(config: dict) -> None:
    """Apply a whole Serve config (``serve deploy`` format); applications left out are removed."""
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate(config))


def _applied(config: dict, timeout: float = 30.0) -> None:
    """Apply ``config`` and return once Serve reports it back (``current_config``), so that the next change,
    made under the lock as soon as this one releases it, reads this one and cannot undo it."""
    apply_config(config)

    def user_configs(cfg: dict) -> dict:
        return {(a["name"], d["name"]): d["user_config"] for a in cfg["applications"]
                for d in a.get("deployments") or [] if "user_config" in d}

    wanted = user_configs(config)
    deadline = time.monotonic() + timeout
    while True:
        seen = user_configs(current_config())
        if all(seen.get(key) == value for key, value in wanted.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve did not report the applied config within {timeout:.0f} s")
        time.sleep(0.05)


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
    return current_traffic_of(current_config(), app_name)


def current_traffic_of(config: dict, app_name: str) -> dict:
    app = router_app_config(config, app_name)
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


def update_traffic(app_name: str, change: Callable[[dict], dict], wait: bool = True,
                   change_apps: Callable[[dict, dict], None] | None = None) -> dict:
    """Apply ``change(traffic) -> traffic`` to the running app's split; returns the new split once every
    router replica has it (``wait``). ``change_apps(config, traffic)`` may then change the applications of
    the same Serve config (add or drop model applications) before it is applied."""
    from serving.runtime.traffic import check_traffic

    with changing():
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
        if change_apps is not None:
            change_apps(config, new)
        _applied(config)
    if wait:
        wait_applied(app_name, new["revision"])
    return new


def _arm(traffic: dict, name: str) -> dict:
    for arm in traffic["arms"]:
        if arm["name"] == name:
            return arm
    raise KeyError(f"no arm {name!r} in the split (arms: {[a['name'] for a in traffic['arms']]})")


def roll_out(app_name: str, arm_name: str, version: str, since: str, start_app: bool = True,
             wait: bool = True) -> dict:
    """Point arm ``arm_name`` at ``version`` (``models:/NAME/VERSION``), serving it since ``since``. In the split
    layout (the arm's model is a Serve application) and with ``start_app``, that version's own model
    application is started beside the current one and the arm moved to it; each router replica switches
    once it has resolved it (serving.runtime.arms). ``start_app=False`` only records what the arm already
    serves. Returns the new split."""
    from serving.runtime.serve_config import MODEL_APP_IMPORT, pinned_model_app_name

    def change(traffic: dict) -> dict:
        arm = _arm(traffic, arm_name)
        arm["serving"], arm["since"] = version, since
        return traffic

    def start(config: dict, traffic: dict) -> None:
        arm = _arm(traffic, arm_name)
        apps = {a["name"]: a for a in config["applications"]}
        old = apps.get(arm["model_app"])
        if not start_app or old is None or old.get("import_path") != MODEL_APP_IMPORT:
            return  # co-located: the routers load the model themselves
        if old["args"].get("model") == version:
            return
        name = pinned_model_app_name(app_name, version, old["args"].get("encoder_variant", "fp32"))
        if name not in apps:
            started = {**copy.deepcopy(old), "name": name, "args": {**old["args"], "model": version}}
            config["applications"].insert(config["applications"].index(old), started)
        arm["model_app"] = name  # the split the router and the canary get (one mapping)

    return update_traffic(app_name, change, wait=wait, change_apps=start)


def _drop_unused_model_apps(config: dict, traffic: dict, app_name: str) -> None:
    """Leave out of ``config`` the model applications of ``app_name`` that no arm of ``traffic`` uses."""
    from serving.runtime.serve_config import MODEL_APP_IMPORT

    used = {arm["model_app"] for arm in traffic["arms"]}
    config["applications"] = [a for a in config["applications"] if a.get("import_path") != MODEL_APP_IMPORT
                              or not a["name"].startswith(f"{app_name}-model-") or a["name"] in used]


def settle_roll_out(app_name: str, arm_name: str, since: str, wait: bool = True) -> dict:
    """Every router serves the arm's new version: record ``since`` and stop the model application it was
    rolled out from (split layout)."""
    def change(traffic: dict) -> dict:
        _arm(traffic, arm_name)["since"] = since
        return traffic

    return update_traffic(app_name, change, wait=wait,
                          change_apps=lambda config, traffic: _drop_unused_model_apps(config, traffic, app_name))


def restore_arm(app_name: str, route: dict, wait: bool = True) -> dict:
    """Put an arm's route back as it was before a roll-out that failed (its model application, version and
    since), and stop the application started for it."""
    def change(traffic: dict) -> dict:
        _arm(traffic, route["name"]).update({k: route.get(k) for k in ("model_app", "serving", "since")})
        return traffic

    return update_traffic(app_name, change, wait=wait,
                          change_apps=lambda config, traffic: _drop_unused_model_apps(config, traffic, app_name))


def update_canary(app_name: str, changes: dict) -> dict:
    """Change the canary controller's hot settings (serving.runtime.settings.CanaryConfig) in place."""
    from serving.runtime.settings import CanaryConfig

    with changing():
        config = current_config()
        app = router_app_config(config, app_name)
        [deployment] = [d for d in app.get("deployments", []) if d["name"] == "Canary"]
        current = dict(deployment["user_config"])
        traffic = current.pop("traffic")
        checked = CanaryConfig.model_validate({**current, **changes}).model_dump(mode="json")
        deployment["user_config"] = {**checked, "traffic": traffic}
        _applied(config)
    return checked


def apply_new_config(config: dict, app_name: str = "terrahash", wait: bool = True) -> None:
    """Apply a whole Serve config written from settings (arms added or removed) to a running app: its split
    gets the next revision, and with ``wait`` this returns once every router replica has it."""
    with changing():
        try:
            running = current_config()
            revision = int(current_traffic_of(running, app_name).get("revision", 0)) + 1
            _keep_rolled_out(config, running, app_name)
        except NotDeclarative:
            revision = 0  # not running yet: a first deployment
        app = router_app_config(config, app_name)
        for deployment in app.get("deployments", []):
            if deployment["name"] in SPLIT_DEPLOYMENTS:
                deployment["user_config"]["traffic"]["revision"] = revision
        _applied(config)
    if wait and revision:
        wait_applied(app_name, revision, timeout=600)  # new arms' applications may take minutes to build


def _keep_rolled_out(config: dict, running: dict, app_name: str) -> None:
    """An arm of the new config declared with the same model as a running one keeps the version a roll-out
    gave it (and, split, that version's model application) instead of starting over from its alias."""
    before = {a["name"]: a for a in current_traffic_of(running, app_name)["arms"] if a.get("serving")}
    running_apps = {a["name"]: a for a in running["applications"]}
    traffic = current_traffic_of(config, app_name)
    for arm in traffic["arms"]:
        old = before.get(arm["name"])
        if old is None or old.get("model") != arm.get("model"):
            continue
        arm["serving"], arm["since"] = old["serving"], old.get("since")
        if old["model_app"] != arm["model_app"] and old["model_app"] in running_apps:
            if old["model_app"] not in {a["name"] for a in config["applications"]}:
                config["applications"].insert(0, copy.deepcopy(running_apps[old["model_app"]]))
            arm["model_app"] = old["model_app"]
    _drop_unused_model_apps(config, traffic, app_name)
    router = router_app_config(config, app_name)
    for deployment in router.get("deployments", []):
        if deployment["name"] in SPLIT_DEPLOYMENTS:
            deployment["user_config"]["traffic"] = traffic


def update_access(app_name: str, change: Callable[[dict], dict]) -> dict:
    """Apply ``change(access) -> access`` to the router's hot access settings (serving.runtime.access.AccessConfig:
    auth, the policy, rate limits) in place; returns the new settings. Replicas are reconfigured, none
    restarts."""
    from serving.runtime.access import AccessConfig

    with changing():
        config = current_config()
        app = router_app_config(config, app_name)
        [deployment] = [d for d in app.get("deployments", []) if d["name"] == "Router"]
        current = dict(deployment["user_config"])
        access = AccessConfig.check(change(copy.deepcopy(current.get("access") or {}))).model_dump(mode="json")
        deployment["user_config"] = {**current, "access": access}
        _applied(config)
    return access
