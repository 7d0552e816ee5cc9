"""Field queries sent as hash codes over a noisy multi-hop radio link: how well the received code retrieves.

The field unit encodes its photo with the exported image student (the int8 variant when the folder has
one, as a field unit would run it) and sends the code's signs with repetition-coded BPSK or QPSK over
``hops`` decode-and-forward hops of ``n`` complex channel uses each, at one per-hop SNR
(serving/model/code_link.py; the channel conventions of training/jscc.py, so the figures sit beside
``terrahash jscc eval``'s at the same SNR and the same number of channel uses).

Protocol: ``terrahash eval``'s. The test split's images are the queries, the train + val images the
database, both encoded by the same student; relevance is the scene class; ranking by Hamming distance of
the received hard code against the clean database codes, ties by distance then database row. Per point:

- ``map_all``: mAP@all of the received hard codes, beside ``map_all_clean`` (the queries' own codes) and
  their ratio ``map_ratio``;
- ``map_all_soft``: the received soft values ranked asymmetrically (inner product with the database's
  +-1 codes, evaluation/metrics.py), what a service storing only bits can do with them;
- ``bit_agreement``: the share of received bits equal to the clean code's, beside ``bit_agreement_theory``
  (1 minus code_link.bit_error_rate).

With ``--learned DIR`` the learned codecs of training/code_link.py (each ``DIR/n<uses>/``, run with
onnxruntime and numpy by serving/model/learned_link.py: what a field unit, its relays and the service
would run) are measured at the same hops and SNRs, as scheme ``learned`` at their own ``n``, beside
repetition at the same ``n``; they have no theoretical bit agreement.

An ``n`` whose uses do not hold a whole number of copies of the code (BPSK needs 64 uses for a 64-bit
code: below that the code does not fit and nothing is sent) is listed as not carried, without figures.
The noise of each point comes from ``np.random.default_rng((seed, scheme, hops, SNR, n))``, so a rerun
gives the same table.

    python -m evaluation.code_link_eval --model runs/fast_split-64/students/onnx [--data DIR] [--json FILE]
        [--learned runs/code-link]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HOPS = (1, 2, 3, 4)
SNRS_DB = (-5.0, -10.0, -15.0)
USES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SCHEMES = ("bpsk", "qpsk")
LEARNED = "learned"  # the scheme name of a learned codec's points (seeded after the repetition schemes)
BATCH = 32  # images per ONNX call


def student_spec(model_dir: str | Path, variant: str = "auto") -> Path:
    """The image student's spec in an exported students folder (or a run's ``students/onnx``): ``int8``,
    ``fp32``, or ``auto`` (int8 when there is one)."""
    from serving.model.versions import find_spec, resolve_model

    folder = resolve_model(model_dir)
    if variant != "auto":
        return find_spec(folder, "image", variant)
    try:
        return find_spec(folder, "image", "int8")
    except FileNotFoundError:
        return find_spec(folder, "image", "fp32")


def encode_images(spec: Path, paths: Sequence[str | Path]) -> np.ndarray:
    """(N, bits) continuous codes of image files by the ONNX image student of ``spec``."""
    from serving.model.encoders import ImageEncoder

    encoder = ImageEncoder(spec)
    return np.concatenate([encoder.encode(list(paths[i:i + BATCH])) for i in range(0, len(paths), BATCH)])


def _seed(seed: int, scheme: str, hops: int, snr_db: float, n: int) -> tuple[int, ...]:
    """One point's noise entropy (numpy's SeedSequence takes non-negative integers, so the SNR is offset)."""
    return seed, (*SCHEMES, LEARNED).index(scheme), hops, int(round(snr_db * 100)) + 100_000, n


def link_points(q_codes: np.ndarray, q_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray,
                hops: Sequence[int] = HOPS, snrs_db: Sequence[float] = SNRS_DB, uses: Sequence[int] = USES,
                schemes: Sequence[str] = SCHEMES, seed: int = 0, learned: Sequence = ()) -> dict:
    """The grid's points for query codes (Q, bits) against database codes (N, bits), both continuous or +-1;
    ``learned``: serving.model.learned_link.LearnedLink codecs, sent the queries' pre-sign codes."""
    from serving.model.code_link import Repetition, bit_error_rate, carries, send_over_hops

    from .metrics import asymmetric_scores, mean_average_precision, relevance_from_labels
    from .retrieval import signs
    from .robustness import hamming_map

    sent, database = signs(q_codes), signs(db_codes)
    bits = sent.shape[1]
    clean = hamming_map(sent, q_labels, database, db_labels)
    relevance = relevance_from_labels(q_labels, db_labels)
    points = []
    for scheme in schemes:
        for hop_count in hops:
            for snr in snrs_db:
                for n in uses:
                    point = {"scheme": scheme, "hops": int(hop_count), "snr_db": float(snr), "uses": int(n)}
                    if not carries(scheme, bits, n):
                        points.append({**point, "carried": False})
                        continue
                    rng = np.random.default_rng(_seed(seed, scheme, hop_count, snr, n))
                    received = send_over_hops(sent, hop_count, snr, n, rng, scheme=scheme)
                    got = hamming_map(received.signs, q_labels, database, db_labels)
                    scores = asymmetric_scores(received.soft, database)  # (Q, N), higher is closer
                    soft = mean_average_precision(scores, relevance, descending=True)
                    points.append({**point, "carried": True, "repeats": Repetition(scheme, bits, n).repeats,
                                   "map_all": got, "map_ratio": got / clean if clean else None,
                                   "map_all_soft": soft, "bit_agreement": float((received.signs == sent).mean()),
                                   "bit_agreement_theory": 1.0 - bit_error_rate(snr, n, bits, scheme, hop_count)})
    for codec in learned:
        if codec.bits != bits:
            raise ValueError(f"{codec.folder}: a codec for {codec.bits}-bit codes, the student's have {bits}")
        for hop_count in hops:
            for snr in snrs_db:
                rng = np.random.default_rng(_seed(seed, LEARNED, hop_count, snr, codec.uses))
                received = codec.send_over_hops(q_codes, int(hop_count), snr, rng)
                got = hamming_map(received.signs, q_labels, database, db_labels)
                soft = mean_average_precision(asymmetric_scores(received.soft, database), relevance, descending=True)
                points.append({"scheme": LEARNED, "hops": int(hop_count), "snr_db": float(snr),
                               "uses": int(codec.uses), "carried": True, "repeats": None, "map_all": got,
                               "map_ratio": got / clean if clean else None, "map_all_soft": soft,
                               "bit_agreement": float((received.signs == sent).mean()),
                               "bit_agreement_theory": None, "codec": str(codec.folder)})
    return {"bits": int(bits), "map_all_clean": clean, "points": points}


def evaluate_code_link(model_dir: str | Path, data_dir: str | Path, variant: str = "auto", seed: int = 0,
                       hops: Sequence[int] = HOPS, snrs_db: Sequence[float] = SNRS_DB, uses: Sequence[int] = USES,
                       schemes: Sequence[str] = SCHEMES, learned: str | Path | None = None) -> dict:
    """The table: the test split's images as queries (``retrieval.choose_rows``), train + val as the database;
    ``learned``: a folder of learned codecs (``n<uses>/code_link.spec.json``) to measure beside repetition."""
    from serving.ingest.dataset import load_dataset
    from serving.model.spec import load_spec

    from .retrieval import choose_rows, database_splits

    dataset = load_dataset(data_dir)
    records = list(dataset.records)
    labels = np.asarray(dataset.label_ids(records), dtype=np.int64)

    def rows(*splits: str) -> np.ndarray:
        return np.asarray([r.index for r in dataset.split(*splits)], dtype=np.int64)

    q_rows, db_rows, database = choose_rows(rows("test"), rows(*database_splits("test")), len(records), "test")
    if database["rule"] != "splits":
        raise ValueError(f"{data_dir}: needs a test split and a train + val database ({database['why']})")
    codecs = learned_codecs(learned) if learned is not None else []
    spec = student_spec(model_dir, variant)
    started = time.perf_counter()
    codes = encode_images(spec, [str(records[r].path) for r in np.concatenate([q_rows, db_rows])])  # (Q + N, bits)
    encoded_s = time.perf_counter() - started
    report = link_points(codes[:len(q_rows)], labels[q_rows], codes[len(q_rows):], labels[db_rows],
                         hops, snrs_db, uses, schemes, seed, codecs)
    quantization = str(load_spec(spec).data.get("quantization", "none"))
    return {"student": {"spec": str(spec), "quantization": quantization}, "data": str(data_dir),
            "queries": int(len(q_rows)), "database": database, "seed": seed, "encode_s": round(encoded_s, 1),
            **report}


def learned_codecs(folder: str | Path) -> list:
    """The learned codecs under ``folder`` (each a subfolder with ``code_link.spec.json``), by ``n``."""
    from serving.model.learned_link import SPEC_FILE, LearnedLink

    specs = sorted(Path(folder).glob(f"*/{SPEC_FILE}"))
    if not specs:
        raise FileNotFoundError(f"{folder}: no learned codec (*/{SPEC_FILE})")
    return sorted((LearnedLink(spec.parent) for spec in specs), key=lambda codec: codec.uses)


def format_points(report: dict) -> str:
    lines = [f"{report['queries']} test queries against {report['database']['images']} train+val images, "
             f"{report['bits']}-bit codes ({report['student']['quantization']} student); clean mAP@all "
             f"{report['map_all_clean']:.4f}",
             f"{'scheme':<7}{'hops':>5}{'SNR':>6}{'uses':>6}{'r':>5}{'bits':>8}{'theory':>8}{'mAP':>8}{'ratio':>8}"
             f"{'soft':>8}"]
    for p in report["points"]:
        head = f"{p['scheme']:<7}{p['hops']:>5}{p['snr_db']:>6g}{p['uses']:>6}"
        if not p["carried"]:
            lines.append(f"{head}  not carried")
            continue
        repeats = "-" if p["repeats"] is None else p["repeats"]
        theory = "-" if p["bit_agreement_theory"] is None else f"{p['bit_agreement_theory']:.3f}"
        lines.append(f"{head}{repeats:>5}{p['bit_agreement']:>8.3f}{theory:>8}"
                     f"{p['map_all']:>8.4f}{p['map_ratio']:>8.3f}{p['map_all_soft']:>8.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.code_link_eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="exported students (a folder of *.spec.json, or a run whose students/onnx holds them)")
    parser.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"),
                        help="dataset folder (default: %(default)s, or $TERRAHASH_DATA)")
    parser.add_argument("--variant", choices=("auto", "int8", "fp32"), default="auto",
                        help="the image student: int8, fp32, or int8 when there is one (default: %(default)s)")
    parser.add_argument("--hops", type=int, nargs="+", default=list(HOPS), help="hop counts (default: %(default)s)")
    parser.add_argument("--snr", type=float, nargs="+", default=list(SNRS_DB),
                        help="per-hop SNRs, dB (default: %(default)s)")
    parser.add_argument("--uses", type=int, nargs="+", default=list(USES),
                        help="complex channel uses per code (default: %(default)s)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES),
                        help="modulations, each with repetition (default: %(default)s)")
    parser.add_argument("--learned", help="a folder of learned codecs (python -m training.code_link --out) to "
                        "measure beside repetition")
    parser.add_argument("--seed", type=int, default=0, help="seed of the channel noise (default: %(default)s)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    report = evaluate_code_link(args.model, args.data, args.variant, args.seed, args.hops, args.snr, args.uses,
                                args.schemes, args.learned)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_points(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
