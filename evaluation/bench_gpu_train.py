"""Benchmark: images per second and GPU utilisation of a fine-tuning config (``full``) on Ray Train.

Runs a few epochs of the config as a Ray Train job (one worker per GPU with ``--workers``) and
samples the GPU's utilisation and memory through NVML every half second while it trains.
Throughput comes from the chief's per-epoch records (training steps only, first epoch dropped as
warm-up), times the number of workers. Without a GPU it runs on the CPU and says so.

    python -m evaluation.bench_gpu_train --config full --epochs 3 --data ../shared/data/ucm_captions

The same script runs as a job on a cluster's GPU workers, which then decide the GPU and CPUs per
worker (``training.distributed.apply_worker_type``)::

    terrahash submit --worker-type gpu --module evaluation.bench_gpu_train -- --config full --data /mnt/data/ucm
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .bench_ray_train import throughput


class GpuSampler:
    """Utilisation (%) and memory (GiB) of every visible GPU, sampled in a background thread."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as err:  # no NVIDIA driver, or no pynvml: nothing to sample
            self.nvml, self.handles, self.reason = None, [], f"{type(err).__name__}: {err}"

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def _run(self):
        while not self._stop.wait(self.interval):
            for handle in self.handles:
                use = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                self.samples.append((use.gpu, memory.used / 2**30))

    def summary(self) -> str:
        if not self.handles:
            return f"no GPU sampled ({self.reason})"
        if not self.samples:
            return "no GPU samples (the run was shorter than the sampling interval)"
        use = [u for u, _ in self.samples]
        return (f"GPU utilisation mean {statistics.fmean(use):.0f}%, median {statistics.median(use):.0f}%; "
                f"memory peak {max(m for _, m in self.samples):.1f} GiB over {len(self.handles)} GPU(s)")


def main(argv: list[str] | None = None) -> None:
    from training.config import WORKERS_ENV, load_config
    from training.distributed import apply_worker_type, fit_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="full")
    parser.add_argument("--data", default="../shared/data/ucm_captions")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers, one GPU each when there are GPUs")
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    args = parser.parse_args(argv)

    import torch

    config = load_config(args.config)
    config.train.epochs = args.epochs
    config.train.eval_every = args.epochs  # one evaluation, at the end
    config.tracking.enabled = False
    if args.batch_size:
        config.train.batch_size = args.batch_size
    import os

    config.distributed.num_workers = args.workers
    apply_worker_type(config.distributed)  # a submitted job: the worker type says whether there are GPUs
    gpu = config.distributed.use_gpu or (not os.environ.get(WORKERS_ENV) and torch.cuda.is_available())
    config.distributed.use_gpu = gpu
    config.train.device = "cuda" if gpu else "cpu"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, GpuSampler() as sampler:
        metrics = fit_distributed(config, args.data, Path(tmp) / "run")
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU workers") if gpu \
        else "CPU (no GPU found)"
    print(f"\n{args.config} on {device}, {args.workers} worker(s), batch {config.train.batch_size}, "
          f"{args.epochs} epochs in {time.perf_counter() - started:.0f} s")
    print(f"training images/s: {throughput(metrics):.1f}")
    print(sampler.summary())


if __name__ == "__main__":
    main()
