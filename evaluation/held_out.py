"""Classes held out from training: the closest local stand-in for an archive of scenes a model never saw.

Splits a Karpathy-style dataset by class into two sets written beside each other, images referenced
in place (never copied; the source dataset is never written to):

``OUT/seen/dataset_seen.json``      every image of the seen classes, with its captions and split:
                                    what ``terrahash train --data OUT/seen`` trains on;
``OUT/unseen/dataset_unseen.json``  every image of the held-out classes, image-only and split-less
                                    (no captions, no split): ``terrahash eval --data OUT/unseen``
                                    ranks it leave-one-out by its own classes, as a transfer figure.

The held-out classes are named (``--classes``) or drawn (``--count`` of them, seeded by ``--seed``);
``OUT/held_out.json`` records which, from which source, so a figure can say what it measured.

``python -m evaluation.held_out --data DIR --out OUT [--count 7 --seed 0 | --classes A,B,...]``
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GENERATOR = "evaluation.held_out"


class HeldOutError(ValueError):
    """Options that cannot make a held-out split, with the reason."""


def choose_classes(classes: Sequence[str], count: int | None = None, names: Sequence[str] = (),
                   seed: int = 0) -> list[str]:
    """The held-out classes: ``names`` if given (each must exist), else ``count`` drawn by ``seed``;
    at least one class stays on each side."""
    classes = sorted(set(classes))
    if names:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise HeldOutError(f"unknown classes {unknown}; the dataset has {classes}")
        chosen = sorted(set(names))
    else:
        if count is None:
            raise HeldOutError("name the held-out classes (--classes) or how many to draw (--count)")
        chosen = sorted(classes[i] for i in np.random.default_rng(seed).permutation(len(classes))[:count])
    if not 0 < len(chosen) < len(classes):
        raise HeldOutError(f"{len(chosen)} of {len(classes)} classes held out: leave at least one on each side")
    return chosen


def write_held_out(data: str | Path, out: str | Path, count: int | None = None, names: Sequence[str] = (),
                   seed: int = 0) -> dict:
    """Write the seen and unseen sets (module docstring); returns the record in ``held_out.json``."""
    from serving.ingest.dataset import KARPATHY, load_dataset

    dataset = load_dataset(data, check_images=False)
    if dataset.layout != KARPATHY:
        raise HeldOutError(f"{data}: a Karpathy-style dataset with captions is needed to train on the seen classes")
    held = set(choose_classes(dataset.classes, count, names, seed))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HeldOutError(f"{out} exists and is not empty; choose a new folder")
    document = json.loads(Path(dataset.json_path).read_text())
    seen, unseen = [], []
    for entry, record in zip(document["images"], dataset.records, strict=True):  # unchecked: none left out
        path = Path(record.path).resolve()
        moved = {**entry, "filepath": str(path.parent), "filename": path.name}
        if entry.get("class") in held:
            unseen.append({k: v for k, v in moved.items() if k not in ("sentences", "split", "sentids")})
        else:
            seen.append(moved)
    record = {"generator": GENERATOR, "source": str(Path(dataset.json_path).resolve()), "seed": seed,
              "held_out": sorted(held), "seen": sorted(set(dataset.classes) - held),
              "images": {"seen": len(seen), "unseen": len(unseen)}}
    for name, images in (("seen", seen), ("unseen", unseen)):
        (out / name).mkdir(parents=True)
        (out / name / f"dataset_{name}.json").write_text(
            json.dumps({"dataset": f"{dataset.name}_{name}", "images": images}))
    (out / "held_out.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.held_out",
        description="Split a captioned dataset by class: the seen classes to train on (OUT/seen), the held-out "
                    "ones as an image-only set to evaluate transfer on (OUT/unseen).")
    parser.add_argument("--data", required=True, help="a Karpathy-style dataset folder or JSON file")
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument("--count", type=int, help="how many classes to hold out, drawn by --seed")
    parser.add_argument("--classes", default="", help="comma-separated class names to hold out instead")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --count classes (default 0)")
    args = parser.parse_args(argv)
    try:
        record = write_held_out(args.data, args.out, args.count,
                                [c for c in args.classes.split(",") if c], args.seed)
    except (HeldOutError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"held out {', '.join(record['held_out'])}: {record['images']['unseen']} images in {args.out}/unseen; "
          f"{len(record['seen'])} classes ({record['images']['seen']} images) in {args.out}/seen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
