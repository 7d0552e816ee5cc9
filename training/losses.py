"""Hashing losses: DHD's proxy, self-distillation and quantization terms, plus cross-modal and bit-level regularisers."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Every loss below takes continuous codes h in (-1, 1) of shape (B, nbits), as produced
# by a tanh hash head; sign(h) gives the binary code used at retrieval time.


def _check_codes(h: Tensor, name: str, nbits: int | None = None) -> None:
    if h.dim() != 2:
        raise ValueError(f"{name} must have shape (B, nbits), got {tuple(h.shape)}")
    if nbits is not None and h.shape[1] != nbits:
        raise ValueError(f"{name} has {h.shape[1]} bits, expected {nbits} (shape {tuple(h.shape)})")


def _check_pair(h_a: Tensor, h_b: Tensor, name_a: str, name_b: str, same_batch: bool) -> None:
    _check_codes(h_a, name_a)
    _check_codes(h_b, name_b)
    if h_a.shape[1] != h_b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of bits, "
            f"got {tuple(h_a.shape)} and {tuple(h_b.shape)}"
        )
    if same_batch and h_a.shape[0] != h_b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size, "
            f"got {tuple(h_a.shape)} and {tuple(h_b.shape)}"
        )


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(B1, D), (B2, D) -> (B1, B2) cosine similarities."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def as_multi_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Return labels as a float (B, num_classes) tensor.

    Integer class indices of shape (B,) are one-hot encoded; multi-hot or one-hot
    (B, num_classes) tensors are cast to float. The input is never modified.
    """
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"1-D labels must be integer class indices, got dtype {labels.dtype}")
        return F.one_hot(labels.long(), num_classes).float()
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels have {labels.shape[1]} classes, expected {num_classes} (shape {tuple(labels.shape)})")
        return labels.float()
    raise ValueError(f"labels must be (B,) class indices or (B, {num_classes}) multi-hot, got {tuple(labels.shape)}")


class HashProxyLoss(nn.Module):
    """Hash-proxy loss L_HP of Deep Hash Distillation (Jang et al., ECCV 2022).

    Each class c owns a learnable proxy p_c in R^nbits; codes are pulled towards the
    proxies of their classes via a softmax over cosine similarities:

        L_HP = mean_b sum_c -y_bc * log softmax_c( cos(h_b, p_c) / tau )

    where y_b is the label row normalised to sum to 1 (so a multi-hot image spreads
    its target mass evenly over its classes).

    Shapes: h (B, nbits); labels (B, C) multi-/one-hot or (B,) int indices;
    proxies (C, nbits). Returns a scalar.
    """

    def __init__(self, num_classes: int, nbits: int, temperature: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        self.nbits = nbits
        self.temperature = temperature
        self.proxies = nn.Parameter(torch.empty(num_classes, nbits))
        # Orthogonal init keeps proxies well separated from the start (as in DHD), so
        # early training does not collapse several classes onto one region of code space.
        # When C > nbits the columns, rather than rows, are orthonormal; still well spread.
        nn.init.orthogonal_(self.proxies)

    def forward(self, h: Tensor, labels: Tensor, proxies: Tensor | None = None) -> Tensor:
        # `proxies` lets another head (e.g. text) score against the image proxies.
        proxies = self.proxies if proxies is None else proxies
        _check_codes(h, "h", self.nbits)
        if proxies.shape != (self.num_classes, self.nbits):
            raise ValueError(f"proxies must have shape {(self.num_classes, self.nbits)}, got {tuple(proxies.shape)}")
        y = as_multi_hot(labels, self.num_classes).to(h.dtype)  # (B, C)
        if y.shape[0] != h.shape[0]:
            raise ValueError(f"h has batch size {h.shape[0]} but labels have {y.shape[0]}")
        # An all-zero label row gives an all-zero target (clamp avoids 0/0): that row adds nothing.
        y = y / y.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, C)
        logits = _cosine_matrix(h, proxies) / self.temperature  # (B, C)
        return -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class SelfDistilledHashingLoss(nn.Module):
    """Self-distilled hashing loss L_SdH of Deep Hash Distillation.

    The code of a strongly augmented view (student) is pulled towards the code of a
    weakly augmented view of the same image (teacher):

        L_SdH = mean_b ( 1 - cos(sg(h_T_b), h_S_b) )

    sg = stop-gradient: the teacher is detached so the easy view is not dragged
    towards the hard one. Shapes: h_teacher, h_student (B, nbits). Returns a scalar
    in [0, 2].
    """

    def forward(self, h_teacher: Tensor, h_student: Tensor) -> Tensor:
        _check_pair(h_teacher, h_student, "h_teacher", "h_student", same_batch=True)
        cos = F.cosine_similarity(h_teacher.detach(), h_student, dim=1)  # (B,)
        return (1.0 - cos).mean()


class BCEQuantizationLoss(nn.Module):
    """BCE quantization loss L_bce-Q of Deep Hash Distillation.

    Each code entry is scored by two Gaussian likelihoods, centred at +1 and at -1,
    read as Bernoulli probabilities:

        g+(h) = exp(-(h - 1)^2 / (2 sigma^2)),   g-(h) = exp(-(h + 1)^2 / (2 sigma^2))
        y     = (sg(sign(h)) + 1) / 2
        L     = mean_elements [ BCE(g+(h), y) + BCE(g-(h), 1 - y) ]

    so an entry is pushed to the nearer of +-1 (y is the target bit). Probabilities are
    clamped into [eps, 1 - eps] so log(0) never occurs. Shape: h (B, nbits). Returns a scalar.
    """

    def __init__(self, sigma: float = 0.5, eps: float = 1e-6):
        super().__init__()
        self.sigma = sigma
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        _check_codes(h, "h")
        two_var = 2.0 * self.sigma**2
        g_pos = torch.exp(-(h - 1.0).pow(2) / two_var).clamp(self.eps, 1.0 - self.eps)  # (B, nbits)
        g_neg = torch.exp(-(h + 1.0).pow(2) / two_var).clamp(self.eps, 1.0 - self.eps)  # (B, nbits)
        y = (torch.sign(h.detach()) + 1.0) / 2.0  # (B, nbits), target bit in {0, 1} (0.5 at h == 0)
        return F.binary_cross_entropy(g_pos, y) + F.binary_cross_entropy(g_neg, 1.0 - y)


class ImageTextContrastiveLoss(nn.Module):
    """Symmetric image-text InfoNCE (CLIP) on L2-normalised continuous codes.

        logits = norm(h_img) @ norm(h_txt)^T / tau                       (B, B)
        L      = ( CE(logits, arange(B)) + CE(logits^T, arange(B)) ) / 2

    Multi-positive form: if `positives` (B, B) bool is given (positives[i, j] means image
    i and text j are a true match, e.g. several captions of one image in the batch), the
    target of row i is uniform over its positives instead of one-hot:

        L = ( CE(logits, rownorm(P)) + CE(logits^T, rownorm(P^T)) ) / 2

    With P = I this is exactly the plain form. Every row and column of P needs at least
    one positive. If `learnable`, log(1/tau) is a parameter (clamped to scale <= 100, as
    in CLIP). Shapes: h_img, h_txt (B, nbits). Returns a scalar.
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = False):
        super().__init__()
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def forward(self, h_img: Tensor, h_txt: Tensor, positives: Tensor | None = None) -> Tensor:
        _check_pair(h_img, h_txt, "h_img", "h_txt", same_batch=True)
        B = h_img.shape[0]
        # Clamp as in CLIP: an unbounded learnable scale makes training unstable.
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * _cosine_matrix(h_img, h_txt)  # (B, B)
        if positives is None:
            target = torch.arange(B, device=logits.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if positives.shape != (B, B):
            raise ValueError(f"positives must have shape {(B, B)}, got {tuple(positives.shape)}")
        p = positives.to(logits.dtype)  # (B, B)
        row_count, col_count = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
        if not (bool((row_count > 0).all()) and bool((col_count > 0).all())):
            raise ValueError("every row and column of positives needs at least one True entry")
        t_i2t = p / row_count  # (B, B), row i: uniform over texts matching image i
        t_t2i = (p / col_count).T  # (B, B), row j: uniform over images matching text j
        return (F.cross_entropy(logits, t_i2t) + F.cross_entropy(logits.T, t_t2i)) / 2


class MarginScalableContrastiveLoss(nn.Module):
    """Bidirectional hinge ranking loss whose margin shrinks for related pairs.

    s = cos(h_img, h_txt) (B, B), s_ii the matched pair. r (B, B) in [0, 1] is the
    relatedness of image i and text j (1 = same scene class or near-identical captions).
    For every negative pair i != j, with m_ij = margin * (1 - r_ij):

        image->text:  l_ij = relu( m_ij - s_ii + s_ij )   (text j ranked against image i's match)
        text->image:  l'_ij = relu( m_ji - s_ii + s_ji )  (image j = (img j, txt i), relatedness r_ji)
        L = ( mean_{i != j} l_ij + mean_{i != j} l'_ij ) / 2

    An unrelated negative (r = 0) must trail the positive by the full margin; a fully
    related one (r = 1) gets margin 0, i.e. it is only required not to beat the positive,
    so near-duplicates (many remote-sensing captions are) are not pushed apart.
    Shapes: h_img, h_txt (B, nbits); relatedness (B, B). Returns a scalar; 0 if B < 2.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, h_img: Tensor, h_txt: Tensor, relatedness: Tensor) -> Tensor:
        _check_pair(h_img, h_txt, "h_img", "h_txt", same_batch=True)
        B = h_img.shape[0]
        if relatedness.shape != (B, B):
            raise ValueError(f"relatedness must have shape {(B, B)}, got {tuple(relatedness.shape)}")
        s = _cosine_matrix(h_img, h_txt)  # (B, B), s[i, j] = cos(img_i, txt_j)
        if B < 2:
            return s.sum() * 0.0  # no negatives; keep the graph so backward() still works
        m = self.margin * (1.0 - relatedness.to(s.dtype))  # (B, B)
        pos = s.diagonal()  # (B,)
        off_diag = ~torch.eye(B, dtype=torch.bool, device=s.device)
        # Row i of each matrix: anchor i against its B - 1 negatives.
        i2t = F.relu(m - pos[:, None] + s)  # (B, B), [i, j] = relu(m_ij - s_ii + s_ij)
        t2i = F.relu(m.T - pos[:, None] + s.T)  # (B, B), [i, j] = relu(m_ji - s_ii + s_ji)
        return (i2t[off_diag].mean() + t2i[off_diag].mean()) / 2


class DistributionAlignmentLoss(nn.Module):
    """Set-level alignment of image and text code distributions via squared MMD.

    Biased estimator with a sum of Gaussian RBF kernels over bandwidths sigma_k:

        k(x, y) = sum_k exp( -||x - y||^2 / nbits / (2 sigma_k^2) )
        MMD^2   = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)

    Distances are divided by nbits so a bandwidth means the same at any code length.
    MMD with a characteristic kernel is zero iff the two distributions match in all
    moments, and it needs no pairing between x_i and y_j: it aligns the two modalities'
    code distributions (e.g. unpaired batches, or bit usage) rather than individual
    pairs, and is invariant to the order within either set.
    Shapes: h_img (B1, nbits), h_txt (B2, nbits), B1 may differ from B2. Returns a scalar.
    """

    def __init__(self, kernel_bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)):
        super().__init__()
        if len(kernel_bandwidths) == 0:
            raise ValueError("kernel_bandwidths must not be empty")
        self.kernel_bandwidths = tuple(float(b) for b in kernel_bandwidths)

    def _kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """(B1, nbits), (B2, nbits) -> (B1, B2) summed RBF kernel values."""
        # Expansion |a|^2 + |b|^2 - 2ab avoids a (B1, B2, nbits) intermediate; clamp the
        # tiny negatives that rounding can produce.
        d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)
        d2 = d2 / a.shape[1]  # (B1, B2), per-bit squared distance
        return sum(torch.exp(-d2 / (2.0 * bw**2)) for bw in self.kernel_bandwidths)

    def forward(self, h_img: Tensor, h_txt: Tensor) -> Tensor:
        _check_pair(h_img, h_txt, "h_img", "h_txt", same_batch=False)
        if h_img.shape[0] == 0 or h_txt.shape[0] == 0:
            raise ValueError("h_img and h_txt must each contain at least one code")
        k_xx = self._kernel(h_img, h_img).mean()
        k_yy = self._kernel(h_txt, h_txt).mean()
        k_xy = self._kernel(h_img, h_txt).mean()
        return k_xx + k_yy - 2.0 * k_xy


class BitBalanceLoss(nn.Module):
    """Bit balance: each bit should be +1 for half of the data.

        L = mean_k ( mean_b h_bk )^2

    Shape: h (B, nbits). Returns a scalar.
    """

    def forward(self, h: Tensor) -> Tensor:
        _check_codes(h, "h")
        return h.mean(dim=0).pow(2).mean()


class BitDecorrelationLoss(nn.Module):
    """Bit decorrelation: different bits should carry independent information.

        C = h^T h / B                                     (nbits, nbits)
        L = mean_{k != l} C_kl^2

    Shape: h (B, nbits). Returns a scalar; 0 if nbits < 2.
    """

    def forward(self, h: Tensor) -> Tensor:
        _check_codes(h, "h")
        B, nbits = h.shape
        corr = h.T @ h / B  # (nbits, nbits)
        if nbits < 2:
            return corr.sum() * 0.0  # no off-diagonal entries; keep the graph
        off_diag = ~torch.eye(nbits, dtype=torch.bool, device=h.device)
        return corr[off_diag].pow(2).mean()


class FeatureStructureLoss(nn.Module):
    """Codes that keep the pretrained features' neighbourhoods: the cosine similarities of the codes
    of a batch are pulled to those of the backbone features, centred over the batch (so that the
    features' common direction, which every image shares, says nothing).

        f_i = (x_i - mean_j x_j) / ||.||,  u_i = h_i / ||h_i||
        L = mean_{i != j} (u_i . u_j - f_i . f_j)^2

    What a class proxy cannot keep (how alike two scenes of classes never trained on look) stays
    in the codes that carry it. Shapes: h (B, nbits), x (B, D). Returns a scalar; 0 if B < 2.
    """

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        _check_codes(h, "h")
        if x.shape[0] != h.shape[0]:
            raise ValueError(f"h has {h.shape[0]} rows but x {x.shape[0]}")
        f = F.normalize(x - x.mean(dim=0, keepdim=True), dim=1)  # (B, D)
        u = F.normalize(h, dim=1)  # (B, nbits)
        off_diag = ~torch.eye(h.shape[0], dtype=torch.bool, device=h.device)
        if not off_diag.any():
            return h.sum() * 0.0
        return (u @ u.T - (f @ f.T).detach())[off_diag].pow(2).mean()


def total_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Sum weights[k] * terms[k] over the keys of `terms`.

    Every term needs a weight (KeyError otherwise, so a typo in a config cannot silently
    drop a loss); extra keys in `weights` are ignored. A weight of 0 skips the term
    entirely, so a NaN in a disabled term cannot leak into the total (0 * NaN = NaN).
    """
    missing = [k for k in terms if k not in weights]
    if missing:
        raise KeyError(f"no weight for loss term(s) {missing}; weights are given for {sorted(weights)}")
    total = None
    for name, value in terms.items():
        w = weights[name]
        if w == 0:
            continue
        total = w * value if total is None else total + w * value
    if total is None:
        device = next(iter(terms.values())).device if terms else None
        return torch.zeros((), device=device)
    return total
