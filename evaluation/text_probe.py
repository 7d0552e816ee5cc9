"""Where the free-text ceiling is: how well the text encoder alone tells the scene classes apart in
sentences worded unlike the training captions, frozen or with its top layers fine-tuned.

A probe, reported only (``docs/results.md``, "How `fast_split` was chosen"). The hash codes of a
free-text query land near the images of one class or another, so free-text mAP@all tracks how often
the text tower names a query's class. This probe measures that directly, without hash heads:

- **kNN vote**: each query takes the class most common among its ``k`` nearest train captions, by
  cosine of the frozen encoder's mean-pooled features (no training at all);
- **classifier**: a head of the text hash head's shape (``text.head_hidden`` of the config, dropout
  and the config's text feature noise) learns the class of every train caption and of its augmented
  copies (``train.captions`` of the config: the same reworded variants the hashing run trains on),
  on the encoder's features with its top ``N`` transformer layers frozen (``N = 0``) or fine-tuned
  (AdamW, ``--encoder-lr``). After each epoch: class accuracy on the val captions and on every
  query set. The epoch reported is the one with the best accuracy on the first query set (the val
  one); the others are reported at that epoch, never chosen on.

``python -m evaluation.text_probe --data DIR --layers 0 2 --epochs 3`` prints one table per setting
and ``--json OUT`` writes them. On this 2-core CPU a frozen epoch takes about 20 s, one with the top
two layers fine-tuned about 7 minutes (every caption through the whole encoder, gradients through
the top layers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .retrieval import _cosine

DEFAULT_SETS = ("ucm_free_text_val", "ucm_free_text")


def knn_vote(train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray, k: int,
             num_classes: int) -> np.ndarray:
    """The class most common among each row's ``k`` nearest train rows by cosine (ties: the lower
    class id, and among equal similarities the lower train row)."""
    similarity = _cosine(features, train_features)  # (Q, M)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = np.stack([np.bincount(train_labels[row], minlength=num_classes) for row in nearest])
    return votes.argmax(axis=1)


class _Probe:
    """The encoder (top ``layers`` trainable) and a class head, trained on labelled texts."""

    def __init__(self, encoder, num_classes: int, hidden: Sequence[int], dropout: float, layers: int,
                 encoder_lr: float, lr: float, noise: np.ndarray | None, seed: int):
        import torch

        from training.models import _mlp

        torch.manual_seed(seed)
        self.encoder, self.layers = encoder, layers
        blocks = encoder.model.encoder.layer
        if layers > len(blocks):
            raise ValueError(f"--layers {layers}: the text encoder has only {len(blocks)} layers")
        for p in encoder.model.parameters():
            p.requires_grad = False
        trainable = [p for block in list(blocks)[len(blocks) - layers:] for p in block.parameters()] if layers else []
        for p in trainable:
            p.requires_grad = True
        self.head = _mlp(encoder.feature_dim, num_classes, tuple(hidden), dropout)
        groups = [{"params": self.head.parameters(), "lr": lr}]
        if trainable:
            groups.append({"params": trainable, "lr": encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
        self.noise = None if noise is None else torch.as_tensor(noise)
        self.generator = torch.Generator().manual_seed(seed)

    def predict(self, texts: list[str]) -> np.ndarray:
        """The head's class of each text, through the encoder as it now is."""
        import torch

        from training.features import text_features

        self.head.eval()
        with torch.no_grad():
            return self.head(torch.as_tensor(text_features(self.encoder, texts, desc="probe texts"))).argmax(1).numpy()

    def epoch(self, texts: list[str], labels: np.ndarray, batch_size: int, rng: np.random.Generator,
              cached=None) -> float:
        """One pass over the texts in a seeded order; ``cached`` features stand in for a frozen
        encoder. Returns the mean loss."""
        import torch
        from torch.nn.functional import cross_entropy

        order = rng.permutation(len(texts))
        self.head.train()
        self.encoder.train(self.layers > 0)
        losses = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            if cached is not None:
                features = cached[rows]
            else:
                features = self.encoder.encode([texts[i] for i in rows])
            if self.noise is not None:
                features = features + self.noise * torch.randn(features.shape, generator=self.generator)
            loss = cross_entropy(self.head(features), torch.as_tensor(labels[rows]))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return float(np.mean(losses))


def run_probe(data_dir: str | Path, config_name: str = "fast_split", layers: Sequence[int] = (0,),
              epochs: int = 3, query_sets: Sequence[str] = DEFAULT_SETS, ks: Sequence[int] = (1, 10, 50),
              encoder_lr: float = 3e-5, seed: int = 0, progress=print) -> dict:
    """The probe's figures: ``{"knn": {set: {k: acc}}, "classifier": [{layers, epochs: [...], chosen}]}``."""
    import torch

    from training.captions import caption_variants
    from training.config import load_config
    from serving.ingest.dataset import load_dataset
    from training.features import text_features
    from training.models import TextEncoder
    from training.train import DatasetIndex

    from .free_text import load_queries

    config = load_config(config_name)
    dataset = load_dataset(data_dir)
    index = DatasetIndex.build(dataset)
    if not index.captions:
        raise ValueError(f"{data_dir}: the dataset has no captions to train a text probe on")
    classes = list(dataset.classes)
    sets = [load_queries(name) for name in query_sets]
    lookup = {c: i for i, c in enumerate(classes)}
    queries = {}
    for s in sets:
        kept = [q for q in s.queries if q.label in lookup]
        queries[s.name] = ([q.text for q in kept], np.asarray([lookup[q.label] for q in kept]))
    caption_labels = index.labels[index.caption_owner]
    train = np.flatnonzero(np.isin(index.caption_owner, index.rows("train")))
    val = np.flatnonzero(np.isin(index.caption_owner, index.rows("val")))
    aug = config.train.captions
    copies = caption_variants(index.captions, train, aug.variants, config.train.seed, **aug.rates)
    texts = [index.captions[i] for i in train] + [t for copy in copies for t in copy]
    labels = np.concatenate([caption_labels[train]] * (1 + len(copies)))
    evaluated = {"val captions": ([index.captions[i] for i in val], caption_labels[val]), **queries}

    frozen = TextEncoder(config.text)
    train_features = text_features(frozen, texts, desc="train texts")  # (len(texts), D)
    as_written = train_features[:len(train)]  # the captions themselves, before their variants
    spread = as_written.std(0)
    knn = {name: {str(k): float(np.mean(knn_vote(as_written, caption_labels[train],
                                                    text_features(frozen, q_texts, desc=name), k, len(classes)) == y))
                  for k in ks} for name, (q_texts, y) in queries.items()}
    progress(f"kNN vote on frozen features: {knn}")
    results = []
    for n in layers:
        encoder = TextEncoder(config.text)  # fresh pretrained weights for every setting
        probe = _Probe(encoder, len(classes), config.text.head_hidden, config.text.dropout, n, encoder_lr,
                       config.train.lr, aug.feature_noise * spread if aug.feature_noise else None, seed)
        cached = torch.as_tensor(train_features) if n == 0 else None
        rng = np.random.default_rng(seed)
        history = []
        for e in range(1, epochs + 1):
            started = time.perf_counter()
            loss = probe.epoch(texts, labels, config.train.batch_size, rng, cached)
            figures = {name: float(np.mean(probe.predict(t) == y)) for name, (t, y) in evaluated.items()}
            history.append({"epoch": e, "loss": loss, "seconds": time.perf_counter() - started, "accuracy": figures})
            progress(f"layers {n} epoch {e}: loss {loss:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        chooser = sets[0].name
        chosen = max(history, key=lambda h: (h["accuracy"][chooser], -h["epoch"]))
        results.append({"layers": n, "epochs": history, "chosen_by": chooser, "chosen": chosen})
    return {"config": config.name, "encoder": config.text.encoder, "train_texts": len(texts),
            "classes": len(classes), "knn": knn, "classifier": results}


def format_probe(result: dict) -> str:
    sets = list(next(iter(result["classifier"]))["chosen"]["accuracy"]) if result["classifier"] else []
    lines = [f"text probe: {result['encoder']} ({result['config']}'s captions and augmentation, "
             f"{result['train_texts']} train texts, {result['classes']} classes); class accuracy"]
    for name, by_k in result["knn"].items():
        lines.append(f"  kNN vote, frozen, {name}: " + ", ".join(f"k={k} {v:.3f}" for k, v in by_k.items()))
    lines.append(f"  {'fine-tuned layers':18s} {'epoch':>5s}  " + "  ".join(f"{s:>18s}" for s in sets))
    for r in result["classifier"]:
        c = r["chosen"]
        lines.append(f"  {r['layers']:<18d} {c['epoch']:>5d}  " + "  ".join(f"{c['accuracy'][s]:>18.3f}" for s in sets))
    lines.append(f"  (epoch chosen by {result['classifier'][0]['chosen_by'] if result['classifier'] else '-'})")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.text_probe",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="captioned dataset folder (dataset*.json)")
    parser.add_argument("--config", default="fast_split",
                        help="config whose text tower, captions augmentation and head the probe copies")
    parser.add_argument("--layers", type=int, nargs="+", default=[0],
                        help="top transformer layers to fine-tune, one setting each (0: frozen)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--encoder-lr", type=float, default=3e-5)
    parser.add_argument("--queries", nargs="+", default=list(DEFAULT_SETS),
                        help="query sets (shipped names or files); the first chooses the epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    try:
        result = run_probe(args.data, args.config, args.layers, args.epochs, args.queries,
                           encoder_lr=args.encoder_lr, seed=args.seed,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(format_probe(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
