"""``terrahash jscc`` configs: the codec, the links of the grid, the training budget (training/jscc.py).

Shipped: ``training/configs/jscc/cpu.yaml`` (128 px crops, one SNR-conditioned model per hop count
trained across the SNR range, 32 hidden channels, 10 epochs for the 1-hop pairs and 3 for the
multi-hop links started from them: sized for a 2-core CPU) and ``gpu.yaml`` (256 px, the paper's 12
decode-and-forward models, one per hop count and SNR).

``protocols`` says what a config trains: ``pixel``, the DeepJSCC links above, and ``code``, the learned
links that send the image student's hash code instead (training/code_link.py, its settings under
``code_link``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from .code_link import CodeLinkConfig, check_code_link_config
from .config import (BatchSize, Count, Device, Name, NonEmpty, NonNegative, NonNegativeInt, OneOf, Positive, Range,
                     TrackingConfig, build, read_config_file)

CONFIG_DIR = Path(__file__).parent / "configs" / "jscc"
MODELS = ("baseline", "aligned")  # MSE only; MSE + lambda * L_SdH through the frozen hasher
PROTOCOLS = ("pixel", "code")  # DeepJSCC of the image; the hash code's learned link
PAPER_QF_GRID = ((4, 0.75), (2, 1.0), (4, 1.25), (2, 1.5), (2, 2.0))  # (N_Q, b)

Hops = Annotated[int, Range(ge=1, le=8)]
Snr = Annotated[float, Range(ge=-30, le=30)]


@dataclass
class JsccConfig:
    name: Name = "jscc-cpu"
    # What to train: "pixel" (the DeepJSCC links) and/or "code" (code links on the hasher run's exported
    # image student, RUN/students/onnx); cpu.yaml asks for both.
    protocols: Annotated[tuple[Annotated[str, OneOf(PROTOCOLS)], ...], NonEmpty()] = ("pixel",)
    image_size: Annotated[int, Range(ge=16)] = 128  # side of the training crops and of the evaluated images
    c_out: Annotated[int, Range(ge=2)] = 32  # channels of the channel input: rho = c_out / 96 (1/3 at 32)
    width: Count = 64  # channels of the codec's hidden layers
    hops: Annotated[tuple[Hops, ...], NonEmpty()] = (1, 2, 3, 4)  # decode-and-forward links (relays = hops - 1)
    # SNR conditioning: one model per hop count, trained with an SNR drawn per image from snr_train_db
    # and told it; without it, one model per hop count and SNR of snr_eval_db (the paper's 12 models).
    snr_conditioning: bool = True
    snr_train_db: tuple[Snr, Snr] = (-15.0, -5.0)
    snr_eval_db: Annotated[tuple[Snr, ...], NonEmpty()] = (-5.0, -10.0, -15.0)
    models: Annotated[tuple[Annotated[str, OneOf(MODELS)], ...], NonEmpty()] = MODELS
    alignment_weight: NonNegative = 0.06  # lambda of the aligned model (the paper's)
    hasher: Annotated[str, OneOf(("student", "teacher"))] = "student"  # the frozen h: RUN/students, or the run's teacher
    qf_grid: tuple[tuple[Count, Positive], ...] = PAPER_QF_GRID  # (N_Q, b) of quantize-and-forward
    # Multi-hop links start from the trained 1-hop link of the same model (every hop's pair a copy of it)
    # instead of from random weights, then train end to end through all hops.
    warm_start: bool = False
    epochs: Count = 8
    # Epochs of a warm-started multi-hop link (it fine-tunes a trained pair); 0: ``epochs``.
    warm_start_epochs: NonNegativeInt = 0
    # Learning rate of that fine-tune (0: ``lr``): a smaller step keeps a deep link near the trained pair
    # it starts from instead of drifting to the mean image.
    warm_start_lr: NonNegative = 0.0
    # The aligned model's 1-hop pair starts from the trained baseline pair (images MSE has already
    # learned to form) and fine-tunes with the alignment term for aligned_epochs (0: ``epochs``).
    aligned_from_baseline: bool = False
    aligned_epochs: NonNegativeInt = 0
    batch_size: BatchSize = 16
    lr: Positive = 1e-3
    seed: NonNegativeInt = 0
    device: Device = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    code_link: CodeLinkConfig = field(default_factory=CodeLinkConfig)  # the code links (protocol ``code``)


def jscc_config_from_dict(data: dict | None) -> JsccConfig:
    from .config import ConfigError

    config = build(JsccConfig, data or {}, "jscc")
    if config.snr_train_db[0] > config.snr_train_db[1]:
        raise ConfigError(f"jscc.snr_train_db: {list(config.snr_train_db)} must be [low, high]")
    if config.aligned_from_baseline and (1 not in config.hops or set(config.models) != set(MODELS)):
        raise ConfigError(f"jscc.aligned_from_baseline: the aligned 1-hop pair starts from the baseline's, but hops "
                          f"are {list(config.hops)} and models {list(config.models)}")
    check_code_link_config(config.code_link, "jscc.code_link")
    if config.warm_start and 1 not in config.hops:
        raise ConfigError(f"jscc.warm_start: multi-hop links start from the 1-hop link, but hops are "
                          f"{list(config.hops)}")
    return config


def load_jscc_config(path_or_name: str | Path) -> JsccConfig:
    """A shipped config by name (``cpu``, ``gpu``) or a YAML file."""
    path = Path(path_or_name)
    if not path.is_file() and (CONFIG_DIR / f"{path_or_name}.yaml").is_file():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    return read_config_file(path, jscc_config_from_dict)
