"""Tests for training.losses: hand-computed values and independent NumPy / loop formulas."""

import math

import numpy as np
import pytest
import torch

from training.losses import (
    BCEQuantizationLoss,
    BitBalanceLoss,
    BitDecorrelationLoss,
    DistributionAlignmentLoss,
    FeatureStructureLoss,
    HashProxyLoss,
    ImageTextContrastiveLoss,
    MarginScalableContrastiveLoss,
    SelfDistilledHashingLoss,
    as_multi_hot,
    total_loss,
)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def codes(b, nbits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(b, nbits, generator=g))


# --------------------------------------------------------------------------- as_multi_hot


def test_as_multi_hot_indices_and_passthrough():
    out = as_multi_hot(torch.tensor([2, 0]), 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0, 0, 1], [1, 0, 0]]
    mh = torch.tensor([[1, 1, 0]])
    assert as_multi_hot(mh, 3).tolist() == [[1.0, 1.0, 0.0]]


def test_as_multi_hot_errors():
    with pytest.raises(ValueError):
        as_multi_hot(torch.tensor([[1.0, 0.0]]), 3)  # wrong class count
    with pytest.raises(ValueError):
        as_multi_hot(torch.tensor([0.5, 1.0]), 3)  # 1-D floats are not indices
    with pytest.raises(ValueError):
        as_multi_hot(torch.zeros(2, 3, 1), 3)


# --------------------------------------------------------------------------- HashProxyLoss


def _proxy_loss_fixed(temperature=0.2):
    loss = HashProxyLoss(num_classes=2, nbits=2, temperature=temperature)
    with torch.no_grad():
        loss.proxies.copy_(t([[1.0, 0.0], [0.0, 1.0]]))
    return loss


def test_hash_proxy_one_hot_is_plain_cross_entropy():
    # h = (0.6, 0.8) has unit norm: cos with p0 = 0.6, with p1 = 0.8; / 0.2 -> logits (3, 4).
    # class 0: -log(e^3 / (e^3 + e^4)) = log(1 + e) = 1.31326
    loss = _proxy_loss_fixed()
    h = t([[0.6, 0.8]])
    expected = -math.log(math.exp(3) / (math.exp(3) + math.exp(4)))
    assert loss(h, t([[1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(1.31326, abs=1e-5)
    # integer class indices give the same value
    assert loss(h, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)
    # class 1: log(1 + e) - 1 = 0.31326
    assert loss(h, torch.tensor([1])).item() == pytest.approx(math.log(1 + math.e) - 1, rel=1e-5)


def test_hash_proxy_multi_hot_uses_normalised_label():
    # y = (1, 1) -> (0.5, 0.5): 0.5 * 1.31326 + 0.5 * 0.31326 = 0.81326
    # (an unnormalised label would give 1.62652)
    loss = _proxy_loss_fixed()
    val = loss(t([[0.6, 0.8]]), t([[1.0, 1.0]])).item()
    assert val == pytest.approx(0.5 * math.log(1 + math.e) + 0.5 * (math.log(1 + math.e) - 1), rel=1e-5)
    assert val == pytest.approx(0.81326, abs=1e-5)


def test_hash_proxy_batch_mean_and_scale_invariance():
    # cosine ignores the norm of h; a batch is averaged.
    loss = _proxy_loss_fixed()
    h = t([[0.6, 0.8], [0.3, 0.4]])
    val = loss(h, torch.tensor([0, 1])).item()
    assert val == pytest.approx((math.log(1 + math.e) + math.log(1 + math.e) - 1) / 2, rel=1e-5)


def test_hash_proxy_override_proxies():
    loss = _proxy_loss_fixed()
    swapped = t([[0.0, 1.0], [1.0, 0.0]])
    # with the proxies swapped, class 0 now has logit 4: log(1 + e) - 1
    val = loss(t([[0.6, 0.8]]), torch.tensor([0]), proxies=swapped).item()
    assert val == pytest.approx(math.log(1 + math.e) - 1, rel=1e-5)


def test_hash_proxy_gradients_reach_codes_and_proxies():
    loss = HashProxyLoss(num_classes=4, nbits=8)
    h = codes(6, 8, seed=0).requires_grad_()
    out = loss(h, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert out.dim() == 0
    out.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert loss.proxies.grad is not None and loss.proxies.grad.abs().sum() > 0


def test_hash_proxy_init_is_well_separated():
    loss = HashProxyLoss(num_classes=4, nbits=16)
    p = loss.proxies.detach()
    gram = p @ p.T
    assert torch.allclose(gram, torch.eye(4), atol=1e-5)


def test_hash_proxy_shape_errors():
    loss = HashProxyLoss(num_classes=3, nbits=4)
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 5), torch.tensor([0, 1]))  # wrong nbits
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.tensor([0, 1, 2]))  # batch mismatch
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.zeros(2, 2))  # wrong class count
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]), proxies=torch.zeros(3, 5))
    with pytest.raises(ValueError):
        loss(torch.zeros(4), torch.tensor([0]))


# --------------------------------------------------------------------------- SelfDistilledHashingLoss


def test_self_distilled_hand_values():
    loss = SelfDistilledHashingLoss()
    a = t([[1.0, 0.0]])
    assert loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(a, t([[0.0, 1.0]])).item() == pytest.approx(1.0, abs=1e-6)
    assert loss(a, t([[-1.0, 0.0]])).item() == pytest.approx(2.0, abs=1e-6)
    # batch mean: (0 + 1 + 2) / 3
    teacher = t([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    student = t([[0.5, 0.0], [0.0, 0.3], [-0.2, 0.0]])
    assert loss(teacher, student).item() == pytest.approx(1.0, abs=1e-6)


def test_self_distilled_gradient_only_to_student():
    teacher = codes(4, 8, seed=1).requires_grad_()
    student = codes(4, 8, seed=2).requires_grad_()
    SelfDistilledHashingLoss()(teacher, student).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_self_distilled_shape_errors():
    loss = SelfDistilledHashingLoss()
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.zeros(2, 5))


# --------------------------------------------------------------------------- BCEQuantizationLoss


def _bceq_numpy(h, sigma=0.5, eps=1e-6):
    h = np.asarray(h, dtype=np.float64)
    gp = np.clip(np.exp(-((h - 1) ** 2) / (2 * sigma**2)), eps, 1 - eps)
    gn = np.clip(np.exp(-((h + 1) ** 2) / (2 * sigma**2)), eps, 1 - eps)
    y = (np.sign(h) + 1) / 2
    bce_p = -(y * np.log(gp) + (1 - y) * np.log(1 - gp))
    bce_n = -((1 - y) * np.log(gn) + y * np.log(1 - gn))
    return bce_p.mean() + bce_n.mean()


def test_bce_quantization_matches_numpy():
    h = [[0.9, -0.95, 0.1], [-0.05, 0.5, -0.7]]
    for sigma in (0.5, 1.0):
        got = BCEQuantizationLoss(sigma=sigma)(t(h)).item()
        assert got == pytest.approx(_bceq_numpy(h, sigma), rel=1e-5)


def test_bce_quantization_hand_value_at_plus_one():
    # h = 1: g+ = 1 -> clamped to 1 - eps, BCE = -log(1 - 1e-6) ~ 1e-6;
    # g- = exp(-4 / 0.5) = e^-8, BCE(g-, 0) = -log(1 - e^-8) ~ 3.3546e-4.
    expected = -math.log(1 - 1e-6) - math.log(1 - math.exp(-8))
    assert BCEQuantizationLoss()(t([[1.0]])).item() == pytest.approx(expected, rel=1e-3)


def test_bce_quantization_lower_near_binary():
    loss = BCEQuantizationLoss()
    near_binary = loss(t([[0.95, -0.95], [-0.9, 0.98]]))
    near_zero = loss(t([[0.05, -0.05], [-0.1, 0.02]]))
    assert near_binary.item() < 0.1 < near_zero.item()


def test_bce_quantization_gradient_pushes_towards_sign():
    h = t([[0.3, -0.3]]).requires_grad_()
    BCEQuantizationLoss()(h).backward()
    # gradient descent moves 0.3 up (towards +1) and -0.3 down (towards -1)
    assert h.grad[0, 0] < 0 and h.grad[0, 1] > 0


# --------------------------------------------------------------------------- ImageTextContrastiveLoss


def _infonce_loop(img, txt, tau, pos=None):
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    b = img.shape[0]
    pos = np.eye(b, dtype=bool) if pos is None else np.asarray(pos, dtype=bool)
    logits = [[float(img[i] @ txt[j]) / tau for j in range(b)] for i in range(b)]

    def ce(row, targets):
        lse = math.log(sum(math.exp(v) for v in row))
        return -sum((row[k] - lse) / len(targets) for k in targets)

    i2t = sum(ce(logits[i], [j for j in range(b) if pos[i, j]]) for i in range(b)) / b
    t2i = sum(ce([logits[i][j] for i in range(b)], [i for i in range(b) if pos[i, j]]) for j in range(b)) / b
    return (i2t + t2i) / 2


def test_infonce_matches_loop():
    img, txt = codes(5, 8, seed=3), codes(5, 8, seed=4)
    got = ImageTextContrastiveLoss(temperature=0.07)(img, txt).item()
    assert got == pytest.approx(_infonce_loop(img.numpy(), txt.numpy(), 0.07), rel=1e-4)


def test_infonce_hand_value():
    # img = txt = e1, e2: logits = I / 0.5 = [[2, 0], [0, 2]]; each row -log(e^2 / (e^2 + 1)).
    e = t([[1.0, 0.0], [0.0, 1.0]])
    got = ImageTextContrastiveLoss(temperature=0.5)(e, e.clone()).item()
    assert got == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)


def test_infonce_identity_mask_equals_plain():
    img, txt = codes(4, 6, seed=5), codes(4, 6, seed=6)
    loss = ImageTextContrastiveLoss()
    plain = loss(img, txt)
    masked = loss(img, txt, positives=torch.eye(4, dtype=torch.bool))
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6)


def test_infonce_multi_positive_matches_loop():
    img, txt = codes(4, 6, seed=7), codes(4, 6, seed=8)
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True  # images 0 and 1 share a caption
    pos[2, 0] = True  # asymmetric: text 0 also matches image 2
    got = ImageTextContrastiveLoss(temperature=0.1)(img, txt, positives=pos).item()
    assert got == pytest.approx(_infonce_loop(img.numpy(), txt.numpy(), 0.1, pos.numpy()), rel=1e-4)


def test_infonce_learnable_temperature_gets_gradient():
    loss = ImageTextContrastiveLoss(learnable=True)
    assert isinstance(loss.logit_scale, torch.nn.Parameter)
    loss(codes(4, 6, seed=9), codes(4, 6, seed=10)).backward()
    assert loss.logit_scale.grad is not None
    assert not any(p.requires_grad for p in ImageTextContrastiveLoss().parameters())


def test_infonce_shape_errors():
    loss = ImageTextContrastiveLoss()
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(3, 4), positives=torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4), torch.randn(2, 4), positives=torch.tensor([[True, False], [False, False]]))


# --------------------------------------------------------------------------- MarginScalableContrastiveLoss


def _margin_loop(img, txt, r, margin):
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    b = img.shape[0]
    s = img @ txt.T
    i2t = t2i = 0.0
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            i2t += max(0.0, margin * (1 - r[i][j]) - s[i, i] + s[i, j])
            t2i += max(0.0, margin * (1 - r[j][i]) - s[i, i] + s[j, i])
    n = b * (b - 1)
    return (i2t / n + t2i / n) / 2


def test_margin_zero_when_positives_win_by_margin():
    # s = I: every negative trails its positive by 1 > margin.
    e = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert MarginScalableContrastiveLoss(0.2)(e, e.clone(), torch.zeros(3, 3)).item() == 0.0


def test_margin_related_vs_unrelated_negative():
    # All four codes identical: s = all ones, so every negative exactly ties its positive.
    h = t([[1.0, 0.0], [1.0, 0.0]])
    loss = MarginScalableContrastiveLoss(margin=0.2)
    # related (r = 1): margin 0, relu(0 - 1 + 1) = 0
    assert loss(h, h.clone(), torch.ones(2, 2)).item() == pytest.approx(0.0, abs=1e-7)
    # unrelated (r = 0): relu(0.2 - 1 + 1) = 0.2 for every negative
    assert loss(h, h.clone(), torch.eye(2)).item() == pytest.approx(0.2, abs=1e-6)
    # half related: margin 0.2 * (1 - 0.5) = 0.1
    assert loss(h, h.clone(), t([[1.0, 0.5], [0.5, 1.0]])).item() == pytest.approx(0.1, abs=1e-6)


def test_margin_hand_value_asymmetric():
    # img = (e1, e2), txt = (e1, e1): s = [[1, 1], [0, 0]], s_00 = 1, s_11 = 0, r = 0, margin 0.2
    # i2t: (i=0, j=1) relu(0.2 - 1 + 1) = 0.2; (i=1, j=0) relu(0.2 - 0 + 0) = 0.2 -> mean 0.2
    # t2i: (txt0, img1) relu(0.2 - 1 + s_10 = 0) = 0; (txt1, img0) relu(0.2 - 0 + s_01 = 1) = 1.2 -> mean 0.6
    # total (0.2 + 0.6) / 2 = 0.4
    img = t([[1.0, 0.0], [0.0, 1.0]])
    txt = t([[1.0, 0.0], [1.0, 0.0]])
    assert MarginScalableContrastiveLoss(0.2)(img, txt, torch.zeros(2, 2)).item() == pytest.approx(0.4, abs=1e-6)


def test_margin_matches_loop_with_asymmetric_relatedness():
    img, txt = codes(5, 8, seed=11), codes(5, 8, seed=12)
    g = torch.Generator().manual_seed(13)
    r = torch.rand(5, 5, generator=g)  # deliberately not symmetric: checks r_ij vs r_ji
    got = MarginScalableContrastiveLoss(0.5)(img, txt, r).item()
    assert got == pytest.approx(_margin_loop(img.numpy(), txt.numpy(), r.numpy(), 0.5), rel=1e-5)
    assert got > 0


def test_margin_single_pair_and_errors():
    h = codes(1, 4, seed=14).requires_grad_()
    out = MarginScalableContrastiveLoss()(h, h, torch.ones(1, 1))
    assert out.item() == 0.0
    out.backward()  # must not fail
    loss = MarginScalableContrastiveLoss()
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 3))


# --------------------------------------------------------------------------- DistributionAlignmentLoss


def _mmd_loop(x, y, bws):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nbits = x.shape[1]

    def k(a, b):
        d = float(((a - b) ** 2).sum()) / nbits
        return sum(math.exp(-d / (2 * bw**2)) for bw in bws)

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


def test_mmd_hand_value_single_points():
    # x = (1, 1), y = (-1, -1): ||x - y||^2 / nbits = 8 / 2 = 4.
    # k(x, x) = k(y, y) = 3 (one per bandwidth); k(x, y) = e^-8 + e^-2 + e^-0.5.
    got = DistributionAlignmentLoss()(t([[1.0, 1.0]]), t([[-1.0, -1.0]])).item()
    expected = 6 - 2 * (math.exp(-8) + math.exp(-2) + math.exp(-0.5))
    assert got == pytest.approx(expected, rel=1e-5)


def test_mmd_identical_sets_near_zero_and_shift_positive():
    loss = DistributionAlignmentLoss()
    x = codes(16, 32, seed=15)
    assert abs(loss(x, x.clone()).item()) < 1e-5
    shifted = (x + 0.5).clamp(-1, 1)
    assert loss(x, shifted).item() > 1e-2


def test_mmd_permutation_invariant():
    loss = DistributionAlignmentLoss()
    x, y = codes(8, 16, seed=16), codes(8, 16, seed=17)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert loss(x, y[perm]).item() == pytest.approx(loss(x, y).item(), rel=1e-5, abs=1e-7)
    # shuffling a set onto itself: still ~0, no pointwise pairing is used
    assert abs(loss(x, x[perm]).item()) < 1e-5


def test_mmd_matches_loop_unequal_batches():
    x, y = codes(6, 12, seed=18), codes(4, 12, seed=19)
    bws = (0.3, 1.5)
    got = DistributionAlignmentLoss(kernel_bandwidths=bws)(x, y).item()
    assert got == pytest.approx(_mmd_loop(x.numpy(), y.numpy(), bws), rel=1e-4)


def test_mmd_gradient_and_errors():
    x = codes(4, 8, seed=20).requires_grad_()
    y = codes(5, 8, seed=21)
    DistributionAlignmentLoss()(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        DistributionAlignmentLoss()(torch.randn(3, 8), torch.randn(3, 4))
    with pytest.raises(ValueError):
        DistributionAlignmentLoss(kernel_bandwidths=())


# --------------------------------------------------------------------------- bit-level regularisers


def test_bit_balance_hand_values():
    loss = BitBalanceLoss()
    # bit means (0, 1): (0^2 + 1^2) / 2 = 0.5
    assert loss(t([[1.0, 1.0], [-1.0, 1.0]])).item() == pytest.approx(0.5)
    # bit means (0.25, -0.5): (0.0625 + 0.25) / 2 = 0.15625
    assert loss(t([[0.5, -0.5], [0.0, -0.5]])).item() == pytest.approx(0.15625)
    assert loss(t([[1.0, -1.0], [-1.0, 1.0]])).item() == 0.0


def test_bit_decorrelation_hand_values():
    loss = BitDecorrelationLoss()
    # columns (1, -1) and (1, 1) are orthogonal: C = I -> 0
    assert loss(t([[1.0, 1.0], [-1.0, 1.0]])).item() == 0.0
    # identical columns: C = all ones -> off-diagonal squares all 1
    assert loss(t([[1.0, 1.0], [1.0, 1.0]])).item() == pytest.approx(1.0)
    # columns (1,1), (1,-1), (-1,1): C01 = C02 = 0, C12 = -1 -> (0 + 0 + 1) * 2 / 6 = 1/3
    assert loss(t([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])).item() == pytest.approx(1 / 3)
    # one bit: no off-diagonal entries
    assert loss(t([[1.0], [-1.0]])).item() == 0.0


def test_feature_structure_hand_values():
    loss = FeatureStructureLoss()
    # centred features (1, 0), (-1, 0): cosine -1. Codes (1, 1), (-1, -1): cosine -1 too -> 0
    features = t([[3.0, 5.0], [1.0, 5.0]])
    assert loss(t([[1.0, 1.0], [-1.0, -1.0]]), features).item() == pytest.approx(0.0, abs=1e-6)
    # codes (1, 1), (1, -1): cosine 0 against -1 -> 1 (both off-diagonal entries)
    assert loss(t([[1.0, 1.0], [1.0, -1.0]]), features).item() == pytest.approx(1.0)
    # the features' shared offset says nothing: the same figure without it
    assert loss(t([[1.0, 1.0], [1.0, -1.0]]), features - t([[2.0, 5.0]])).item() == pytest.approx(1.0)


def test_feature_structure_trains_the_codes_only():
    torch.manual_seed(0)
    h = torch.tanh(torch.randn(6, 8)).requires_grad_()
    x = torch.randn(6, 16).requires_grad_()
    FeatureStructureLoss()(h, x).backward()
    assert h.grad.abs().sum() > 0 and (x.grad is None or x.grad.abs().sum() == 0)
    with pytest.raises(ValueError, match="rows"):
        FeatureStructureLoss()(h, x[:5])


def test_bit_losses_shape_errors():
    with pytest.raises(ValueError):
        BitBalanceLoss()(torch.zeros(4))
    with pytest.raises(ValueError):
        BitDecorrelationLoss()(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------- no in-place modification


def test_inputs_not_modified_in_place():
    img, txt = codes(4, 6, seed=22), codes(4, 6, seed=23)
    labels_mh = t([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]])
    labels_idx = torch.tensor([0, 2, 1, 1])
    rel = torch.rand(4, 4, generator=torch.Generator().manual_seed(24))
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 1] = True
    inputs = [img, txt, labels_mh, labels_idx, rel, pos]
    before = [x.clone() for x in inputs]

    proxy = HashProxyLoss(num_classes=3, nbits=6)
    proxies_before = proxy.proxies.detach().clone()
    proxy(img, labels_mh)
    proxy(img, labels_idx)
    proxy(txt, labels_mh, proxies=proxy.proxies)
    SelfDistilledHashingLoss()(img, txt)
    BCEQuantizationLoss()(img)
    ImageTextContrastiveLoss()(img, txt)
    ImageTextContrastiveLoss()(img, txt, positives=pos)
    MarginScalableContrastiveLoss()(img, txt, rel)
    DistributionAlignmentLoss()(img, txt)
    BitBalanceLoss()(img)
    BitDecorrelationLoss()(img)
    as_multi_hot(labels_mh, 3)

    for x, b in zip(inputs, before):
        assert x.dtype == b.dtype and torch.equal(x, b)
    assert torch.equal(proxy.proxies.detach(), proxies_before)


# --------------------------------------------------------------------------- total_loss


def test_total_loss_weighted_sum():
    terms = {"hp": torch.tensor(2.0), "q": torch.tensor(3.0)}
    out = total_loss(terms, {"hp": 1.0, "q": 0.5, "unused": 7.0})
    assert out.item() == pytest.approx(3.5)


def test_total_loss_missing_weight_raises():
    with pytest.raises(KeyError, match="q"):
        total_loss({"hp": torch.tensor(1.0), "q": torch.tensor(1.0)}, {"hp": 1.0})


def test_total_loss_zero_weight_skips_term():
    terms = {"hp": torch.tensor(2.0), "bad": torch.tensor(float("nan"))}
    assert total_loss(terms, {"hp": 1.0, "bad": 0.0}).item() == pytest.approx(2.0)
    assert total_loss({"bad": torch.tensor(float("nan"))}, {"bad": 0}).item() == 0.0


def test_total_loss_backward():
    h = codes(4, 8, seed=25).requires_grad_()
    terms = {"balance": BitBalanceLoss()(h), "decor": BitDecorrelationLoss()(h)}
    total_loss(terms, {"balance": 1.0, "decor": 0.1}).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
