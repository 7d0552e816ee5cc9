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
MODULATIONS = ("bpsk", "qpsk")  # of the repetition scheme
LEARNED = "learned"  # the scheme name of a learned codec's points (seeded after the repetition modulations)


def _seed(seed: int, scheme: str, hops: int, snr_db: float, n: int) -> tuple[int, ...]:
    """One point's noise entropy (numpy's SeedSequence takes non-negative integers, so the SNR is offset);
    ``scheme``: a repetition modulation or ``learned``."""
    return seed, (*MODULATIONS, LEARNED).index(scheme), hops, int(round(snr_db * 100)) + 100_000, n


def link_points(q_codes: np.ndarray, q_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray,
                hops: Sequence[int] = HOPS, snrs_db: Sequence[float] = SNRS_DB, uses: Sequence[int] = USES,
                modulations: Sequence[str] = MODULATIONS, seed: int = 0, learned: Sequence = ()) -> dict:
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
    for modulation in modulations:
        for hop_count in hops:
            for snr in snrs_db:
                for n in uses:
                    point = {"protocol": "code", "scheme": "repetition", "modulation": modulation,
                             "hops": int(hop_count), "snr_db": float(snr), "channel_uses": int(n)}
                    if not carries(modulation, bits, n):
                        points.append({**point, "carried": False})
                        continue
                    rng = np.random.default_rng(_seed(seed, modulation, hop_count, snr, n))
                    received = send_over_hops(sent, hop_count, snr, n, rng, scheme=modulation)
                    got = hamming_map(received.signs, q_labels, database, db_labels)
                    scores = asymmetric_scores(received.soft, database)  # (Q, N), higher is closer
                    soft = mean_average_precision(scores, relevance, descending=True)
                    points.append({**point, "carried": True, "repeats": Repetition(modulation, bits, n).repeats,
                                   "map_all": got, "map_ratio": got / clean if clean else None,
                                   "map_all_soft": soft, "bit_agreement": float((received.signs == sent).mean()),
                                   "bit_agreement_theory": 1.0 - bit_error_rate(snr, n, bits, modulation, hop_count)})
    for codec in learned:
        if codec.bits != bits:
            raise ValueError(f"{codec.folder}: a codec for {codec.bits}-bit codes, the student's have {bits}")
        for hop_count in hops:
            for snr in snrs_db:
                rng = np.random.default_rng(_seed(seed, LEARNED, hop_count, snr, codec.uses))
                received = codec.send_over_hops(q_codes, int(hop_count), snr, rng)
                got = hamming_map(received.signs, q_labels, database, db_labels)
                soft = mean_average_precision(asymmetric_scores(received.soft, database), relevance, descending=True)
                points.append({"protocol": "code", "scheme": LEARNED, "modulation": None, "hops": int(hop_count),
                               "snr_db": float(snr), "channel_uses": int(codec.uses), "carried": True, "repeats": None, "map_all": got,
                               "map_ratio": got / clean if clean else None, "map_all_soft": soft,
                               "bit_agreement": float((received.signs == sent).mean()),
                               "bit_agreement_theory": None, "codec": str(codec.folder)})
    return {"bits": int(bits), "map_all_clean": clean, "points": points}


def evaluate_code_link(model_dir: str | Path, data_dir: str | Path, variant: str = "auto", seed: int = 0,
                       hops: Sequence[int] = HOPS, snrs_db: Sequence[float] = SNRS_DB, uses: Sequence[int] = USES,
                       modulations: Sequence[str] = MODULATIONS, learned: str | Path | None = None,
                       split: str = "test") -> dict:
    """The table: the images of ``split`` as queries (``retrieval.choose_rows``; ``test`` against train + val,
    ``val`` against train, where choices are made); ``learned``: a folder of learned codecs
    (``n<uses>/code_link.spec.json``) to measure beside repetition."""
    from serving.ingest.dataset import load_dataset
    from serving.model.field import encode_images, student_spec
    from serving.model.learned_link import load_codecs
    from serving.model.spec import load_spec

    from .retrieval import choose_rows, database_splits

    dataset = load_dataset(data_dir)
    records = list(dataset.records)
    labels = np.asarray(dataset.label_ids(records), dtype=np.int64)

    def rows(*splits: str) -> np.ndarray:
        return np.asarray([r.index for r in dataset.split(*splits)], dtype=np.int64)

    if split not in ("test", "val"):
        raise ValueError(f"the queries are the test or the val split, not {split!r}")
    q_rows, db_rows, database = choose_rows(rows(split), rows(*database_splits(split)), len(records), split)
    if database["rule"] != "splits":
        raise ValueError(f"{data_dir}: needs a {split} split and its database splits ({database['why']})")
    codecs = load_codecs(learned) if learned is not None else []
    spec = student_spec(model_dir, variant)
    started = time.perf_counter()
    codes = encode_images(spec, [str(records[r].path) for r in np.concatenate([q_rows, db_rows])])  # (Q + N, bits)
    encoded_s = time.perf_counter() - started
    report = link_points(codes[:len(q_rows)], labels[q_rows], codes[len(q_rows):], labels[db_rows],
                         hops, snrs_db, uses, modulations, seed, codecs)
    quantization = str(load_spec(spec).data.get("quantization", "none"))
    return {"student": {"spec": str(spec), "quantization": quantization}, "data": str(data_dir), "split": split,
            "queries": int(len(q_rows)), "database": database, "seed": seed, "encode_s": round(encoded_s, 1),
            **report}


def format_points(report: dict) -> str:
    against = "train+val" if report.get("split", "test") == "test" else "train"
    lines = [f"{report['queries']} {report.get('split', 'test')} queries against {report['database']['images']} "
             f"{against} images, "
             f"{report['bits']}-bit codes ({report['student']['quantization']} student); clean mAP@all "
             f"{report['map_all_clean']:.4f}",
             f"{'scheme':<11}{'hops':>5}{'SNR':>6}{'uses':>6}{'r':>5}{'bits':>8}{'theory':>8}{'mAP':>8}{'ratio':>8}"
             f"{'soft':>8}"]
    for p in report["points"]:
        head = f"{p['modulation'] or p['scheme']:<11}{p['hops']:>5}{p['snr_db']:>6g}{p['channel_uses']:>6}"
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
    parser.add_argument("--modulations", nargs="+", choices=MODULATIONS, default=list(MODULATIONS),
                        help="modulations, each with repetition (default: %(default)s)")
    parser.add_argument("--learned", help="a folder of learned codecs (python -m training.code_link --out) to "
                        "measure beside repetition")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="queries: the test split against train+val, or val against train (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the channel noise (default: %(default)s)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    report = evaluate_code_link(args.model, args.data, args.variant, args.seed, args.hops, args.snr, args.uses,
                                args.modulations, args.learned, args.split)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_points(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
