"""The CPU-scale demo parts: the toy generator (dpg.toy), built-in corpora as val_lm texts, and text metrics
in the evaluation stage."""

import pytest
import torch

from dpg import loop
from dpg.errors import DPGError
from dpg.generator import load_generator
from dpg.prompts import load_texts
from dpg.runconfig import load_config
from dpg.toy import SPECIALS, TOKEN, toy_lm, toy_vocabulary


def test_toy_vocabulary_takes_the_commonest_words_of_each_corpus_in_turn():
    vocab = toy_vocabulary(("wiki-vital", "wiki-vital-fr"), 40)
    assert list(vocab[:3]) == SPECIALS and len(vocab) == len(set(vocab)) == 40
    english = toy_vocabulary(("wiki-vital",), 40)
    counts = {}
    for _, text in load_texts("wiki-vital"):
        for t in TOKEN.findall(text.lower()):
            counts[t] = counts.get(t, 0) + 1
    assert list(english[3:]) == sorted(counts, key=lambda w: (-counts[w], w))[:37]
    assert "de" in vocab and "the" in vocab  # both languages contribute
    with pytest.raises(DPGError, match="generator.toy.vocab"):
        toy_vocabulary(("wiki-vital",), 3)


def test_toy_lm_is_seeded_and_its_tokenizer_round_trips_known_words():
    a, tokenizer = toy_lm(("wiki-vital",), vocab=64, hidden=32, layers=1, seed=3)
    b, _ = toy_lm(("wiki-vital",), vocab=64, hidden=32, layers=1, seed=3)
    c, _ = toy_lm(("wiki-vital",), vocab=64, hidden=32, layers=1, seed=4)
    state = torch.get_rng_state()
    load_generator("toy", seed=5, toy={"corpora": ["wiki-vital"], "vocab": 64, "hidden": 32, "layers": 1})
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and wa.shape == (64, 32)
    words = " ".join(toy_vocabulary(("wiki-vital",), 64)[3:13])
    ids = tokenizer(words)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == words
    assert tokenizer("The Zyzzyva")["input_ids"][1] == tokenizer.unk_token_id  # lowercased; unknown -> <unk>


def test_a_built_in_corpus_is_a_val_lm_target_and_text_metrics_reach_the_evaluation():
    cfg = load_config(None, ["generator.source=toy", "generator.toy={vocab: 64, hidden: 32, layers: 1}",
                             "target.spec=val_lm:wiki-vital-fr", "target.options={max_texts: 4, max_len: 16}",
                             "target.tiny_hidden=32", "target.tiny_layers=1",
                             "target.text_metrics=[length, 'langid:fr']",
                             "prompts.per_iteration=2", "rollouts.n_rollouts=2", "rollouts.max_new_tokens=5",
                             "sft.microbatch=2", "sft.max_len=8"])
    generator, tokenizer = load_generator("toy", seed=0, toy=cfg.generator.toy)
    model, target_tokenizer, target = loop.load_target(cfg, tokenizer)
    french = [t for _, t in load_texts("wiki-vital-fr")[:4]]
    encoded = target_tokenizer(french[0])["input_ids"]
    assert len(encoded) > 2 and target.report(model)["val_loss"] > 0
    rollouts = loop.sample(cfg, 0, generator, tokenizer, "base")
    metrics, _ = loop.evaluate(cfg, rollouts, model, target_tokenizer, target)
    words = sum(len(r.text.split()) for r in rollouts) / len(rollouts)
    assert metrics["text_mean_words"] == pytest.approx(words) and 0 <= metrics["text_share_fr"] <= 1
    assert "eval_val_loss" in metrics


def test_a_pretrained_tiny_target_is_seeded_and_has_learned_the_corpus():
    base = ["generator.source=toy", "generator.toy={vocab: 64, hidden: 32, layers: 1}", "target.tiny_hidden=32",
            "target.tiny_layers=1"]
    _, tokenizer = load_generator("toy", seed=0, toy={"vocab": 64, "hidden": 32, "layers": 1})
    spec = "target.spec=val_lm:wiki-vital"
    random_target = loop.load_target(load_config(None, [*base, spec, "target.tiny_pretrain_steps=0"]), tokenizer)
    a = loop.load_target(load_config(None, [*base, spec, "target.tiny_pretrain_steps=30"]), tokenizer)
    b = loop.load_target(load_config(None, [*base, spec, "target.tiny_pretrain_steps=30"]), tokenizer)
    wa, wb = (m.get_input_embeddings().weight for m in (a[0], b[0]))
    assert torch.equal(wa, wb) and not a[0].training
    assert a[2].report(a[0])["val_loss"] < random_target[2].report(random_target[0])["val_loss"] - 0.5
    with pytest.raises(DPGError, match="tiny_pretrain_steps"):
        load_config(None, ["target.tiny_pretrain_steps=-1"])
