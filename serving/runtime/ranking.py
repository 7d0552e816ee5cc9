"""Merging per-shard answers into the global top-k, and re-ranking it (plain functions, tested without Ray).

Order everywhere: Hamming distance, then global row (``serving.index.shards.merge_topk``); re-ranked lists
break ties by row (asymmetric) or by image id (fusion).
"""
import numpy as np

from serving.index.topk import MISSING_ROW, merge_topk
from serving.model.codes import unpack_signs
from serving.runtime.thumbnails import thumbnail_path

DESCRIBED = ("bbox", "datetime", "start_datetime", "end_datetime", "properties")  # serving.index.items.describe


def item_image(item: dict, refs) -> str:
    """Where an item's image is: its properties' ``source`` (a STAC asset, a chip of a scene elsewhere), else
    ``refs(row, image_id)`` (serving.index.refs.ImageRefs)."""
    return (item.get("properties") or {}).get("source") or refs(int(item["row"]), str(item["image_id"]))


def public_image(reference: str, image_id: str) -> str:
    """What an answer says of where an image is: a URI a client can read as it is (``s3://``, ``https://``),
    a file of the server as the image's id (its path under the archive root that was indexed), so that
    no answer carries the server's folders."""
    return reference if _is_uri(reference) else image_id


def public_hit(hit: dict) -> dict:
    """``hit`` as answered: its image by ``public_image``, a ``source`` property only when it is a URI."""
    hit["image"] = public_image(hit["image"], hit["image_id"])
    source = (hit.get("properties") or {}).get("source")
    if source is not None and not _is_uri(str(source)):
        hit["properties"] = {k: v for k, v in hit["properties"].items() if k != "source"}
    return hit


def _is_uri(reference: str) -> bool:
    return "://" in reference and not reference.startswith("file://")


def merge_hits(answers: list[dict], k: int, bits: int, refs, with_codes: bool = False) -> list[dict]:
    """Per-shard answers of one query -> the global top-k as result dicts, ordered by (distance, row).

    ``refs(row, image_id)`` is the image reference of a hit (serving.index.refs.ImageRefs), unless the
    item's properties name its ``source``. Hits of an index with metadata carry ``bbox`` (when the
    item has a footprint), ``datetime`` (or ``start_datetime``/``end_datetime``) and ``properties``.
    """
    distances, rows = merge_topk([(a["distances"], a["rows"]) for a in answers], k)  # (1, k) each
    by_row = {}
    for a in answers:
        for j, row in enumerate(a["rows"][0].tolist()):
            if row != MISSING_ROW:
                by_row[row] = (a["ids"][0][j], a["image_ids"][0][j], a["codes"][0][j] if with_codes else None,
                               a["texts"][0][j] if "texts" in a else None, a["meta"][0][j] if "meta" in a else None)
    hits = []
    for distance, row in zip(distances[0].tolist(), rows[0].tolist()):
        if row == MISSING_ROW:
            break  # fewer than k items in the whole index
        item_id, image_id, code, text, meta = by_row[row]
        hit = {"id": str(item_id), "row": int(row), "distance": int(distance), "score": 1.0 - distance / bits,
               "image_id": str(image_id), **(meta or {})}  # serving.index.items.describe: bbox, datetime, properties
        hit.update(image=item_image(hit, refs), thumbnail=thumbnail_path(str(image_id)))
        if text is not None:
            hit["text"] = str(text)  # a caption index's words
        if with_codes:
            hit["code"] = code
        hits.append(hit)
    return hits


def asymmetric_rerank(query: np.ndarray, hits: list[dict], bits: int) -> list[dict]:
    """Re-order hits by the asymmetric distance of the float query to each binary code.

    d_a(q, b) = sum_i (1 - q_i b_i) / 2 with b in {-1, +1}: the Hamming distance when q is binary.
    Ties by row. ``distance`` stays the Hamming distance; ``score`` becomes 1 - d_a / bits.
    """
    if not hits:
        return []
    signs = unpack_signs(np.stack([h.pop("code") for h in hits]), bits).astype(np.float32)  # (R, bits)
    d_a = (bits - signs @ query.astype(np.float32)) / 2  # (R,)
    for hit, d in zip(hits, d_a.tolist()):
        hit["asymmetric_distance"], hit["score"] = round(d, 4), 1.0 - d / bits
    return sorted(hits, key=lambda h: (h["asymmetric_distance"], h["row"]))


def fuse(images: list[dict], captions: list[dict], bits: int, rule: str) -> list[dict]:
    """Late fusion of image-code hits and caption-code hits into one image ranking.

    An image's caption score is the best score of its captions. An image missing from one list
    gets that list's lowest retrieved score (no unretrieved item can score higher). The fused
    score is the average or the maximum of the two; ties by image id.
    """
    image_scores = {h["image_id"]: h for h in images}
    about = {h["image_id"]: {k: h[k] for k in DESCRIBED if k in h} for h in captions}  # caption-only images
    caption_scores: dict[str, float] = {}
    where = {h["image_id"]: h["image"] for h in captions}  # the image reference of caption-only images
    for h in captions:
        caption_scores[h["image_id"]] = max(caption_scores.get(h["image_id"], -1.0), h["score"])
    floor_i = min((h["score"] for h in images), default=0.0)
    floor_c = min(caption_scores.values(), default=0.0)
    combine = (lambda a, b: (a + b) / 2) if rule == "average" else max
    fused = []
    for image_id in set(image_scores) | set(caption_scores):
        hit = image_scores.get(image_id)
        s_i = hit["score"] if hit else floor_i
        s_c = caption_scores.get(image_id, floor_c)
        fused.append({"id": image_id, "distance": hit["distance"] if hit else None, "image_score": s_i,
                      "caption_score": s_c, "score": combine(s_i, s_c), "image_id": image_id,
                      "image": hit["image"] if hit else where[image_id], "thumbnail": thumbnail_path(image_id),
                      **({k: hit[k] for k in DESCRIBED if k in hit} if hit else about[image_id])})
    return sorted(fused, key=lambda h: (-h["score"], h["id"]))

