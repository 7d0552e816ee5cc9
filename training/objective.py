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

    def forward(self, h_weak: torch.Tensor, h_strong: torch.Tensor | None, h_text: torch.Tensor | None,
                labels: torch.Tensor, caption_features: torch.Tensor,
                target_proxies: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms. Shapes: codes (B, nbits), labels (B,) class ids, caption_features (B, D).

        The split schedules compute one side only. The image job passes ``h_text=None``: only the
        image terms. The text job passes the image job's published codes of the batch's images as
        ``h_weak`` (constants), ``h_strong=None``, and the published proxies as ``target_proxies``:
        only the terms that train the text tower.
        """
        w = self.config.weights
        image_side, text_side = h_strong is not None, h_text is not None
        terms: dict[str, torch.Tensor] = {}
        h_image = scale_gradient(h_weak, self.config.image_grad_from_text)  # image codes as the text terms see them
        trained = [h_weak, h_strong] if image_side else []  # codes this step updates
        if text_side:
            trained.append(h_text)
        if image_side and w.get("hash_proxy", 0):
            terms["hash_proxy"] = (self.proxy(h_weak, labels) + self.proxy(h_strong, labels)) / 2
        if text_side and w.get("text_hash_proxy", 0):
            proxies = (target_proxies if target_proxies is not None
                       else scale_gradient(self.proxy.proxies, self.config.image_grad_from_text))
            terms["text_hash_proxy"] = self.proxy(h_text, labels, proxies=proxies)
        if image_side and w.get("self_distill", 0):
            terms["self_distill"] = self.self_distill(h_weak, h_strong)
        if w.get("quantization", 0):
            terms["quantization"] = self.quantization(torch.cat(trained))
        if text_side and w.get("contrastive", 0):
            terms["contrastive"] = self.contrastive(h_image, h_text)
        if text_side and w.get("margin", 0):
            terms["margin"] = self.margin(h_image, h_text, self.relatedness(labels, caption_features))
        if text_side and w.get("alignment", 0):
            terms["alignment"] = self.alignment(h_image, h_text)
        if w.get("bit_balance", 0):
            terms["bit_balance"] = self.balance(torch.cat(([h_weak] if image_side else []) + ([h_text] if text_side else [])))
        if image_side and w.get("decorrelation", 0):
            terms["decorrelation"] = self.decorrelation(h_weak)
        return terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return total_loss(terms, self.config.weights)
