"""Prompt sources: files, saved datasets, URLs, the built-in corpora, and the rephrase template."""

import subprocess
import sys

import pandas as pd
import pytest

from dpg.errors import DPGError
from dpg.generator import encode_prompt
from dpg.prompts import DEFAULT_CORPUS_SOURCE, DEFAULT_TEMPLATE, build_prompts, load_texts, split_articles
from tests.conftest import make_tokenizer

ROWS = pd.DataFrame({"id": [10, 11, 12, 13], "body": ["the cat sat", "", "a dog ran", None]})


@pytest.mark.parametrize("suffix, write", [
    (".parquet", lambda f, p: f.to_parquet(p)),
    (".jsonl", lambda f, p: f.to_json(p, orient="records", lines=True)),
    (".json", lambda f, p: f.to_json(p, orient="records")),
    (".csv", lambda f, p: f.to_csv(p, index=False)),
    (".csv.gz", lambda f, p: f.to_csv(p, index=False, compression="gzip")),
])
def test_load_texts_reads_files_and_skips_blank_rows(tmp_path, suffix, write):
    path = tmp_path / f"articles{suffix}"
    write(ROWS, path)
    texts = load_texts(str(path), text_column="body")
    assert texts == [(f"articles{suffix}:0", "the cat sat"), (f"articles{suffix}:2", "a dog ran")]
    assert load_texts(str(path), text_column="body", limit=1) == texts[:1]


def test_load_texts_reads_a_saved_hf_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_pandas(ROWS).save_to_disk(str(tmp_path / "one"))
    assert [t for _, t in load_texts(str(tmp_path / "one"), text_column="body")] == ["the cat sat", "a dog ran"]
    DatasetDict({"train": Dataset.from_pandas(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_texts(str(tmp_path / "dict"), text_column="body")) == 2
    DatasetDict({"test": Dataset.from_pandas(ROWS)}).save_to_disk(str(tmp_path / "test_only"))
    with pytest.raises(DPGError, match=r"splits \['test'\] and none is 'train'"):
        load_texts(str(tmp_path / "test_only"), text_column="body")


def test_load_texts_reads_an_fsspec_url():
    import fsspec

    with fsspec.open("memory://dpg-test/articles.jsonl", "w") as f:
        f.write('{"text": "the cat sat on the mat"}\n{"text": "then came back"}\n')
    assert load_texts("memory://dpg-test/articles.jsonl") == [("articles.jsonl:0", "the cat sat on the mat"),
                                                             ("articles.jsonl:1", "then came back")]


def test_load_texts_bad_inputs_raise_one_clear_error_each(tmp_path):
    ROWS.to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"text": ["", None, "  "]}).to_parquet(tmp_path / "blank.parquet")
    with pytest.raises(DPGError, match=r"text_column='text' is not a column of .*columns are \['id', 'body'\]"):
        load_texts(str(tmp_path / "a.parquet"))
    with pytest.raises(DPGError, match="has no non-empty text"):
        load_texts(str(tmp_path / "blank.parquet"))
    with pytest.raises(DPGError, match="does not exist"):
        load_texts(str(tmp_path / "missing.csv"))
    with pytest.raises(DPGError, match="unknown type; use .parquet"):
        load_texts(str(tmp_path / "a.txt"))
    with pytest.raises(DPGError, match="not a dataset saved with save_to_disk"):
        load_texts(str(tmp_path))
    with pytest.raises(DPGError, match="prompts.limit=0"):
        load_texts("python-docs", limit=0)


def test_default_corpus_is_offline_english_prose_of_article_size():
    texts = load_texts()
    assert len(texts) > 5000 and len({s for s, _ in texts}) == len(texts)
    assert all(300 <= len(t) <= 1500 for _, t in texts)
    sample = " ".join(t for _, t in texts[::50]).lower().split()
    common = sum(w in {"the", "of", "and", "in", "a", "is", "to"} for w in sample) / len(sample)
    assert common > 0.15, common  # function words make up a large share of any English prose
    assert "wiki-vital" in DEFAULT_CORPUS_SOURCE and "CC BY-SA 4.0" in DEFAULT_CORPUS_SOURCE
    assert texts[0][0].startswith("wiki-vital:")


def test_python_docs_corpus_needs_nothing_but_the_stdlib():
    texts = load_texts("python-docs", limit=20)
    assert len(texts) == 20 and all(300 <= len(t) <= 1500 for _, t in texts)
    assert all("\n" not in t and not t.startswith(" ") for _, t in texts)


def test_split_articles_packs_paragraphs_and_splits_long_ones():
    short, long = "word " * 20, "This is a sentence of some length. " * 60  # 100 and 2100 characters
    articles = split_articles([short, short, short, short, long, "tiny"], 300, 1500)
    assert all(300 <= len(a) <= 1500 for a in articles) and len(articles) == 3
    assert articles[0] == " ".join([short.strip()] * 4)  # packed: a fifth piece would pass 1500 characters
    assert articles[1].startswith("This is") and articles[1].endswith("length.")  # split at sentence ends
    assert articles[2].endswith("length. tiny")
    assert split_articles(["tiny"], 300, 1500) == []  # too short to be an article


def test_build_prompts_fills_the_template_and_keeps_source_ids():
    tok = make_tokenizer()
    prompts = build_prompts([("s1", "the cat sat"), ("s2", "a dog")], max_prompt_tokens=64, tokenizer=tok)
    assert prompts == [("s1", DEFAULT_TEMPLATE.replace("{article}", "the cat sat")),
                       ("s2", DEFAULT_TEMPLATE.replace("{article}", "a dog"))]
    assert "Rephrase this article in different terms" in prompts[0][1]
    custom = build_prompts([("s", "cat")], template="{article} and then", tokenizer=tok)
    assert custom == [("s", "cat and then")]


def test_build_prompts_truncates_the_article_at_a_word_boundary_to_fit():
    tok = make_tokenizer()  # word level: "the cat sat on the mat" is 6 tokens
    article = "the cat sat on the mat and the dog ran far away from home"
    [(_, prompt)] = build_prompts([("s", article)], template="then {article}", max_prompt_tokens=5, tokenizer=tok)
    assert prompt == "then the cat sat on"
    assert len(encode_prompt(tok, prompt)) == 5


def test_build_prompts_raises_when_even_an_empty_article_does_not_fit():
    tok = make_tokenizer()
    with pytest.raises(DPGError, match=r"template alone takes 3 generator tokens > prompts.max_prompt_tokens=2"):
        build_prompts([("s", "cat")], template="the cat {article} sat", max_prompt_tokens=2, tokenizer=tok)
    with pytest.raises(DPGError, match="placeholder"):
        build_prompts([("s", "cat")], template="no slot", tokenizer=tok)


@pytest.mark.smollm2
def test_build_prompts_counts_chat_formatted_smollm2_tokens(smollm2):
    _, tok = smollm2
    texts = load_texts(limit=3)
    prompts = build_prompts(texts, max_prompt_tokens=80, tokenizer=tok)
    for (source_id, prompt), (text_id, article) in zip(prompts, texts):
        n = len(encode_prompt(tok, prompt))
        assert source_id == text_id and 60 < n <= 80  # the system turn and template take ~40 tokens
        body = prompt.split("Article:\n", 1)[1]
        assert article.startswith(body) and len(body) < len(article)


def test_generator_and_prompts_import_no_optional_stack():
    code = ("import sys, dpg.generator, dpg.prompts; "
            "print(sorted(m for m in ('pydantic', 'prefect', 'mlflow', 'fsspec', 's3fs', 'datasets', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
