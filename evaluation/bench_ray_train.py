"""Benchmark: samples per second of the training loop, plain vs Ray Train with 1 and 2 workers.

Runs the same config on the same data three ways and prints throughput and ratios. Throughput is
taken from the chief's per-epoch records (training steps only: start-up, feature extraction and
evaluation excluded), the first epoch dropped as warm-up; with W workers each trains on 1/W of the
rows, so the job's throughput is W times the chief's. The machine's cores are split evenly over
the workers, as a plain run's torch uses all of them.

    python -m evaluation.bench_ray_train --config fast --epochs 6 --data ../shared/data/ucm_captions
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def throughput(metrics: dict) -> float:
    """Job samples/s from the chief's epoch records, without the first (warm-up) epoch."""
    epochs = metrics["history"][1:] or metrics["history"]
    samples = sum(e["samples"] for e in epochs) * metrics["world_size"]
    return samples / sum(e["seconds"] for e in epochs)


def main(argv: list[str] | None = None) -> None:
    from training.config import load_config
    from training.distributed import fit_distributed
    from training.train import fit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fast")
    parser.add_argument("--data", default="../shared/data/ucm_captions")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cache-dir", default=".cache/terrahash/features")
    args = parser.parse_args(argv)

    def config(workers: int):
        c = load_config(args.config)
        c.train.epochs, c.train.eval_every = args.epochs, args.epochs  # evaluate once, at the end
        c.tracking.enabled = False
        c.distributed.num_workers = workers
        # The machine's cores split over the workers, as the plain run's torch uses them all.
        c.distributed.cpus_per_worker = max(1.0, (os.cpu_count() or 1) / max(workers, 1))
        return c

    with tempfile.TemporaryDirectory() as tmp:
        plain = fit(config(0), args.data, Path(tmp) / "plain", cache_dir=args.cache_dir, progress=False)
        one = fit_distributed(config(1), args.data, Path(tmp) / "ray1", cache_dir=args.cache_dir)
        two = fit_distributed(config(2), args.data, Path(tmp) / "ray2", cache_dir=args.cache_dir)
    rates = {"plain": throughput(plain), "ray, 1 worker": throughput(one), "ray, 2 workers": throughput(two)}
    print(f"\n{args.config}, {args.epochs} epochs, samples/s of the training loop:")
    for name, rate in rates.items():
        print(f"  {name:<16}{rate:10.1f}")
    print(f"ratio ray 1 worker / plain:   {rates['ray, 1 worker'] / rates['plain']:.3f}")
    print(f"ratio ray 2 workers / 1:      {rates['ray, 2 workers'] / rates['ray, 1 worker']:.3f}")


if __name__ == "__main__":
    main()
