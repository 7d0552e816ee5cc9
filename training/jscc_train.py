"""Training the DeepJSCC links of a config's grid (training/jscc.py), baseline and aligned.

The frozen hasher h is the project's image tower: the image student of a distilled run
(``RUN/students``, config ``hasher: student``, cheap on a CPU) or the run's teacher (``hasher:
teacher``). It sees received images as serving would: resized to its input size and standardised.

The code links (protocol ``code``) are training/code_link.py's, trained on the codes of the hasher
run's exported image student and written to ``OUT/code/``.

Data: the train split's images, decoded once at 256 px (UCM's own size; ``image_size`` when larger)
and cut into one random ``image_size`` crop per image and epoch (seeded: epoch e of the run with seed s draws from
``default_rng((s, e))``). Each link writes ``OUT/<link>.pt`` (its weights and what it was trained
for) and ``OUT/onnx/<link>/`` (its ONNX encoder and decoder with their spec, training/jscc_export.py);
``OUT/jscc.json`` lists them with their losses.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .jscc import AlignedLoss, DecodeForward
from .jscc_config import MODELS, JsccConfig
from .jscc_export import export_link

log = logging.getLogger(__name__)


class FrozenHasher(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> continuous codes (B, bits) of a frozen image network."""

    def __init__(self, network: nn.Module, size: int, mean, std):
        super().__init__()
        self.network, self.size = network, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.network((images - self.mean) / self.std)


class _Teacher(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.head = model.image_encoder, model.image_head

    def forward(self, x):
        return self.head(self.encoder(x))


def load_hasher(model_dir: str | Path, kind: str = "student", device: torch.device | None = None) -> FrozenHasher:
    """The frozen hasher of a ``terrahash train`` folder: its distilled image student or its teacher."""
    folder = Path(model_dir)
    if kind == "student":
        from .students import load_image_student

        students = folder / "students" if (folder / "students").is_dir() else folder
        student, _ = load_image_student(students)
        c = student.config
        hasher = FrozenHasher(student, c.image_size, c.mean, c.std)
    else:
        from .train import load_trained

        model, config, _ = load_trained(folder, device)
        hasher = FrozenHasher(_Teacher(model), config.image.image_size, config.image.mean, config.image.std)
    return hasher.to(device or torch.device("cpu")).eval()


def load_images(paths: list, side: int) -> np.ndarray:
    """uint8 (N, side, side, 3) of the images, resized (bicubic) once."""
    from .features import load_image

    return np.stack([load_image(p, side) for p in tqdm(paths, desc="images", unit="image", leave=False)])


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def crops(images: np.ndarray, size: int, seed: int, epoch: int) -> torch.Tensor:
    """One random ``size`` crop of each image, float (N, 3, size, size) in [0, 1], seeded by (seed, epoch)."""
    rng = np.random.default_rng((seed, epoch))
    n, side = len(images), images.shape[1]
    ys, xs = rng.integers(0, side - size + 1, n), rng.integers(0, side - size + 1, n)
    out = np.stack([images[i, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))])
    return as_tensor(out)


def link_names(config: JsccConfig) -> list[tuple[str, int, float | None, str]]:
    """(name, hops, SNR it is trained at or None for a conditioned link, model) of every link to train."""
    snrs = [None] if config.snr_conditioning else list(config.snr_eval_db)
    out = []
    for hops in sorted(config.hops):
        for snr in snrs:
            for model in sorted(config.models, key=MODELS.index):  # the baseline first: aligned may start from it
                name = f"df-h{hops}" + ("" if snr is None else f"-snr{snr:g}") + f"-{model}"
                out.append((name, hops, snr, model))
    return out


class Start(NamedTuple):
    """Where a link starts and how it trains from there."""
    source: str | None  # the model whose trained 1-hop pair it copies; None: random weights
    epochs: int
    lr: float


def link_start(config: JsccConfig, hops: int, model: str) -> Start:
    """A warm-started multi-hop link starts from its own model's pair for ``warm_start_epochs`` at
    ``warm_start_lr``, the aligned 1-hop pair from the baseline's for ``aligned_epochs`` (0: ``epochs``,
    ``lr``)."""
    if hops > 1 and config.warm_start:
        return Start(model, config.warm_start_epochs or config.epochs, config.warm_start_lr or config.lr)
    if hops == 1 and model == "aligned" and config.aligned_from_baseline:
        return Start("baseline", config.aligned_epochs or config.epochs, config.lr)
    return Start(None, config.epochs, config.lr)


def train_link(config: JsccConfig, hops: int, snr_db: float | None, model: str, images: np.ndarray,
               hasher: FrozenHasher | None, device: torch.device, seed: int, progress: bool = True,
               start_from: DecodeForward | None = None, epochs: int | None = None,
               lr: float | None = None) -> tuple[DecodeForward, dict]:
    """One link trained end to end through its hops; returns it (eval mode) and the mean of each loss term
    per epoch (``loss``, ``mse`` and, for the aligned model, ``sdh``).
    ``start_from``: a trained 1-hop link whose encoder/decoder pair every hop starts from.
    ``epochs``, ``lr``: default the config's."""
    torch.manual_seed(seed)
    link = DecodeForward(hops, config.c_out, config.width, config.snr_conditioning).to(device)
    if start_from is not None:
        for encoder, decoder in zip(link.encoders, link.decoders):
            encoder.load_state_dict(start_from.encoders[0].state_dict())
            decoder.load_state_dict(start_from.decoders[0].state_dict())
    loss_fn = AlignedLoss(hasher if model == "aligned" else None, config.alignment_weight).train()
    optimizer = torch.optim.Adam(link.parameters(), lr=config.lr if lr is None else lr)
    noise = torch.Generator(device=device).manual_seed(seed)
    snr_rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {}
    low, high = config.snr_train_db
    for epoch in tqdm(range(config.epochs if epochs is None else epochs), desc=f"{hops} hop(s) {model}",
                      unit="epoch", disable=not progress):
        data = crops(images, config.image_size, config.seed, epoch)
        order = torch.from_numpy(np.random.default_rng((config.seed, epoch, 1)).permutation(len(data)))
        totals, batches = {}, 0
        for start in range(0, len(data), config.batch_size):
            batch = data[order[start:start + config.batch_size]].to(device)
            if snr_db is None:
                snr = torch.from_numpy(snr_rng.uniform(low, high, len(batch)).astype(np.float32)).to(device)
            else:
                snr = float(snr_db)
            losses = loss_fn(batch, link(batch, snr, noise))
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for term, value in losses.items():
                totals[term] = totals.get(term, 0.0) + float(value.detach())
            batches += 1
        for term, total in totals.items():
            history.setdefault(term, []).append(total / max(batches, 1))
    return link.eval(), history


def train_grid(config: JsccConfig, hasher_dir: str | Path, data_dir: str | Path, out: str | Path,
               progress: bool = True) -> dict:
    """Every link of the config's grid: the pixel links (``OUT/<link>.pt``, ``OUT/onnx/<link>/``) and the
    code links (``OUT/code/``) its ``protocols`` ask for; writes ``OUT/jscc.json``."""
    from serving.ingest.dataset import load_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir)
    train = [r.path for r in dataset.split("train")]
    if not train:
        raise ValueError(f"{data_dir}: no train images to train the links on")
    # Links of a protocol not trained now are kept from an earlier run into the same folder, so that the
    # long pixel grid and the code links can be trained (and retrained) one at a time.
    previous = json.loads((out / "jscc.json").read_text()) if (out / "jscc.json").is_file() else {}
    manifest = {"config": asdict(config), "hasher": {"model_dir": str(hasher_dir), "kind": config.hasher},
                "dataset": dataset.name, "train_images": len(train), "links": []}
    if "pixel" in config.protocols:
        manifest["links"] = _train_pixel_links(config, hasher_dir, train, out, progress)
    elif previous.get("links"):  # kept with the config and hasher they were trained with, which eval reads
        kept = previous["config"]
        manifest.update(config={**kept, "protocols": ["pixel", *config.protocols],
                                "code_link": asdict(config.code_link)},
                        hasher=previous["hasher"], links=previous["links"])
    if "code" in config.protocols:
        from .code_link import train_code_links

        manifest["code"] = _code_summary(train_code_links(config.code_link, hasher_students(hasher_dir), data_dir,
                                                          out / "code"))
    elif (out / "code" / "code_link.json").is_file():
        manifest["code"] = _code_summary(json.loads((out / "code" / "code_link.json").read_text()))
    (out / "jscc.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def hasher_students(hasher_dir: str | Path) -> Path:
    """The exported students of a ``terrahash train`` folder (``RUN/students/onnx``), or the folder itself
    when it holds them."""
    folder = Path(hasher_dir)
    return folder / "students" / "onnx" if (folder / "students" / "onnx").is_dir() else folder


def _code_summary(manifest: dict) -> dict:
    """jscc.json's entry for the code links in ``OUT/code`` (their ``code_link.json`` without histories)."""
    return {"folder": "code", "code_space": manifest["code_space"], "students": manifest["students"],
            "student": manifest["config"]["student"], "config": manifest["config"],
            "codecs": [{k: v for k, v in codec.items() if k != "history"} for codec in manifest["codecs"]]}


def _train_pixel_links(config: JsccConfig, hasher_dir: str | Path, train: list, out: Path, progress: bool) -> list:
    """Every DeepJSCC link of the grid: ``OUT/<link>.pt`` and ``OUT/onnx/<link>/``; their manifest entries."""
    from .features import default_device

    device = default_device(config.device)
    images = load_images(train, max(256, config.image_size))
    hasher = load_hasher(hasher_dir, config.hasher, device) if "aligned" in config.models else None
    links, one_hop = [], {}
    for n, (name, hops, snr, model) in enumerate(link_names(config)):  # 1-hop links first
        start = time.perf_counter()
        source, epochs, lr = link_start(config, hops, model)
        start_from = one_hop[(snr, source)] if source else None
        link, history = train_link(config, hops, snr, model, images, hasher, device, config.seed + n, progress,
                                   start_from, epochs, lr)
        if hops == 1:
            one_hop[(snr, model)] = link
        record = {"state_dict": link.state_dict(), "hops": hops, "snr_db": snr, "model": model, "config": asdict(config)}
        torch.save(record, out / f"{name}.pt")
        export_link(link, record, out / "onnx" / name)  # the query path's encoder, decoder and spec
        links.append({"name": name, "hops": hops, "snr_db": snr, "model": model, "loss": history["loss"],
                      "terms": history,
                      "started_from": ("random" if source is None else "1-hop link" if source == model
                                       else f"{source} 1-hop link"), "lr": lr,
                      "seconds": round(time.perf_counter() - start, 1)})
        log.info("%s: loss %.4f after %d epochs (%.0f s)", name, history["loss"][-1], len(history["loss"]),
                 links[-1]["seconds"])
    return links


def load_link(path: str | Path, device: torch.device | None = None) -> tuple[DecodeForward, dict]:
    """A trained link and its record."""
    state = torch.load(path, map_location=device or "cpu", weights_only=False)
    c = state["config"]
    link = DecodeForward(state["hops"], c["c_out"], c["width"], c["snr_conditioning"])
    link.load_state_dict(state["state_dict"])
    return link.eval(), state
