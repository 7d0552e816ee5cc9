"""The training objective: named terms, shared proxies, and the asymmetric gradient."""
from __future__ import annotations

import pytest
import torch

from training.config import LossConfig
from training.objective import HashingObjective, duplicate_captions, scale_gradient


def codes(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.tanh(torch.randn(*shape)).requires_grad_(True)


def test_scale_gradient_keeps_values_and_scales_gradients():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([4.0, 8.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0]


def test_every_weighted_term_is_returned_and_zero_weight_terms_are_not():
    weights = dict(LossConfig().weights, decorrelation=0.0)
    objective = HashingObjective(LossConfig(weights=weights), num_classes=3, nbits=8)
    labels = torch.tensor([0, 1, 2, 0])
    terms = objective(codes(4, 8), codes(4, 8, seed=1), codes(4, 8, seed=2), labels, torch.randn(4, 5))
    assert set(terms) == {k for k, w in weights.items() if w}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    expected = sum(weights[k] * v for k, v in terms.items())
    torch.testing.assert_close(objective.total(terms), expected)


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_text_terms_reach_the_image_side_only_as_far_as_configured(scale):
    text_only = {k: 0.0 for k in LossConfig().weights}
    text_only.update(text_hash_proxy=1.0, contrastive=1.0, margin=1.0, alignment=1.0)
    objective = HashingObjective(LossConfig(weights=text_only, image_grad_from_text=scale), 3, 8)
    h_image, h_text = codes(4, 8), codes(4, 8, seed=2)
    terms = objective(h_image, h_image.detach(), h_text, torch.tensor([0, 1, 2, 0]), torch.randn(4, 5))
    objective.total(terms).backward()
    assert h_text.grad.abs().sum() > 0
    if scale == 0.0:
        assert h_image.grad is None or h_image.grad.abs().sum() == 0
        assert objective.proxy.proxies.grad is None or objective.proxy.proxies.grad.abs().sum() == 0
    else:
        assert h_image.grad.abs().sum() > 0 and objective.proxy.proxies.grad.abs().sum() > 0


def test_relatedness_is_one_for_same_class_and_grows_with_caption_similarity():
    objective = HashingObjective(LossConfig(caption_relatedness=0.8), 2, 8)
    labels = torch.tensor([0, 0, 1, 1])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    r = objective.relatedness(labels, features)
    assert r[0, 1] == 1.0  # same class, dissimilar captions
    assert r[0, 2] == pytest.approx(1.0)  # other class, identical captions
    assert r[1, 2] == 0.0  # other class, orthogonal captions (cos 0 < 0.8)
    assert r[0, 3] == 0.0  # cos 0.6 is below the threshold
    torch.testing.assert_close(r, r.T)
    torch.testing.assert_close(r.diagonal(), torch.ones(4))


def test_a_split_code_keeps_the_proxies_off_its_instance_bits():
    """instance_bits = 3 of 8: the proxy terms see bits 0..4 only; with image_grad_from_text 0 the
    cross-modal terms reach the image codes on the instance bits alone."""
    objective = HashingObjective(LossConfig(instance_bits=3, image_grad_from_text=0.0), 3, 8)
    assert objective.proxy.proxies.shape == (3, 5)
    proxy_only = {k: 0.0 for k in LossConfig().weights}
    proxy_only.update(hash_proxy=1.0)
    objective.config.weights = proxy_only
    h_weak, h_strong = codes(4, 8), codes(4, 8, seed=1)
    objective.total(objective(h_weak, h_strong, None, torch.tensor([0, 1, 2, 0]), torch.randn(4, 5))).backward()
    assert h_weak.grad[:, :5].abs().sum() > 0 and h_weak.grad[:, 5:].abs().sum() == 0

    cross_modal = {k: 0.0 for k in LossConfig().weights}
    cross_modal.update(contrastive=1.0, margin=1.0, alignment=1.0)
    objective.config.weights = cross_modal
    h_image, h_text = codes(4, 8, seed=3), codes(4, 8, seed=4)
    objective.total(objective(h_image, h_image.detach(), h_text, torch.tensor([0, 1, 2, 0]),
                              torch.randn(4, 5))).backward()
    assert h_image.grad[:, :5].abs().sum() == 0 and h_image.grad[:, 5:].abs().sum() > 0


def test_instance_bits_must_leave_class_bits():
    with pytest.raises(ValueError, match="instance_bits"):
        HashingObjective(LossConfig(instance_bits=8), 3, 8)


def test_identical_captions_are_positives_of_each_other_in_the_contrastive_term():
    """Two images with the same caption: with duplicate_positives the InfoNCE target splits between
    them, so swapping their captions changes nothing; without it, it does."""
    only = {k: 0.0 for k in LossConfig().weights}
    only.update(contrastive=1.0)
    features = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert duplicate_captions(features).tolist() == [[True, True, False, False], [True, True, False, False],
                                                     [False, False, True, False], [False, False, False, True]]
    h_image, h_text = codes(4, 8).detach(), codes(4, 8, seed=1).detach()
    swapped = h_text[[1, 0, 2, 3]]
    labels = torch.tensor([0, 1, 2, 0])
    losses = {}
    for on in (True, False):
        objective = HashingObjective(LossConfig(weights=only, duplicate_positives=on), 3, 8)
        losses[on] = [float(objective(h_image, h_image, t, labels, features)["contrastive"]) for t in (h_text, swapped)]
    assert losses[True][0] == pytest.approx(losses[True][1])
    assert losses[False][0] != pytest.approx(losses[False][1])


def test_the_instance_proxy_term_pulls_the_instance_bits_alone_towards_proxies_of_their_own():
    only = {k: 0.0 for k in LossConfig().weights}
    only.update(instance_hash_proxy=1.0)
    objective = HashingObjective(LossConfig(weights=only, instance_bits=3), 3, 8)
    assert objective.instance_proxy.proxies.shape == (3, 3)
    h_weak, h_strong = codes(4, 8), codes(4, 8, seed=1)
    terms = objective(h_weak, h_strong, None, torch.tensor([0, 1, 2, 0]), torch.randn(4, 5))
    assert set(terms) == {"instance_hash_proxy"}
    objective.total(terms).backward()
    assert h_weak.grad[:, :5].abs().sum() == 0 and h_weak.grad[:, 5:].abs().sum() > 0
    assert HashingObjective(LossConfig(instance_bits=3), 3, 8).instance_proxy is None  # weight 0: no proxies


def test_the_structure_term_shapes_the_instance_bits_of_the_weak_view_alone():
    only = {k: 0.0 for k in LossConfig().weights}
    only.update(instance_structure=1.0)
    objective = HashingObjective(LossConfig(weights=only, instance_bits=3), 3, 8)
    h_weak, h_strong = codes(4, 8), codes(4, 8, seed=1)
    labels, captions = torch.tensor([0, 1, 2, 0]), torch.randn(4, 5)
    assert objective(h_weak, h_strong, None, labels, captions) == {}  # no features given: not computed
    terms = objective(h_weak, h_strong, None, labels, captions, image_features=torch.randn(4, 16))
    assert set(terms) == {"instance_structure"}
    objective.total(terms).backward()
    assert h_weak.grad[:, :5].abs().sum() == 0 and h_weak.grad[:, 5:].abs().sum() > 0
    assert h_strong.grad is None or h_strong.grad.abs().sum() == 0


def test_the_text_structure_term_shapes_the_text_codes_alone_from_the_worded_captions_features():
    only = {k: 0.0 for k in LossConfig().weights}
    only.update(text_structure=1.0)
    objective = HashingObjective(LossConfig(weights=only), 3, 8)
    h_weak, h_text = codes(4, 8), codes(4, 8, seed=2)
    labels, captions = torch.tensor([0, 1, 2, 0]), torch.randn(4, 5)
    assert objective(h_weak, None, h_text, labels, captions) == {}  # no worded features: not computed
    worded = torch.randn(4, 5)
    terms = objective(h_weak, None, h_text, labels, captions, text_features=worded)
    assert set(terms) == {"text_structure"}
    objective.total(terms).backward()
    assert h_text.grad.abs().sum() > 0 and (h_weak.grad is None or h_weak.grad.abs().sum() == 0)
    # zero when the codes' similarities already are the centred features' own
    centred = torch.nn.functional.normalize(worded - worded.mean(0), dim=1)
    assert float(objective.structure(centred, worded)) == pytest.approx(0.0, abs=1e-10)
