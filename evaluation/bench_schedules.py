"""Benchmark: wall time and test figures of the training schedules (sync vs async, joint for reference).

Each schedule runs the whole ``terrahash train`` job (training, checkpoint selection on val, the
final test evaluation) on the same config, data and feature cache, one after the other in this
process, with MLflow tracking off so that only the training is timed. The figures are the
binary test-split ones of the combined model.

    python -m evaluation.bench_schedules --config fast --bits 64 --data ../shared/data/ucm_captions
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

FIGURES = (("i2i mAP", "test/image_to_image/map_all"), ("t2i mAP", "test/text_to_image/map_all"),
           ("i2t mAP", "test/image_to_text/map_all"), ("mR", "test/mr"))


def main(argv: list[str] | None = None) -> None:
    from training.config import load_config
    from evaluation.evaluate import run_eval
    from training.jobs import SCHEDULES, run_training

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fast")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--data", default="../shared/data/ucm_captions")
    parser.add_argument("--cache-dir", default=".cache/terrahash/features")
    parser.add_argument("--schedules", nargs="+", default=["sync", "async"], choices=SCHEDULES)
    parser.add_argument("--workers", type=int, default=1, help="image-job Ray Train workers (async needs >= 1)")
    parser.add_argument("--sync-on-ray", action="store_true",
                        help="run sync as Ray Train jobs too (same start-up costs as async), not in one process")
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in args.schedules:
            config = load_config(args.config)
            config.train.bits, config.train.schedule = args.bits, schedule
            if args.epochs:
                config.train.epochs = args.epochs
            config.tracking.enabled = False
            # Both jobs of "async" share the machine: one core each when there are two.
            on_ray = schedule == "async" or (schedule == "sync" and args.sync_on_ray)
            config.distributed.num_workers = args.workers if on_ray else 0
            config.distributed.cpus_per_worker = max(1.0, (os.cpu_count() or 2) // 2)
            started = time.perf_counter()
            metrics = run_training(config, args.data, Path(tmp) / schedule, cache_dir=args.cache_dir, evaluate=run_eval)
            results[schedule] = (time.perf_counter() - started, metrics["eval"])
            print(f"{schedule}: {results[schedule][0]:.1f} s, " + ", ".join(
                f"{name} {metrics['eval'][key]:.4f}" for name, key in FIGURES), flush=True)

    print(f"\n{args.config}, {args.bits} bits, test split (binary codes):")
    print(f"{'schedule':<10}{'wall s':>9}" + "".join(f"{name:>10}" for name, _ in FIGURES))
    for schedule, (seconds, figures) in results.items():
        print(f"{schedule:<10}{seconds:9.1f}" + "".join(f"{figures[key]:10.4f}" for _, key in FIGURES))
    if "sync" in results and "async" in results:
        print(f"wall time async / sync: {results['async'][0] / results['sync'][0]:.3f}")


if __name__ == "__main__":
    main()
