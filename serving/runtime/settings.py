"""The search app's settings: typed and range-checked (pydantic), unknown keys an error, hot ones split out.

``ServeSettings`` is everything the apps are built from (serving/apps.py); its hot fields (``HOT_ROUTER``,
``HOT_ENCODER``, the traffic split and the canary's limits) travel as Serve ``user_config`` and change
without restarting replicas (``reconfigure`` re-checks them with ``RouterConfig`` / ``EncoderConfig`` /
``serving.runtime.traffic.Traffic`` / ``CanaryConfig``).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.validation import describe


# strict: a YAML "50" or `true` is not taken for a number (ints are still accepted for floats)
_STRICT = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class RouterConfig(BaseModel):
    """The router's hot settings: limits, defaults and the request deadline."""

    model_config = _STRICT

    max_query_chars: int = Field(512, ge=1, le=100_000)
    max_k: int = Field(100, ge=1, le=10_000)
    default_k: int = Field(10, ge=1)
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    rerank: Literal["none", "asymmetric", "fusion"] = "none"  # default re-ranking
    rerank_depth: int = Field(100, ge=1, le=10_000)  # R: candidates re-ranked
    fusion: Literal["average", "max"] = "average"  # of the image-code and caption-code scores
    deadline_s: float = Field(5.0, gt=0, le=600)  # a request's whole budget: encoder, lookup, fan-out, retries
    shard_timeout_s: float = Field(2.0, gt=0, le=600)  # one call's budget before it is retried
    shard_retries: int = Field(2, ge=0, le=20)  # retries of a lost or timed-out call
    # Requests a router replica answers at once; past it a request gets a JSON 503 "overloaded" at once (with
    # Retry-After) instead of queueing: at about 5 ms a query, 64 waiting is a third of a second.
    max_inflight: int = Field(64, ge=1, le=100_000)
    # When the drift detector fires (serving/index/drift.py): "asymmetric" re-ranks an image query asked with
    # rerank none by its float code (the path that loses least to flipped bits) and flags the answer;
    # "flag" only flags it.
    drift_fallback: Literal["asymmetric", "flag"] = "asymmetric"

    @model_validator(mode="after")
    def _k_within_limit(self):
        if self.default_k > self.max_k:
            raise ValueError(f"need default_k <= max_k, got {self.default_k} and {self.max_k}")
        return self


class EncoderConfig(BaseModel):
    """The encoder deployment's hot settings: request batching."""

    model_config = _STRICT

    batch_max_size: int = Field(16, ge=1, le=1024)
    batch_wait_s: float = Field(0.002, ge=0, le=1)


class Fault(BaseModel):
    """Injected faults of one arm (drills and tests of the rollback path; see serving.runtime.traffic)."""

    model_config = _STRICT

    error_rate: float = Field(0.0, ge=0, le=1)
    delay_s: float = Field(0.0, ge=0, le=60)
    garbage: bool = False


class ArmSettings(BaseModel):
    """One traffic arm: a model version and an index release, and its share of traffic."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    model: str | None = None  # models:/NAME/VERSION, models:/NAME@ALIAS or a folder; default the release's model
    index: str | None = None  # artifact root of the arm's index; default the settings' index
    release: str | None = None  # default: the latest release of that root
    weight: float = Field(0.0, ge=0, le=100)  # percent of live traffic (shadow: percent of requests mirrored)
    shadow: bool = False
    alias: str | None = None  # the registry alias the arm stands for; default the model URI's @ALIAS
    fault: Fault | None = None


class CanaryConfig(BaseModel):
    """The canary controller's hot settings: the sliding window, the limits past which a challenger is
    rolled back, and the probe queries that measure each arm's retrieval quality live."""

    model_config = _STRICT

    enabled: bool = True
    interval_s: float = Field(1.0, gt=0, le=3600)  # how often the arms are judged
    window_s: float = Field(60.0, gt=0, le=86_400)  # the sliding window the figures are computed over
    min_requests: int = Field(20, ge=1)  # fewer requests in the window: no data yet for errors and latency
    min_probes: int = Field(10, ge=1)  # fewer probe answers in the window: no data yet for quality
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_p99_ms: float = Field(1000.0, gt=0)
    max_probe_map_drop: float = Field(0.15, ge=0, le=1)  # below the primary's probe mAP@k by more: rolled back
    probe_data: str | None = None  # Karpathy-style dataset folder whose val split gives the probes; None: none
    probe_rate: float = Field(2.0, ge=0, le=1000)  # probe queries per second, per arm
    probe_count: int = Field(40, ge=2, le=10_000)  # probes drawn from val (half captions, half images)
    probe_k: int = Field(10, ge=1, le=1000)
    auto_rollback: bool = True
    root: str | None = None  # artifact root of the audit log; default $TERRAHASH_ROOT or ./terrahash-root
    record_every_s: float = Field(30.0, gt=0)  # how often each registered arm's record goes to MLflow
    follow_aliases: bool = True  # an arm given as models:/NAME@ALIAS rolls out the version the alias moves to
    alias_poll_s: float = Field(5.0, gt=0, le=3600)  # how often the registry is asked where the aliases point
    rollout_timeout_s: float = Field(600.0, gt=0)  # a version not served by every router by then: roll-out failed


class AuthSettings(BaseModel):
    """Who may call the API (serving.runtime.access, serving.governance.roles): API keys from ``keys``, rules from ``policy``."""

    model_config = _STRICT

    enabled: bool = False
    keys: str | None = None  # the key file (`terrahash keys create NAME --role ROLE --keys FILE`): a path or s3://
    policy: str | None = None  # a policy file (serving/policy.yaml), read when the Serve config is written
    keys_reload_s: float = Field(5.0, gt=0, le=3600)  # how soon a created or revoked key takes effect

    @model_validator(mode="after")
    def _keys_when_enabled(self):
        if self.enabled and not self.keys:
            raise ValueError("auth is enabled: give its key file (keys: FILE)")
        return self


class RateLimitSettings(BaseModel):
    """Per API key, a token bucket shared by every router replica (serving.governance.ratelimit); with auth on only."""

    model_config = _STRICT

    enabled: bool = True
    rate: float = Field(10.0, gt=0, le=1_000_000)  # requests a second, per key (a key's own rate overrides it)
    burst: float = Field(20.0, ge=1, le=1_000_000)


class AuditSettings(BaseModel):
    """The audit trail of queries (serving.governance.query_log): one hash-chained JSON line per request."""

    model_config = _STRICT

    log: str | None = None  # the log file, on the node the writer runs on (None: no audit trail)
    on_failure: Literal["closed", "open"] = "closed"  # when the writer cannot take an entry: refuse, or answer
    flush_s: float = Field(1.0, gt=0, le=1.0)  # entries are durable within this
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources to pin the writer's node


class TlsSettings(BaseModel):
    """HTTPS on Serve's proxies (Ray Serve's ``http_options``): plain HTTP is then refused on the port."""

    model_config = _STRICT

    certfile: str  # PEM certificate (chain) of the service; on every node that runs a proxy
    keyfile: str  # its PEM private key
    ca_certs: str | None = None  # CA bundle to verify client certificates by (mutual TLS)

    def http_options(self) -> dict:
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile,
                **({"ssl_ca_certs": self.ca_certs} if self.ca_certs else {})}


class ServeSettings(RouterConfig, EncoderConfig):
    """Everything the app is built from; unknown keys are an error."""

    index: str | None = None  # artifact root holding index/ (releases and both collections): a folder or s3://
    model: str | None = None  # models:/NAME/VERSION, models:/NAME@ALIAS or a folder; default the release's model
    # Traffic arms; none: one arm, "default", from index / model / release.
    arms: list[ArmSettings] = Field(default_factory=list)
    salt: str = "terrahash"  # of the sticky client assignment (a new salt reshuffles every client)
    primary: str | None = None  # the arm that answers when another fails; default the first live arm
    arm_timeout_s: float = Field(1.0, gt=0, le=600)  # a non-primary arm's budget before the primary answers
    shadow_timeout_s: float = Field(2.0, gt=0, le=600)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    app_name: str = Field("terrahash", pattern=r"^[a-z][a-z0-9_-]{0,40}$")  # the router's Serve application
    route_prefix: str = "/"
    tracking_uri: str | None = None  # MLflow, for models:/ URIs; default $MLFLOW_TRACKING_URI
    model_cache_dir: str = "/tmp/terrahash/models"  # node-local copies of registered model versions
    # An exported DeepJSCC link (`terrahash jscc train`'s OUT/onnx/<link>) whose decoder turns the symbols of
    # POST /v1/search/received into an image; None: the endpoint answers 404.
    jscc_model: str | None = None
    # Learned code links (`terrahash jscc train`'s OUT/code: one codec per number of channel uses) that
    # decode the hash codes of POST /v1/search/received; repetition-coded links need none.
    code_link_model: str | None = None
    release: str | None = None  # the index release served (e.g. r0003); default the latest
    image_version: str | None = None  # override the release's image index version
    caption_version: str | None = None  # override the release's caption index version
    encoder_variant: Literal["fp32", "int8"] = "fp32"  # which exported students to serve
    image_base: str | None = None  # prefix of image references; default: the image_root the index records
    # Placement. "colocated": every router replica runs the query encoders and the shard groups in process
    # (no hop per request), shard groups beyond ``local_groups`` stay shard deployments called through
    # handles, so an index larger than a node stays spread; "split": encoders and every shard group are
    # deployments of their own, one call each (the layout before the co-located one, kept for comparison).
    layout: Literal["colocated", "split"] = "colocated"
    # Colocated: shard groups of each collection held in every router replica. None: chosen from where the
    # shards live: every group on a one-node cluster, else one (the router's node holds one, the rest spread).
    local_groups: int | None = Field(None, ge=0)
    router_threads: int = Field(4, ge=1, le=256)  # the router's pool for in-process encoding and searching
    shard_replicas: int = Field(2, ge=1)  # replicas per shard deployment
    # Shards held by one shard deployment (searched side by side, answered in one call). 0: as
    # many as spread the shards over the cluster's nodes, ceil(shards / nodes); on one node that
    # is every shard in one deployment, one call per query instead of one per shard.
    shards_per_replica: int = Field(0, ge=0)
    spread_shards: bool = True  # at most one replica of a shard per node (needs >= shard_replicas nodes)
    encoder_replicas: int = Field(1, ge=1)
    router_replicas: int = Field(1, ge=1)
    # Text queries encoded inside the router (the text student takes well under a millisecond,
    # a call to the encoder deployment several); images always go to the batching encoder.
    router_encodes_text: bool = True
    # Logical CPUs reserved per replica: searches are short, and a laptop must fit 2 collections x
    # 4 shards x 2 replicas on two cores.
    shard_num_cpus: float = Field(0.05, ge=0)
    encoder_num_cpus: float = Field(0.5, ge=0)
    router_num_cpus: float = Field(0.25, ge=0)
    decode_threads: int = Field(2, ge=1, le=64)  # uploaded images decoded in a pool of this size per router
    encoder_threads: int = Field(1, ge=1, le=256)  # onnxruntime intra-op threads per encoder replica
    shard_threads: int = Field(1, ge=1, le=256)  # faiss OpenMP threads per shard replica: one query gains
    #                         nothing from more, and idle OpenMP threads spin, stealing the others' cores
    # Node-local copies of the shards a replica serves, fetched from the artifact root and verified
    # there (one folder per node below it). A copy that fails its checksum fails the replica's health check.
    shard_cache_dir: str = "/tmp/terrahash/shards"
    shard_health_period_s: float = Field(2.0, gt=0, le=3600)  # how often Serve checks a shard replica
    # The key of an index encrypted at rest (serving.index.crypto): a file on every node that holds shards
    # (or $TERRAHASH_INDEX_KEY in the replicas' environment). Never beside the index.
    index_key_file: str | None = None
    # A log line per shard call in every shard replica: off by default, as the router's access log
    # already has every request and the lines cost CPU that the searches need under load.
    shard_access_log: bool = False
    # A log line per request in every router replica: off by default, as Serve's metrics count requests by
    # route and status, the audit trail (when on) records each one, and the lines cost CPU the searches need.
    router_access_log: bool = False
    # Ray runtime_env of every replica, e.g. {"env_vars": {"AWS_ENDPOINT_URL": ...}} for an S3-compatible
    # store (with `serve deploy`, the application's own runtime_env does the same).
    runtime_env: dict = Field(default_factory=dict)
    router_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources, e.g. to pin a node
    encoder_resources: dict[str, float] = Field(default_factory=dict)
    shard_resources: dict[str, float] = Field(default_factory=dict)
    # Governance (README "Security and governance"): API keys and roles, query rules, rate limits, audit.
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    tls: TlsSettings | None = None
    # HTTP ingress (serving/runtime/ingress.py): "auto" is HAProxy where the binary is present and TLS is not
    # asked for, else Serve's Python proxy; read when `terrahash serve` starts Ray (a cluster's own
    # environment decides for a cluster: the rendered manifests set it).
    ingress: Literal["auto", "haproxy", "proxy"] = "auto"

    HOT_ROUTER: ClassVar[tuple[str, ...]] = tuple(RouterConfig.model_fields)
    HOT_ENCODER: ClassVar[tuple[str, ...]] = tuple(EncoderConfig.model_fields)

    @classmethod
    def from_dict(cls, data: dict, source: str = "serve settings") -> "ServeSettings":
        """Settings from a mapping; ValueError naming each bad or unknown key and ``source``."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(describe(err, source)) from None

    def check(self) -> None:
        """Re-validate (settings changed by assignment are checked as they are set)."""
        type(self).model_validate(self.model_dump())

    def arm_list(self) -> list[ArmSettings]:
        """The arms, each with its index filled in; without arms, one live arm from index / model / release."""
        if not self.arms and not self.index:
            raise ValueError("serve settings: give index (an artifact root) or arms")
        for arm in self.arms:
            if not (arm.index or self.index):
                raise ValueError(f"serve settings: arm {arm.name!r} has no index, and the settings give none")
        if not self.arms:
            return [ArmSettings(name="default", model=self.model, index=self.index, release=self.release,
                                weight=100.0)]
        return [arm.model_copy(update={"index": arm.index or self.index}) for arm in self.arms]

    def with_absolute_paths(self) -> "ServeSettings":
        """Local paths made absolute (replicas may not start in this directory); the audit root defaulted
        here ($TERRAHASH_ROOT, else ./terrahash-root), so that the canary writes where `terrahash history` reads."""
        import os

        from serving.governance.audit import default_root

        def absolute(path: str | None) -> str | None:
            return path if path is None or "://" in path or path.startswith("models:/") else os.path.abspath(path)

        canary = self.canary.model_copy(update={"root": absolute(default_root(self.canary.root)),
                                                "probe_data": absolute(self.canary.probe_data)})
        arms = [arm.model_copy(update={"index": absolute(arm.index), "model": absolute(arm.model)}) for arm in self.arms]
        auth = self.auth.model_copy(update={"keys": absolute(self.auth.keys), "policy": absolute(self.auth.policy)})
        key_file = absolute(self.index_key_file)
        tls = None if self.tls is None else self.tls.model_copy(update={
            "certfile": absolute(self.tls.certfile), "keyfile": absolute(self.tls.keyfile),
            "ca_certs": absolute(self.tls.ca_certs)})
        audit = self.audit.model_copy(update={"log": absolute(self.audit.log)})
        return self.model_copy(update={"index": absolute(self.index), "model": absolute(self.model), "canary": canary,
                                       "arms": arms, "auth": auth, "audit": audit, "index_key_file": key_file,
                                       "tls": tls})

    def router_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ROUTER}

    def access_config(self) -> dict:
        """The router's hot ``access`` settings (serving.runtime.access.AccessConfig), the policy file read here."""
        from serving.governance.policy import load_policy

        return {"enabled": self.auth.enabled, "keys": self.auth.keys, "keys_reload_s": self.auth.keys_reload_s,
                "policy": load_policy(self.auth.policy) if self.auth.policy else None,
                "rate": self.rate_limit.model_dump(), "audit": bool(self.audit.log),
                "on_failure": self.audit.on_failure}

    def encoder_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ENCODER}


def check_hot_settings(config: dict) -> dict:
    """Validate the router's user_config (also on every ``reconfigure``); the checked dict."""
    try:
        return RouterConfig.model_validate(config).model_dump()
    except ValidationError as err:
        raise ValueError(describe(err, "router settings")) from None


def check_encoder_settings(config: dict) -> dict:
    """Validate the encoder's user_config (on every ``reconfigure``); the checked dict."""
    try:
        return EncoderConfig.model_validate(config).model_dump()
    except ValidationError as err:
        raise ValueError(describe(err, "encoder settings")) from None


def load_settings(path: str | Path, **overrides) -> ServeSettings:
    """Settings from a YAML file (a mapping of ServeSettings fields), with ``overrides`` on top."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of serve settings")
    return ServeSettings.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}}, str(path))
