"""Why a result was returned, from the ONNX students (serving.model.encoders; no torch).

* **Occlusion map** of the result image: the image is cut into a ``grid`` x ``grid`` of cells, each cell in
  turn painted over with the image's mean colour and encoded again. A cell whose masking moves the result's
  code furthest from the query's is what made the result look like the query. Per cell: the change of the
  Hamming distance (what ranking saw: whole bits), and of the cosine distance of the continuous codes (finer,
  so that cells whose masking flips no bit still rank); the strongest cell is the largest cosine change.
* **Leave-one-word-out** for text queries: the query is encoded again without each word in turn; the bits
  of its code that flip say how much that word carries.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

Encode = Callable[[list], np.ndarray]  # inputs -> continuous codes (n, bits)
MIN_GRID, MAX_GRID = 2, 8


def _signs(codes: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(codes) >= 0, 1, -1).astype(np.int8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of the binary codes of continuous ``a`` (bits,) to each row of ``b`` (n, bits)."""
    return (_signs(a)[None, :] != _signs(np.atleast_2d(b))).sum(axis=1)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.atleast_2d(np.asarray(b, np.float64))
    return 1.0 - (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a) + 1e-12)


def masked_copies(pixels: np.ndarray, grid: int) -> list[np.ndarray]:
    """``grid * grid`` copies of an RGB uint8 (S, S, 3) image, copy ``r * grid + c`` with cell (r, c) painted
    over with the image's mean colour (cell edges at round(i * S / grid))."""
    if not MIN_GRID <= grid <= MAX_GRID:
        raise ValueError(f"grid must be from {MIN_GRID} to {MAX_GRID}, got {grid}")
    height, width = pixels.shape[:2]
    fill = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    ys = [round(i * height / grid) for i in range(grid + 1)]
    xs = [round(i * width / grid) for i in range(grid + 1)]
    copies = []
    for r in range(grid):
        for c in range(grid):
            masked = pixels.copy()
            masked[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = fill
            copies.append(masked)
    return copies


def occlusion(query_code: np.ndarray, result_code: np.ndarray, masked_codes: np.ndarray, grid: int) -> dict:
    """The occlusion map from the query's code, the result's, and the codes of ``masked_copies``."""
    base_h = int(hamming(query_code, result_code[None])[0])
    base_c = float(_cosine_distance(query_code, result_code[None])[0])
    change_h = hamming(query_code, masked_codes) - base_h  # (grid * grid,)
    change_c = _cosine_distance(query_code, masked_codes) - base_c
    order = np.lexsort((np.arange(len(change_c)), -change_h, -change_c))  # largest change; ties: more bits, first
    strongest = int(order[0])
    return {"grid": grid, "hamming_distance": base_h, "hamming_change": change_h.reshape(grid, grid).tolist(),
            "distance_change": np.round(change_c, 6).reshape(grid, grid).tolist(),
            "strongest_cell": [strongest // grid, strongest % grid]}


def overlay_png(pixels: np.ndarray, change: list[list[float]]) -> bytes:
    """The result image with the cells that matter most tinted red (alpha by the positive change), as PNG."""
    from PIL import Image

    grid = np.clip(np.asarray(change, np.float64), 0, None)
    weight = grid / grid.max() if grid.max() > 0 else grid
    height, width = pixels.shape[:2]
    cells = np.kron(weight, np.ones((-(-height // len(weight)), -(-width // len(weight)))))[:height, :width]
    alpha = (0.6 * cells)[..., None]
    red = np.array([255, 0, 0], np.float64)
    tinted = (pixels.astype(np.float64) * (1 - alpha) + red * alpha).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(tinted).save(out, format="PNG")
    return out.getvalue()


def leave_one_out(query: str) -> tuple[list[str], list[str]]:
    """The words of ``query`` (split on whitespace) and the query without each of them in turn."""
    words = query.split()
    return words, [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


def attribution(words: list[str], codes: np.ndarray) -> list[dict]:
    """Per word, the bits flipped between the query's code (``codes[0]``) and its code without the word."""
    flips = hamming(codes[0], codes[1:]) if len(words) else []
    return [{"word": word, "bits_flipped": int(n)} for word, n in zip(words, flips)]


def word_attribution(query: str, encode_text: Encode) -> list[dict]:
    """Per word of ``query``: the bits its removal flips in the query's code."""
    words, variants = leave_one_out(query)
    if not words:
        return []
    return attribution(words, np.asarray(encode_text([query, *variants])))


def explain_image(query_code: np.ndarray, pixels: np.ndarray, encode_images: Encode, grid: int = 4) -> dict:
    """The occlusion map of a result image (RGB uint8 at the model's size) for a query code (one pass)."""
    codes = np.asarray(encode_images([pixels, *masked_copies(pixels, grid)]))
    return occlusion_with_overlay(query_code, pixels, codes, grid)


def occlusion_with_overlay(query_code: np.ndarray, pixels: np.ndarray, codes: np.ndarray, grid: int) -> dict:
    """``occlusion`` from the codes of [the image, *masked_copies], with the PNG overlay as ``png``."""
    found = occlusion(np.asarray(query_code), codes[0], codes[1:], grid)
    found["png"] = overlay_png(pixels, found["distance_change"])
    return found
