"""Training batches: weak and strong views of images, a caption of each, and its label.

Three sources with one output layout, so the training step does not care which is used:
- ``CachedBatches``: frozen backbones; views are rows of precomputed feature arrays, and the
  strong view adds feature noise on top of a different dihedral view.
- ``ImageBatches``: fine-tuned backbones; images are decoded and augmented on the fly.
- ``CaptionBatches``: the text job of the split schedules, which needs no pixels at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .features import NUM_DIHEDRAL_VIEWS, dihedral, load_image


@dataclass
class Batch:
    weak: torch.Tensor | None  # (B, D) features or (B, 3, H, W) uint8 images; None for captions only
    strong: torch.Tensor | None  # same layout as weak
    captions: torch.Tensor  # (B,) row of each sampled caption in the dataset's caption list
    labels: torch.Tensor  # (B,) class ids
    images: torch.Tensor  # (B,) dataset row of each image
    # (B,) which wording of each caption: 0 the caption itself, v > 0 its v-th augmented variant
    # (training/captions.py); None when captions are not augmented
    caption_variants: torch.Tensor | None = None


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch over ``n`` rows in order. A last batch of a single row joins
    the one before it: batch norm and the in-batch losses need two samples."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def sample_captions(image_rows: np.ndarray, captions_of: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One caption row per image, uniformly among its captions."""
    return np.array([captions_of[i][rng.integers(len(captions_of[i]))] for i in image_rows], dtype=np.int64)


def caption_batch(image_rows: np.ndarray, captions_of: list[np.ndarray], rng: np.random.Generator,
                  variants: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's caption rows, and with ``variants`` > 0 a wording of each drawn uniformly from
    the caption and its ``variants`` augmented copies (nothing more is drawn without them)."""
    captions = torch.as_tensor(sample_captions(image_rows, captions_of, rng))
    if not variants:
        return captions, None
    return captions, torch.as_tensor(rng.integers(variants + 1, size=len(image_rows)))


class CachedBatches:
    """Batches over cached features (V, N, D); the weak and strong views differ when V > 1.

    ``noise_rows`` are the rows whose spread sets the noise scale: the whole train split (not a
    worker's shard, so every worker adds the same noise scale; never val or test).
    """

    def __init__(self, features: torch.Tensor, rows: np.ndarray, labels: np.ndarray,
                 captions_of: list[np.ndarray], batch_size: int, noise: float, seed: int, *, noise_rows: np.ndarray,
                 caption_variants: int = 0, weak_views: int | None = None):
        self.features = features  # (V, N, D)
        self.caption_variants = caption_variants
        self.weak_views = weak_views or features.shape[0]  # the first ones: views the weak side is drawn from
        self.rows = rows
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.captions_of = captions_of
        self.batch_size = batch_size
        # Noise relative to each feature dimension's spread, so one setting fits any backbone.
        spread = features[0, torch.as_tensor(noise_rows, device=features.device)].std(dim=0, keepdim=True)  # (1, D)
        self.noise_scale = noise * spread
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.rows), self.batch_size))

    def state_dict(self) -> dict:
        """Random state, so a resumed run draws the same batches as an uninterrupted one."""
        return {"numpy": self.rng.bit_generator.state, "torch": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        self.generator.set_state(state["torch"])

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator).to(like.device) * self.noise_scale

    def __iter__(self):
        order = self.rng.permutation(self.rows)
        views = self.features.shape[0]
        for start, stop in batch_bounds(len(order), self.batch_size):
            rows = order[start:stop]
            weak_view = self.rng.integers(self.weak_views, size=len(rows))
            # A different view for the strong side whenever there is one (sensor views included).
            strong_view = (weak_view + 1 + self.rng.integers(max(views - 1, 1), size=len(rows))) % views
            index = torch.as_tensor(rows)
            weak = self.features[torch.as_tensor(weak_view), index]  # (B, D)
            strong = self.features[torch.as_tensor(strong_view), index]  # (B, D)
            # Both views get independent noise (the weak one half as much): a frozen backbone
            # sees each image under few views, and noise is what keeps the heads from memorising them.
            weak = weak + 0.5 * self._noise(weak)
            strong = strong + self._noise(strong)
            captions, variants = caption_batch(rows, self.captions_of, self.rng, self.caption_variants)
            yield Batch(weak, strong, captions, self.labels[index], index, variants)


class AugmentedImages(Dataset):
    """(weak, strong) uint8 views of each image: weak = a random dihedral view; strong = that
    plus a random resized crop, colour jitter and blur (DHD's weak/strong augmentation pair)."""

    def __init__(self, paths: list, image_size: int):
        self.paths = paths
        self.image_size = image_size
        self.strong = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = torch.from_numpy(load_image(self.paths[i], self.image_size)).permute(2, 0, 1)  # (3, H, W)
        views = torch.randint(NUM_DIHEDRAL_VIEWS, (2,))
        weak = dihedral(image[None], int(views[0]))[0]
        strong = self.strong(dihedral(image[None], int(views[1]))[0])
        return weak, strong, i


class ImageBatches:
    """Batches of augmented images for fine-tuning, loaded by a DataLoader."""

    def __init__(self, paths: list, rows: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray],
                 image_size: int, batch_size: int, workers: int, seed: int, caption_variants: int = 0):
        self.rows = rows
        self.caption_variants = caption_variants
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.captions_of = captions_of
        self.rng = np.random.default_rng(seed)
        subset = [paths[i] for i in rows]
        self.loader = DataLoader(AugmentedImages(subset, image_size), batch_size=batch_size, shuffle=True,
                                 num_workers=workers, drop_last=len(subset) > batch_size,
                                 generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"numpy": self.rng.bit_generator.state, "torch": self.loader.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        self.loader.generator.set_state(state["torch"])

    def __iter__(self):
        for weak, strong, local in self.loader:
            rows = self.rows[local.numpy()]
            index = torch.as_tensor(rows)
            captions, variants = caption_batch(rows, self.captions_of, self.rng, self.caption_variants)
            yield Batch(weak, strong, captions, self.labels[index], index, variants)


class CaptionBatches:
    """Batches of image rows with one sampled caption each, and no image data: the text job's input."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray], batch_size: int, seed: int,
                 caption_variants: int = 0):
        self.rows = rows
        self.caption_variants = caption_variants
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.captions_of = captions_of
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.rows), self.batch_size))

    def state_dict(self) -> dict:
        return {"numpy": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]

    def __iter__(self):
        order = self.rng.permutation(self.rows)
        for start, stop in batch_bounds(len(order), self.batch_size):
            rows = order[start:stop]
            index = torch.as_tensor(rows)
            captions, variants = caption_batch(rows, self.captions_of, self.rng, self.caption_variants)
            yield Batch(None, None, captions, self.labels[index], index, variants)
