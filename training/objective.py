"""The training objective: every loss term of the asymmetric hashing method, by name.

Terms are returned as a dict so each one is logged; ``total_loss`` sums them by weight.
The class proxies live here and are shared by both modalities: the text head learns to map
captions onto the image proxies, i.e. into the image code space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .losses import (BCEQuantizationLoss, BitBalanceLoss, BitDecorrelationLoss, DistributionAlignmentLoss,
                     HashProxyLoss, ImageTextContrastiveLoss, MarginScalableContrastiveLoss,
                     SelfDistilledHashingLoss, total_loss)


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return x.detach() + scale * (x - x.detach())


class HashingObjective(nn.Module):
    def __init__(self, config: LossConfig, num_classes: int, nbits: int):
        super().__init__()
        self.config = config
        self.proxy = HashProxyLoss(num_classes, nbits, config.proxy_temperature)
        self.self_distill = SelfDistilledHashingLoss()
        self.quantization = BCEQuantizationLoss(config.quantization_sigma)
        self.contrastive = ImageTextContrastiveLoss(config.contrastive_temperature)
        self.margin = MarginScalableContrastiveLoss(config.margin)
        self.alignment = DistributionAlignmentLoss()
        self.balance = BitBalanceLoss()
        self.decorrelation = BitDecorrelationLoss()

    def relatedness(self, labels: torch.Tensor, caption_features: torch.Tensor) -> torch.Tensor:
        """(B, B) in [0, 1]: 1 for the same class, else the caption similarity above the threshold, else 0."""
        same_class = (labels[:, None] == labels[None, :]).float()  # (B, B)
        sim = F.normalize(caption_features, dim=1) @ F.normalize(caption_features, dim=1).T  # (B, B)
        threshold = self.config.caption_relatedness
        close = ((sim - threshold) / (1 - threshold)).clamp(0, 1)  # 0 at the threshold, 1 for identical
        return torch.maximum(same_class, close)

    def forward(self, h_weak: torch.Tensor, h_strong: torch.Tensor, h_text: torch.Tensor,
                labels: torch.Tensor, caption_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms. Shapes: codes (B, nbits), labels (B,) class ids, caption_features (B, D)."""
        w = self.config.weights
        terms: dict[str, torch.Tensor] = {}
        h_image = scale_gradient(h_weak, self.config.image_grad_from_text)  # image codes as the text terms see them
        if w.get("hash_proxy", 0):
            terms["hash_proxy"] = (self.proxy(h_weak, labels) + self.proxy(h_strong, labels)) / 2
        if w.get("text_hash_proxy", 0):
            proxies = scale_gradient(self.proxy.proxies, self.config.image_grad_from_text)
            terms["text_hash_proxy"] = self.proxy(h_text, labels, proxies=proxies)
        if w.get("self_distill", 0):
            terms["self_distill"] = self.self_distill(h_weak, h_strong)
        if w.get("quantization", 0):
            terms["quantization"] = self.quantization(torch.cat([h_weak, h_strong, h_text]))
        if w.get("contrastive", 0):
            terms["contrastive"] = self.contrastive(h_image, h_text)
        if w.get("margin", 0):
            terms["margin"] = self.margin(h_image, h_text, self.relatedness(labels, caption_features))
        if w.get("alignment", 0):
            terms["alignment"] = self.alignment(h_image, h_text)
        if w.get("bit_balance", 0):
            terms["bit_balance"] = self.balance(torch.cat([h_weak, h_text]))
        if w.get("decorrelation", 0):
            terms["decorrelation"] = self.decorrelation(h_weak)
        return terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return total_loss(terms, self.config.weights)
