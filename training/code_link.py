"""A learned code link: the image student's hash code sent over a noisy multi-hop radio link by a tiny codec.

Retrieval-oriented joint source-channel coding of the code, not of the pixels (Jankowski, Gündüz,
Mikolajczyk, "Wireless image retrieval at the edge", JSAC 2021), beside serving/model/code_link.py's
repetition-coded BPSK at the same SNR and the same number of channel uses.

Codec, one per number of complex channel uses ``n`` (a key of the config's ``uses``), told the SNR:

- encoder f: a soft code u (B, bits) in [-1, 1] and the SNR s -> x (B, 2n) real values, symbol j the
  pair (2j, 2j + 1) (I, Q), power-normalised per code exactly as training/jscc.py and the numpy link:
  x_n = x * sqrt(n / ||x||^2), mean power 1 per complex symbol. The field unit's u is the pre-sign
  code c squashed by a scale saved with the codec, u = tanh(c / code_scale) (``field_input``); a relay's
  u is its decoded soft code.
- channel: complex AWGN at s dB per hop, sigma^2 = 10^(-s/10), sigma^2 / 2 per real value
  (training/jscc.py's ``awgn``, the same as serving/model/code_link.awgn).
- decoder g: received y (B, 2n) and s -> logits l (B, bits); the soft code is tanh(l / 2) = 2 P(bit = +1) - 1,
  the expected sign under the decoder's posterior; the service ranks by its signs.
- the SNR enters both as one extra input feature s / SNR_SCALE (training/jscc.py's scale).

Decode-and-forward over h hops: node 0 sends f(u_0); relay i decodes u_i = tanh(g(y_i) / 2) and
re-encodes it with the same f; the service decodes the last hop. Relays pass the soft estimate by
default (``relay: soft``): it keeps how sure the relay is, so the next hop's encoder can spend its power
on the bits that survived, and the link is differentiable end to end without a straight-through
estimator; ``relay: hard`` sends sign(u_i) (straight-through in training), as a bit-level relay would.
One encoder and one decoder serve every node, since each node solves the same problem.

Loss (``CodeLinkLoss``): BCE of the decoded logits against the clean code's bits, plus a retrieval term
(``DatabaseContrastiveLoss``) that ranks the database codes of the query's class above the others.

Training draws per batch an SNR per code from ``snr_train_db`` and a hop count from ``hops_train``, on
the train split's codes only; the checkpoint kept is the one with the best mean val mAP@all (val codes
through the link as queries against the clean train codes) over ``snr_eval_db`` at the largest hop count.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BatchSize, Count, Name, NonEmpty, NonNegative, NonNegativeInt, OneOf, Positive, Range, build, \
    read_config_file
from .jscc import SNR_SCALE, awgn, power_normalize

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs" / "code_link"
RELAYS = ("soft", "hard")
STUDENT_VARIANTS = ("int8", "fp32")
SPEC_FILE, ENCODER_FILE, DECODER_FILE = "code_link.spec.json", "code_link_encoder.onnx", "code_link_decoder.onnx"
CODES_FILE = "codes.npz"
VERIFY_ATOL = 1e-5

Snr = Annotated[float, Range(ge=-30, le=30)]
Hops = Annotated[int, Range(ge=1, le=8)]


@dataclass
class CodeLinkConfig:
    name: Name = "code-link-cpu"
    uses: Annotated[tuple[Count, ...], NonEmpty()] = (64, 256, 1024)  # n per codec: complex channel uses per code
    hidden: Count = 256  # width of the two hidden layers of encoder and decoder
    relay: Annotated[str, OneOf(RELAYS)] = "soft"  # what a relay re-encodes: its soft estimate or its signs
    snr_train_db: tuple[Snr, Snr] = (-15.0, 0.0)  # SNR drawn per code in training (one codec for the range)
    hops_train: Annotated[tuple[Hops, ...], NonEmpty()] = (1, 2, 3)  # hop count drawn per batch
    snr_eval_db: Annotated[tuple[Snr, ...], NonEmpty()] = (-5.0, -10.0, -15.0)  # val checkpoint choice
    bce_weight: NonNegative = 1.0  # weight of the bits term
    retrieval_weight: NonNegative = 1.0  # weight of the database contrastive term
    temperature: Positive = 0.05  # of the contrastive term's softmax over database codes
    student: Annotated[str, OneOf(STUDENT_VARIANTS)] = "int8"  # the exported image student whose codes are sent
    steps: Count = 3000
    eval_every: Count = 250
    batch_size: BatchSize = 256
    lr: Positive = 1e-3
    weight_decay: NonNegative = 1e-4
    seed: NonNegativeInt = 0


def check_code_link_config(config: CodeLinkConfig, where: str = "code_link") -> CodeLinkConfig:
    """The checks across fields that the types cannot say; raises ConfigError naming the field."""
    from .config import ConfigError

    if config.snr_train_db[0] > config.snr_train_db[1]:
        raise ConfigError(f"{where}.snr_train_db: {list(config.snr_train_db)} must be [low, high]")
    if len(set(config.uses)) != len(config.uses):
        raise ConfigError(f"{where}.uses: {list(config.uses)} lists a value twice")
    return config


def code_link_config_from_dict(data: dict | None) -> CodeLinkConfig:
    return check_code_link_config(build(CodeLinkConfig, data or {}, "code_link"))


def load_code_link_config(path_or_name: str | Path) -> CodeLinkConfig:
    """A shipped config by name (``cpu``) or a YAML file."""
    path = Path(path_or_name)
    if not path.is_file() and (CONFIG_DIR / f"{path_or_name}.yaml").is_file():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    return read_config_file(path, code_link_config_from_dict)


# ----------------------------------------------------------------------------------------------
# The codec and the link


def _finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")


def _snr_feature(snr_db: float | Tensor, batch: int, like: Tensor) -> Tensor:
    snr = torch.as_tensor(snr_db, dtype=like.dtype, device=like.device).reshape(-1, 1)  # (B or 1, 1)
    return snr.expand(batch, 1) / SNR_SCALE


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, outputs))


class CodeEncoder(nn.Module):
    """f: soft code (B, bits) in [-1, 1], SNR dB (B,) or scalar -> power-normalised (B, 2n) (I, Q pairs)."""

    def __init__(self, bits: int, uses: int, hidden: int = 256):
        super().__init__()
        self.bits, self.uses = bits, uses
        self.net = _mlp(bits + 1, hidden, 2 * uses)

    def forward(self, code: Tensor, snr_db: float | Tensor) -> Tensor:
        x = self.net(torch.cat([code, _snr_feature(snr_db, code.shape[0], code)], dim=1))  # (B, 2n)
        return power_normalize(x)


class CodeDecoder(nn.Module):
    """g: received (B, 2n), SNR dB -> logits (B, bits) of the code's bits (+1 where positive)."""

    def __init__(self, bits: int, uses: int, hidden: int = 256):
        super().__init__()
        self.bits, self.uses = bits, uses
        self.net = _mlp(2 * uses + 1, hidden, bits)

    def forward(self, received: Tensor, snr_db: float | Tensor) -> Tensor:
        return self.net(torch.cat([received, _snr_feature(snr_db, received.shape[0], received)], dim=1))


def soft_code(logits: Tensor) -> Tensor:
    """tanh(l / 2) = 2 sigmoid(l) - 1: the expected sign of each bit, in (-1, 1)."""
    return torch.tanh(logits / 2)


def _hard(u: Tensor) -> Tensor:
    """sign(u) with sign(0) = +1, straight-through: the forward pass is hard, the gradient that of u."""
    hard = torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))
    return u + (hard - u).detach()


class CodeLink(nn.Module):
    """One codec for ``uses`` channel uses, run decode-and-forward over any number of hops."""

    def __init__(self, bits: int, uses: int, hidden: int = 256, relay: str = "soft", code_scale: float = 1.0):
        super().__init__()
        if relay not in RELAYS:
            raise ValueError(f"unknown relay {relay!r}; known: {list(RELAYS)}")
        self.encoder, self.decoder = CodeEncoder(bits, uses, hidden), CodeDecoder(bits, uses, hidden)
        self.relay = relay
        self.register_buffer("code_scale", torch.tensor(float(code_scale)))

    @property
    def uses(self) -> int:
        return self.encoder.uses

    def field_input(self, code: Tensor) -> Tensor:
        """The field unit's soft code of a pre-sign code: tanh(c / code_scale)."""
        return torch.tanh(code / self.code_scale)

    def forward(self, code: Tensor, hops: int, snr_db: float | Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """Logits (B, bits) at the service of pre-sign codes (B, bits) sent over ``hops`` hops."""
        _finite(code, "the code")
        _finite(torch.as_tensor(snr_db), "the SNR")
        if hops < 1:
            raise ValueError(f"a link has at least one hop, got {hops}")
        u = self.field_input(code)
        for hop in range(hops):
            y = awgn(self.encoder(u, snr_db), snr_db, generator)  # (B, 2n)
            logits = self.decoder(y, snr_db)
            if hop < hops - 1:
                u = soft_code(logits) if self.relay == "soft" else _hard(soft_code(logits))
        return logits


def build_link(config: CodeLinkConfig, bits: int, uses: int, code_scale: float = 1.0) -> CodeLink:
    """The codec for ``uses`` channel uses; ``uses`` must be one of the config's."""
    if uses not in config.uses:
        raise ValueError(f"no codec for {uses} channel uses in config {config.name!r}; it lists {list(config.uses)}")
    return CodeLink(bits, uses, config.hidden, config.relay, code_scale)


# ----------------------------------------------------------------------------------------------
# Losses


class BitBCELoss(nn.Module):
    """L_bits = mean_{b,k} BCE(sigmoid(l_bk), [c_bk >= 0]): logits l (B, bits), clean codes c (B, bits)."""

    def forward(self, logits: Tensor, clean: Tensor) -> Tensor:
        if logits.shape != clean.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and codes {tuple(clean.shape)} differ in shape")
        return F.binary_cross_entropy_with_logits(logits, (clean >= 0).to(logits.dtype))


class DatabaseContrastiveLoss(nn.Module):
    """Ranks the database codes of the query's class first.

    s_bj = <u_b, d_j> / bits for the decoded soft code u (B, bits) and the database's sign codes d
    (N, bits), p_bj = softmax_j(s_bj / tau), and

        L_ret = -mean_b log sum_{j: y_j = y_b} p_bj

    with y (B,) the queries' and (N,) the database's classes: the probability mass the soft Hamming
    similarity puts on the query's class.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, soft: Tensor, labels: Tensor, db_codes: Tensor, db_labels: Tensor) -> Tensor:
        if soft.shape[1] != db_codes.shape[1]:
            raise ValueError(f"codes of {soft.shape[1]} and {db_codes.shape[1]} bits")
        logits = soft @ db_codes.T / (soft.shape[1] * self.temperature)  # (B, N)
        same = labels[:, None] == db_labels[None, :]  # (B, N)
        log_p = logits.log_softmax(dim=1)
        return -(log_p.masked_fill(~same, float("-inf")).logsumexp(dim=1)).mean()


class CodeLinkLoss(nn.Module):
    """bce_weight * L_bits + retrieval_weight * L_ret; returns the named terms and their sum."""

    def __init__(self, bce_weight: float = 1.0, retrieval_weight: float = 1.0, temperature: float = 0.05):
        super().__init__()
        self.weights = {"bits": bce_weight, "retrieval": retrieval_weight}
        self.bits, self.retrieval = BitBCELoss(), DatabaseContrastiveLoss(temperature)

    def forward(self, logits: Tensor, clean: Tensor, labels: Tensor, db_codes: Tensor,
                db_labels: Tensor) -> dict[str, Tensor]:
        terms = {"bits": self.bits(logits, clean),
                 "retrieval": self.retrieval(soft_code(logits), labels, db_codes, db_labels)}
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms


# ----------------------------------------------------------------------------------------------
# Data: the exported image student's codes, cached


def student_codes(students: str | Path, data_dir: str | Path, out: str | Path, variant: str = "int8") -> dict:
    """Codes of every image of the dataset by the exported image student, cached as ``OUT/codes.npz``
    (``codes`` (N, bits) float32, ``labels``, ``splits``, ``rows``); read back when the cache names the
    same student and dataset."""
    from serving.ingest.dataset import load_dataset
    from serving.model.field import encode_images, student_spec

    spec = student_spec(students, variant)
    dataset = load_dataset(data_dir)
    key = {"spec": str(spec), "model_sha256": json.loads(spec.read_text()).get("model_sha256"),
           "dataset": dataset.fingerprint()}
    cache = Path(out) / CODES_FILE
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if json.loads(str(data["key"])) == key:
            return {name: data[name] for name in data.files}
    records = list(dataset.records)
    codes = encode_images(spec, [str(r.path) for r in records]).astype(np.float32)
    arrays = {"codes": codes, "labels": np.asarray(dataset.label_ids(records), dtype=np.int64),
              "splits": np.asarray([r.split or "" for r in records]), "rows": np.asarray([r.index for r in records]),
              "key": np.asarray(json.dumps(key))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def split_codes(data: dict, *splits: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, labels) of the rows of ``splits`` (``restval`` counts as train)."""
    wanted = set(splits) | ({"restval"} if "train" in splits else set())
    mask = np.isin(data["splits"], list(wanted))
    return data["codes"][mask], data["labels"][mask]


# ----------------------------------------------------------------------------------------------
# Training


def _signs(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


@torch.no_grad()
def link_map(link: CodeLink, codes: Tensor, labels: np.ndarray, db_codes: Tensor, db_labels: np.ndarray,
             hops: int, snr_db: float, seed: int = 0) -> dict:
    """mAP@all (Hamming ranking) and bit agreement of ``codes`` sent over the link as queries against the
    database's sign codes, beside the clean queries' mAP."""
    from evaluation.robustness import hamming_map

    generator = torch.Generator().manual_seed(seed)
    got = _signs(link.eval()(codes, hops, snr_db, generator)).numpy().astype(np.int8)
    sent, database = _signs(codes).numpy().astype(np.int8), _signs(db_codes).numpy().astype(np.int8)
    clean = hamming_map(sent, labels, database, db_labels)
    received = hamming_map(got, labels, database, db_labels)
    return {"map_all": received, "map_all_clean": clean, "map_ratio": received / clean if clean else None,
            "bit_agreement": float((got == sent).mean())}


def train_codec(config: CodeLinkConfig, uses: int, train: tuple[np.ndarray, np.ndarray],
                val: tuple[np.ndarray, np.ndarray], steps: int | None = None,
                progress: bool = False) -> tuple[CodeLink, dict]:
    """One codec trained on ``train`` (codes, labels); the checkpoint with the best val score is returned
    (eval mode) with its history. The val score: mean mAP@all ratio of val queries against the train
    codes over ``snr_eval_db`` at the largest of ``hops_train``."""
    codes, labels = torch.from_numpy(np.asarray(train[0], dtype=np.float32)), torch.from_numpy(np.asarray(train[1]))
    _finite(codes, "the train codes")
    val_codes, val_labels = torch.from_numpy(np.asarray(val[0], dtype=np.float32)), np.asarray(val[1])
    db_codes = _signs(codes)  # (N, bits): the training database is the train split's own codes
    torch.manual_seed(config.seed)
    scale = float(codes.std())
    link = build_link(config, codes.shape[1], uses, scale)
    loss_fn = CodeLinkLoss(config.bce_weight, config.retrieval_weight, config.temperature)
    optimizer = torch.optim.AdamW(link.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.steps if steps is None else steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total, pct_start=0.1)
    rng = np.random.default_rng((config.seed, uses))
    noise = torch.Generator().manual_seed(config.seed)
    low, high = config.snr_train_db
    eval_hops = max(config.hops_train)
    history: dict[str, list] = {"step": [], "loss": [], "bits": [], "retrieval": [], "val": []}
    best, best_state, running = -1.0, None, {}
    for step in range(1, total + 1):
        link.train()
        batch = torch.from_numpy(rng.choice(len(codes), min(config.batch_size, len(codes)), replace=False))
        snr = torch.from_numpy(rng.uniform(low, high, len(batch)).astype(np.float32))
        hops = int(rng.choice(config.hops_train))
        terms = loss_fn(link(codes[batch], hops, snr, noise), codes[batch], labels[batch], db_codes, labels)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        schedule.step()
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if step % config.eval_every == 0 or step == total:
            count = config.eval_every if step % config.eval_every == 0 else step % config.eval_every
            points = [link_map(link, val_codes, val_labels, codes, labels.numpy(), eval_hops, s, config.seed)
                      for s in config.snr_eval_db]
            score = float(np.mean([p["map_ratio"] for p in points]))
            history["step"].append(step)
            for k in ("loss", "bits", "retrieval"):
                history[k].append(running.get(k, 0.0) / count)
            history["val"].append({"score": score, "points": points})
            running = {}
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in link.state_dict().items()}
            if progress:
                log.info("n=%d step %d: loss %.4f, val mAP ratio %.3f", uses, step, history["loss"][-1], score)
    link.load_state_dict(best_state)
    history["best_val_score"] = best
    history["best_step"] = history["step"][int(np.argmax([v["score"] for v in history["val"]]))]
    return link.eval(), history


# ----------------------------------------------------------------------------------------------
# Export: what a field unit, a relay and the service run with onnxruntime and numpy


class _Decode(nn.Module):
    """The exported decoder: received (B, 2n), SNR (B,) -> soft code tanh(l / 2) (B, bits)."""

    def __init__(self, decoder: CodeDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, snr_db):
        return soft_code(self.decoder(x, snr_db))


def export_codec(link: CodeLink, config: CodeLinkConfig, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``code_link_encoder.onnx`` (soft code (B, bits), snr_db (B,) -> (B, 2n) channel input),
    ``code_link_decoder.onnx`` (received (B, 2n), snr_db (B,) -> soft code (B, bits)) and their spec
    (serving/model/learned_link.py reads it); each file checked against torch to VERIFY_ATOL."""
    import onnxruntime as ort

    from serving.storage import sha256_file

    from .export import _export

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    link = link.eval()
    bits, uses = link.encoder.bits, link.uses
    rng = np.random.default_rng(0)
    snr = np.array([-5.0, -12.5, 0.0], dtype=np.float32)
    feeds = {"encoder": np.tanh(rng.standard_normal((3, bits))).astype(np.float32),
             "decoder": rng.standard_normal((3, 2 * uses)).astype(np.float32)}
    batch = torch.export.Dim("batch", min=1)
    files = {}
    for name, module, path in (("encoder", link.encoder, out / ENCODER_FILE),
                               ("decoder", _Decode(link.decoder), out / DECODER_FILE)):
        args = (torch.from_numpy(feeds[name]), torch.from_numpy(snr))
        _export(module, args, ["x", "snr_db"], ({0: batch}, {0: batch}), path, "out")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["out"], {"x": feeds[name], "snr_db": snr})[0]
        with torch.no_grad():
            want = module(*args).numpy()
        error = float(np.abs(got - want).max())
        if error > VERIFY_ATOL:
            raise RuntimeError(f"{path}: onnxruntime differs from torch by up to {error:.2e} (> {VERIFY_ATOL})")
        files[name] = {"file": path.name, "sha256": sha256_file(path)}
    spec = {"kind": "code_link", "format_version": 1, "model_version": files["decoder"]["sha256"][:16],
            "bits": bits, "uses": uses, "relay": link.relay, "code_scale": float(link.code_scale),
            "field_input": "tanh(code / code_scale) of the pre-sign code",
            "snr_scale": SNR_SCALE, "snr_train_db": list(config.snr_train_db), "hops_train": list(config.hops_train),
            "power_normalisation": "mean power 1 per complex symbol, per code: x * sqrt(n / ||x||^2)",
            "symbol_layout": "symbol j = real values (2j, 2j+1) of the channel input (I, Q)",
            "decoder_output": "soft code tanh(l / 2) in (-1, 1); its signs are the received code",
            **files, **(extra or {})}
    path = out / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1))
    return path


def train_code_links(config: CodeLinkConfig, students: str | Path, data_dir: str | Path, out: str | Path) -> dict:
    """Every codec of the config, on the cached student codes of the train split, chosen on val; writes
    ``OUT/n<uses>/`` (ONNX and spec), ``OUT/n<uses>.pt`` and ``OUT/code_link.json``."""
    from serving.model.field import student_code_space, student_spec

    out = Path(out)
    data = student_codes(students, data_dir, out, config.student)
    code_space = student_code_space(student_spec(students, config.student))
    train, val = split_codes(data, "train"), split_codes(data, "val")
    if not len(train[0]) or not len(val[0]):
        raise ValueError(f"{data_dir}: needs train and val images ({len(train[0])} and {len(val[0])})")
    codecs = []
    for uses in config.uses:
        started = time.perf_counter()
        link, history = train_codec(config, uses, train, val, progress=True)
        seconds = round(time.perf_counter() - started, 1)
        torch.save({"state_dict": link.state_dict(), "uses": uses, "bits": link.encoder.bits,
                    "config": asdict(config)}, out / f"n{uses}.pt")
        export_codec(link, config, out / f"n{uses}", {"code_space": code_space, "train_seconds": seconds,
                                                      "best_step": history["best_step"]})
        codecs.append({"uses": uses, "seconds": seconds, "best_step": history["best_step"],
                       "best_val_score": history["best_val_score"], "history": history})
    manifest = {"config": asdict(config), "students": str(students), "code_space": code_space, "data": str(data_dir),
                "train_codes": int(len(train[0])), "val_codes": int(len(val[0])), "codecs": codecs}
    (out / "code_link.json").write_text(json.dumps(manifest, indent=1))
    return manifest


__all__ = ["BitBCELoss", "check_code_link_config", "CodeDecoder", "CodeEncoder", "CodeLink", "CodeLinkConfig", "CodeLinkLoss",
           "DatabaseContrastiveLoss", "build_link", "export_codec", "load_code_link_config", "soft_code",
           "split_codes", "student_codes", "train_code_links", "train_codec"]


def main(argv=None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m training.code_link", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu", help="a shipped config (cpu) or a YAML file")
    parser.add_argument("--students", required=True, help="exported students (a run's students/onnx)")
    parser.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Tiny MLPs: one thread is several times faster than two on a shared 2-core machine (no spinning
    # threads waiting for each other on every small matrix product).
    torch.set_num_threads(1)
    manifest = train_code_links(load_code_link_config(args.config), args.students, args.data, args.out)
    for codec in manifest["codecs"]:
        print(f"n={codec['uses']}: {codec['seconds']} s, best val score {codec['best_val_score']:.3f} "
              f"at step {codec['best_step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

