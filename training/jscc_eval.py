"""``terrahash jscc eval``: the grid's figures on the test split (queries) against train + val (database).

``split="val"`` gives the same figures for the val split's queries against the train split, the
figures a config's choices (lambda, epochs, warm start) are made on, so that the test split is only
reported; its quantize-and-forward codebooks are then fitted on as many train images as val has.

For every trained link and SNR of the config (decode-and-forward, ``protocol: df``) and every
(N_Q, b) of the quantize-and-forward grid at each SNR (``protocol: qf``: the 1-hop pair's channel
output quantized by a k-means codebook fitted on the val split's channel outputs, then decoded by
the same frozen pair), for the baseline and the aligned model:

- ``psnr`` (dB) and ``ms_ssim`` of the received test images against the sent ones (MS-SSIM by
  pytorch-msssim over its 5 scales, with the widest window the image size allows: 7 pixels at
  128 px, its default 11 from 161 px); LPIPS is not computed: its network weights come from a model
  hub, which this project does not reach;
- ``bit_agreement``: the share of equal bits between the frozen hasher's codes of the sent and the
  received image;
- ``map_all``: image-to-image mAP@all (``terrahash eval``'s protocol: class relevance, Hamming
  ranking, ties by id) of the received images as queries against the hasher's codes of the clean
  database images, beside ``map_all_clean`` (the sent images as queries) and their ratio.

The sent images are the test images resized to the config's ``image_size``; the channel noise of
test image i at one grid point is drawn from ``Generator().manual_seed(seed + i)``-style seeds fixed
per point, so a rerun gives the same table.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .jscc import BlockQuantizer, awgn, psnr, qf_bits_per_pixel, symbols
from .jscc_config import JsccConfig, jscc_config_from_dict
from .jscc_train import as_tensor, link_names, load_hasher, load_images, load_link

log = logging.getLogger(__name__)

QF_FIT_BLOCKS = 200_000  # val channel-output blocks the codebook is fitted on (seeded sample)


def ms_ssim_of(source: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """(B,) MS-SSIM over pytorch-msssim's 5 scales with the widest window (11 down to 3 pixels) that the
    image size allows: it needs side > (window - 1) * 16 (its defaults, a window of 11, need > 160 px)."""
    from pytorch_msssim import ms_ssim

    side = min(source.shape[-2:])
    window = next((w for w in (11, 9, 7, 5, 3) if side > (w - 1) * 16), None)
    if window is None:
        raise ValueError(f"MS-SSIM over 5 scales needs images over 32 px, got {side} px")
    return ms_ssim(source, received, data_range=1.0, size_average=False, win_size=window)


def _batches(tensor: torch.Tensor, size: int):
    for start in range(0, len(tensor), size):
        yield start, tensor[start:start + size]


@torch.no_grad()
def hash_codes(hasher, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    return torch.cat([hasher(x) for _, x in _batches(images, batch)]).numpy()


def _figures(sent: torch.Tensor, received: torch.Tensor, hasher, sent_codes: np.ndarray, q_labels, db_codes,
             db_labels) -> dict:
    from evaluation.retrieval import signs
    from evaluation.robustness import hamming_map

    received_signs = signs(hash_codes(hasher, received))
    return {"psnr": float(psnr(sent, received).mean()), "ms_ssim": float(ms_ssim_of(sent, received).mean()),
            "bit_agreement": float((received_signs == signs(sent_codes)).mean()),
            "map_all": hamming_map(received_signs, q_labels, db_codes, db_labels)}


@torch.no_grad()
def _df(link, sent: torch.Tensor, snr: float, seed: int, batch: int = 16) -> torch.Tensor:
    out = []
    generator = torch.Generator().manual_seed(seed)
    for _, x in _batches(sent, batch):
        out.append(link(x, snr, generator))
    return torch.cat(out)


@torch.no_grad()
def _channel_outputs(link, images: torch.Tensor, snr: float, seed: int, batch: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    encoder = link.encoders[0]
    return torch.cat([awgn(encoder(x, snr), snr, generator) for _, x in _batches(images, batch)])


@torch.no_grad()
def _qf(link, quantizer: BlockQuantizer, received: torch.Tensor, snr: float, batch: int = 16) -> torch.Tensor:
    decoder = link.decoders[0]
    out = []
    for _, y in _batches(received, batch):
        out.append(decoder(quantizer.decode(quantizer.encode(y), y.shape), snr))
    return torch.cat(out)


def evaluate_grid(model_dir: str | Path, data_dir: str | Path, progress: bool = True, split: str = "test") -> dict:
    """The table's points for the links in ``model_dir`` (written by ``train_grid``), the queries of ``split``
    (``test`` or ``val``) against its database splits."""
    from evaluation.retrieval import choose_rows, signs
    from evaluation.robustness import hamming_map

    from serving.ingest.dataset import load_dataset
    from .train import DatasetIndex

    folder = Path(model_dir)
    manifest = json.loads((folder / "jscc.json").read_text())
    config: JsccConfig = jscc_config_from_dict(manifest["config"])
    if split not in ("test", "val"):
        raise ValueError(f"jscc eval: the queries are the test or the val split, not {split!r}")
    hasher = load_hasher(manifest["hasher"]["model_dir"], manifest["hasher"]["kind"])
    index = DatasetIndex.build(load_dataset(data_dir))
    q_rows, db_rows, database = choose_rows(index.rows(split), index.database_rows(split), len(index.labels), split)
    fit_rows = index.rows("val")  # the codebooks' channel outputs: never the queries'
    if split == "val":
        fit_rows = np.sort(np.random.default_rng(config.seed).choice(index.rows("train"), len(fit_rows), replace=False))
    paths = [r.path for r in index.dataset.records]
    size = config.image_size

    def tensor(rows, side: int = size) -> torch.Tensor:
        return as_tensor(load_images([paths[r] for r in rows], side))

    sent, fit_images = tensor(q_rows), tensor(fit_rows)
    db_codes = signs(hash_codes(hasher, tensor(db_rows, hasher.size)))  # the database as the index holds it
    q_labels, db_labels = index.labels[q_rows], index.labels[db_rows]
    sent_codes = hash_codes(hasher, sent)

    clean = hamming_map(signs(sent_codes), q_labels, db_codes, db_labels)
    links = {(l["hops"], l["snr_db"], l["model"]): folder / f"{l['name']}.pt" for l in manifest["links"]}
    points = []
    k = symbols(config.c_out, size, size)
    steps = tqdm(total=len(links) * (1 if not config.snr_conditioning else len(config.snr_eval_db)) +
                 len(config.models) * len(config.snr_eval_db) * len(config.qf_grid), desc="grid points",
                 unit="point", disable=not progress)
    for n, snr in enumerate(config.snr_eval_db):
        for (hops, trained_snr, model), path in sorted(links.items(), key=lambda kv: (kv[0][0], kv[0][2])):
            if trained_snr is not None and trained_snr != snr:
                continue
            link, _ = load_link(path)
            received = _df(link, sent, snr, seed=config.seed + 1000 * n + hops)
            points.append({"protocol": "df", "hops": hops, "snr_db": snr, "model": model,
                           **_figures(sent, received, hasher, sent_codes, q_labels, db_codes, db_labels)})
            steps.update()
        for model in config.models:
            key = next(((h, s, m) for (h, s, m) in links if h == 1 and m == model and s in (None, snr)), None)
            if key is None:
                continue
            link, _ = load_link(links[key])
            fit_on = _channel_outputs(link, fit_images, snr, seed=config.seed + 7)
            received_symbols = _channel_outputs(link, sent, snr, seed=config.seed + 1000 * n + 1)
            rng = np.random.default_rng(config.seed)
            for n_q, b in config.qf_grid:
                quantizer = BlockQuantizer(n_q, b)
                blocks = quantizer.blocks(fit_on)
                sample = blocks[torch.from_numpy(rng.choice(len(blocks), min(QF_FIT_BLOCKS, len(blocks)), replace=False))]
                quantizer.fit(sample, seed=config.seed)
                received = _qf(link, quantizer, received_symbols, snr)
                points.append({"protocol": "qf", "n_q": n_q, "b": b, "bits_per_pixel": qf_bits_per_pixel(k, n_q, b, size, size),
                               "snr_db": snr, "model": model,
                               **_figures(sent, received, hasher, sent_codes, q_labels, db_codes, db_labels)})
                steps.update()
    steps.close()
    for point in points:
        point["map_ratio"] = point["map_all"] / clean if clean else None
    return {"split": split, "points": points, "map_all_clean": clean,
            "database": {**database, "queries": int(len(q_rows))},
            "image_size": size, "symbols": k, "bandwidth_ratio": k / (3 * size * size),
            "hasher": manifest["hasher"], "lpips": "not computed: its network weights come from a model hub"}


def format_points(report: dict) -> str:
    lines = [f"received-query mAP@all against clean queries' {report['map_all_clean']:.4f} "
             f"(rho = {report['bandwidth_ratio']:.3f}, {report['image_size']} px)",
             f"{'protocol':<10}{'link':<12}{'SNR':>6}{'model':>10}{'PSNR':>8}{'MS-SSIM':>9}{'bits':>8}{'mAP':>8}{'ratio':>8}"]
    for p in report["points"]:
        link = f"{p['hops']} hop(s)" if p["protocol"] == "df" else f"N_Q={p['n_q']} b={p['b']:g}"
        lines.append(f"{p['protocol']:<10}{link:<12}{p['snr_db']:>6g}{p['model']:>10}{p['psnr']:>8.2f}{p['ms_ssim']:>9.4f}"
                     f"{p['bit_agreement']:>8.4f}{p['map_all']:>8.4f}{p['map_ratio']:>8.3f}")
    return "\n".join(lines)


__all__ = ["evaluate_grid", "format_points", "link_names", "ms_ssim_of"]
