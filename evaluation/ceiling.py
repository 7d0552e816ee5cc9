"""The highest text-to-image R@K any model can reach on a split, given its duplicate captions.

Identical captions get identical codes, hence identical scores against every image and one same
ranking. When a text is the caption of several images of the split, only one of them can be
ranked first for it, only five in the top 5, and so on: its other captions miss at R@1 whatever
the model. On the UCM-Captions test split this caps text-to-image R@1 near 38% and R@5 near 85%
under the standard instance protocol (a caption's ground truth is its own image).

``best_ranks`` gives each caption the best rank its image can have: within a group of identical
texts, the images ordered by how many of the group's captions they own (ties: lower row first),
which maximises the hits at every K at once. ``recall_ceiling`` turns that into R@K bounds in
percent. Captions count as identical when their texts are equal once surrounding and repeated
whitespace is removed: a valid bound for any text encoder (one that also ignores case or
punctuation would make the true ceiling lower still).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


def caption_key(text: str) -> str:
    """The form under which two captions count as the same text."""
    return " ".join(text.split())


def best_ranks(captions: Sequence[str], owners: Sequence[int]) -> np.ndarray:
    """The best rank (1 = first) each caption's own image can reach: int64 (M,).

    ``owners[m]`` is the image of caption ``m`` (any hashable ids of the split's images).
    """
    if len(captions) != len(owners):
        raise ValueError(f"{len(captions)} captions but {len(owners)} owners")
    groups: dict[str, list[int]] = defaultdict(list)
    for m, text in enumerate(captions):
        groups[caption_key(text)].append(m)
    ranks = np.zeros(len(captions), dtype=np.int64)
    for members in groups.values():
        counts = Counter(owners[m] for m in members)
        # The group's one ranking, at best: the images owning most of its captions first.
        order = sorted(counts, key=lambda image: (-counts[image], image))
        position = {image: p for p, image in enumerate(order, start=1)}
        for m in members:
            ranks[m] = position[owners[m]]
    return ranks


def recall_ceiling(captions: Sequence[str], owners: Sequence[int], ks: Iterable[int] = (1, 5, 10)) -> dict:
    """Upper bounds on text-to-image R@K (percent) from duplicate captions: {"r1": ..., ...},
    with the numbers of captions and distinct texts; None without captions."""
    if not len(captions):
        return None
    ranks = best_ranks(captions, owners)
    bounds = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    return {**bounds, "captions": len(captions), "distinct_captions": len({caption_key(c) for c in captions})}


def footnote(ceiling: dict | None, split: str) -> str | None:
    """One line for a printed table, or None without captions."""
    if not ceiling:
        return None
    bounds = ", ".join(f"R@{k[1:]} {v:.1f}" for k, v in ceiling.items() if k.startswith("r"))
    return (f"* R@K ceiling of text_to_image on the {split} queries: {bounds} (identical captions get identical "
            f"codes; {ceiling['distinct_captions']} distinct texts among {ceiling['captions']} captions)")
