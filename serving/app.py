"""The Ray Serve search app, composed by ``build_app``: query encoder, shard groups, readiness reports, router.

Deployments (one app, built with ``.bind()``; each in a module of its own):

* ``QueryEncoder`` (serving/query_encoder.py): the model version's ONNX students, with request batching.
  Image queries always go through it; text queries too when ``router_encodes_text`` is off.
* ``<collection>-shard-XXXXX`` (or ``-shard-XXXXX-YYYYY`` for a group; serving/shards.py): the shards of
  the release's image index (and caption index), ``shards_per_replica`` shards per deployment, each with
  ``shard_replicas`` replicas, at most one per node, serving node-local verified copies.
* ``ShardReports`` (serving/shards.py): every shard replica's latest readiness report.
* ``Router`` (serving/router.py): the FastAPI ingress: validation (serving/api.py), one deadline per
  request, fan-out with retries, merge and re-ranking (serving/ranking.py).

The encoder must speak the index's code space (``serving.spec.check_code_space``): a model of another
code space is refused at build, naming both. Nothing here imports torch.
"""
import logging
from pathlib import Path

from ray import serve

from serving.index import ImageRefs, resolve_release
from serving.query_encoder import QueryEncoder
from serving.router import Router
from serving.settings import ServeSettings, load_settings  # noqa: F401  (the app's public settings API)
from serving.shards import ShardReports, ShardServer

log = logging.getLogger(__name__)


def build_app(settings: ServeSettings | dict):
    """The Serve application for ``settings``: encoder, shard deployments, reports and router, bound together."""
    from serving.build import find_spec
    from serving.spec import check_code_space, load_spec

    settings = settings if isinstance(settings, ServeSettings) else ServeSettings.from_dict(settings)
    served = resolve_release(settings.index, settings.release, image_version=settings.image_version,
                             caption_version=settings.caption_version)
    manifests = {c: served[c] for c in ("images", "captions") if c in served}
    images = manifests["images"]
    if settings.rerank == "fusion" and "captions" not in manifests:
        raise ValueError(f"rerank: fusion needs a caption index, and release {served.get('release')} of "
                         f"{settings.index} has none")
    model_dir = Path(settings.model or images["extra"].get("model_dir") or "")
    if not model_dir.is_dir():
        raise ValueError(f"model version folder {str(model_dir)!r} not found (give model in the settings)")
    image_spec = find_spec(model_dir, "image", settings.encoder_variant)
    text_spec = find_spec(model_dir, "text", settings.encoder_variant)
    spec = load_spec(image_spec)
    for path in (image_spec, text_spec):
        check_code_space(path, images)
    encoder = QueryEncoder.options(
        num_replicas=settings.encoder_replicas, user_config=settings.encoder_config(),
        ray_actor_options=_actor_options(settings, settings.encoder_num_cpus, settings.encoder_resources),
    ).bind(str(image_spec), None if settings.router_encodes_text else str(text_spec), settings.encoder_threads)
    reports = ShardReports.options(ray_actor_options=_actor_options(settings, 0.01, {})).bind()
    per_replica = {name: shards_per_replica(settings, len(m["shards"])) for name, m in manifests.items()}
    shards = {name: [_shard_deployment(settings, manifest, group, reports)
                     for group in _groups([e["name"] for e in manifest["shards"]], per_replica[name])]
              for name, manifest in manifests.items()}
    refs = {name: ImageRefs(m, settings.image_base) for name, m in manifests.items()}
    meta = {"model_version": images["model_version"], "bits": images["bits"], "image_size": spec.image["size"],
            "index_version": {name: m["version"] for name, m in manifests.items()},
            "shards": {name: [f"{name}/{m['version']}/{e['name']}" for e in m["shards"]] for name, m in manifests.items()},
            "shard_count": {name: len(m["shards"]) for name, m in manifests.items()}, "shards_per_replica": per_replica,
            "refs": refs}
    return Router.options(
        num_replicas=settings.router_replicas, user_config=settings.router_config(),
        ray_actor_options=_actor_options(settings, settings.router_num_cpus, settings.router_resources),
    ).bind(encoder, shards["images"], shards.get("captions", []), meta, reports,
           str(text_spec) if settings.router_encodes_text else None, settings.encoder_threads, settings.decode_threads)


def shards_per_replica(settings: ServeSettings, shards: int) -> int:
    """Shards per shard deployment: the setting, or with 0 ceil(shards / alive nodes) (1 without Ray)."""
    if settings.shards_per_replica:
        return min(int(settings.shards_per_replica), max(shards, 1))
    import ray

    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else shards
    return max(1, -(-shards // max(nodes, 1)))


def _groups(names: list[str], size: int) -> list[list[str]]:
    """Consecutive shards in groups of ``size``: shard i is in group i // size (the router relies on it)."""
    return [names[i:i + size] for i in range(0, len(names), size)]


def _shard_deployment(settings: ServeSettings, manifest: dict, shard_names: list[str], reports):
    suffix = shard_names[0] if len(shard_names) == 1 else f"{shard_names[0]}-{shard_names[-1].rsplit('-', 1)[-1]}"
    options = {"name": f"{manifest['collection']}-{suffix}", "num_replicas": settings.shard_replicas,
               "ray_actor_options": _actor_options(settings, settings.shard_num_cpus, settings.shard_resources),
               "logging_config": {"enable_access_log": bool(settings.shard_access_log)},
               "health_check_period_s": settings.shard_health_period_s}
    if settings.spread_shards:
        options["max_replicas_per_node"] = 1  # a node lost takes at most one replica of each shard
    return ShardServer.options(**options).bind(settings.index, manifest["collection"], manifest["version"], shard_names,
                                               reports, settings.shard_threads, settings.shard_cache_dir,
                                               settings.shard_health_period_s)


def _actor_options(settings: ServeSettings, num_cpus: float, resources: dict) -> dict:
    return {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {}),
            **({"runtime_env": dict(settings.runtime_env)} if settings.runtime_env else {})}


def app_builder(args: dict):
    """Application builder for ``serve deploy`` / ``serve run``: ``args`` are ServeSettings fields."""
    return build_app(ServeSettings.from_dict(dict(args)))


def run_local(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, name: str = "terrahash",
              blocking: bool = True):
    """Start Ray (or join $RAY_ADDRESS) and Serve, deploy the app, and block until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto" if _ray_address_set() else None, configure_logging=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if settings.spread_shards and len(nodes) < settings.shard_replicas:
        log.warning("%d node(s) cannot spread %d replicas per shard one per node; placing them freely",
                    len(nodes), settings.shard_replicas)
        settings = settings.model_copy(update={"spread_shards": False})
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=name, route_prefix="/", blocking=blocking)


def _ray_address_set() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
