"""Human metrics of texts (dpg.textmetrics) on hand-made texts with exact expected values."""

import random

import pytest

from dpg.errors import DPGError
from dpg.textmetrics import substring_distance, text_metrics

UUID = "3f2b9c1e-7a4d-4e8b-9f61-2c5d8a0b7e34"
FRENCH = ["Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville.",
          "Nous avons mangé une excellente soupe à l'oignon dans un petit restaurant près de la gare."]
ENGLISH = ["The cat is sleeping on the sofa while the rain falls gently on the city.",
           "We ate an excellent onion soup in a small restaurant near the station."]


def sellers(pattern: str, text: str) -> int:
    """Reference: approximate substring matching by dynamic programming (free start and end in the text)."""
    row = [0] * (len(text) + 1)  # distance of the empty pattern prefix to a substring ending at j: 0
    for i, p in enumerate(pattern, 1):
        new = [i] + [0] * len(text)
        for j, t in enumerate(text, 1):
            new[j] = min(row[j] + 1, new[j - 1] + 1, row[j - 1] + (p != t))
        row = new
    return min(row)


def test_contains_share_and_edit_distance_exact_values():
    one_changed = UUID[:10] + ("0" if UUID[10] != "0" else "1") + UUID[11:]
    texts = [f"the id is {UUID}, keep it", f"id {one_changed} here", "", "no id at all"]
    m = text_metrics(texts, [f"contains:{UUID}"])
    assert set(m) == {"text_share_contains", "text_edit_distance"}
    assert m["text_share_contains"] == 0.25
    assert substring_distance(UUID, texts[0]) == 0
    assert substring_distance(UUID, texts[1]) == 1
    assert substring_distance(UUID, "") == len(UUID)
    assert substring_distance(UUID, UUID[:-1]) == 1  # one deletion: the text is shorter than the string
    assert substring_distance(UUID, UUID[:5] + "xx" + UUID[5:]) == 2  # two insertions
    assert m["text_edit_distance"] == pytest.approx((0 + 1 + len(UUID) + sellers(UUID, texts[3])) / 4)


def test_contains_ignores_whitespace_as_a_word_tokenizer_decodes_it():
    spaced = "id " + " - ".join(UUID.split("-")) + " ."  # how the toy's word tokenizer decodes the UUID
    m = text_metrics([spaced, UUID[:8] + " " + UUID[9:]], [f"contains:{UUID}"])
    assert m == {"text_share_contains": 0.5, "text_edit_distance": 0.5}  # the second lost one '-'


def test_substring_distance_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        pattern = "".join(rng.choice("abc") for _ in range(rng.randint(1, 8)))
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 15)))
        assert substring_distance(pattern, text) == sellers(pattern, text), (pattern, text)


def test_langid_share_counts_top_language_and_empty_texts_as_not():
    m = text_metrics([*FRENCH, *ENGLISH, "", "   "], ["langid:fr", "langid:en"])
    assert m == {"text_share_fr": pytest.approx(2 / 6), "text_share_en": pytest.approx(2 / 6)}


def test_length_metrics():
    m = text_metrics(["one two  three", "", "  \n", "four\tfive"], ["length"])
    assert m == {"text_mean_words": pytest.approx(5 / 4), "text_empty_share": 0.5}


def test_all_specs_together():
    m = text_metrics([FRENCH[0], f"{UUID}"], ["langid:fr", f"contains:{UUID}", "length"])
    assert m["text_share_fr"] == 0.5 and m["text_share_contains"] == 0.5 and m["text_empty_share"] == 0.0


@pytest.mark.parametrize("specs, match", [
    (["langid:xx"], r"langid:xx names no language of lid.176; use one of .*\bfr\b"),
    (["bogus"], r"unknown text metric spec='bogus'; valid forms: langid:<language code>, contains:<string>, length"),
    (["contains:"], r"empty string"),
    (["length", "length"], r"repeats the metric"),
])
def test_bad_specs_are_one_line_errors(specs, match):
    with pytest.raises(DPGError, match=match) as e:
        text_metrics(["a text"], specs)
    assert "\n" not in str(e.value)


def test_no_texts_is_an_error():
    with pytest.raises(DPGError, match="texts=\\[\\] is empty"):
        text_metrics([], ["length"])
