"""One Serve config from the serve settings: the router's application, one per index, one per model.

``serve_config(settings)`` is what ``terrahash serve`` applies and what ``terrahash serve --render``
writes for ``serve deploy`` (and, later, a RayService's ``serveConfigV2``): the app is defined once.
Each application's ``args`` hold only the settings that shape it, so a change to the split or to a
hot setting (the deployments' ``user_config``) reconfigures replicas in place, and adding an arm
adds applications without touching the others.
"""
from __future__ import annotations

import hashlib
import json

from serving.runtime.settings import ArmSettings, ServeSettings

INDEX_FIELDS = ("index", "release", "image_version", "caption_version", "image_base", "shard_replicas",
                "shards_per_replica", "spread_shards", "shard_num_cpus", "shard_threads", "shard_cache_dir",
                "shard_health_period_s", "shard_access_log", "runtime_env", "shard_resources", "index_key_file",
                "layout", "local_groups")
MODEL_FIELDS = ("model", "index", "release", "encoder_variant", "encoder_replicas", "encoder_num_cpus",
                "encoder_threads", "encoder_resources", "router_encodes_text", "runtime_env", "tracking_uri",
                "model_cache_dir")
ROUTER_FIELDS = ("router_replicas", "router_num_cpus", "router_resources", "decode_threads", "encoder_threads",
                 "router_encodes_text", "runtime_env", "tracking_uri", "model_cache_dir", "app_name", "audit",
                 "jscc_model", "code_link_model", "layout", "encoder_variant", "router_threads", "rate_limit", "auth",
                 "router_access_log")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def _pick(settings: ServeSettings, fields: tuple[str, ...], **updates) -> dict:
    data = settings.model_dump(mode="json")
    return {**{f: data[f] for f in fields if data[f] is not None}, **{k: v for k, v in updates.items() if v is not None}}


def index_fields(settings: ServeSettings, arm: ArmSettings) -> dict:
    return _pick(settings, INDEX_FIELDS, index=arm.index, release=arm.release)


def model_fields(settings: ServeSettings, arm: ArmSettings) -> dict:
    return _pick(settings, MODEL_FIELDS, model=arm.model, index=arm.index, release=arm.release)


def router_fields(settings: ServeSettings) -> dict:
    return _pick(settings, ROUTER_FIELDS)


def index_app_name(settings: ServeSettings, arm: ArmSettings) -> str:
    fields = index_fields(settings, arm)
    return f"{settings.app_name}-index-{_key(fields.get('index'), fields.get('release'), fields.get('image_version'), fields.get('caption_version'))}"


def model_app_name(settings: ServeSettings, arm: ArmSettings) -> str:
    fields = model_fields(settings, arm)
    # a model given by alias is its own application (until a roll-out pins the arm to a version's own)
    if fields.get("model"):
        return pinned_model_app_name(settings.app_name, fields["model"], fields["encoder_variant"])
    return f"{settings.app_name}-model-{_key('release', fields.get('index'), fields.get('release'), fields['encoder_variant'])}"


def pinned_model_app_name(app_name: str, model: str, variant: str) -> str:
    """The model application of ``model`` (``models:/NAME/VERSION``) that a roll-out starts: the name an arm
    declared with that model would have."""
    return f"{app_name}-model-{_key(model, variant)}"


MODEL_APP_IMPORT = "serving.app:model_app"


def alias_of(arm: ArmSettings) -> str | None:
    if arm.alias:
        return arm.alias
    model = arm.model or ""
    return model.rsplit("@", 1)[1] if model.startswith("models:/") and "@" in model else None


def traffic(settings: ServeSettings) -> dict:
    """The split as the router's and the canary's user_config carry it (serving.runtime.traffic.Traffic)."""
    arms = [{"name": arm.name, "weight": arm.weight, "shadow": arm.shadow,
             "model_app": model_app_name(settings, arm), "index_app": index_app_name(settings, arm),
             "model": arm.model, "alias": alias_of(arm),
             "fault": arm.fault.model_dump() if arm.fault else None}
            for arm in settings.arm_list()]
    from serving.runtime.traffic import check_traffic

    data = {"arms": arms, "salt": settings.salt, "primary": settings.primary,
            "arm_timeout_s": settings.arm_timeout_s, "shadow_timeout_s": settings.shadow_timeout_s}
    return check_traffic(data).model_dump(mode="json")


def app_specs(settings: ServeSettings) -> list[dict]:
    """Every application: {"kind", "name", "route_prefix", "import_path", "args", "deployments"} (the
    router's last), indexes and models shared by the arms that declare the same ones; no model applications
    in the co-located layout, whose routers load the models."""
    specs: dict[str, dict] = {}
    for arm in settings.arm_list():
        specs.setdefault(index_app_name(settings, arm), {
            "kind": "index", "name": index_app_name(settings, arm), "route_prefix": None,
            "import_path": "serving.app:index_app", "args": index_fields(settings, arm), "deployments": []})
        if settings.layout == "colocated":
            continue  # the routers load the arm's model themselves: no encoder application
        specs.setdefault(model_app_name(settings, arm), {
            "kind": "model", "name": model_app_name(settings, arm), "route_prefix": None,
            "import_path": MODEL_APP_IMPORT, "args": model_fields(settings, arm),
            "deployments": [{"name": "QueryEncoder", "user_config": settings.encoder_config()}]})
    split = traffic(settings)
    router = {"kind": "router", "name": settings.app_name, "route_prefix": settings.route_prefix,
              "import_path": "serving.app:router_app", "args": router_fields(settings),
              "deployments": [{"name": "Router", "user_config": {**settings.router_config(), "traffic": split,
                                                                 "access": settings.access_config()}},
                              {"name": "Canary", "user_config": {**settings.canary.model_dump(mode="json"),
                                                                 "traffic": split}}]}
    return [*specs.values(), router]


def serve_config(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                 proxy_location: str = "EveryNode") -> dict:
    """The Serve config (``serve deploy`` format) of every application of ``settings``."""
    apps = []
    for spec in app_specs(settings):
        app = {"name": spec["name"], "route_prefix": spec["route_prefix"], "import_path": spec["import_path"],
               "args": spec["args"], "deployments": spec["deployments"]}
        if settings.runtime_env:
            app["runtime_env"] = dict(settings.runtime_env)
        apps.append(app)
    http = {"host": host, "port": port, **(settings.tls.http_options() if settings.tls else {})}
    return {"proxy_location": proxy_location, "http_options": http, "applications": apps}
