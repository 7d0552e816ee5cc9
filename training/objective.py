"""The training objective: every loss term of the asymmetric hashing method, by name.

Terms are returned as a dict so each one is logged; ``total_loss`` sums them by weight.
The class proxies live here and are shared by both modalities: the text head learns to map
captions onto the image proxies, i.e. into the image code space.

With ``loss.instance_bits`` = I > 0 the code is split: its first nbits - I bits (the class part)
are what the proxy terms see, and the cross-modal terms reach the image codes there only through
``image_grad_from_text``; its last I bits (the instance part) have no proxy and take the
cross-modal gradient at full strength (``instance_grad_from_text``). Images of a class then
share their class part, which keeps class retrieval exact, while the instance part tells them
apart the way their captions do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .losses import (BCEQuantizationLoss, BitBalanceLoss, BitDecorrelationLoss, DistributionAlignmentLoss,
                     FeatureStructureLoss, HashProxyLoss, ImageTextContrastiveLoss, MarginScalableContrastiveLoss,
                     SelfDistilledHashingLoss, total_loss)


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return x.detach() + scale * (x - x.detach())


def split_gradient(h: torch.Tensor, class_bits: int, class_scale: float, instance_scale: float) -> torch.Tensor:
    """``h`` (B, nbits) with the gradient of its first ``class_bits`` columns scaled by
    ``class_scale`` and that of the others by ``instance_scale``."""
    if class_bits >= h.shape[1] or class_scale == instance_scale:
        return scale_gradient(h, class_scale)
    return torch.cat([scale_gradient(h[:, :class_bits], class_scale),
                      scale_gradient(h[:, class_bits:], instance_scale)], dim=1)


def duplicate_captions(caption_features: torch.Tensor, threshold: float = 0.999) -> torch.Tensor:
    """(B, B) bool: caption j says what caption i says (same text up to the encoder's precision).
    Image i and the caption of image j are then both true matches of each other."""
    unit = F.normalize(caption_features, dim=1)
    same = unit @ unit.T >= threshold
    return same | torch.eye(len(unit), dtype=torch.bool, device=unit.device)


class HashingObjective(nn.Module):
    def __init__(self, config: LossConfig, num_classes: int, nbits: int):
        super().__init__()
        if config.instance_bits >= nbits:
            raise ValueError(f"config.loss.instance_bits: {config.instance_bits} leaves no class bits in a "
                             f"{nbits}-bit code; it must be below train.bits")
        self.config = config
        self.class_bits = nbits - config.instance_bits
        self.proxy = HashProxyLoss(num_classes, self.class_bits, config.proxy_temperature)
        # The instance part's own class proxies (the ``instance_hash_proxy`` term): a weak class pull
        # that keeps the images of a class nearer each other there than the images of other classes.
        self.instance_proxy = (HashProxyLoss(num_classes, config.instance_bits, config.proxy_temperature)
                               if config.instance_bits and config.weights.get("instance_hash_proxy", 0) else None)
        self.self_distill = SelfDistilledHashingLoss()
        self.structure = FeatureStructureLoss()
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
                target_proxies: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms. Shapes: codes (B, nbits), labels (B,) class ids, caption_features (B, D),
        ``image_features`` (B, D') the frozen backbone's features of the weak view (for the
        ``instance_structure`` term; without them the term is not computed), ``text_features``
        (B, D) the frozen text encoder's features of the texts ``h_text`` was coded from, as worded
        in the batch (augmented), for the ``text_structure`` term likewise.

        The split schedules compute one side only. The image job passes ``h_text=None``: only the
        image terms. The text job passes the image job's published codes of the batch's images as
        ``h_weak`` (constants), ``h_strong=None``, and the published proxies as ``target_proxies``:
        only the terms that train the text tower.
        """
        w = self.config.weights
        image_side, text_side = h_strong is not None, h_text is not None
        terms: dict[str, torch.Tensor] = {}
        # image codes as the text terms see them
        h_image = split_gradient(h_weak, self.class_bits, self.config.image_grad_from_text,
                                 self.config.instance_grad_from_text)
        c = self.class_bits
        trained = [h_weak, h_strong] if image_side else []  # codes this step updates
        if text_side:
            trained.append(h_text)
        if image_side and w.get("hash_proxy", 0):
            terms["hash_proxy"] = (self.proxy(h_weak[:, :c], labels) + self.proxy(h_strong[:, :c], labels)) / 2
        if image_side and self.instance_proxy is not None:
            terms["instance_hash_proxy"] = (self.instance_proxy(h_weak[:, c:], labels)
                                            + self.instance_proxy(h_strong[:, c:], labels)) / 2
        if text_side and w.get("text_hash_proxy", 0):
            proxies = (target_proxies if target_proxies is not None
                       else scale_gradient(self.proxy.proxies, self.config.image_grad_from_text))
            terms["text_hash_proxy"] = self.proxy(h_text[:, :c], labels, proxies=proxies)
        if image_side and image_features is not None and self.config.instance_bits \
                and w.get("instance_structure", 0):
            terms["instance_structure"] = self.structure(h_weak[:, c:], image_features)
        if text_side and text_features is not None and w.get("text_structure", 0):
            terms["text_structure"] = self.structure(h_text, text_features)
        if image_side and w.get("self_distill", 0):
            terms["self_distill"] = self.self_distill(h_weak, h_strong)
        if w.get("quantization", 0):
            terms["quantization"] = self.quantization(torch.cat(trained))
        if text_side and w.get("contrastive", 0):
            positives = duplicate_captions(caption_features) if self.config.duplicate_positives else None
            terms["contrastive"] = self.contrastive(h_image, h_text, positives)
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
