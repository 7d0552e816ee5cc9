"""Free-text queries: a labelled set of queries worded as users type them, and their figures.

A query file is JSON (``evaluation/queries/README.md`` tells how the shipped one was written)::

    {"name": "ucm_free_text", "description": "...",
     "classes": ["agricultural", "airplane", ...],
     "queries": [{"text": "jets waiting on the apron next to the terminal", "class": "airplane"}, ...]}

``classes`` lists every class a query may name (a typo in a query's class is then an error, not a
silently empty class). Evaluated on a dataset, a query is relevant to the database images of its
class; queries of classes the dataset lacks are left out and listed in the report.

``python -m evaluation.free_text FILE --data DIR`` checks that no query occurs in the dataset's
captions and prints the largest word-trigram overlap of each query with any caption.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .retrieval import SIMILARITIES, scores, signs

QUERY_DIR = Path(__file__).resolve().parent / "queries"  # the shipped sets
DEFAULT_QUERIES = QUERY_DIR / "ucm_free_text.json"
FIGURES = ("map_all", "map_50", "p_at_10")


class QueryFileError(ValueError):
    """A query file that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class FreeTextQuery:
    text: str
    label: str


@dataclass(frozen=True)
class QuerySet:
    name: str
    path: Path
    classes: tuple[str, ...]
    queries: tuple[FreeTextQuery, ...]

    def texts(self) -> list[str]:
        return [q.text for q in self.queries]

    def by_class(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {c: [] for c in self.classes}
        for q in self.queries:
            out[q.label].append(q.text)
        return out


def shipped_sets() -> list[str]:
    return sorted(p.stem for p in QUERY_DIR.glob("*.json"))


def resolve(path: str | Path) -> Path:
    """A query file's path, or a shipped set's by its name (``ucm_free_text``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = QUERY_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    raise QueryFileError(f"{path}: no such query file (shipped sets, by name: {', '.join(shipped_sets())})")


def load_queries(path: str | Path) -> QuerySet:
    """Read and check a query file, given by path or by the name of a shipped set (module
    docstring): every query a non-empty text and a class of ``classes``; no text twice."""
    path = resolve(path)
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QueryFileError(f"{path}: not a JSON query file ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("queries"), list):
        raise QueryFileError(f"{path}: expected an object with a 'queries' list")
    classes = document.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise QueryFileError(f"{path}: expected a non-empty 'classes' list of class names")
    known, seen, queries = set(classes), set(), []
    for n, entry in enumerate(document["queries"]):
        where = f"{path}: queries[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or "class" not in entry:
            raise QueryFileError(f"{where}: expected an object with a 'text' string and a 'class'")
        text = " ".join(entry["text"].split())
        if not text:
            raise QueryFileError(f"{where}: empty query")
        if entry["class"] not in known:
            raise QueryFileError(f"{where} ({text!r}): unknown class {entry['class']!r}; the file's classes: "
                                 f"{sorted(known)}")
        if text.lower() in seen:
            raise QueryFileError(f"{where}: {text!r} is in the file twice")
        seen.add(text.lower())
        queries.append(FreeTextQuery(text, entry["class"]))
    if not queries:
        raise QueryFileError(f"{path}: has no queries")
    return QuerySet(document.get("name") or path.stem, path, tuple(classes), tuple(queries))


# --- overlap with a dataset's captions ----------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def trigrams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def caption_overlap(queries: Sequence[str], captions: Sequence[str]) -> list[dict]:
    """Per query: whether its words occur (as one run) in a caption, and its largest word-trigram
    overlap with one caption: the share of the query's trigrams that caption also has."""
    caption_words = {" " + " ".join(words(c)) + " " for c in captions}
    caption_trigrams = [(c, trigrams(c)) for c in dict.fromkeys(captions)]
    out = []
    for query in queries:
        mine = trigrams(query)
        phrase = " " + " ".join(words(query)) + " "
        best, best_caption = 0, None
        for caption, theirs in caption_trigrams:
            shared = len(mine & theirs)
            if shared > best:
                best, best_caption = shared, caption
        out.append({"query": query, "in_a_caption": any(phrase in c for c in caption_words),
                    "trigrams": len(mine), "shared": best,
                    "overlap": best / len(mine) if mine else 0.0, "caption": best_caption})
    return out


# --- figures ----------------------------------------------------------------------------------


def _per_query_ap(score: np.ndarray, descending: bool, relevance: np.ndarray, k: int | None) -> np.ndarray:
    order = metrics.rank(score, descending=descending)
    ranked = np.take_along_axis(relevance, order, axis=1)
    return metrics.average_precision(ranked, k=k)


def free_text_figures(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray,
                      db_labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Text-to-image figures of the queries' continuous codes against the database images'
    continuous codes, by class relevance, for each similarity (``retrieval.SIMILARITIES``):
    {"binary": {"map_all", "map_50", "p_at_10", "per_class": {class: mAP}}, "asymmetric": ..., "float": ...}.
    ``per_class`` holds the classes with queries."""
    relevance = metrics.relevance_from_labels(query_labels, db_labels)
    sides = {"hamming": (signs(query_codes), signs(db_codes)), "asymmetric": (query_codes, signs(db_codes)),
             "cosine": (query_codes, db_codes)}
    out = {}
    for key, similarity in SIMILARITIES.items():
        score, desc = scores(*sides[similarity], similarity)
        ap = _per_query_ap(score, desc, relevance, None)
        per_class = {classes[c]: float(ap[query_labels == c].mean()) for c in np.unique(query_labels)}
        out[key] = {"map_all": float(ap.mean()),
                    "map_50": metrics.mean_average_precision(score, relevance, k=50, descending=desc),
                    "p_at_10": metrics.precision_at_k(score, relevance, k=10, descending=desc),
                    "per_class": per_class}
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.free_text",
        description="Check a free-text query file against a dataset's captions: that no query occurs in any "
                    "caption, and how many word trigrams each query shares with its closest caption.")
    parser.add_argument("queries", nargs="?", default=DEFAULT_QUERIES.stem,
                        help="query file, or a shipped set's name (default: %(default)s)")
    parser.add_argument("--data", required=True, help="dataset folder holding one Karpathy-style dataset*.json")
    parser.add_argument("--top", type=int, default=10, help="how many of the most overlapping queries to list")
    args = parser.parse_args(argv)
    from serving.ingest.dataset import load_dataset

    query_set = load_queries(args.queries)
    dataset = load_dataset(args.data, check_images=False)
    captions = [c for r in dataset.records for c in r.captions]
    report = caption_overlap(query_set.texts(), captions)
    missing = sorted(set(dataset.classes) - set(query_set.classes))
    occurring = [r["query"] for r in report if r["in_a_caption"]]
    print(f"{len(report)} queries of {len(query_set.classes)} classes against {len(set(captions))} distinct "
          f"captions of {dataset.name}")
    print(f"queries occurring in a caption: {len(occurring)}" + (f" ({occurring})" if occurring else ""))
    print(f"dataset classes without queries: {missing or 'none'}")
    top = sorted(report, key=lambda r: (-r["overlap"], r["query"]))[:args.top]
    print(f"max word-trigram overlap with one caption: {top[0]['overlap']:.2f}" if top else "no queries")
    for r in top:
        print(f"  {r['shared']}/{r['trigrams']}  {r['query']!r}  ~ {r['caption']!r}")
    return 1 if occurring else 0


if __name__ == "__main__":
    sys.exit(_main())
