"""The training loop of the asymmetric hashing model, in one process (CPU or one GPU) or one Ray Train worker.

``fit`` trains with the DHD and cross-modal objective, evaluates on the val split every few
epochs, keeps the best checkpoint by val figures only (never the test split), and writes
``checkpoint.pt``, ``config.yaml`` and ``metrics.json`` to the output folder. Its ``role`` says
which towers it trains: both ("joint"), or one side of the split schedules ("image": the image
tower and the proxies; "text": the text tower against the image job's snapshots; see
``training/snapshots.py`` and ``training/jobs.py``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluation.retrieval import database_splits, evaluate_rows
from serving.ingest.dataset import CaptionDataset, load_dataset

from .batches import Batch, CachedBatches, CaptionBatches, ImageBatches
from .captions import caption_variants
from .config import ExperimentConfig, check, save_config, to_dict
from .features import FeatureCache, default_device, image_features, module_fingerprint, normalize, text_features
from .models import HashingModel, ImageEncoder, TextEncoder, build_heads
from .objective import HashingObjective
from .snapshots import Snapshot, wait_for
from .tracking import NoTracker, Tracker, check_tracking, track_run

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
OUTPUTS = (CHECKPOINT, "config.yaml")  # what a reported checkpoint carries of a training job's outputs
ROLES = ("joint", "image", "text")  # which towers a training job updates


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class DatasetIndex:
    """Flat arrays over a dataset: labels per image, captions and their owners."""

    dataset: CaptionDataset
    labels: np.ndarray  # (N,) class id per image
    captions: list[str]  # (M,) every caption, image by image
    caption_owner: np.ndarray  # (M,) image row of each caption
    captions_of: list[np.ndarray]  # per image, its caption rows

    @classmethod
    def build(cls, dataset: CaptionDataset) -> "DatasetIndex":
        labels = np.asarray(dataset.label_ids(list(dataset.records)), dtype=np.int64)
        captions, owner, captions_of = [], [], []
        for row, record in enumerate(dataset.records):
            captions_of.append(np.arange(len(captions), len(captions) + len(record.captions)))
            captions.extend(record.captions)
            owner.extend([row] * len(record.captions))
        return cls(dataset, labels, captions, np.asarray(owner, dtype=np.int64), captions_of)

    def rows(self, *splits: str) -> np.ndarray:
        return np.asarray([r.index for r in self.dataset.split(*splits)], dtype=np.int64)

    def database_rows(self, query_split: str) -> np.ndarray:
        """Rows the queries of ``query_split`` are ranked against (evaluation.retrieval.DATABASE_SPLITS)."""
        return self.rows(*database_splits(query_split))


def build_model(config: ExperimentConfig, num_classes: int) -> tuple[HashingModel, HashingObjective]:
    """Encoders with their configured weights, fresh heads, and the objective with its proxies."""
    image_encoder = ImageEncoder(config.image)
    text_encoder = TextEncoder(config.text)
    image_head, text_head = build_heads(config.image, config.text, config.train.bits,
                                        image_encoder.feature_dim, text_encoder.feature_dim,
                                        config.loss.instance_bits, config.loss.instance_trunk_grad,
                                        config.loss.instance_head_hidden)
    model = HashingModel(image_head, text_head, image_encoder, text_encoder)
    return model, HashingObjective(config.loss, num_classes, config.train.bits)


class Encoders:
    """Features of every image and caption of a dataset: from the cache for frozen towers, live otherwise."""

    def __init__(self, model: HashingModel, config: ExperimentConfig, index: DatasetIndex,
                 cache: FeatureCache, device: torch.device):
        self.model, self.config, self.index, self.device = model, config, index, device
        self.cache = cache
        self.paths = [r.path for r in index.dataset.records]

    def image_features(self, views: tuple[int, ...] = (0,), sensor_views: int = 0) -> np.ndarray:
        """(V + S, N, D) features of every image of the dataset: dihedral views, then sensor views."""
        image = self.config.image
        frozen = image.freeze_backbone
        return image_features(self.model.image_encoder, self.paths, image.image_size, image.mean, image.std,
                              views=views, device=self.device, cache=self.cache if frozen else None,
                              batch_size=128 if self.device.type == "cuda" else 64, sensor_views=sensor_views)

    def text_features(self) -> np.ndarray:
        """(M, D) features of every caption of the dataset."""
        frozen = self.config.text.freeze_encoder
        return text_features(self.model.text_encoder, self.index.captions, cache=self.cache if frozen else None)


@torch.no_grad()
def head_codes(head: torch.nn.Module, features: np.ndarray, device: torch.device, batch: int = 4096) -> np.ndarray:
    """Continuous codes (N, nbits) of features (N, D) through a hash head in eval mode."""
    was_training = head.training
    head.eval()
    out = [head(torch.as_tensor(features[i:i + batch], device=device)).float().cpu() for i in range(0, len(features), batch)]
    head.train(was_training)
    return torch.cat(out).numpy()


def text_codes(model: HashingModel, texts: list[str], device: torch.device, desc: str = "texts") -> np.ndarray:
    """Continuous codes (Q, nbits) of any texts through the model's text tower (encoder, then head)."""
    return head_codes(model.text_head, text_features(model.text_encoder, texts, desc=desc), device)


def image_codes(encoders: Encoders) -> np.ndarray:
    """Continuous codes (N, nbits) of every image: the mean of its codes under the configured dihedral views."""
    views = encoders.image_features(encoders.config.image.encode_views)  # (V, N, D)
    return np.mean([head_codes(encoders.model.image_head, view, encoders.device) for view in views], axis=0)


def caption_codes(encoders: Encoders) -> np.ndarray:
    """Continuous codes (M, nbits) of every caption ((0, nbits) for an image-only dataset)."""
    if not encoders.index.captions:
        return np.zeros((0, encoders.config.train.bits), dtype=np.float32)
    return head_codes(encoders.model.text_head, encoders.text_features(), encoders.device)


def dataset_codes(encoders: Encoders) -> tuple[np.ndarray, np.ndarray]:
    """Continuous codes of every image (N, nbits) and every caption (M, nbits)."""
    return image_codes(encoders), caption_codes(encoders)


# Val figures a checkpoint can be chosen by, by name (binary codes).
SELECTION = {
    "class": lambda b: (b["image_to_image"]["map_all"] + b["text_to_image"]["map_all"]) / 2,
    "class_and_instance": lambda b: (b["image_to_image"]["map_all"] + b["text_to_image"]["map_all"] + b["mr"] / 100) / 3,
}


# The split schedules' jobs are chosen by what they train: the image job by image-to-image mAP
# (the text tower is not trained yet); the text job by the text figures against the image codes.
ROLE_SELECTION = {
    "image": {"class": lambda b: b["image_to_image"]["map_all"],
              "class_and_instance": lambda b: b["image_to_image"]["map_all"]},
    "text": {"class": lambda b: b["text_to_image"]["map_all"],
             "class_and_instance": lambda b: (b["text_to_image"]["map_all"] + b["mr"] / 100) / 2},
}


def selection_rule(selection: str, role: str = "joint"):
    """The named selection rule for a job's role; unknown names fail before any training starts."""
    if role not in ROLES:
        raise ValueError(f"unknown training role {role!r}; known: {list(ROLES)}")
    if selection not in SELECTION:
        raise KeyError(f"config.train.selection: unknown {selection!r}; known: {sorted(SELECTION)}")
    return ROLE_SELECTION[role][selection] if role in ROLE_SELECTION else SELECTION[selection]


def selection_score(figures: dict, selection: str, role: str = "joint") -> float:
    return selection_rule(selection, role)(figures["binary"])


def _lr_lambda(config: ExperimentConfig, steps_per_epoch: int, role: str = "joint"):
    """Linear warm-up, then cosine decay to 0 at the last step. The async text job restarts the
    cosine for its final epochs: it must still be able to move onto the image job's final codes."""
    t = config.train
    total = max(t.epochs * steps_per_epoch, 1)
    warmup = t.warmup_epochs * steps_per_epoch
    restart = (t.epochs - min(t.text_final_epochs, t.epochs)) * steps_per_epoch
    restarts = role == "text" and t.schedule == "async" and restart > warmup

    def cosine(step: int, start: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * (step - start) / max(total - start, 1)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if restarts and step >= restart:
            return cosine(step, restart)
        return cosine(step, warmup)
    return factor


def _optimizer(model: HashingModel, objective: HashingObjective, config: ExperimentConfig,
               role: str = "joint") -> torch.optim.Optimizer:
    """AdamW over what the role trains: heads and proxies at ``lr``, fine-tuned encoders at ``backbone_lr``."""
    t = config.train
    image, text = role in ("joint", "image"), role in ("joint", "text")
    heads = [*model.image_head.parameters(), *objective.parameters()] if image else []
    heads += list(model.text_head.parameters()) if text else []
    groups = [{"params": heads, "lr": t.lr}]
    if image and not config.image.freeze_backbone:
        groups.append({"params": list(model.image_encoder.parameters()), "lr": t.backbone_lr})
    if text and not config.text.freeze_encoder:
        groups.append({"params": list(model.text_encoder.parameters()), "lr": t.backbone_lr})
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


class Trainer:
    """Holds the model, the objective and the feature sources for one training run."""

    def __init__(self, config: ExperimentConfig, index: DatasetIndex, device: torch.device, cache: FeatureCache,
                 role: str = "joint"):
        self.config, self.index, self.device, self.role = config, index, device, role
        self.snapshot: Snapshot | None = None  # the text role's image codes and proxies
        self.model, self.objective = build_model(config, len(index.dataset.classes))
        self.model.to(device)
        self.objective.to(device)
        for tower, frozen in ((self.model.image_encoder, config.image.freeze_backbone),
                              (self.model.text_encoder, config.text.freeze_encoder)):
            tower.requires_grad_(not frozen)
        self.encoders = Encoders(self.model, config, index, cache, device)
        # Caption features of the (frozen) text encoder: relatedness between captions, and the
        # text tower's input when it is frozen.
        self.caption_features = torch.as_tensor(self.encoders.text_features(), device=device)
        self._prepare_caption_variants(cache)

    def _prepare_caption_variants(self, cache: FeatureCache) -> None:
        """The augmented wordings of the train captions (others keep their own), and with a frozen
        text encoder their features: ``variant_texts[v][m]``, ``variant_features`` (V + 1, M, D)."""
        aug, index = self.config.train.captions, self.index
        self.variant_texts: list[list[str]] = [index.captions]
        self.variant_features = self.caption_features[None]  # (1, M, D)
        train_captions = np.concatenate([index.captions_of[r] for r in index.rows("train")] or [np.zeros(0, int)])
        if aug.variants and len(train_captions):
            for texts in caption_variants(index.captions, train_captions, aug.variants, self.config.train.seed,
                                          **aug.rates):
                wording = list(index.captions)
                for row, text in zip(train_captions.tolist(), texts):
                    wording[row] = text
                self.variant_texts.append(wording)
            if self.config.text.freeze_encoder:
                self.variant_features = torch.stack([self.caption_features] + [
                    torch.as_tensor(text_features(self.model.text_encoder, wording, cache=cache,
                                                  desc=f"caption variant {v}"), device=self.device)
                    for v, wording in enumerate(self.variant_texts[1:], 1)])
        self.text_noise = None
        if aug.feature_noise and len(train_captions):
            spread = self.caption_features[torch.as_tensor(train_captions, device=self.device)].std(dim=0)  # (D,)
            self.text_noise = aug.feature_noise * spread

    def batches(self, rows: np.ndarray, seed: int):
        """The training batches over ``rows`` (this worker's shard), drawn with ``seed``."""
        t = self.config.train
        variants = len(self.variant_texts) - 1
        if self.role == "text":
            return CaptionBatches(rows, self.index.labels, self.index.captions_of, t.batch_size, seed, variants)
        if self.config.image.freeze_backbone:
            features = torch.as_tensor(self.encoders.image_features(t.views, t.sensor_views), device=self.device)
            return CachedBatches(features, rows, self.index.labels, self.index.captions_of, t.batch_size,
                                 t.feature_noise, seed, noise_rows=self.index.rows("train"), caption_variants=variants,
                                 weak_views=len(t.views))
        paths = [r.path for r in self.index.dataset.records]
        return ImageBatches(paths, rows, self.index.labels, self.index.captions_of, self.config.image.image_size,
                            t.batch_size, t.loader_workers, seed, variants)

    def _image_codes(self, views: torch.Tensor) -> torch.Tensor:
        if self.config.image.freeze_backbone:
            return self.model.image_head(views)
        image = self.config.image
        x = normalize(views.to(self.device).permute(0, 2, 3, 1), image.mean, image.std)
        return self.model.image_head(self.model.image_encoder(x.contiguous(memory_format=torch.channels_last)))

    def _text_codes(self, caption_rows: torch.Tensor, variants: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.text.freeze_encoder:
            features = self._worded_features(caption_rows, variants)
            if self.text_noise is not None and self.model.text_head.training:
                features = features + torch.randn_like(features) * self.text_noise
            return self.model.text_head(features)
        variants = torch.zeros_like(caption_rows) if variants is None else variants
        texts = [self.variant_texts[v][i] for v, i in zip(variants.tolist(), caption_rows.tolist())]
        return self.model.text_head(self.model.text_encoder.encode(texts))

    def _worded_features(self, caption_rows: torch.Tensor, variants: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen text encoder's features (B, D) of captions as a batch words them (the drawn
        variant; None: as written)."""
        rows = caption_rows.to(self.device)
        variants = torch.zeros_like(rows) if variants is None else variants.to(self.device)
        return self.variant_features[variants, rows]

    def _structure_features(self, batch: Batch) -> torch.Tensor | None:
        """What the text_structure term compares the text codes with; None when it is off or the
        text encoder is fine-tuned (no cached features)."""
        if not (self.config.loss.weights.get("text_structure", 0) and self.config.text.freeze_encoder):
            return None
        return self._worded_features(batch.captions, batch.caption_variants)

    def use_snapshot(self, snapshot: Snapshot) -> None:
        """The image codes and proxies the text role trains against from now on."""
        self.snapshot = snapshot
        self._snapshot_codes = torch.as_tensor(snapshot.codes, device=self.device)  # (N, nbits)
        self._snapshot_proxies = torch.as_tensor(snapshot.proxies, device=self.device)  # (C, nbits)

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms of one batch for this role (nothing is updated here)."""
        labels = batch.labels.to(self.device)
        caption_features = self.caption_features[batch.captions.to(self.device)]
        if self.role == "text":
            h_image = self._snapshot_codes[batch.images.to(self.device)]  # (B, nbits), constants
            return self.objective(h_image, None, self._text_codes(batch.captions, batch.caption_variants), labels,
                                  caption_features, target_proxies=self._snapshot_proxies,
                                  text_features=self._structure_features(batch))
        h_weak = self._image_codes(batch.weak)
        h_strong = self._image_codes(batch.strong)
        h_text = self._text_codes(batch.captions, batch.caption_variants) if self.role == "joint" else None
        features = batch.weak.to(self.device) if self.config.image.freeze_backbone else None  # (B, D)
        return self.objective(h_weak, h_strong, h_text, labels, caption_features, image_features=features,
                              text_features=self._structure_features(batch) if h_text is not None else None)

    def train_mode(self, on: bool) -> None:
        self.model.train(on)
        # Frozen towers stay in eval mode: their batch-norm statistics must not drift.
        if self.config.image.freeze_backbone:
            self.model.image_encoder.eval()
        if self.config.text.freeze_encoder:
            self.model.text_encoder.eval()

    def evaluate(self, query_split: str, db_rows: np.ndarray) -> dict:
        """Val figures of what this role trains (the image role: image-to-image only)."""
        self.train_mode(False)
        images = self.snapshot.codes if self.role == "text" else image_codes(self.encoders)
        figures = evaluate_rows(images, caption_codes(self.encoders), self.index.labels, self.index.captions_of,
                                self.index.rows(query_split), db_rows)
        if self.role == "image":  # the text head is untrained here: its figures mean nothing
            return {kind: {"image_to_image": f["image_to_image"]} for kind, f in figures.items()}
        return figures

    def publish_snapshot(self, version: int, step: int, epoch: int, final: bool, shared_rows: np.ndarray) -> Snapshot:
        """The image role's current codes of ``shared_rows`` (others NaN) and its proxies."""
        self.train_mode(False)
        codes = np.full((len(self.index.labels), self.config.train.bits), np.nan, dtype=np.float32)
        codes[shared_rows] = image_codes(self.encoders)[shared_rows]
        proxies = self.objective.proxy.proxies.detach().float().cpu().numpy()
        self.train_mode(True)
        return Snapshot(version, step, epoch, final, codes, proxies)


@dataclass
class LoopContext:
    """Where the epoch loop runs: one plain process by default. ``training/distributed.py``
    subclasses it for a Ray Train worker; these few methods are the loop's only Ray touch-points."""

    rank: int = 0
    world_size: int = 1
    snapshots: object = None  # the split schedules' SnapshotStore (or RemoteSnapshots); None for "joint"

    @property
    def is_chief(self) -> bool:
        """The one process that evaluates, writes files and logs."""
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This worker's share of the training rows: every world_size-th, from its rank, of the rows
        padded by wrapping around to a multiple of world_size (as torch's DistributedSampler does).
        Every worker then has as many rows, hence as many steps an epoch: DDP's all-reduce waits
        for every worker at every step, so one extra step on one worker would hang them all."""
        if self.world_size == 1 or len(rows) == 0:
            return rows
        padded = np.resize(rows, -(-len(rows) // self.world_size) * self.world_size)  # repeats rows cyclically
        return padded[self.rank::self.world_size]

    def seed(self, base: int) -> int:
        """This worker's seed for what it draws (batches, views, noise, captions, dropout): workers
        must not all draw the same. ``base + rank``, so rank 0 draws what one process would."""
        return base + self.rank

    def prepare(self, step: torch.nn.Module) -> torch.nn.Module:
        """Wrap the training step for data parallelism (identity in one process)."""
        return step

    def report(self, epoch: int, record: dict, out: Path, state: Callable[[], dict],
               outputs: tuple[str, ...] = OUTPUTS, name: str = "epoch") -> None:
        """Called by every worker after each evaluated epoch, once the chief has written ``out``.
        ``state()`` gives what resuming needs: {"shared": ... (chief only), "own": this worker's};
        ``outputs`` are the chief's files (or folders) in ``out`` that go with it, and ``name``
        starts the name of the checkpoint (``<name>-<epoch>``)."""

    def resume(self) -> tuple[dict, dict, Path] | None:
        """(shared state, this worker's state, folder with the reported outputs) to resume from, or None."""
        return None


def copy_outputs(names: tuple[str, ...], source: Path, target: Path) -> None:
    """Copy the files or folders ``names`` that exist in ``source`` to ``target``."""
    for name in names:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        elif (source / name).exists():
            shutil.copyfile(source / name, target / name)


class TrainStep(torch.nn.Module):
    """One batch through both towers and the objective: the module data parallelism wraps, so that
    gradients of every trainable part (heads, proxies, fine-tuned encoders) are averaged."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model, self.objective = trainer.model, trainer.objective
        self.run = trainer.step  # uses the same modules registered above

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.run(batch)


@contextlib.contextmanager
def averaged_heads(heads: torch.nn.Module, ema: torch.optim.swa_utils.AveragedModel | None):
    """Temporarily load the moving-average weights into ``heads`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    current = {k: v.clone() for k, v in heads.state_dict().items()}
    heads.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        heads.load_state_dict(current)


def fit(config: ExperimentConfig, data_dir: str | Path, out_dir: str | Path,
        cache_dir: str | Path | None = None, progress: bool = True, skip_bad_images: bool = False,
        context: LoopContext | None = None, role: str = "joint", parent_run_id: str | None = None) -> dict:
    """Train, select on val, write the checkpoint, config and metrics; return the metrics dict.

    With ``skip_bad_images`` unreadable images are left out and listed in the metrics file;
    otherwise the first one stops the run before training starts. With ``config.tracking.enabled``
    the run is logged to MLflow (``tracking.track_run``; a child of ``parent_run_id`` when given)
    and ``metrics["mlflow_run_id"]`` names it. ``role`` is "joint", "image" or "text" (see the
    module docstring); the split roles need ``context.snapshots``.
    """
    started = time.time()
    check(config)  # a config changed in place is checked as a file would be
    t = config.train
    selection_rule(t.selection, role)
    if role != "joint" and (context is None or context.snapshots is None):
        raise ValueError(f"the {role!r} role exchanges snapshots with the other job: give a context with snapshots")
    if config.tracking.enabled:
        check_tracking(config.tracking)  # a missing package stops the run before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(t.seed)
    device = default_device(t.device)
    index = DatasetIndex.build(load_dataset(data_dir, skip_bad_images=skip_bad_images))
    index.dataset.require_captions(("train", "val"), "training")  # the text terms and val selection use them
    cache = FeatureCache(Path(cache_dir) if cache_dir else None)
    context = context or LoopContext()
    images_processed = len(index.rows("train")) * t.epochs
    with track_run(config, out, index.dataset, images_processed, rank=context.rank, parent_run_id=parent_run_id,
                   run_name=role if parent_run_id else None) as tracker:
        best, history, start = train_and_select(config, index, device, cache, out, progress and context.is_chief,
                                                tracker, context, role)
        if not context.is_chief:  # only the chief evaluates and writes; the others trained their shard
            return {"rank": context.rank, "world_size": context.world_size, "history": history}
        metrics = {"config": config.name, "bits": t.bits, "role": role, "dataset": index.dataset.name,
                   "dataset_fingerprint": index.dataset.fingerprint(), "skipped_images": list(index.dataset.skipped),
                   "best_epoch": best["epoch"],
                   "selection_score": best["score"], "val": best["val"], "history": history,
                   "train_seconds": round(time.time() - started, 1), "device": str(device),
                   "world_size": context.world_size, "resumed_from_epoch": start, "rows_per_worker": len(context.shard(index.rows("train"))),
                   "mlflow_run_id": tracker.run_id}
        if context.is_chief:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("best val epoch %d (score %.4f); wrote %s", best["epoch"], best["score"], out)
    return metrics


def train_and_select(config: ExperimentConfig, index: DatasetIndex, device: torch.device, cache: FeatureCache,
                     out: Path, progress: bool, tracker: Tracker | NoTracker,
                     context: LoopContext, role: str = "joint") -> tuple[dict, list[dict], int]:
    """The epoch loop: train, evaluate on val every few epochs, save the best checkpoint so far.

    Returns the best evaluation (epoch, score, val figures), the per-epoch history, and the epoch
    it resumed after (0 for a fresh start). The image role publishes snapshots (every
    ``snapshot_every`` steps in the async schedule, and its selected checkpoint's at the end); the
    text role picks up the newest at each epoch, and only epochs trained against the final one can
    be selected.
    """
    t = config.train
    trainer = Trainer(config, index, device, cache, role)
    heads = torch.nn.ModuleDict({"image": trainer.model.image_head, "text": trainer.model.text_head})
    ema = (torch.optim.swa_utils.AveragedModel(heads, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay),
                                               use_buffers=True) if t.ema_decay else None)
    train_rows = index.rows("train")
    val_db = index.database_rows("val")  # train only: no test data is ever seen
    batches = trainer.batches(context.shard(train_rows), context.seed(t.seed))
    if context.rank:
        # The model was built from the common seed, so every worker starts from the same weights
        # (and caches the same features); from here on each one draws its own dropout and
        # augmentations. Rank 0 keeps the one-process stream.
        seed_everything(context.seed(t.seed))
    step = context.prepare(TrainStep(trainer))
    optimizer = _optimizer(trainer.model, trainer.objective, config, role)
    publishes = role == "image" and context.is_chief
    shared_rows = index.rows("train", "val")  # what the text job may see: never the test split
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, len(batches), role))
    if context.is_chief:
        save_config(config, out / "config.yaml")

    def state() -> dict:
        own = {"batches": batches.state_dict(), "torch": torch.get_rng_state()}
        if not context.is_chief:
            return {"own": own}
        shared = {"epoch": epoch + 1, "best": best, "history": history + [record],
                  "trainable": trainable_state(trainer.model, trainer.objective, config),
                  "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None}
        return {"shared": shared, "own": own}

    history, best, start = [], None, 0
    resumed = context.resume()
    if resumed:
        shared, own, folder = resumed
        load_trainable_state(trainer.model, trainer.objective, shared["trainable"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        if ema is not None:
            ema.load_state_dict(shared["ema"])
        if own is not None:
            batches.load_state_dict(own["batches"])
            torch.set_rng_state(own["torch"])
        start, best, history = shared["epoch"], shared["best"], shared["history"]
        if context.is_chief:
            copy_outputs((CHECKPOINT,), folder, out)
        log.info("rank %d resumed after epoch %d", context.rank, start)
    bar = tqdm(range(start, t.epochs), initial=start, total=t.epochs, desc=f"train {config.name} {t.bits} bits",
               unit="epoch", disable=not progress)
    for epoch in bar:
        if role == "text":  # the newest snapshot; the last epochs wait for the final one
            snapshot = wait_for(context.snapshots, final=epoch >= t.epochs - t.text_final_epochs)
            if trainer.snapshot is None or snapshot.version != trainer.snapshot.version:
                trainer.use_snapshot(snapshot)
        trainer.train_mode(True)
        sums: dict[str, float] = {}
        epoch_started, samples = time.perf_counter(), 0
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress):
            terms = step(batch)
            loss = trainer.objective.total(terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(heads)
            steps = scheduler.last_epoch  # optimizer steps so far, resumed runs included
            if publishes and t.schedule == "async" and steps % t.snapshot_every == 0:
                with averaged_heads(heads, ema):
                    context.snapshots.publish(trainer.publish_snapshot(steps, steps, epoch, False, shared_rows))
            samples += len(batch.labels)
            for name, value in {"total": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        # Samples this worker trained on and the seconds it took (evaluation excluded): throughput.
        record = {"epoch": epoch + 1, "loss": {k: v / len(batches) for k, v in sums.items()},
                  "samples": samples, "seconds": round(time.perf_counter() - epoch_started, 4)}
        if role == "text":  # which image codes this epoch learnt against
            record["snapshot"] = {"version": trainer.snapshot.version, "final": trainer.snapshot.final}
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            if context.is_chief:
                with averaged_heads(heads, ema):  # evaluate and save what will be used: the averaged heads
                    figures = trainer.evaluate("val", val_db)
                    record["val"] = figures
                    score = selection_score(figures, t.selection, role)
                    # The text head ships with the image job's final codes: only epochs trained
                    # against them are candidates.
                    eligible = role != "text" or trainer.snapshot.final
                    if eligible and (best is None or score > best["score"]):
                        best = {"epoch": epoch + 1, "score": score, "val": figures}
                        save_checkpoint(out / CHECKPOINT, trainer, index, best)
                bar.set_postfix(loss=f"{record['loss']['total']:.3f}", val=f"{score:.4f}", best=best and best["epoch"])
            context.report(epoch + 1, record, out, state)
        tracker.log_epoch(record["epoch"], record["loss"], record.get("val"))
        history.append(record)
    if publishes:  # the selected checkpoint is what the text job must map into
        load_trainable_state(trainer.model, trainer.objective,
                             torch.load(out / CHECKPOINT, map_location=device, weights_only=True))
        steps = scheduler.last_epoch
        context.snapshots.publish(trainer.publish_snapshot(steps + 1, steps, best["epoch"], True, shared_rows))
    return best, history, start


def trainable_state(model: HashingModel, objective: HashingObjective, config: ExperimentConfig) -> dict:
    """Weights that cannot be rebuilt from the config: heads, proxies, fine-tuned encoders, and
    frozen encoders without pretrained weights (a random init)."""
    keep_image = not config.image.freeze_backbone or config.image.weights == "none"
    return {"image_head": model.image_head.state_dict(), "text_head": model.text_head.state_dict(),
            "objective": objective.state_dict(),
            "image_encoder": model.image_encoder.state_dict() if keep_image else None,
            "text_encoder": None if config.text.freeze_encoder else model.text_encoder.state_dict()}


def load_trainable_state(model: HashingModel, objective: HashingObjective | None, state: dict) -> None:
    """Load what ``trainable_state`` saved (the objective only when given)."""
    model.image_head.load_state_dict(state["image_head"])
    model.text_head.load_state_dict(state["text_head"])
    if objective is not None:
        objective.load_state_dict(state["objective"])
    for name, tower in (("image_encoder", model.image_encoder), ("text_encoder", model.text_encoder)):
        if state[name] is not None:
            tower.load_state_dict(state[name])


def encoder_fingerprints(model: HashingModel) -> dict[str, str]:
    """Fingerprints of both encoders' weights, as stored in a checkpoint and checked on load."""
    return {"image_encoder": module_fingerprint(model.image_encoder),
            "text_encoder": module_fingerprint(model.text_encoder.model)}


def save_checkpoint(path: Path, trainer: Trainer, index: DatasetIndex, best: dict) -> None:
    """The trainable weights, and what rebuilding the rest needs: the config, the classes, and
    fingerprints that prove a rebuilt frozen encoder is the one the model was trained with."""
    model, config = trainer.model, trainer.config
    state = {
        **trainable_state(model, trainer.objective, config),
        "config": to_dict(config),
        "classes": list(index.dataset.classes),
        "fingerprints": encoder_fingerprints(model),
        "epoch": best["epoch"],
        "val": best["val"],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_trained(model_dir: str | Path, device: torch.device | None = None) -> tuple[HashingModel, ExperimentConfig, dict]:
    """Rebuild a trained model from ``model_dir/checkpoint.pt``; returns (model, config, checkpoint)."""
    from .config import config_from_dict

    path = Path(model_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (train one with `terrahash train`)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_dict(state["config"])
    model, _ = build_model(config, len(state["classes"]))
    load_trainable_state(model, None, state)
    for name, value in encoder_fingerprints(model).items():
        if value != state["fingerprints"][name]:
            raise ValueError(f"{path}: the {name.replace('_', ' ')} weights differ from those the model was "
                             f"trained with (fingerprint {value} != {state['fingerprints'][name]}); "
                             "reinstall the same weight package or retrain")
    model.to(device or torch.device("cpu")).eval()
    return model, config, state
