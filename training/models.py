"""The asymmetric hashing model: a heavy image tower and a light text tower, one code space.

Image tower: a timm backbone (pooled features) and a deep MLP hash head.
Text tower: a transformers sentence encoder (mean pooling) and a shallow hash head that maps
captions into the image code space (both heads are trained against the image proxies).
Codes are ``tanh(W x)`` while training and ``sign`` of that for retrieval.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageTowerConfig, TextTowerConfig
from .pretrained import load_packaged_image_weights, packaged_text_model_dir

log = logging.getLogger(__name__)


class HashHead(nn.Module):
    """MLP from features to ``nbits`` continuous codes in (-1, 1).

    With ``instance_bits`` = I > 0 and ``trunk_grad`` < 1, the gradient that the last I outputs
    (the instance part of a split code, training/objective.py) send into the layers they share with
    the class part is scaled by ``trunk_grad`` (0: the instance part learns on top of features that
    only the class part shapes). Values are the same either way; only training differs. With
    ``instance_hidden`` widths the instance part is a branch of its own instead (features -> its
    hidden layers -> I outputs): the class part's layers never see the instance objective, and the
    instance part still learns from the features themselves.
    """

    def __init__(self, in_dim: int, nbits: int, hidden: tuple[int, ...] = (), dropout: float = 0.0,
                 instance_bits: int = 0, trunk_grad: float = 1.0, instance_hidden: tuple[int, ...] = ()):
        super().__init__()
        self.instance_bits, self.trunk_grad = instance_bits, trunk_grad
        branch = bool(instance_bits and instance_hidden)
        self.mlp = _mlp(in_dim, nbits - instance_bits if branch else nbits, hidden, dropout)
        self.instance_mlp = _mlp(in_dim, instance_bits, instance_hidden, dropout) if branch else None
        self.nbits = nbits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.instance_mlp is not None:  # (B, nbits - I) class part, (B, I) instance part
            return torch.tanh(torch.cat([self.mlp(features), self.instance_mlp(features)], dim=1))
        if not (self.training and self.instance_bits and self.trunk_grad != 1.0 and len(self.mlp) > 1):
            return torch.tanh(self.mlp(features))  # (B, nbits)
        shared, last = self.mlp[:-1](features), self.mlp[-1]  # (B, width), Linear(width, nbits)
        c = self.nbits - self.instance_bits
        guarded = shared.detach() + self.trunk_grad * (shared - shared.detach())
        return torch.tanh(torch.cat([F.linear(shared, last.weight[:c], last.bias[:c]),
                                     F.linear(guarded, last.weight[c:], last.bias[c:])], dim=1))


def _mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    # Standardise the input: features pooled from several levels differ in scale.
    layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if hidden else []
    width = in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.GELU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def binarize(codes: torch.Tensor) -> torch.Tensor:
    """Binary codes in {-1, +1}; an exact 0 maps to +1 so every bit is defined."""
    return torch.where(codes >= 0, 1.0, -1.0).to(codes.dtype)


class ImageEncoder(nn.Module):
    """timm backbone returning pooled features (B, feature_dim) from normalised images."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        self.pool_levels = list(config.pool_levels)
        self._load_weights(config.weights)
        # Channels-last convolutions are about twice as fast on CPU (and what AMP wants on GPU).
        self.backbone.to(memory_format=torch.channels_last)
        with torch.no_grad():  # the width of the concatenated features, from one tiny forward pass
            was_training = self.backbone.training
            self.feature_dim = self.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
            self.backbone.train(was_training)

    def _load_weights(self, weights: str) -> None:
        if weights == "none":
            return
        if weights == "packaged":
            load_packaged_image_weights(self.backbone, self.config.backbone)
            return
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"image weights {weights!r}: no such file (or use 'packaged' / 'none')")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))}
        self.backbone.load_state_dict(state, strict=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.pool_levels:
            return self.backbone(images)  # (B, feature_dim)
        final, levels = self.backbone.forward_intermediates(images, indices=self.pool_levels, extra_blocks=True)
        pooled = [self.backbone.forward_head(final, pre_logits=True)] + [f.mean(dim=(2, 3)) for f in levels]
        return torch.cat(pooled, dim=1)  # (B, feature_dim)


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (unpadded) tokens: (B, T, D), (B, T) -> (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (B, T, 1)
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def resolve_text_encoder(name: str) -> str:
    """Local folder for a packaged encoder name, else the name/path as given."""
    folder = packaged_text_model_dir(name)
    return str(folder) if folder is not None else name


class TextEncoder(nn.Module):
    """transformers encoder with mean pooling; tokenizes raw strings itself."""

    def __init__(self, config: TextTowerConfig, model: nn.Module | None = None, tokenizer=None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        source = resolve_text_encoder(config.encoder)
        self.model = model if model is not None else AutoModel.from_pretrained(source)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
        self.feature_dim = self.model.config.hidden_size

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return mean_pool(states, attention_mask)  # (B, D)

    def encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        device = next(self.parameters()).device
        return self(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))


class HashingModel(nn.Module):
    """Both towers and their heads. Encoders may be left out when features come from a cache."""

    def __init__(self, image_head: HashHead, text_head: HashHead,
                 image_encoder: ImageEncoder | None = None, text_encoder: TextEncoder | None = None):
        super().__init__()
        if image_head.nbits != text_head.nbits:
            raise ValueError(f"image head has {image_head.nbits} bits but text head {text_head.nbits}")
        self.image_head = image_head
        self.text_head = text_head
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

    @property
    def nbits(self) -> int:
        return self.image_head.nbits


def build_heads(image: ImageTowerConfig, text: TextTowerConfig, nbits: int,
                image_dim: int, text_dim: int, instance_bits: int = 0,
                instance_trunk_grad: float = 1.0,
                instance_hidden: tuple[int, ...] = ()) -> tuple[HashHead, HashHead]:
    """The asymmetric pair of hash heads (deep for images, shallow for text)."""
    return (HashHead(image_dim, nbits, image.head_hidden, image.dropout, instance_bits, instance_trunk_grad,
                     instance_hidden),
            HashHead(text_dim, nbits, text.head_hidden, text.dropout))
