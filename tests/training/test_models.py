"""Encoders and hash heads: shapes, ranges, multi-level pooling, asymmetry."""
from __future__ import annotations

import pytest
import torch

from training.config import ImageTowerConfig, TextTowerConfig
from training.models import HashHead, HashingModel, ImageEncoder, TextEncoder, binarize, build_heads, mean_pool


def test_hash_head_codes_are_in_open_interval_and_binarize_to_signs():
    torch.manual_seed(0)
    head = HashHead(20, 16, (32,), 0.0).eval()
    codes = head(torch.randn(8, 20) * 100)  # large inputs saturate tanh; codes stay within [-1, 1]
    assert codes.shape == (8, 16)
    assert codes.abs().max() <= 1.0
    bits = binarize(codes)
    assert set(bits.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(bits, torch.where(codes >= 0, 1.0, -1.0))
    assert binarize(torch.zeros(1, 3)).tolist() == [[1.0, 1.0, 1.0]]  # 0 is a defined bit


def test_image_encoder_concatenates_pooled_levels():
    plain = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights="none"))
    levels = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights="none", pool_levels=(1, 2)))
    levels.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain.eval()(x), levels.eval()(x)
    assert b.shape == (2, levels.feature_dim) and levels.feature_dim > plain.feature_dim
    torch.testing.assert_close(b[:, :plain.feature_dim], a)  # the final pooled features come first


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(states, mask).tolist() == [[2.0, 3.0]]


def test_text_encoder_from_local_folder(tiny_text_encoder):
    encoder = TextEncoder(TextTowerConfig(encoder=str(tiny_text_encoder), max_length=8)).eval()
    features = encoder.encode(["many planes parked next to a long building", "a river"])
    assert features.shape == (2, 32)
    # Truncation to max_length: a long caption still encodes.
    assert encoder.tokenize(["word " * 100])["input_ids"].shape[1] == 8


def test_default_heads_are_asymmetric_and_share_the_code_space():
    image_head, text_head = build_heads(ImageTowerConfig(), TextTowerConfig(), 64, 1280, 384)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(image_head) > 2 * count(text_head)
    assert image_head.nbits == text_head.nbits == 64
    with pytest.raises(ValueError, match="bits"):
        HashingModel(HashHead(4, 16), HashHead(4, 32))


def test_local_checkpoint_weights_load_by_path(tmp_path):
    source = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights="none"))
    torch.save(source.backbone.state_dict(), tmp_path / "backbone.pth")
    loaded = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights=str(tmp_path / "backbone.pth")))
    assert all(torch.equal(v, loaded.backbone.state_dict()[k]) for k, v in source.backbone.state_dict().items())


def test_missing_local_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights=str(tmp_path / "nope.pth")))


def test_a_head_can_keep_its_trunk_from_the_instance_bits_gradient():
    """trunk_grad 0: the last instance_bits outputs train their own weights but send nothing into
    the shared layers; the values are those of the plain head."""
    torch.manual_seed(0)
    plain = HashHead(6, 8, (5,))
    guarded = HashHead(6, 8, (5,), instance_bits=3, trunk_grad=0.0)
    guarded.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(guarded(x), plain(x))
    guarded(x)[:, 5:].sum().backward()  # only the instance outputs
    first = guarded.mlp[1].weight.grad  # the shared hidden layer
    assert first is None or first.abs().sum() == 0
    assert guarded.mlp[-1].weight.grad[5:].abs().sum() > 0
    plain(x)[:, 5:].sum().backward()
    assert plain.mlp[1].weight.grad.abs().sum() > 0


def test_an_instance_branch_is_a_head_of_its_own():
    """instance_hidden: the last instance_bits outputs come from their own layers on the features, so
    their gradient never reaches the class part's layers, and the class part's never reaches theirs."""
    torch.manual_seed(0)
    head = HashHead(6, 8, (5,), instance_bits=3, instance_hidden=(4,)).train()
    assert head.mlp[-1].out_features == 5 and head.instance_mlp[-1].out_features == 3
    x = torch.randn(4, 6)
    codes = head(x)
    assert codes.shape == (4, 8) and codes.abs().max() < 1
    codes[:, 5:].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.mlp.parameters())
    assert head.instance_mlp[1].weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    head(x)[:, :5].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.instance_mlp.parameters())
    assert HashHead(6, 8, (5,), instance_bits=3).instance_mlp is None  # no widths: one shared trunk
