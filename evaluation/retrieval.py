"""The retrieval protocol: which queries, which database, which relevance, which figures.

Class-level figures (``map_*``, ``p_at_10``) rank a database of other splits' items for each
query of the evaluated split (``DATABASE_SPLITS``: val against train only, as checkpoint
selection ranks it, so no test item is ever seen; test against train + val), relevance = same
scene class. Instance figures (``r1/r5/r10``, ``mr``)
follow the RS image-text retrieval literature: computed on the split alone, a caption's ground
truth is its image, an image's ground truth is its captions.

Three similarities (``SIMILARITIES``, the report's keys): ``binary`` ranks sign codes on both
sides by Hamming distance; ``asymmetric`` scores the query's continuous (pre-sign) code by inner
product with every binary database code, the whole database ranked; ``float`` ranks continuous
codes on both sides by cosine similarity. Ties go to the lower database id in all three.

A dataset without the splits the protocol needs (no split field, or an empty query split or
database) is evaluated leave-one-out (``LEAVE_ONE_OUT``): every image is a query against all the
others, never against itself (nor its own captions). Splits with no captions give only the
image-to-image figures; the text ones are None.
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


# How the report's "database" entry names the rule used when the splits cannot be.
LEAVE_ONE_OUT = "leave_one_out"
SPLITS = "splits"

# Report keys of the three ways of ranking, and the similarity each one uses.
SIMILARITIES = {"binary": "hamming", "asymmetric": "asymmetric", "float": "cosine"}


def choose_rows(query_rows: np.ndarray, db_rows: np.ndarray, n_images: int, query_split: str) -> tuple:
    """(query rows, database rows, the report's "database" entry) for ``query_split``.

    The protocol's rows when the split and its database both hold images; otherwise every image
    of the dataset against all the others (leave-one-out: a query's own image is never ranked).
    """
    if len(query_rows) and len(db_rows):
        return query_rows, db_rows, {"rule": SPLITS, "splits": list(database_splits(query_split)),
                                     "images": int(len(db_rows))}
    if n_images < 2:
        raise ValueError(f"leave-one-out evaluation needs at least 2 images, the dataset has {n_images}")
    why = (f"split {query_split!r} has no images" if not len(query_rows)
           else f"its database splits {list(database_splits(query_split))} have no images")
    everything = np.arange(n_images, dtype=np.int64)
    return everything, everything, {"rule": LEAVE_ONE_OUT, "splits": [], "images": int(n_images),
                                    "why": why, "queries": "every image, against all the others (never itself)"}


@dataclass
class SplitCodes:
    """Codes of one side of the protocol: images, their captions, and who owns what."""

    images: np.ndarray  # (N, nbits) codes of the images
    image_labels: np.ndarray  # (N,) class index of each image
    captions: np.ndarray  # (M, nbits) codes of the captions (M may be 0)
    caption_owner: np.ndarray  # (M,) row in ``images`` of each caption's image
    image_ids: np.ndarray | None = None  # (N,) dataset rows: a query never retrieves its own image or captions

    @property
    def caption_labels(self) -> np.ndarray:
        return self.image_labels[self.caption_owner]

    @property
    def caption_ids(self) -> np.ndarray | None:
        return None if self.image_ids is None else self.image_ids[self.caption_owner]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T  # (Q, N)


def scores(queries: np.ndarray, db: np.ndarray, similarity: str) -> tuple[np.ndarray, bool]:
    """(score matrix (Q, N), descending?) of queries against database codes.

    ``hamming``: both sides binary; ``asymmetric``: continuous queries, binary database (inner
    product); ``cosine``: both sides continuous.
    """
    if similarity == "hamming":
        return metrics.hamming_distances(queries, db), False
    if similarity == "asymmetric":
        return metrics.asymmetric_scores(queries, db), True
    if similarity == "cosine":
        return _cosine(queries.astype(np.float64), db.astype(np.float64)), True
    raise ValueError(f"unknown similarity {similarity!r}; known: hamming, asymmetric, cosine")


def _same(query_ids: np.ndarray | None, db_ids: np.ndarray | None) -> np.ndarray | None:
    """Mask (Q, N) of database items that are the query's own image, or None if there are none."""
    if query_ids is None or db_ids is None:
        return None
    mask = query_ids[:, None] == db_ids[None, :]
    return mask if mask.any() else None


def _class_figures(q: np.ndarray, db: np.ndarray, q_labels, db_labels, similarity: str, exclude,
                   names: tuple[str, ...]) -> dict:
    """The class-relevance figures ``names`` (map_all, map_50, p_at_10) of q against db."""
    score, desc = scores(q, db, similarity)
    rel = metrics.relevance_from_labels(q_labels, db_labels)
    compute = {
        "map_all": lambda: metrics.mean_average_precision(score, rel, descending=desc, exclude=exclude),
        "map_50": lambda: metrics.mean_average_precision(score, rel, k=50, descending=desc, exclude=exclude),
        "p_at_10": lambda: metrics.precision_at_k(score, rel, k=10, descending=desc, exclude=exclude),
    }
    return {name: compute[name]() for name in names}


def retrieval_figures(query: SplitCodes, database: SplitCodes, similarity: str = "hamming",
                      own: SplitCodes | None = None) -> dict:
    """All figures of the protocol for one split as queries, as a nested dict.

    ``similarity`` is one of ``scores``'s: with ``hamming`` the codes must be {-1, +1} (or
    {0, 1}); with ``cosine`` they are continuous (the float baseline the hash codes are measured
    against); with ``asymmetric`` the query codes are continuous and the database's binary.
    ``own`` is the query split as a database for the instance figures (default ``query``; the
    split's binary codes for ``asymmetric``). Without query captions the text figures are None;
    without database captions image-to-text mAP is.
    """
    own = query if own is None else own
    figures = {"image_to_image": _class_figures(query.images, database.images, query.image_labels,
                                                database.image_labels, similarity,
                                                _same(query.image_ids, database.image_ids),
                                                ("map_all", "map_50", "p_at_10")),
               "text_to_image": None, "image_to_text": None, "mr": None}
    if not len(query.captions):
        return figures

    # Instance protocol on the split alone.
    t2i_own, desc = scores(query.captions, own.images, similarity)
    t2i_gt = query.caption_owner[:, None] == np.arange(len(query.images))[None, :]  # (M, N)
    i2t_own, _ = scores(query.images, own.captions, similarity)
    r_t2i = metrics.recall_at_k(t2i_own, t2i_gt, descending=desc)
    r_i2t = metrics.recall_at_k(i2t_own, t2i_gt.T, descending=desc)

    t2i = _class_figures(query.captions, database.images, query.caption_labels, database.image_labels,
                         similarity, _same(query.caption_ids, database.image_ids), ("map_all",))
    i2t = (_class_figures(query.images, database.captions, query.image_labels, database.caption_labels,
                          similarity, _same(query.image_ids, database.caption_ids), ("map_all",))
           if len(database.captions) else {"map_all": None})
    figures["text_to_image"] = {**t2i, "r1": r_t2i[1], "r5": r_t2i[5], "r10": r_t2i[10]}
    figures["image_to_text"] = {**i2t, "r1": r_i2t[1], "r5": r_i2t[5], "r10": r_i2t[10]}
    figures["mr"] = metrics.mean_recall(r_t2i, r_i2t)
    return figures


def per_class_figures(query: SplitCodes, database: SplitCodes, class_names) -> dict:
    """{"image_to_image": {class: mAP@all}, "text_to_image": {...} or None} of binary codes (Hamming)."""
    def by_class(q, q_labels, q_ids):
        score, desc = scores(q, database.images, "hamming")
        rel = metrics.relevance_from_labels(q_labels, database.image_labels)
        found = metrics.per_class_average_precision(score, rel, q_labels, descending=desc,
                                                    exclude=_same(q_ids, database.image_ids))
        return {str(class_names[int(label)]): value for label, value in found.items()}

    return {"image_to_image": by_class(query.images, query.image_labels, query.image_ids),
            "text_to_image": by_class(query.captions, query.caption_labels, query.caption_ids)
            if len(query.captions) else None}


def image_pr_curve(query: SplitCodes, database: SplitCodes) -> dict:
    """Image-to-image precision and recall at each Hamming radius, as lists (for JSON and plots)."""
    relevance = metrics.relevance_from_labels(query.image_labels, database.image_labels)
    curve = metrics.precision_recall_curve(query.images, database.images, relevance)
    return {name: np.asarray(values).tolist() for name, values in curve.items()}


def _cell(value) -> str:
    return f"{value:>12.4f}" if value is not None else f"{'-':>12}"


def format_table(binary: dict, floats: dict | None = None, title: str = "", asymmetric: dict | None = None,
                 footnotes: tuple[str, ...] = ()) -> str:
    """The figures as a plain-text table: binary, then asymmetric and float beside it when given.
    A figure that could not be computed (no captions) shows as "-"."""
    columns = {"binary": binary, "asymmetric": asymmetric, "float": floats}
    columns = {name: figures for name, figures in columns.items() if figures is not None}
    rows = [(task, name) for task in TASKS for name in (binary[task] or {})]
    if not binary["text_to_image"]:  # the text rows are shown, empty, so that the reader sees why
        rows += [(task, name) for task in TASKS[1:] for name in ("map_all",)]
    rows.append(("mr", ""))
    lines = [title] if title else []
    lines.append(f"{'metric':<24}" + "".join(f"{name:>12}" for name in columns))
    for task, name in rows:
        values = [(figures[task] or {}).get(name) if name else figures[task] for figures in columns.values()]
        lines.append(f"{task + ('.' + name if name else ''):<24}" + "".join(_cell(v) for v in values))
    lines.extend(footnotes)
    return "\n".join(lines)


def split_codes(images: np.ndarray, captions: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray],
                rows: np.ndarray) -> SplitCodes:
    """The codes of the given image rows and of their captions (``captions_of[row]``: that image's
    caption rows), with caption owners local to ``rows``; ``image_ids`` are the rows."""
    rows = np.asarray(rows, dtype=np.int64)
    caption_rows = np.concatenate([np.asarray(captions_of[r], dtype=np.int64) for r in rows] or [np.zeros(0, np.int64)])
    owner = np.repeat(np.arange(len(rows)), [len(captions_of[r]) for r in rows])
    return SplitCodes(images[rows], labels[rows], captions[caption_rows], owner, rows)


def signs(codes: np.ndarray) -> np.ndarray:
    """Binary codes of continuous ones, as training's binarize: >= 0 -> +1, < 0 -> -1 (int8)."""
    return np.where(codes >= 0, 1, -1).astype(np.int8)


def _signs(codes: SplitCodes) -> SplitCodes:
    return SplitCodes(signs(codes.images), codes.image_labels, signs(codes.captions), codes.caption_owner,
                      codes.image_ids)


def evaluate_rows(images: np.ndarray, captions: np.ndarray, labels: np.ndarray, captions_of: list[np.ndarray],
                  query_rows: np.ndarray, db_rows: np.ndarray, pr_curve: bool = False,
                  asymmetric: bool = False, class_names=None) -> dict:
    """Binary and float figures (and with ``asymmetric`` the asymmetric ones) of the query rows
    against the database rows, from continuous codes: ``images`` (N, nbits), ``captions``
    (M, nbits), ``labels`` (N,) and each image's caption rows. A query row that is also a
    database row is not ranked against itself (leave-one-out). With ``class_names`` (the names of the
    label ids), ``per_class``: the binary mAP@all of each class's image and text queries
    (metrics.per_class_average_precision), keyed by class name."""
    query = split_codes(images, captions, labels, captions_of, query_rows)
    database = split_codes(images, captions, labels, captions_of, db_rows)
    binary_query, binary_db = _signs(query), _signs(database)
    figures = {"binary": retrieval_figures(binary_query, binary_db, "hamming"),
               "float": retrieval_figures(query, database, "cosine")}
    if asymmetric:
        figures["asymmetric"] = retrieval_figures(query, binary_db, "asymmetric", own=binary_query)
    if pr_curve:
        figures["pr_curve"] = image_pr_curve(binary_query, binary_db)
    if class_names is not None:
        figures["per_class"] = per_class_figures(binary_query, binary_db, class_names)
    return figures
