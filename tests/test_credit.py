"""Token credit (rewards.credit=token): per-token metagradients mapped onto the generator's tokens, the
reward-to-go advantages, and the per-token GRPO loss."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpg import loop
from dpg.credit import generator_credit, reward_to_go, token_advantages, token_ends
from dpg.errors import DPGError
from dpg.generator import load_generator, to_target_examples
from dpg.policy import grpo_loss
from dpg.records import Rollout
from dpg.runconfig import load_config

TOY = ["generator.source=toy", "generator.toy={corpora: [wiki-vital], vocab: 64, hidden: 32, layers: 1}",
       "target.tiny_hidden=32", "target.tiny_layers=1", "prompts.per_iteration=2", "rollouts.n_rollouts=2",
       "rollouts.max_new_tokens=6", "sft.microbatch=2", "sft.max_len=10", "sft.optimizer=adamw", "sft.lr=1e-2",
       "sft.dtype=float64", "target.tiny_pretrain_steps=0", "target.options={}"]


def char_tokenizer(text: str):
    """A target tokenizer that splits into single characters: a tokenisation unlike the generator's words."""
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", *sorted(set(text))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def test_token_credit_of_a_real_toy_run_sums_to_tau_and_reaches_the_advantages():
    cfg = load_config(None, [*TOY, "rewards.credit=token"])
    generator, tokenizer = load_generator("toy", seed=0, toy=cfg.generator.toy)
    rollouts = loop.sample(cfg, 0, generator, tokenizer, "base")
    assert all(len(r.token_ends) == len(r.token_ids) for r in rollouts)
    model, target_tokenizer, target = loop.load_target(cfg, tokenizer)
    taus, credit = {}, {}
    for group in loop.group_ids(cfg):
        scores, run, group_credit = loop.group_rewards(cfg, rollouts, group, model, target_tokenizer, target)
        taus.update(scores)
        credit.update(group_credit)
        members = [r for r in rollouts if r.group_id == group]
        ids, mask, _, _ = to_target_examples(members, target_tokenizer, cfg.sft.max_len)
        sequence = loop.get_reward("dpg")(model, {group: (ids, mask)}, target, cfg.sft)[0][group]
        assert [scores[r.example_id] for r in members] == pytest.approx(sequence.tolist(), rel=1e-9, abs=1e-15)
    for r in rollouts:  # no completion is cut at sft.max_len here, so the credit keeps all of tau
        assert len(credit[r.example_id]) == len(r.token_ids)
        assert math.fsum(credit[r.example_id]) == pytest.approx(taus[r.example_id], rel=1e-9, abs=1e-15)
    rewards = loop.advantages(cfg, rollouts, taus, credit)
    assert all(len(w.token_advantages) == len(r.token_ids) for w, r in zip(rewards, rollouts))
    assert any(a != 0 for w in rewards for a in w.token_advantages)
    # token-context: the same credit, less each token id's batch mean (own credit, not reward-to-go)
    own = loop.advantages(load_config(None, [*TOY, "rewards.credit=token-own"]), rollouts, taus, credit)
    context = loop.advantages(load_config(None, [*TOY, "rewards.credit=token-context"]), rollouts, taus, credit)
    per_id: dict[int, list[float]] = {}
    for w, r in zip(context, rollouts):
        for t, a in zip(r.token_ids, w.token_advantages):
            per_id.setdefault(t, []).append(a)
    assert all(abs(math.fsum(v)) < 1e-9 for v in per_id.values())
    assert any(a != b for w, v in zip(own, context) for a, b in zip(w.token_advantages, v.token_advantages))
    assert any(a != 0 for w in context for a in w.token_advantages)


def test_credit_moves_across_tokenisations_by_characters():
    text = "the cat sat"
    generator = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"<pad>": 0, "<eos>": 1, "<unk>": 2, "the": 3, "cat": 4, "sat": 5}, unk_token="<unk>")), eos_token="<eos>")
    generator.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    ids = [3, 4, 5, 1]
    ends = token_ends(generator, ids, True, text)
    assert ends == [3, 7, 11, 11]
    rollout = Rollout("0-0-0", 0, 0, 0, 0, "p", text, [3], ids, [0.0] * 4, "stop", "v", token_ends=ends)
    target = char_tokenizer(text)
    n = len(target(text)["input_ids"]) + 1  # the characters, then the appended eos
    scores = torch.arange(n, dtype=torch.float64)  # column s scores s; column 0 predicts nothing
    credit = generator_credit(rollout, scores, n, target)
    # characters 1-2 "he" -> "the"; 3-6 " cat" -> "cat" (the space starts inside its span); 7-10 -> "sat";
    # the appended eos (column 11) -> the end token
    assert credit.tolist() == [1 + 2, 3 + 4 + 5 + 6, 7 + 8 + 9 + 10, 11]
    with pytest.raises(DPGError, match="token_ends"):
        generator_credit(Rollout("0-0-1", 0, 0, 1, 0, "p", text, [3], ids, [0.0] * 4, "stop", "v"), scores, n,
                         target)


def test_token_advantages_use_a_leave_one_out_baseline_per_position():
    rollouts = [Rollout(f"0-0-{k}", 0, 0, k, k, "p", "x", [1], [5] * length, [0.0] * length, "length", "v")
                for k, length in enumerate([2, 3, 1])]
    credit = {"0-0-0": [1.0, 2.0], "0-0-1": [0.0, 0.0, 3.0], "0-0-2": [6.0]}
    returns = {k: reward_to_go(torch.tensor(v, dtype=torch.float64)) for k, v in credit.items()}
    assert returns["0-0-1"].tolist() == [3.0, 3.0, 3.0]
    adv, scale = token_advantages(rollouts, returns, eps_fraction=0.0)
    raw = {"0-0-0": [3 - 4.5, 2 - 3], "0-0-1": [3 - 4.5, 3 - 2, 3], "0-0-2": [6 - 3]}  # minus the others' mean
    flat = torch.tensor([x for v in raw.values() for x in v])
    assert scale == pytest.approx(float(flat.std(unbiased=False)))
    for k, v in raw.items():
        assert adv[k].tolist() == pytest.approx((torch.tensor(v) / scale).tolist())
    same, zero = token_advantages(rollouts, {k: torch.ones(2) for k in credit})  # equal returns: no signal
    assert zero == 0.0 and all((a == 0).all() for a in same.values())


def test_context_only_token_advantages_take_out_each_token_ids_batch_mean():
    ids = {"0-0-0": [5, 6], "0-0-1": [5, 6, 7], "0-0-2": [8], "0-0-3": []}  # the last: a completion with no tokens
    rollouts = [Rollout(k, 0, 0, n, n, "p", "x", [1], v, [0.0] * len(v), "length", "v")
                for n, (k, v) in enumerate(ids.items())]
    returns = {"0-0-0": [1.0, 2.0], "0-0-1": [0.0, 0.0, 3.0], "0-0-2": [6.0], "0-0-3": []}
    returns = {k: reward_to_go(torch.tensor(v, dtype=torch.float64)) for k, v in returns.items()}
    adv, scale = token_advantages(rollouts, returns, eps_fraction=0.0, context_only=True)
    # leave-one-out: [-1.5, -1], [-1.5, 1, 3], [3]; id 5 has mean -1.5, id 6 mean 0, ids 7 and 8 occur once
    raw = {"0-0-0": [0.0, -1.0], "0-0-1": [0.0, 1.0, 0.0], "0-0-2": [0.0], "0-0-3": []}
    assert scale == pytest.approx(math.sqrt(2 / 6))
    for k, v in raw.items():
        assert adv[k].tolist() == pytest.approx((torch.tensor(v) / scale).tolist())


def test_per_token_advantages_equal_to_the_sequence_advantage_give_the_sequence_loss():
    torch.manual_seed(0)
    new = [torch.randn(n, requires_grad=True) for n in (3, 1, 4)]
    old = [x.detach() + 0.1 * torch.randn(x.shape) for x in new]
    A = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    seq, _ = grpo_loss(new, old, A, 0.2)
    tok, _ = grpo_loss(new, old, [torch.full((x.numel(),), float(a)) for x, a in zip(new, A)], 0.2)
    assert torch.allclose(seq, tok)
    with pytest.raises(DPGError, match="one per"):
        grpo_loss(new, old, [torch.zeros(2), torch.zeros(1), torch.zeros(4)], 0.2)


def test_token_credit_needs_the_dpg_reward():
    with pytest.raises(DPGError, match="rewards.credit"):
        load_config(None, ["rewards.credit=token", "rewards.name=naive"])
    with pytest.raises(DPGError, match="rewards.credit"):
        load_config(None, ["rewards.credit=words"])


def test_token_own_credits_each_token_with_its_own_share_and_token_with_its_reward_to_go():
    rollouts = [Rollout(f"0-0-{k}", 0, 0, k, k, "p", "x y", [1], [5, 6], [0.0, 0.0], "length", "v") for k in range(2)]
    taus = {"0-0-0": 3.0, "0-0-1": 1.0}
    credit = {"0-0-0": [1.0, 2.0], "0-0-1": [0.5, 0.5]}
    for mode, returns in (("token-own", {k: torch.tensor(v) for k, v in credit.items()}),
                          ("token", {k: reward_to_go(torch.tensor(v)) for k, v in credit.items()})):
        cfg = load_config(None, [f"rewards.credit={mode}"])
        expected, _ = token_advantages(rollouts, {k: v.double() for k, v in returns.items()}, cfg.rewards.eps_fraction)
        got = {w.example_id: w.token_advantages for w in loop.advantages(cfg, rollouts, taus, credit)}
        assert all(got[k] == pytest.approx(expected[k].tolist()) for k in got), mode
