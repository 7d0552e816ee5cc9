"""The search app's settings: typed and range-checked (pydantic), unknown keys an error, hot ones split out.

``ServeSettings`` is everything ``build_app`` needs; its hot fields (``HOT_ROUTER``, ``HOT_ENCODER``) travel
as Serve ``user_config`` and change without restarting replicas (``reconfigure`` re-checks them with
``RouterConfig`` / ``EncoderConfig``).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RERANK_MODES = ("none", "asymmetric", "fusion")
FUSION_RULES = ("average", "max")

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


class ServeSettings(RouterConfig, EncoderConfig):
    """Everything the app is built from; unknown keys are an error."""

    index: str  # artifact root holding index/ (releases and both collections): a folder or s3://
    model: str | None = None  # model version folder (ONNX + specs); default: the image index's model_dir
    release: str | None = None  # the index release served (e.g. r0003); default the latest
    image_version: str | None = None  # override the release's image index version
    caption_version: str | None = None  # override the release's caption index version
    encoder_variant: Literal["fp32", "int8"] = "fp32"  # which exported students to serve
    image_base: str | None = None  # prefix of image references; default: the image_root the index records
    # Placement.
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
    # A log line per shard call in every shard replica: off by default, as the router's access log
    # already has every request and the lines cost CPU that the searches need under load.
    shard_access_log: bool = False
    # Ray runtime_env of every replica, e.g. {"env_vars": {"AWS_ENDPOINT_URL": ...}} for an S3-compatible
    # store (with `serve deploy`, the application's own runtime_env does the same).
    runtime_env: dict = Field(default_factory=dict)
    router_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources, e.g. to pin a node
    encoder_resources: dict[str, float] = Field(default_factory=dict)
    shard_resources: dict[str, float] = Field(default_factory=dict)

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

    def router_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ROUTER}

    def encoder_config(self) -> dict:
        return {name: getattr(self, name) for name in self.HOT_ENCODER}


def describe(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: message``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


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
