"""The search service as Serve applications: one per index, one per model version, and the router's.

Traffic arms (serving/runtime/traffic.py) are built from three kinds of application, so that an arm can be
added, re-weighted or removed while the others keep serving, without restarting a replica:

* ``<app>-index-<key>`` (``index_app``): one index release, its shard groups (serving/runtime/replicas.py,
  ``shards_per_replica`` shards per deployment, ``shard_replicas`` replicas each, at most one per node,
  serving node-local verified copies), ``ShardReports`` and ``IndexInfo`` (what the router needs to
  know of the index). Arms that declare the same index and release share it.
* ``<app>-model-<key>`` (``model_app``): a ``QueryEncoder`` (serving/runtime/query_encoder.py) for one model
  version, fetched on its own node from the registry's artifact store (serving/model/registry.py).
* ``<app>`` (``router_app``): the ``Router`` (serving/runtime/router.py, the FastAPI ingress) and the
  ``Canary`` controller (serving/lifecycle/canary.py). The split lives in their ``user_config``.

``serving.runtime.serve_config.serve_config(settings)`` writes the whole set as one Serve config (for
``serve deploy`` or ``terrahash serve``); ``run_apps`` deploys the same set from Python. The encoder
must speak the index's code space (``serving.model.spec.check_code_space``), checked when the model
application starts. Nothing here imports torch.
"""
import logging
import os

from ray import serve

from serving.governance.query_log import AuditWriter
from serving.governance.ratelimit import RateLimiter
from serving.index.refs import ImageRefs
from serving.index.releases import resolve_release
from serving.lifecycle.canary import Canary
from serving.model.versions import served_model
from serving.runtime.ingress import ingress_env
from serving.runtime.query_encoder import QueryEncoder
from serving.runtime.replicas import ShardReports, ShardServer
from serving.runtime.router import Router
from serving.runtime.serve_config import app_specs, router_fields
from serving.runtime.settings import ServeSettings, load_settings  # noqa: F401  (the app's public settings API)

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1)
class IndexInfo:
    """The ingress of an index application: what a router needs to use the index. The shard deployments
    and the reports are bound to it only to make them part of the application; nothing is searched here."""

    def __init__(self, info: dict, shards: list, reports):
        self.info = info

    async def describe(self) -> dict:
        return self.info


def index_app(args: dict):
    """An index release's shard groups, readiness reports and ``IndexInfo``."""
    settings = ServeSettings.from_dict(dict(args), "index application")
    served = resolve_release(settings.index, settings.release, image_version=settings.image_version,
                             caption_version=settings.caption_version)
    manifests = {c: served[c] for c in ("images", "captions") if c in served}
    images = manifests["images"]
    reports = ShardReports.options(ray_actor_options=_actor_options(settings, 0.01, {})).bind()
    per_replica = {name: shards_per_replica(settings, len(m["shards"])) for name, m in manifests.items()}
    groups, names = {}, {}
    for collection, manifest in manifests.items():
        groups[collection] = _groups([e["name"] for e in manifest["shards"]], per_replica[collection])
        names[collection] = [_group_name(manifest, group) for group in groups[collection]]
    shard_names = {c: [list(group) for group in gs] for c, gs in groups.items()}
    local = {c: local_groups(settings, len(gs)) for c, gs in groups.items()}
    for collection, manifest in manifests.items():  # the routers hold the first local[collection] groups
        groups[collection] = [_shard_deployment(settings, manifest, group, reports)
                              for group in groups[collection][local[collection]:]]
    info = {"index": settings.index, "release": served.get("release"), "model_version": images["model_version"],
            "model": served_model(served, settings.index), "code_space": images.get("code_space"), "bits": images["bits"],
            "index_version": {name: m["version"] for name, m in manifests.items()},
            "shards": {name: [f"{name}/{m['version']}/{e['name']}" for e in m["shards"]]
                       for name, m in manifests.items()},
            "shard_count": {name: len(m["shards"]) for name, m in manifests.items()},
            "shards_per_replica": per_replica, "groups": names, "group_shards": shard_names, "local_groups": local,
            "local": {"threads": settings.shard_threads, "cache_dir": settings.shard_cache_dir,
                      "period_s": settings.shard_health_period_s, "key_file": settings.index_key_file},
            "refs": {name: ImageRefs(m, settings.image_base) for name, m in manifests.items()}, "reports": True,
            "filterable": images.get("filterable") or {"bbox": 0, "datetime": 0},
            "drift": images.get("extra", {}).get("drift")}
    return IndexInfo.options(ray_actor_options=_actor_options(settings, 0.01, {})).bind(
        info, [g for gs in groups.values() for g in gs], reports)


def model_app(args: dict):
    """One model version's ``QueryEncoder`` (its ingress)."""
    settings = ServeSettings.from_dict(dict(args), "model application")
    return QueryEncoder.options(
        num_replicas=settings.encoder_replicas, user_config=settings.encoder_config(),
        ray_actor_options=_actor_options(settings, settings.encoder_num_cpus, settings.encoder_resources),
    ).bind({"model": settings.model, "index": settings.index, "release": settings.release,
            "variant": settings.encoder_variant, "threads": settings.encoder_threads,
            "load_text": not settings.router_encodes_text, "tracking_uri": settings.tracking_uri,
            "cache_dir": settings.model_cache_dir})


def router_app(args: dict):
    """The router and the canary controller; their user_configs (the split, the limits) come from the
    Serve config's deployment entries."""
    return _router_app(args)


def _router_app(args: dict, router_config: dict | None = None, canary_config: dict | None = None):
    """``router_app``, with the user_configs given here when run from Python (``run_apps``)."""
    settings = ServeSettings.from_dict(dict(args), "router application")
    canary = Canary.options(
        num_replicas=1, ray_actor_options=_actor_options(settings, 0.05, {}),
        **({"user_config": canary_config} if canary_config is not None else {}),
    ).bind(settings.app_name, settings.tracking_uri)
    limiter = None  # started only where keys with rate limits exist
    if settings.auth.enabled and settings.rate_limit.enabled:
        limiter = RateLimiter.options(ray_actor_options=_actor_options(settings, 0.01, {})).bind()
    audit = None
    if settings.audit.log:
        audit = AuditWriter.options(ray_actor_options=_actor_options(settings, 0.01, settings.audit.resources)).bind(
            settings.audit.log, settings.audit.flush_s)
    return Router.options(
        num_replicas=settings.router_replicas, logging_config={"enable_access_log": settings.router_access_log},
        ray_actor_options=_actor_options(settings, settings.router_num_cpus, settings.router_resources),
        **({"user_config": router_config} if router_config is not None else {}),
    ).bind(canary, {"encoder_threads": settings.encoder_threads, "decode_threads": settings.decode_threads,
                    "router_encodes_text": settings.router_encodes_text, "tracking_uri": settings.tracking_uri,
                    "model_cache_dir": settings.model_cache_dir, "app_name": settings.app_name,
                    "jscc_model": settings.jscc_model, "code_link_model": settings.code_link_model,
                    "layout": settings.layout,
                    "encoder_variant": settings.encoder_variant, "router_threads": settings.router_threads},
           limiter, audit)


BUILDERS = {"index": index_app, "model": model_app, "router": router_app}


def shards_per_replica(settings: ServeSettings, shards: int) -> int:
    """Shards per shard deployment: the setting, or with 0 ceil(shards / alive nodes) (1 without Ray)."""
    if settings.shards_per_replica:
        return min(int(settings.shards_per_replica), max(shards, 1))
    import ray

    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else shards
    return max(1, -(-shards // max(nodes, 1)))


def local_groups(settings: ServeSettings, groups: int) -> int:
    """Shard groups of a collection held in the router replicas: none when split; the setting; with None,
    none when the shards are pinned to other nodes than the routers (``shard_resources``), else every group
    on a one-node cluster (or without Ray) and one on a larger one."""
    if settings.layout != "colocated":
        return 0
    if settings.local_groups is not None:
        return min(settings.local_groups, groups)
    if settings.shard_resources and settings.shard_resources != settings.router_resources:
        return 0  # the shards are pinned to nodes of their own
    import ray

    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 1
    return groups if nodes <= 1 else min(1, groups)


def _groups(names: list[str], size: int) -> list[list[str]]:
    """Consecutive shards in groups of ``size``: shard i is in group i // size (the router relies on it)."""
    return [names[i:i + size] for i in range(0, len(names), size)]


def _group_name(manifest: dict, shard_names: list[str]) -> str:
    suffix = shard_names[0] if len(shard_names) == 1 else f"{shard_names[0]}-{shard_names[-1].rsplit('-', 1)[-1]}"
    return f"{manifest['collection']}-{suffix}"


def _shard_deployment(settings: ServeSettings, manifest: dict, shard_names: list[str], reports):
    options = {"name": _group_name(manifest, shard_names), "num_replicas": settings.shard_replicas,
               "ray_actor_options": _actor_options(settings, settings.shard_num_cpus, settings.shard_resources),
               "logging_config": {"enable_access_log": bool(settings.shard_access_log)},
               "health_check_period_s": settings.shard_health_period_s}
    if settings.spread_shards:
        options["max_replicas_per_node"] = 1  # a node lost takes at most one replica of each shard
    return ShardServer.options(**options).bind(settings.index, manifest["collection"], manifest["version"], shard_names,
                                               reports, settings.shard_threads, settings.shard_cache_dir,
                                               settings.shard_health_period_s, settings.index_key_file)


def _actor_options(settings: ServeSettings, num_cpus: float, resources: dict) -> dict:
    return {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {}),
            **({"runtime_env": dict(settings.runtime_env)} if settings.runtime_env else {})}


def app_builder(args: dict):
    """Kept for Serve configs of one application: ``args`` are ServeSettings fields; one arm, served alone
    (its index and model applications must be deployed beside it, as ``serve_config`` writes them)."""
    return router_app(router_fields(ServeSettings.from_dict(dict(args))))


def check_arms(settings: ServeSettings) -> list[dict]:
    """Before deploying: every arm's release resolves, its model loads here, and speaks the index's code
    space (``CodeSpaceError`` naming both otherwise). Returns, per arm, the model QueryEncoder would load."""
    from serving.runtime.query_encoder import load_model
    from serving.model.spec import check_code_space

    loaded = []
    for arm in settings.arm_list():
        served = resolve_release(arm.index, arm.release, image_version=settings.image_version,
                                 caption_version=settings.caption_version)
        model = load_model(arm.model, arm.index, arm.release, settings.encoder_variant, settings.tracking_uri,
                           settings.model_cache_dir)
        for spec in (model["image_spec"], model["text_spec"]):
            check_code_space(spec, served["images"])
        loaded.append(model)
    return loaded


def run_apps(settings: ServeSettings, name: str | None = None, route_prefix: str | None = None) -> None:
    """Deploy every application of ``settings`` from Python (``serve.run``), the router's last.

    The split changes live only in a declarative deployment (``deploy_local``); here a new split
    means running again, which restarts the router.
    """
    updates = {k: v for k, v in (("app_name", name), ("route_prefix", route_prefix)) if v is not None}
    settings = settings.model_copy(update=updates) if updates else settings
    check_arms(settings)
    specs = app_specs(settings)
    for spec in specs:
        kind = spec["kind"]
        if kind == "router":
            users = {d["name"]: d["user_config"] for d in spec["deployments"]}
            app = _router_app(spec["args"], users["Router"], users["Canary"])
        else:
            app = BUILDERS[kind](spec["args"])
        serve.run(app, name=spec["name"], route_prefix=spec["route_prefix"])  # waits until it runs


def delete_apps(name: str = "terrahash") -> None:
    """Delete the router application ``name`` and its index and model applications (holding the config
    lock: a change of the split read before the delete would otherwise deploy them again)."""
    from serving.lifecycle.control import changing

    with changing():
        ours = [app for app in serve.status().applications
                if app == name or app.startswith((f"{name}-index-", f"{name}-model-"))]
        for app in sorted(ours, key=lambda a: a != name):  # the router first: nothing calls the others then
            serve.delete(app)


def deploy_local(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> dict:
    """Start Ray (or join $RAY_ADDRESS) and Serve, and apply the settings' Serve config declaratively,
    so that ``terrahash traffic set`` can change the split live. Returns the config applied."""
    import ray

    from serving.lifecycle.control import apply_config
    from serving.runtime.serve_config import serve_config

    if not ray.is_initialized():
        joining = _ray_address_set()
        if not joining:  # a Ray of our own: its Serve takes the ingress from this environment
            env, why = ingress_env(settings.ingress, tls=settings.tls is not None)
            os.environ.update(env)
            if why:
                log.warning("%s", why)
        # the replicas' and Serve's own lines stay in their log files (/tmp/ray/session_latest/logs/serve)
        # "local": a Ray of its own even where `ray start` left a cluster on this machine (join: $RAY_ADDRESS)
        ray.init(address="auto" if joining else "local", configure_logging=False, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if settings.spread_shards and len(nodes) < settings.shard_replicas:
        log.warning("%d node(s) cannot spread %d replicas per shard one per node; placing them freely",
                    len(nodes), settings.shard_replicas)
        settings = settings.model_copy(update={"spread_shards": False})
    config = serve_config(settings, host=host, port=port)
    serve.start(http_options=config["http_options"])  # with TLS, its certificate and key
    apply_config(config)
    return config


def _ray_address_set() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))

