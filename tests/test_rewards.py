"""Rewards whose right answers are known: exact metagradients per SFT group, the naive baseline by hand,
and the heuristic text rewards (SPEC §3, §7)."""

import dataclasses
import logging
import math

import pytest
import torch
from conftest import make_tokenizer

import dpg
from dpg import loop
from dpg.errors import DPGError
from dpg.exact import random_data, tiny_model
from dpg.generator import to_target_examples
from dpg.records import Rollout
from dpg.rewards import (
    REWARDS,
    dpg_rewards,
    embedding_rewards,
    get_reward,
    langid_rewards,
    levenshtein_rewards,
    merge_groups,
    naive_rewards,
    needs_ids,
    needs_sft,
    random_rewards,
    split_by_group,
)
from dpg.runconfig import load_config

PROMPTS, ROLLOUTS, LENGTH = 4, 2, 10
CFG = dpg.SFTConfig(optimizer="sgd", lr=0.3, microbatch=2, grad_accum=1, max_len=LENGTH, dtype="float64")


def rollouts(cross_group: bool) -> list[Rollout]:
    """PROMPTS x ROLLOUTS records in prompt-major order; group_id = rollout index (inverse groups) or 0."""
    return [Rollout(example_id=f"0-{p}-{k}", outer_iteration=0, prompt_id=p, rollout_index=k,
                    group_id=0 if cross_group else k, prompt="", text="", prompt_token_ids=[], token_ids=[],
                    logprobs=[], finish_reason="stop", generator_version="test")
            for p in range(PROMPTS) for k in range(ROLLOUTS)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=1)
    ids, mask = random_data(PROMPTS * ROLLOUTS, LENGTH)
    return model, ids, mask, dpg.get_target("pattern:67", model)


@pytest.mark.parametrize("cross_group", [False, True])
def test_group_structure_assigns_the_right_examples(setup, cross_group):
    _, ids, mask, _ = setup
    group_ids = torch.tensor([r.group_id for r in rollouts(cross_group)])
    groups = split_by_group(group_ids, ids, mask)
    if cross_group:
        assert list(groups) == [0] and torch.equal(groups[0][0], ids) and torch.equal(groups[0][1], mask)
    else:  # group k = the k-th rollout of every prompt, in prompt order
        assert list(groups) == list(range(ROLLOUTS))
        for k in range(ROLLOUTS):
            rows = [p * ROLLOUTS + k for p in range(PROMPTS)]
            assert torch.equal(groups[k][0], ids[rows]) and torch.equal(groups[k][1], mask[rows])
    marks = {k: g[0][:, 0].double() for k, g in groups.items()}  # a per-example value: its first token id
    assert torch.equal(merge_groups(marks, group_ids), ids[:, 0].double())


def test_merge_groups_rejects_missing_or_misshapen_groups():
    with pytest.raises(DPGError, match="SFT group 1 has 2 examples but its rewards are nothing"):
        merge_groups({0: torch.zeros(2)}, torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("cross_group", [False, True])
def test_dpg_rewards_equal_metagradients_per_group(setup, cross_group):
    model, ids, mask, target = setup
    group_ids = torch.tensor([r.group_id for r in rollouts(cross_group)])
    tau, runs = dpg_rewards(model, split_by_group(group_ids, ids, mask), target, CFG, outer_iteration=3)
    merged = merge_groups(tau, group_ids)
    for run in runs:
        rows = torch.nonzero(group_ids == run.group_id).flatten()
        direct = dpg.metagradients(model, ids[rows], mask[rows], target, CFG)
        assert torch.equal(merged[rows], direct.scores) and merged.dtype == torch.float64
        assert (run.outer_iteration, run.n_examples, run.inner_steps) == (3, len(rows), len(rows) // 2)
        assert (run.phi_before, run.phi_after) == (direct.value_before, direct.value_after)
        assert run.report_after == direct.report_after and "pixel_accuracy" in run.report_after
    assert [r.group_id for r in runs] == sorted(set(group_ids.tolist()))


def test_group_size_error_says_which_sizes_work(setup):
    model, ids, mask, target = setup
    cfg = dpg.SFTConfig(microbatch=3, max_len=LENGTH, dtype="float64")
    with pytest.raises(DPGError, match=r"SFT group 0: number of examples n=4 .*=3; use 3 or 6 .*number of prompts"):
        dpg_rewards(model, {0: (ids[:4], mask[:4])}, target, cfg)


def test_naive_reward_is_phi_after_training_minus_phi_before(setup):
    model, ids, mask, target = setup
    groups = {0: (ids[:4], mask[:4]), 1: (ids[4:], mask[4:])}
    tau, runs = naive_rewards(model, groups, target, CFG)
    with torch.no_grad():
        before = float(target(model))
        for k, (i, m) in groups.items():
            after = float(target(dpg.train(model, i, m, CFG)))
            assert torch.equal(tau[k], torch.full((4,), after - before, dtype=torch.float64))
            assert (runs[k].phi_before, runs[k].phi_after) == (before, after)
    assert tau[0][0] != tau[1][0]


def test_naive_reward_of_one_group_needs_no_other_group(setup):
    model, ids, mask, target = setup
    both, _ = naive_rewards(model, {0: (ids[:4], mask[:4]), 1: (ids[4:], mask[4:])}, target, CFG)
    alone, [run] = naive_rewards(model, {1: (ids[4:], mask[4:])}, target, CFG)  # as dpg.loop calls it
    assert list(alone) == [1] and torch.equal(alone[1], both[1]) and run.group_id == 1


@pytest.mark.parametrize("overrides", [["rollouts.grouping=cross"], ["rollouts.n_rollouts=1"]])
def test_naive_reward_needs_inverse_groups_of_two_or_more_rollouts_in_the_config(overrides):
    with pytest.raises(DPGError) as e:
        load_config(None, ["rewards.name=naive", *overrides])
    message = str(e.value)
    assert "\n" not in message and "rewards.name='naive'" in message
    assert "use rollouts.grouping=inverse and rollouts.n_rollouts >= 2" in message
    assert load_config(None, ["rewards.name=naive"]).rewards.name == "naive"  # the defaults: 4 inverse groups


def test_random_reward_is_seeded_noise_per_rollout_that_no_text_can_earn():
    ids = [f"3-{p}-{k}" for p in range(4) for k in range(2)]
    texts = ["the same text"] * len(ids)
    state = torch.get_rng_state()
    r = random_rewards(texts, None, example_ids=ids, seed=5, outer_iteration=3)
    assert torch.equal(torch.get_rng_state(), state)  # never the global RNG
    assert r.dtype == torch.float64 and r.shape == (8,) and len(set(r.tolist())) == 8  # same text, 8 rewards
    assert torch.equal(r, random_rewards(texts, None, example_ids=ids, seed=5, outer_iteration=3))  # rerun
    assert torch.equal(r, random_rewards([f"text {i}" for i in range(8)], "goal", example_ids=ids, seed=5,
                                         outer_iteration=3))  # the text and the goal do not matter
    assert not torch.equal(r, random_rewards(texts, None, example_ids=ids, seed=5, outer_iteration=4))
    assert not torch.equal(r, random_rewards(texts, None, example_ids=ids, seed=6, outer_iteration=3))
    many = random_rewards(["x"] * 2000, None, example_ids=[str(i) for i in range(2000)], seed=0)
    assert abs(float(many.mean())) < 0.1 and abs(float(many.std()) - 1) < 0.1  # standard normal
    assert get_reward("random") is random_rewards and needs_ids(random_rewards) and not needs_sft(random_rewards)


def test_random_reward_through_loop_group_rewards_needs_no_sft():
    cfg = load_config(None, ["rewards.name=random", "seed=7"])
    rollouts_ = [dataclasses.replace(r, text="same") for r in rollouts(cross_group=False)]
    taus, run, _ = loop.group_rewards(cfg, rollouts_, 1, None, None, None)  # no target needed
    members = [r.example_id for r in rollouts_ if r.group_id == 1]
    assert run is None and list(taus) == members
    expected = random_rewards(["same"] * len(members), None, example_ids=members, seed=7, outer_iteration=0)
    assert list(taus.values()) == expected.tolist() and len(set(taus.values())) == len(members)


def test_an_empty_completion_keeps_its_sft_slot_and_gets_no_reward(setup, caplog):
    cfg = load_config(None, ["target.tiny_hidden=32", "target.tiny_layers=1", "sft.microbatch=2", "sft.max_len=10",
                             "sft.lr=0.5", "rollouts.n_rollouts=2", "rewards.credit=sequence",
                             "target.tiny_pretrain_steps=0", "target.options={}"])
    tok = make_tokenizer()
    model, tokenizer, target = loop.load_target(cfg, tok)
    texts = ["the cat sat on the mat", "", "a dog ran far away", "then came back home"]  # prompts 0-3, rollout 0
    rollouts_ = [dataclasses.replace(r, text=texts[r.prompt_id] if r.group_id == 0 else "cat")
                 for r in rollouts(cross_group=False)]
    with caplog.at_level(logging.WARNING, logger="dpg.loop"):
        taus, run, _ = loop.group_rewards(cfg, rollouts_, 0, model, tokenizer, target)
    assert "1 empty completion(s) get no reward" in caplog.text
    members = [r for r in rollouts_ if r.group_id == 0]
    assert list(taus) == [r.example_id for r in members] and run.n_examples == 4 and run.inner_steps == 2
    assert math.isnan(taus["0-1-0"]) and all(math.isfinite(taus[r.example_id]) for r in members if r.text)
    ids, mask, empty, _ = to_target_examples(members, tokenizer, cfg.sft.max_len)
    direct = dpg.metagradients(model, ids, mask, target, cfg.sft)  # the same slots: row 1 is a one-token row
    assert empty == [False, True, False, False] and direct.scores[1] == 0.0
    assert [taus[r.example_id] for r in members if r.text] == direct.scores[[0, 2, 3]].tolist()

    all_empty = [dataclasses.replace(r, text=" ") if r.group_id == 1 else r for r in rollouts_]
    taus, run, _ = loop.group_rewards(cfg, all_empty, 1, model, tokenizer, target)  # skipped, not an error
    assert run is None and len(taus) == 4 and all(math.isnan(t) for t in taus.values())


def test_levenshtein_reward_is_max_for_identical_texts():
    r = levenshtein_rewards(["the goal text", "kitten", "", "zzzz"], "the goal text")
    assert r[0] == 1.0 and r.dtype == torch.float64 and (r[1:] < 1).all()
    assert levenshtein_rewards(["kitten"], "sitting").item() == pytest.approx(1 - 3 / 7)  # d = 3, max len 7
    assert levenshtein_rewards([""], "").item() == 1.0


def test_embedding_reward_identical_is_one_and_paraphrase_beats_unrelated():
    goal = "The cat sat on the mat."
    r = embedding_rewards([goal, "A cat was sitting on the rug.", "Quarterly revenue exceeded expectations."], goal)
    assert r.dtype == torch.float64 and r[0].item() == pytest.approx(1.0, abs=1e-6)
    assert r[1] > r[2] + 0.3


def test_langid_reward_scores_the_goal_language():
    english = "The weather was lovely this morning, so we walked to the market and bought fresh bread."
    french = "Il faisait très beau ce matin, alors nous sommes allés au marché acheter du pain frais."
    en, fr = langid_rewards([english, french], "en"), langid_rewards([english, french], "fr")
    assert en[0] > 0.8 and fr[1] > 0.8 and en[1] < 0.1 and fr[0] < 0.1 and en.dtype == torch.float64
    with pytest.raises(DPGError, match="not a language of lid.176; use one of .*en.*fr"):
        langid_rewards([english], "english")


def test_unknown_reward_name_lists_valid_names():
    with pytest.raises(DPGError) as e:
        get_reward("bleu")
    assert all(name in str(e.value) for name in REWARDS) and "package.module:function" in str(e.value)
    with pytest.raises(DPGError, match="cannot load plugin"):
        get_reward("no_such_module_xyz:fn")


def test_plugin_rewards_load_and_declare_their_kind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def length(texts, goal):\n"
        "    return torch.tensor([float(len(t)) for t in texts], dtype=torch.float64)\n"
        "def sft(target_model, examples_by_group, target, sft_config, outer_iteration=0, progress=None):\n"
        "    return {}, []\n"
        "sft.needs_sft = True\n")
    assert get_reward("my_rewards:length")(["ab", "abc"], "").tolist() == [2.0, 3.0]
    assert needs_sft(get_reward("my_rewards:sft")) and not needs_sft(get_reward("my_rewards:length"))
    assert needs_sft(get_reward("dpg")) and needs_sft(get_reward("naive")) and not needs_sft(get_reward("langid"))
