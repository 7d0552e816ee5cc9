"""Caption augmentation: reworded copies of the training captions, so the text tower learns what a
caption says rather than how the dataset's annotators worded it.

Remote sensing caption sets are written from a few templates ("There are many planes parked at the
airport."), so a text head trained on them alone maps the templates well and the sentences users type
badly. Each augmented variant of a caption applies, in this order:

1. clause reordering: the caption is cut at commas, semicolons, " while " and " and " between clauses,
   and its clauses are shuffled (with probability ``reorder``);
2. synonyms: every word or phrase of the vocabulary's groups (``VOCABULARIES``: ``SYNONYMS``, the
   scene words, alone or with ``CAPTION_SYNONYMS``) is replaced by a random member of its group
   (with probability ``synonym`` each);
3. word dropout: every word is dropped with probability ``word_dropout`` (one word at least stays).

Variants are drawn from ``numpy.random.default_rng((seed, caption_row, variant))``: the same seed gives
the same variants, whatever else the run draws, and a caption's variants do not depend on the others.
With a frozen text encoder the variants' features are computed once and cached like the captions'.
"""
from __future__ import annotations

import re

import numpy as np

# Groups of interchangeable words and phrases in aerial scene descriptions (lower case). A phrase
# matches whole words only; longer phrases are tried first.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    # general words of scene descriptions
    ("many", "lots of", "numerous", "a lot of", "plenty of"),
    ("some", "several", "a few"),
    ("big", "large", "huge"),
    ("small", "little", "tiny"),
    ("next to", "beside", "near", "by", "close to"),
    ("around", "surrounding", "encircling"),
    ("surrounded by", "ringed by", "bordered by"),
    ("arranged neatly", "in neat rows", "laid out in order"),
    ("lined up", "in rows", "in a row"),
    ("dense", "crowded", "packed"),
    ("densely", "tightly", "closely"),
    ("sparse", "scattered", "spread out"),
    ("green", "verdant", "grassy"),
    ("white", "pale"),
    ("dark", "black"),
    ("piece", "area", "patch"),
    ("there are", "we can see", "you can see", "the image shows"),
    ("there is", "we can see", "you can see", "the image shows"),
    # things seen from above
    ("plane", "airplane", "aircraft", "jet", "airliner"),
    ("planes", "airplanes", "aircraft", "jets", "airliners"),
    ("parked", "standing", "stationed"),
    ("airport", "airfield", "aerodrome"),
    ("runway", "airstrip", "landing strip"),
    ("building", "structure", "block"),
    ("buildings", "structures", "blocks"),
    ("house", "home", "residence"),
    ("houses", "homes", "residences", "dwellings"),
    ("residential", "housing"),
    ("road", "street"),
    ("roads", "streets"),
    ("car", "vehicle", "automobile"),
    ("cars", "vehicles", "automobiles"),
    ("parking lot", "car park", "parking area"),
    ("tree", "plant"),
    ("trees", "vegetation", "greenery"),
    ("plants", "shrubs", "vegetation"),
    ("bushes", "shrubs", "scrub"),
    ("forest", "woods", "woodland"),
    ("chaparral", "scrubland", "shrubland", "brush"),
    ("farmland", "cropland", "fields", "farm fields", "arable land"),
    ("meadow", "grassland", "lawn"),
    ("turfs", "fairways", "greens", "lawns"),
    ("bunkers", "sand traps"),
    ("golf course", "golf links", "golf club"),
    ("baseball diamond", "baseball field", "ball park", "softball field"),
    ("tennis court", "tennis pitch"),
    ("field", "ground", "pitch"),
    ("river", "stream", "waterway"),
    ("banks", "shores", "riverbanks"),
    ("beach", "shore", "coast", "seaside"),
    ("waves", "surf", "breakers"),
    ("sea", "ocean"),
    ("boats", "ships", "vessels", "yachts"),
    ("boat", "ship", "vessel", "yacht"),
    ("docked", "moored", "tied up"),
    ("harbor", "harbour", "marina", "port"),
    ("storage tanks", "oil tanks", "fuel tanks", "silos"),
    ("tanks", "containers", "cylinders"),
    ("mobile homes", "trailers", "caravans", "prefab homes"),
    ("mobile home park", "trailer park", "caravan park"),
    ("freeway", "highway", "motorway", "expressway"),
    ("freeways", "highways", "motorways", "expressways"),
    ("overpass", "flyover", "highway bridge", "interchange"),
    ("intersection", "crossroads", "junction", "road crossing"),
)


# The words of the train captions most often left out by the groups above (frequent words
# counted over the UCM-Captions train split, stop words aside), with everyday alternatives. Used
# on top of SYNONYMS by the "scene_and_captions" vocabulary.
CAPTION_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("lines", "rows"),
    ("roofs", "rooftops"),
    ("roof", "rooftop"),
    ("tennis courts", "tennis pitches"),
    ("grey", "gray", "greyish"),
    ("villa", "mansion", "detached house"),
    ("villas", "mansions", "detached houses"),
    ("withered", "dry", "parched", "dead"),
    ("swimming pool", "pool", "backyard pool"),
    ("swimming pools", "pools", "backyard pools"),
    ("grass", "lawn", "turf"),
    ("narrow", "thin", "slim"),
    ("busy", "congested", "heavy with traffic"),
    ("desert", "arid land", "barren land", "wasteland"),
    ("desolate", "barren", "bleak"),
    ("lush", "luxuriant", "thick", "flourishing"),
    ("empty", "vacant", "deserted"),
    ("weeds", "scrub", "wild plants"),
    ("roadside", "side of the road", "edge of the road"),
    ("parallel", "side by side"),
    ("diagonally", "at an angle", "obliquely"),
    ("haphazardly", "randomly", "irregularly", "in disorder"),
    ("scatteredly", "dispersedly", "here and there"),
    ("backyards", "gardens", "yards"),
    ("manicured", "well kept", "neatly trimmed"),
    ("emerald", "bright green"),
    ("turbid", "muddy", "murky"),
    ("curved", "winding", "bending"),
    ("round", "circular"),
    ("old", "aged", "weathered"),
    ("stopped", "waiting", "sitting"),
    ("across", "spanning", "over"),
    ("medium", "moderate", "mid-sized"),
    ("water", "the water surface"),
    ("sands", "sand", "sandy ground"),
)

# Named vocabularies (train.captions.vocabulary in a config).
VOCABULARIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "scene": SYNONYMS,
    "scene_and_captions": SYNONYMS + CAPTION_SYNONYMS,
}

_CLAUSE_BREAK = re.compile(r"\s*(?:[,;]|\bwhile\b|\band\b(?= (?:a|an|the|some|many|two|three|several|lots)\b))\s*")


def _synonym_table(groups) -> tuple[dict[tuple[str, ...], tuple[str, ...]], int]:
    table: dict[tuple[str, ...], tuple[str, ...]] = {}
    for group in groups:
        for phrase in group:
            table.setdefault(tuple(phrase.split()), group)
    return table, max(len(k) for k in table)


_TABLES = {name: _synonym_table(groups) for name, groups in VOCABULARIES.items()}


def _replace_synonyms(words: list[str], rate: float, rng: np.random.Generator, vocabulary: str) -> list[str]:
    table, longest = _TABLES[vocabulary]
    out, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            group = table.get(tuple(words[i:i + n]))
            if group is not None:
                out.extend(group[rng.integers(len(group))].split() if rng.random() < rate else words[i:i + n])
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return out


def augment_caption(text: str, rng: np.random.Generator, word_dropout: float = 0.1, synonym: float = 0.5,
                    reorder: float = 0.5, vocabulary: str = "scene") -> str:
    """One reworded copy of ``text`` (lower case, the final full stop kept if it had one)."""
    clauses = [c for c in _CLAUSE_BREAK.split(text.strip().rstrip(".").lower()) if c]
    if len(clauses) > 1 and rng.random() < reorder:
        clauses = [clauses[i] for i in rng.permutation(len(clauses))]
    words = _replace_synonyms(" , ".join(clauses).split(), synonym, rng, vocabulary)
    kept = [w for w in words if w == "," or rng.random() >= word_dropout]
    if all(w == "," for w in kept):
        kept = [w for w in words if w != ","][:1]
    sentence = " ".join(kept).replace(" ,", ",").strip(", ")
    return sentence + "." if text.strip().endswith(".") else sentence


def caption_variants(captions: list[str], rows: np.ndarray, variants: int, seed: int, **rates) -> list[list[str]]:
    """``variants`` augmented copies of each caption of ``rows``: out[v][i] is variant v + 1 of
    caption ``rows[i]`` (variant 0 is the caption itself)."""
    return [[augment_caption(captions[row], np.random.default_rng((seed, int(row), v)), **rates) for row in rows]
            for v in range(variants)]

