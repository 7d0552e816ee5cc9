"""Caption augmentation: reworded copies that are deterministic per seed and keep the caption's content."""
from __future__ import annotations

import numpy as np

from training.captions import augment_caption, caption_variants

CAPTIONS = ["There are many planes parked next to some buildings , and a road .",
            "This is a beach with blue sea and white sands .", "Lots of cars are parked in the parking lot ."]


def test_variants_are_the_same_for_the_same_seed_and_differ_for_another():
    rows = np.arange(len(CAPTIONS))
    first = caption_variants(CAPTIONS, rows, 4, seed=0)
    assert first == caption_variants(CAPTIONS, rows, 4, seed=0)
    assert first != caption_variants(CAPTIONS, rows, 4, seed=1)
    assert len(first) == 4 and all(len(v) == len(CAPTIONS) for v in first)
    # a caption's variants do not depend on which other captions are augmented with it
    assert caption_variants(CAPTIONS, rows[1:], 4, seed=0) == [v[1:] for v in first]


def test_variants_reword_without_inventing_words():
    vocabulary = {w for c in CAPTIONS for w in c.lower().replace(",", " ").replace(".", " ").split()}
    from training.captions import SYNONYMS
    vocabulary |= {w for group in SYNONYMS for phrase in group for w in phrase.split()}
    variants = [v for per in caption_variants(CAPTIONS, np.arange(3), 20, seed=0) for v in per]
    assert len(set(variants)) > 30  # the wording really varies
    assert all(set(v.replace(",", " ").replace(".", " ").split()) <= vocabulary for v in variants)


def test_rates_of_zero_leave_the_caption_as_written_in_lower_case():
    rng = np.random.default_rng(0)
    out = augment_caption("There is a piece of farmland .", rng, word_dropout=0.0, synonym=0.0, reorder=0.0)
    assert out == "there is a piece of farmland."
    assert augment_caption("a", np.random.default_rng(0), word_dropout=0.99) == "a"  # one word always stays


def test_the_wider_vocabulary_rewords_the_caption_words_the_scene_list_leaves_out():
    caption = ["Some villas with swimming pools and lush trees are next to a grey road ."]
    scene = [v[0] for v in caption_variants(caption, np.arange(1), 30, seed=0, synonym=1.0, word_dropout=0.0)]
    wider = [v[0] for v in caption_variants(caption, np.arange(1), 30, seed=0, synonym=1.0, word_dropout=0.0,
                                            vocabulary="scene_and_captions")]
    assert all("villas" in v and "lush" in v for v in scene)  # not in the scene groups: kept as written
    assert any("mansions" in v for v in wider) and any("luxuriant" in v for v in wider)
    assert wider == [v[0] for v in caption_variants(caption, np.arange(1), 30, seed=0, synonym=1.0, word_dropout=0.0,
                                                    vocabulary="scene_and_captions")]


def test_an_unknown_vocabulary_is_a_config_error():
    import pytest

    from training.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="vocabulary"):
        config_from_dict({"train": {"captions": {"vocabulary": "thesaurus"}}})
