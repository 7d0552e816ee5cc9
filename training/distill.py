"""Distillation of a trained teacher into compact students, from unlabelled images and captions.

The teacher's continuous codes of every image and caption are the targets (``teacher_targets``).
Each student learns to reproduce them: cosine agreement, quantization, and the teacher's in-batch
similarity structure. ``distill`` trains on the train split, selects the checkpoint by agreement
with the teacher on the val split (never test) and writes one checkpoint per student.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from serving.ingest.dataset import load_dataset

from .batches import batch_bounds
from .config import check
from .features import FeatureCache, default_device, dihedral, image_features, load_image, normalize
from .losses import BCEQuantizationLoss, total_loss
from .models import HashingModel
from .students import (DISTILL_CONFIG, IMAGE_CHECKPOINT, TEXT_CHECKPOINT, TOKENIZER_DIR, DistillConfig,
                       DistillLossConfig, ImageStudent, build_text_student, save_distill_config, save_image_student,
                       save_text_student, student_source)
from .train import DatasetIndex, Encoders, LoopContext, copy_outputs, dataset_codes, load_trained, seed_everything

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Loss terms


class CosineAgreementLoss(nn.Module):
    """Cosine agreement of student codes with the teacher's (the L_SdH form of DHD, across models):

        L_cos = mean_b ( 1 - cos(h_S_b, sg(h_T_b)) )

    Shapes: h_student, h_teacher (B, bits). Returns a scalar in [0, 2]. The teacher is detached.
    """

    def forward(self, h_student: Tensor, h_teacher: Tensor) -> Tensor:
        _check_same(h_student, h_teacher)
        return (1.0 - F.cosine_similarity(h_student, h_teacher.detach(), dim=1)).mean()


class SimilarityStructureLoss(nn.Module):
    """Keeps the teacher's similarity structure within a batch (relational distillation):

        S_S = norm(h_S) norm(h_S)^T,  S_T = norm(h_T) norm(h_T)^T       (B, B) cosine matrices
        L_sim = mean_{i,j} ( S_S_ij - S_T_ij )^2

    Codes may each drift a little from the teacher's; what retrieval needs is that the ranking of
    neighbours survives. Shapes: h_student, h_teacher (B, bits). Returns a scalar in [0, 4].
    """

    def forward(self, h_student: Tensor, h_teacher: Tensor) -> Tensor:
        _check_same(h_student, h_teacher)
        s = F.normalize(h_student, dim=1)
        t = F.normalize(h_teacher.detach(), dim=1)
        return (s @ s.T - t @ t.T).pow(2).mean()


def _check_same(h_student: Tensor, h_teacher: Tensor) -> None:
    if h_student.dim() != 2 or h_student.shape != h_teacher.shape:
        raise ValueError(f"student and teacher codes must both be (B, bits), got {tuple(h_student.shape)} "
                         f"and {tuple(h_teacher.shape)}")


class DistillObjective(nn.Module):
    """The named distillation terms (a dict, so each one is logged) and their weighted sum."""

    def __init__(self, config: DistillLossConfig):
        super().__init__()
        self.weights = dict(config.weights)
        self.cosine = CosineAgreementLoss()
        self.quantization = BCEQuantizationLoss(config.quantization_sigma)
        self.similarity = SimilarityStructureLoss()

    def forward(self, h_student: Tensor, h_teacher: Tensor) -> dict[str, Tensor]:
        terms = {"cosine": lambda: self.cosine(h_student, h_teacher),
                 "quantization": lambda: self.quantization(h_student),
                 "similarity": lambda: self.similarity(h_student, h_teacher)}
        return {name: term() for name, term in terms.items() if self.weights.get(name, 0.0) != 0}

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        return total_loss(terms, self.weights)


def bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of bits on which two sets of continuous codes (N, bits) have the same sign (0 -> +1)."""
    if a.shape != b.shape:
        raise ValueError(f"codes differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean((a >= 0) == (b >= 0)))


# ----------------------------------------------------------------------------------------------
# Teacher targets


@dataclass
class TeacherTargets:
    """The teacher and its continuous codes of every image (N, bits) and caption (M, bits)."""

    model: HashingModel
    config: object  # the teacher's ExperimentConfig
    index: DatasetIndex
    images: np.ndarray  # (N, bits): mean over the teacher's encode_views, as it retrieves with
    captions: np.ndarray  # (M, bits)

    @property
    def bits(self) -> int:
        return self.images.shape[1]


def teacher_targets(teacher_dir: str | Path, data_dir: str | Path, cache_dir: str | Path | None = None,
                    device: torch.device | None = None) -> TeacherTargets:
    """Load the teacher run in ``teacher_dir`` and compute its codes of every image and caption."""
    device = device or torch.device("cpu")
    model, config, state = load_trained(teacher_dir, device)
    index = DatasetIndex.build(load_dataset(data_dir))
    index.dataset.require_captions(("train", "val", "test"), "distillation")  # the text student learns them
    if list(index.dataset.classes) != state["classes"]:
        raise ValueError(f"{data_dir}: classes differ from those teacher {teacher_dir} was trained with; "
                         "distil on the teacher's dataset")
    encoders = Encoders(model, config, index, FeatureCache(cache_dir), device)
    images, captions = dataset_codes(encoders)  # (N, bits), (M, bits)
    return TeacherTargets(model, config, index, images.astype(np.float32), captions.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# What each student trains on: one small class per student, one generic loop.


class _ImageTask:
    """Image student. Frozen backbone: the head trains on cached features of random dihedral views.
    Trained backbone: the whole student trains on decoded images under random dihedral views."""

    name, checkpoint = "image", IMAGE_CHECKPOINT

    def __init__(self, config: DistillConfig, targets: TeacherTargets, cache: FeatureCache, device: torch.device):
        self.c, self.device = config.image, device
        self.student = ImageStudent(self.c, targets.bits).to(device)
        self.targets = torch.as_tensor(targets.images, device=device)  # (N, bits)
        self.paths = [r.path for r in targets.index.dataset.records]
        frozen = self.c.freeze_backbone
        self.student.encoder.requires_grad_(not frozen)
        self.module = self.student.head if frozen else self.student
        self.features = None
        if frozen:  # (V, N, D), each view computed once and cached by the backbone's fingerprint
            feats = image_features(self.student.encoder, self.paths, self.c.image_size, self.c.mean, self.c.std,
                                   views=self.c.views, device=device, cache=cache, desc="student image features")
            self.features = torch.as_tensor(feats, device=device)

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.student.head.parameters()), "lr": self.c.lr}]
        if not self.c.freeze_backbone:
            groups.append({"params": list(self.student.encoder.parameters()), "lr": self.c.backbone_lr})
        return groups

    def train_mode(self, on: bool) -> None:
        self.student.train(on)
        if self.c.freeze_backbone:
            self.student.encoder.eval()  # frozen batch-norm statistics must not drift

    def batch_order(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        return order  # images: batches as drawn

    def train_inputs(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[Tensor]:
        picks = rng.integers(len(self.c.views), size=len(rows))  # one random view per image
        if self.features is not None:
            return (self.features[torch.as_tensor(picks), torch.as_tensor(rows)],)  # (B, D)
        x = self._pixels(rows)  # (B, 3, S, S)
        views = [dihedral(x[i:i + 1], self.c.views[p]) for i, p in enumerate(picks)]
        return (torch.cat(views).contiguous(memory_format=torch.channels_last),)

    def _pixels(self, rows: np.ndarray) -> Tensor:
        batch = torch.from_numpy(np.stack([load_image(self.paths[r], self.c.image_size) for r in rows]))
        return normalize(batch.to(self.device), self.c.mean, self.c.std)  # (B, 3, S, S)

    @torch.no_grad()
    def eval_codes(self, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Student codes (R, bits) of the upright view (view 0), as the exported student sees images."""
        self.train_mode(False)
        if self.features is not None and 0 in self.c.views:
            feats = self.features[self.c.views.index(0), torch.as_tensor(rows)]
            return self.student.head(feats).cpu().numpy()
        chunks = [self.student(self._pixels(rows[i:i + batch_size])).cpu() for i in range(0, len(rows), batch_size)]
        return torch.cat(chunks).numpy()

    def save(self, path: Path, extra: dict) -> None:
        save_image_student(path, self.student, extra)


class _TextTask:
    """Text student: the whole shallow encoder and head train on tokenized captions."""

    name, checkpoint = "text", TEXT_CHECKPOINT

    def __init__(self, config: DistillConfig, targets: TeacherTargets, device: torch.device):
        self.c, self.device = config.text, device
        teacher = targets.model
        source = student_source(self.c, teacher.text_encoder)
        self.student = build_text_student(self.c, teacher.text_encoder, teacher.text_head, source).to(device)
        self.tokenizer = source.tokenizer
        self.module = self.student
        self.captions = targets.index.captions
        self.targets = torch.as_tensor(targets.captions, device=device)  # (M, bits)
        self._token_lengths = np.zeros(0, dtype=np.int64)  # of every caption, once asked (batch_order)
        self.student.model.get_input_embeddings().weight.requires_grad_(self.c.train_embeddings)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": self.c.lr}]

    def train_mode(self, on: bool) -> None:
        self.student.train(on)

    def with_variants(self, rows: np.ndarray, targets: TeacherTargets, seed: int) -> np.ndarray:
        """``rows`` and the rows of ``caption_variants`` reworded copies of each of their captions,
        appended to the task's captions with the teacher's codes of them as targets."""
        if not self.c.caption_variants:
            return rows
        from .captions import caption_variants
        from .train import text_codes

        texts = [t for variant in caption_variants(list(self.captions), rows, self.c.caption_variants, seed,
                                                   **targets.config.train.captions.rates) for t in variant]
        codes = text_codes(targets.model, texts, self.device, desc="reworded captions")  # (R * variants, bits)
        first = len(self.captions)
        self.captions = list(self.captions) + texts
        self.targets = torch.cat([self.targets, torch.as_tensor(codes, device=self.device, dtype=self.targets.dtype)])
        return np.concatenate([rows, np.arange(first, first + len(texts), dtype=np.int64)])

    def batch_order(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """``order`` (a random permutation) in batches of similar token lengths when ``group_by_length``:
        each window of LENGTH_WINDOW batches sorted by length, cut into batches, and the batches shuffled."""
        if not self.c.group_by_length:
            return order
        lengths = self._lengths(order)
        window = LENGTH_WINDOW * batch_size
        grouped = np.concatenate([order[i:i + window][np.argsort(lengths[i:i + window], kind="stable")]
                                  for i in range(0, len(order), window)])
        batches = [grouped[start:stop] for start, stop in batch_bounds(len(grouped), batch_size)]
        return np.concatenate([batches[b] for b in rng.permutation(len(batches))])

    def _lengths(self, rows: np.ndarray) -> np.ndarray:
        if len(self._token_lengths) != len(self.captions):  # the captions grow with their variants
            self._token_lengths = np.asarray([len(ids) for ids in self.tokenizer(
                list(self.captions), truncation=True, max_length=self.student.max_length)["input_ids"]])
        return self._token_lengths[rows]

    def _tokens(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer([self.captions[r] for r in rows], padding=True, truncation=True,
                                max_length=self.student.max_length, return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)  # (B, T) each

    def train_inputs(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        return self._tokens(rows)

    @torch.no_grad()
    def eval_codes(self, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.train_mode(False)
        chunks = [self.student(*self._tokens(rows[i:i + batch_size])).cpu() for i in range(0, len(rows), batch_size)]
        return torch.cat(chunks).numpy()  # (R, bits)

    def save(self, path: Path, extra: dict) -> None:
        save_text_student(path, self.student, self.tokenizer, extra)


LENGTH_WINDOW = 50  # batches whose rows are grouped by token length together (_TextTask.batch_order)


def _schedule(epochs: int, warmup_epochs: int, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to 0, per optimizer step."""
    total, warmup = max(epochs * steps_per_epoch, 1), warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return factor


def _train_epoch(task, module: nn.Module, objective: DistillObjective, optimizer, scheduler, rows: np.ndarray,
                 batch_size: int, rng: np.random.Generator, desc: str, progress: bool) -> dict[str, float]:
    """One pass over ``rows`` in random order; returns the mean of each loss term."""
    task.train_mode(True)
    sums: dict[str, float] = {}
    order = task.batch_order(rng.permutation(rows), batch_size, rng)
    bounds = batch_bounds(len(order), batch_size)
    for start, stop in tqdm(bounds, desc=desc, unit="batch", leave=False, disable=not progress):
        batch = order[start:stop]
        if len(batch) < 2:
            continue  # batch norm and the similarity term need two codes
        terms = objective(module(*task.train_inputs(batch, rng)), task.targets[torch.as_tensor(batch)])
        loss = objective.total(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in {"total": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    return {k: v / max(len(bounds), 1) for k, v in sums.items()}


# What a reported checkpoint carries of the chief's outputs, so a restarted job gets them back.
OUTPUTS = (IMAGE_CHECKPOINT, TEXT_CHECKPOINT, TOKENIZER_DIR, DISTILL_CONFIG)


def _fit_student(task, config: DistillConfig, train_rows: np.ndarray, val_rows: np.ndarray, out: Path,
                 context: LoopContext, progress: bool, extra: dict, done: dict, resumed: tuple | None = None) -> dict:
    """Train one student, evaluate on val every ``eval_every`` epochs, keep the best checkpoint.

    The score is the val bit agreement with the teacher's codes: no labels, no test data.
    ``done`` holds the results of the students trained before this one (they go into every
    reported checkpoint); ``resumed`` is (shared, own) state of this student from a checkpoint.
    """
    epochs, batch_size = task.c.epochs, task.c.batch_size
    rows = context.shard(train_rows)
    seed = context.seed(config.seed)
    rng = np.random.default_rng(seed)
    if context.rank:  # built from the common seed; each worker draws its own dropout from here on
        torch.manual_seed(seed)
    start, best, history = 0, None, []
    if resumed:
        shared, own = resumed
        task.module.load_state_dict(shared["trainable"])
        start, best, history = shared["epoch"], shared["best"], shared["history"]
    module = context.prepare(task.module)
    objective = DistillObjective(config.loss)
    # One fused kernel per step over all parameters (CPU and CUDA): the per-tensor loop was a fifth of a text
    # student's step on a 2-core CPU.
    optimizer = torch.optim.AdamW(task.param_groups(), weight_decay=config.weight_decay, fused=True)
    steps = max(len(batch_bounds(len(rows), batch_size)), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(epochs, config.warmup_epochs, steps))
    if resumed:
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        if own is not None:
            rng.bit_generator.state = own["numpy"]
            torch.set_rng_state(own["torch"])
        log.info("rank %d resumed the %s student after epoch %d", context.rank, task.name, start)
    val_targets = task.targets[torch.as_tensor(val_rows)].cpu().numpy()  # (R, bits)

    def state() -> dict:
        own = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
        if not context.is_chief:
            return {"own": own}
        shared = {"student": task.name, "epoch": epoch + 1, "best": best, "history": history + [record],
                  "trainable": task.module.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "done": done}
        return {"shared": shared, "own": own}

    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=f"distil {task.name} student", unit="epoch",
               disable=not progress)
    for epoch in bar:
        losses = _train_epoch(task, module, objective, optimizer, scheduler, rows, batch_size, rng,
                              f"epoch {epoch + 1}", progress)
        record = {"epoch": epoch + 1, "loss": losses}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == epochs:
            if context.is_chief:
                score = bit_agreement(task.eval_codes(val_rows), val_targets)
                record["val_bit_agreement"] = score
                if best is None or score > best["val_bit_agreement"]:
                    best = {"epoch": epoch + 1, "val_bit_agreement": score}
                    task.save(out / task.checkpoint, {**extra, **best})
                bar.set_postfix(loss=f"{losses['total']:.4f}", val=f"{score:.4f}", best=best["epoch"])
            context.report(epoch + 1, record, out, state, outputs=OUTPUTS, name=f"{task.name}-epoch")
        history.append(record)
    return {"best": best, "history": history, "resumed_from_epoch": start}


def distill(teacher_dir: str | Path, config: DistillConfig, data_dir: str | Path, out_dir: str | Path,
            cache_dir: str | Path | None = None, progress: bool = True, context: LoopContext | None = None) -> dict:
    """Distil the teacher in ``teacher_dir`` into the configured students; returns the metrics dict.

    Writes to ``out_dir``: ``distill_config.yaml`` (DISTILL_CONFIG), one checkpoint per student (``image_student.pt``,
    ``text_student.pt`` + ``tokenizer/``), chosen by val bit agreement with the teacher, and
    ``metrics.json``. The teacher's codes are the only targets: no labels are used. A Ray Train
    worker group restarted after a failure resumes from its last reported checkpoint: the
    students finished before it are not trained again, the one in training continues.
    """
    started = time.time()
    check(config, "distill")
    context = context or LoopContext()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = default_device(config.device)
    targets = teacher_targets(teacher_dir, data_dir, cache_dir, device)
    targets_s = round(time.time() - started, 1)
    index = targets.index
    train_images, val_images = index.rows("train"), index.rows("val")
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError(f"{data_dir}: distillation needs images in both the train and the val split")
    if context.is_chief:
        save_distill_config(config, out / DISTILL_CONFIG)
    extra = {"teacher": str(teacher_dir), "teacher_config": targets.config.name, "bits": targets.bits,
             "dataset": index.dataset.name, "dataset_fingerprint": index.dataset.fingerprint()}
    resumed = context.resume()
    results = {}
    if resumed:
        shared, own, folder = resumed
        results = dict(shared["done"])  # their checkpoints come back with the reported outputs
        if context.is_chief:
            copy_outputs(OUTPUTS, folder, out)
    for kind in config.students:
        if kind in results:
            continue
        seed_everything(config.seed)
        if kind == "image":
            task, rows, val = (_ImageTask(config, targets, FeatureCache(Path(cache_dir) if cache_dir else None), device),
                               train_images, val_images)
        else:
            task = _TextTask(config, targets, device)
            rows, val = _unique_caption_rows(index, train_images), _unique_caption_rows(index, val_images)
            rows = task.with_variants(rows, targets, config.seed)  # val stays the captions as written
        mine = (shared, own) if resumed and shared["student"] == kind else None
        began = time.time()
        results[kind] = _fit_student(task, config, rows, val, out, context, progress and context.is_chief, extra,
                                     done=dict(results), resumed=mine)
        results[kind]["seconds"] = round(time.time() - began, 1)  # its features (image) and its epochs
    metrics = {**extra, "config": config.name, "students": results, "seconds": round(time.time() - started, 1),
               "teacher_targets_s": targets_s,
               "device": str(device), "world_size": context.world_size}
    if context.is_chief:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _unique_caption_rows(index: DatasetIndex, image_rows: np.ndarray) -> np.ndarray:
    """The caption rows of these images, one per distinct text (first occurrence). Identical
    captions have identical teacher codes: repeats would only cost time (UCM's 8,400 train
    captions hold 1,731 distinct texts)."""
    rows = np.concatenate([index.captions_of[r] for r in image_rows])
    _, first = np.unique([index.captions[r] for r in rows], return_index=True)
    return rows[np.sort(first)].astype(np.int64)
