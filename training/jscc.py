"""DeepJSCC over noisy multi-hop radio links, aligned by a frozen hasher (the models; no training loop).

A field unit sends an image S (B, 3, H, W) in [0, 1] as k complex channel symbols; relays forward it;
the search service receives S_hat and hashes it like an uploaded image.

Codec (Bourtsoulatze et al., 2019). The encoder f: five 5x5 convolutions with PReLU, the first two of
stride 2 (downsampling by 4), to ``c_out`` channels; z = f(S) has shape (B, c_out, H/4, W/4), read as
k = c_out * (H/4) * (W/4) / 2 complex symbols (consecutive pairs of real values). The decoder d mirrors
it with transposed convolutions and ends in a sigmoid. The bandwidth ratio is

    rho = k / (3 H W) = c_out / 96        (1/3 at the paper's c_out = 32)

Power normalisation, per image: z_n = z * sqrt(k / ||z||^2), so the mean power per complex symbol is
1 (||z_n||^2 = k, two real values per symbol).

Channel: complex AWGN at SNR s dB, y = z_n + n with n ~ CN(0, sigma^2), sigma^2 = 10^(-s/10): each
real component gets variance sigma^2 / 2. With ``snr_conditioning`` the encoder's last and the
decoder's first convolution also see a constant map of s / 20, so one codec serves a range of SNRs.

Decode-and-forward over r relays (``DecodeForward``, hops = r + 1): each hop i has its own pair
(f_i, d_i); node i+1 receives y_i = f_i(S_i) + n_i and decodes S_{i+1} = d_i(y_i); S_hat = S_{r+1}.
The pairs train end to end through every hop.

Quantize-and-forward (``BlockQuantizer``): the first relay cuts its channel output (2k real values)
into blocks of N_Q values and replaces each block by the index of its nearest codeword in a k-means
codebook of 2^(N_Q b) codewords (learned on channel outputs of the val split), i.e. N_Q b bits per
block; the bits travel over error-free hops and the destination decodes the codewords with the
frozen point-to-point decoder. The rate is

    I = (2k / N_Q) * N_Q b / (H W) = 2 k b / (H W) bits per pixel   (4 bpp at b = 2, rho = 1/3).

Semantic alignment: L = MSE(S, S_hat) + lambda * L_SdH(h(S), h(S_hat)), with h the project's image
hasher, frozen (eval mode, parameters without gradients; the gradient still flows through h to the
decoder), and L_SdH = mean_b (1 - cos(h(S)_b, h(S_hat)_b)) (training.losses.SelfDistilledHashingLoss:
the source's code is the stop-gradient target). lambda = 0.06 in the paper.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .losses import SelfDistilledHashingLoss

SNR_SCALE = 20.0  # the SNR map a conditioned codec sees: snr_db / SNR_SCALE


def bandwidth_ratio(c_out: int) -> float:
    """rho = k / (3 H W) of a codec with ``c_out`` output channels (downsampling by 4)."""
    return c_out / 96.0


def symbols(c_out: int, height: int, width: int) -> int:
    """k, the complex symbols an image of ``height`` x ``width`` is sent as."""
    if height % 4 or width % 4:
        raise ValueError(f"image sides must be multiples of 4 (the codec downsamples by 4), got {height}x{width}")
    if c_out % 2:
        raise ValueError(f"c_out must be even (pairs of real values make complex symbols), got {c_out}")
    return c_out * (height // 4) * (width // 4) // 2


def power_normalize(z: Tensor) -> Tensor:
    """z (B, ...) scaled per image to mean power 1 per complex symbol: ||z_b||^2 = k_b = z_b.numel() / 2."""
    flat = z.flatten(1)
    k = flat.shape[1] / 2
    return z * torch.sqrt(k / flat.pow(2).sum(dim=1).clamp_min(1e-12)).view(-1, *([1] * (z.dim() - 1)))


def noise_variance(snr_db: float | Tensor) -> float | Tensor:
    """sigma^2 of complex AWGN at ``snr_db`` for unit signal power."""
    return 10.0 ** (-snr_db / 10.0)


def awgn(z: Tensor, snr_db: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """y = z + n, n ~ CN(0, sigma^2) per complex symbol (variance sigma^2 / 2 per real value).
    ``snr_db``: a float, or (B,) per image."""
    variance = noise_variance(snr_db)
    if isinstance(variance, Tensor):
        variance = variance.to(z.device).view(-1, *([1] * (z.dim() - 1)))
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + noise * torch.sqrt(torch.as_tensor(variance, dtype=z.dtype, device=z.device) / 2.0)


def _snr_map(x: Tensor, snr_db: float | Tensor) -> Tensor:
    snr = torch.as_tensor(snr_db, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1) / SNR_SCALE
    return snr.expand(x.shape[0], 1, x.shape[2], x.shape[3])


class Encoder(nn.Module):
    """f: (B, 3, H, W) in [0, 1] -> power-normalised (B, c_out, H/4, W/4)."""

    def __init__(self, c_out: int = 32, width: int = 64, snr_conditioning: bool = False):
        super().__init__()
        self.c_out, self.snr_conditioning = c_out, snr_conditioning
        layers, channels = [], 3
        for stride in (2, 2, 1, 1):
            layers += [nn.Conv2d(channels, width, 5, stride=stride, padding=2), nn.PReLU(width)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width + snr_conditioning, c_out, 5, padding=2)

    def forward(self, image: Tensor, snr_db: float | Tensor = 0.0) -> Tensor:
        x = self.body(image)  # (B, width, H/4, W/4)
        if self.snr_conditioning:
            x = torch.cat([x, _snr_map(x, snr_db)], dim=1)
        return power_normalize(self.out(x))


class Decoder(nn.Module):
    """d: received (B, c_out, H/4, W/4) -> image (B, 3, H, W) in [0, 1]."""

    def __init__(self, c_out: int = 32, width: int = 64, snr_conditioning: bool = False):
        super().__init__()
        self.snr_conditioning = snr_conditioning
        self.inp = nn.Sequential(nn.ConvTranspose2d(c_out + snr_conditioning, width, 5, padding=2), nn.PReLU(width))
        layers = []
        for stride in (1, 1, 2):
            layers += [nn.ConvTranspose2d(width, width, 5, stride=stride, padding=2, output_padding=stride - 1),
                       nn.PReLU(width)]
        layers += [nn.ConvTranspose2d(width, 3, 5, stride=2, padding=2, output_padding=1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, received: Tensor, snr_db: float | Tensor = 0.0) -> Tensor:
        if self.snr_conditioning:
            received = torch.cat([received, _snr_map(received, snr_db)], dim=1)
        return self.body(self.inp(received))


class DecodeForward(nn.Module):
    """hops = relays + 1 codec pairs; every node decodes and re-encodes (module docstring)."""

    def __init__(self, hops: int = 1, c_out: int = 32, width: int = 64, snr_conditioning: bool = False):
        super().__init__()
        if hops < 1:
            raise ValueError(f"a link has at least one hop, got {hops}")
        self.encoders = nn.ModuleList(Encoder(c_out, width, snr_conditioning) for _ in range(hops))
        self.decoders = nn.ModuleList(Decoder(c_out, width, snr_conditioning) for _ in range(hops))

    @property
    def hops(self) -> int:
        return len(self.encoders)

    def forward(self, image: Tensor, snr_db: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = image
        for encoder, decoder in zip(self.encoders, self.decoders):
            x = decoder(awgn(encoder(x, snr_db), snr_db, generator), snr_db)
        return x


def qf_bits_per_pixel(k: int, n_q: int, b: float, height: int, width: int) -> float:
    """I = 2 k N_Q b / (N_Q H W): the rate of quantize-and-forward, bits per pixel."""
    return 2.0 * k * n_q * b / (n_q * height * width)


class BlockQuantizer:
    """k-means codebook over blocks of ``n_q`` real channel values, ``n_q * b`` bits per block."""

    def __init__(self, n_q: int, b: float):
        bits = n_q * b
        if abs(bits - round(bits)) > 1e-9 or bits < 1:
            raise ValueError(f"N_Q * b must be a whole number of bits per block, got {n_q} * {b} = {bits}")
        self.n_q, self.b, self.bits = n_q, b, int(round(bits))
        self.codebook: Tensor | None = None  # (2^bits, n_q)

    def blocks(self, y: Tensor) -> Tensor:
        flat = y.flatten(1)
        if flat.shape[1] % self.n_q:
            raise ValueError(f"{flat.shape[1]} channel values do not cut into blocks of {self.n_q}")
        return flat.reshape(-1, self.n_q)

    def fit(self, channel_outputs: Tensor, iterations: int = 25, seed: int = 0) -> "BlockQuantizer":
        """Lloyd's k-means on the blocks of ``channel_outputs`` (val split), seeded."""
        data = self.blocks(channel_outputs.detach().float())
        size = 2 ** self.bits
        if len(data) < size:
            raise ValueError(f"a codebook of {size} codewords needs at least as many blocks, got {len(data)}")
        generator = torch.Generator().manual_seed(seed)
        codebook = data[torch.randperm(len(data), generator=generator)[:size]].clone()
        for _ in range(iterations):
            nearest = torch.cdist(data, codebook).argmin(dim=1)
            sums = torch.zeros_like(codebook).index_add_(0, nearest, data)
            counts = torch.bincount(nearest, minlength=size).unsqueeze(1)
            codebook = torch.where(counts > 0, sums / counts.clamp_min(1), codebook)
        self.codebook = codebook
        return self

    def encode(self, y: Tensor) -> Tensor:
        """(B, blocks) int64 codeword indices: what the relay sends, ``bits`` bits each."""
        if self.codebook is None:
            raise RuntimeError("fit the codebook first")
        return torch.cdist(self.blocks(y.float()), self.codebook).argmin(dim=1).reshape(y.shape[0], -1)

    def decode(self, indices: Tensor, shape: tuple[int, ...]) -> Tensor:
        return self.codebook[indices.reshape(-1)].reshape(shape)


def freeze(hasher: nn.Module) -> nn.Module:
    """The hasher in eval mode with no parameter taking gradients (gradients still flow through it)."""
    hasher.eval()
    for parameter in hasher.parameters():
        parameter.requires_grad_(False)
    return hasher


class AlignedLoss(nn.Module):
    """MSE(S, S_hat) + lambda * L_SdH(h(S), h(S_hat)) with a frozen hasher h (lambda 0: the baseline)."""

    def __init__(self, hasher: nn.Module | None, weight: float = 0.06):
        super().__init__()
        self.hasher = freeze(hasher) if hasher is not None else None
        self.weight = weight
        self.sdh = SelfDistilledHashingLoss()

    def train(self, mode: bool = True) -> "AlignedLoss":
        super().train(mode)
        if self.hasher is not None:
            self.hasher.eval()  # frozen: batch norm statistics and dropout stay as trained
        return self

    def forward(self, source: Tensor, received: Tensor) -> dict[str, Tensor]:
        mse = torch.mean((source - received) ** 2)
        if self.hasher is None or self.weight == 0:
            return {"loss": mse, "mse": mse}
        with torch.no_grad():
            target = self.hasher(source)
        semantic = self.sdh(target, self.hasher(received))
        return {"loss": mse + self.weight * semantic, "mse": mse, "sdh": semantic}


def psnr(source: Tensor, received: Tensor) -> Tensor:
    """(B,) PSNR in dB of images in [0, 1]."""
    mse = ((source - received) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10.0 * torch.log10(1.0 / mse)


__all__ = ["AlignedLoss", "BlockQuantizer", "DecodeForward", "Decoder", "Encoder", "awgn", "bandwidth_ratio",
           "freeze", "noise_variance", "power_normalize", "psnr", "qf_bits_per_pixel", "symbols"]
