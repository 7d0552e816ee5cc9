"""The retrieval protocol: which queries, which database, which relevance, which figures.

Class-level figures (``map_*``, ``p_at_10``) rank a database of other splits' items for each
query of the evaluated split (``DATABASE_SPLITS``: val against train only, as checkpoint
selection ranks it, so no test item is ever seen; test against train + val), relevance = same
scene class. Instance figures (``r1/r5/r10``, ``mr``)
follow the RS image-text retrieval literature: computed on the split alone, a caption's ground
truth is its image, an image's ground truth is its captions. Binary codes are ranked by Hamming
distance, float codes by cosine similarity; ties go to the lower database id in both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics


TASKS = ("image_to_image", "text_to_image", "image_to_text")

# The splits whose items the queries of each split are ranked against. Val chooses checkpoints,
# so it never sees test; test is ranked against everything a model may have seen.
DATABASE_SPLITS = {"train": ("val", "test"), "val": ("train",), "test": ("train", "val")}


def database_splits(query_split: str) -> tuple[str, ...]:
    """The database splits of ``query_split`` (``DATABASE_SPLITS``); an unknown split is an error."""
    if query_split not in DATABASE_SPLITS:
        raise ValueError(f"unknown query split {query_split!r}; known: {list(DATABASE_SPLITS)}")
    return DATABASE_SPLITS[query_split]


@dataclass
class SplitCodes:
    """Codes of one side of the protocol: images, their captions, and who owns what."""

    images: np.ndarray  # (N, nbits) codes of the images
    image_labels: np.ndarray  # (N,) class index of each image
    captions: np.ndarray  # (M, nbits) codes of the captions
    caption_owner: np.ndarray  # (M,) row in ``images`` of each caption's image

    @property
    def caption_labels(self) -> np.ndarray:
        return self.image_labels[self.caption_owner]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T  # (Q, N)


def _scores(queries: np.ndarray, db: np.ndarray, binary: bool) -> tuple[np.ndarray, bool]:
    """(score matrix, descending?) for the chosen similarity."""
    if binary:
        return metrics.hamming_distances(queries, db), False
    return _cosine(queries.astype(np.float64), db.astype(np.float64)), True


def retrieval_figures(query: SplitCodes, database: SplitCodes, binary: bool = True) -> dict:
    """All figures of the protocol for one split as queries, as a nested dict.

    With ``binary`` the codes must be {-1, +1} (or {0, 1}); otherwise they are continuous and
    ranked by cosine similarity (the float baseline the hash codes are measured against).
    """
    i2i, desc = _scores(query.images, database.images, binary)
    i2i_rel = metrics.relevance_from_labels(query.image_labels, database.image_labels)
    t2i, _ = _scores(query.captions, database.images, binary)
    t2i_rel = metrics.relevance_from_labels(query.caption_labels, database.image_labels)
    i2t, _ = _scores(query.images, database.captions, binary)
    i2t_rel = metrics.relevance_from_labels(query.image_labels, database.caption_labels)

    # Instance protocol on the split alone.
    t2i_own, _ = _scores(query.captions, query.images, binary)
    t2i_gt = query.caption_owner[:, None] == np.arange(len(query.images))[None, :]  # (M, N)
    i2t_own, _ = _scores(query.images, query.captions, binary)
    r_t2i = metrics.recall_at_k(t2i_own, t2i_gt, descending=desc)
    r_i2t = metrics.recall_at_k(i2t_own, t2i_gt.T, descending=desc)

    return {
        "image_to_image": {
            "map_all": metrics.mean_average_precision(i2i, i2i_rel, descending=desc),
            "map_50": metrics.mean_average_precision(i2i, i2i_rel, k=50, descending=desc),
            "p_at_10": metrics.precision_at_k(i2i, i2i_rel, k=10, descending=desc),
        },
        "text_to_image": {
            "map_all": metrics.mean_average_precision(t2i, t2i_rel, descending=desc),
            "r1": r_t2i[1], "r5": r_t2i[5], "r10": r_t2i[10],
        },
        "image_to_text": {
            "map_all": metrics.mean_average_precision(i2t, i2t_rel, descending=desc),
            "r1": r_i2t[1], "r5": r_i2t[5], "r10": r_i2t[10],
        },
        "mr": metrics.mean_recall(r_t2i, r_i2t),
    }


def image_pr_curve(query: SplitCodes, database: SplitCodes) -> dict:
    """Image-to-image precision and recall at each Hamming radius, as lists (for JSON and plots)."""
    relevance = metrics.relevance_from_labels(query.image_labels, database.image_labels)
    curve = metrics.precision_recall_curve(query.images, database.images, relevance)
    return {name: np.asarray(values).tolist() for name, values in curve.items()}


def format_table(binary: dict, floats: dict | None = None, title: str = "") -> str:
    """The figures as a plain-text table, binary beside float when given."""
    rows = [(f"{task}.{name}", value) for task in TASKS for name, value in binary[task].items()]
    rows.append(("mr", binary["mr"]))
    lines = [title] if title else []
    lines.append(f"{'metric':<24}{'binary':>10}" + (f"{'float':>10}" if floats else ""))
    for key, value in rows:
        task, _, name = key.partition(".")
        other = (floats[task][name] if name else floats[task]) if floats else None
        lines.append(f"{key:<24}{value:>10.4f}" + (f"{other:>10.4f}" if other is not None else ""))
    return "\n".join(lines)


def split_codes(images: np.ndarray, captions: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray],
                rows: np.ndarray) -> SplitCodes:
    """The codes of the given image rows and of their captions (``captions_of[row]``: that image's
    caption rows), with caption owners local to ``rows``."""
    caption_rows = np.concatenate([captions_of[r] for r in rows])
    owner = np.repeat(np.arange(len(rows)), [len(captions_of[r]) for r in rows])
    return SplitCodes(images[rows], labels[rows], captions[caption_rows], owner)


def _signs(codes: SplitCodes) -> SplitCodes:
    sign = lambda x: np.where(x >= 0, 1, -1).astype(np.int8)  # noqa: E731  (as training's binarize: 0 -> +1)
    return SplitCodes(sign(codes.images), codes.image_labels, sign(codes.captions), codes.caption_owner)


def evaluate_rows(images: np.ndarray, captions: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray],
                  query_rows: np.ndarray, db_rows: np.ndarray, pr_curve: bool = False) -> dict:
    """Binary and float figures of the query rows against the database rows, from continuous codes:
    ``images`` (N, nbits), ``captions`` (M, nbits), ``labels`` (N,) and each image's caption rows."""
    query = split_codes(images, captions, labels, captions_of, query_rows)
    database = split_codes(images, captions, labels, captions_of, db_rows)
    figures = {"binary": retrieval_figures(_signs(query), _signs(database), binary=True),
               "float": retrieval_figures(query, database, binary=False)}
    if pr_curve:
        figures["pr_curve"] = image_pr_curve(_signs(query), _signs(database))
    return figures
