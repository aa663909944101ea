"""Generator side: loading, seeded rollouts, log-probs against a rescoring pass, target-example conversion."""

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpg.errors import DPGError
from dpg.generator import (
    RolloutConfig,
    encode_prompt,
    is_empty,
    load_generator,
    sample_rollouts,
    sequence_logprobs,
    to_target_examples,
)
from dpg.records import Rollout
from tests.conftest import make_tokenizer

PROMPTS = [("doc:0", "the cat sat on the mat"), ("doc:1", "a dog ran far away from home"), ("doc:2", "then")]


def tiny_generator(seed=0, vocab_size=None):
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval(), tokenizer


def favour_eos(model, bonus):
    """A forward hook that adds `bonus` to the eos logit (seen by sampling and rescoring alike)."""
    return model.lm_head.register_forward_hook(lambda module, args, out: out + bonus * torch.nn.functional.one_hot(
        torch.tensor(1), out.shape[-1]).to(out.dtype))


def rollout(text, i=0):
    return Rollout(example_id=f"0-{i}-0", outer_iteration=0, prompt_id=i, rollout_index=0, group_id=0, prompt="p",
                   text=text, prompt_token_ids=[3], token_ids=[4, 1], logprobs=[-1.0, -1.0], finish_reason="stop",
                   generator_version="v0")


def test_same_seed_gives_identical_rollouts_and_other_seeds_differ():
    model, tok = tiny_generator()
    cfg = RolloutConfig(n_rollouts=3, max_new_tokens=12, seed=7)
    a = sample_rollouts(model, tok, PROMPTS, cfg, outer_iteration=0, generator_version="v0")
    b = sample_rollouts(model, tok, PROMPTS, cfg, outer_iteration=0, generator_version="v0")
    c = sample_rollouts(model, tok, PROMPTS, RolloutConfig(n_rollouts=3, max_new_tokens=12, seed=8), 0, "v0")
    d = sample_rollouts(model, tok, PROMPTS, cfg, outer_iteration=1, generator_version="v0")
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.token_ids for r in a] != [r.token_ids for r in d]  # each outer iteration samples afresh
    assert len({tuple(r.token_ids) for r in a}) > 1  # rollouts of one prompt differ from each other


def test_rollouts_do_not_depend_on_batch_size():
    model, tok = tiny_generator()
    model.train()  # sampling runs in eval mode and restores the caller's mode
    one = sample_rollouts(model, tok, PROMPTS[:2], RolloutConfig(n_rollouts=2, max_new_tokens=8, batch_size=1), 0, "v")
    all_ = sample_rollouts(model, tok, PROMPTS[:2], RolloutConfig(n_rollouts=2, max_new_tokens=8, batch_size=4), 0, "v")
    assert [r.token_ids for r in one] == [r.token_ids for r in all_] and model.training
    for x, y in zip(one, all_):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


@pytest.mark.parametrize("grouping, expected", [("inverse", [0, 1, 2, 0, 1, 2, 0, 1, 2]), ("cross", [0] * 9)])
def test_group_ids_follow_the_grouping(grouping, expected):
    model, tok = tiny_generator()
    rollouts = sample_rollouts(model, tok, PROMPTS, RolloutConfig(n_rollouts=3, max_new_tokens=3, grouping=grouping),
                               outer_iteration=5, generator_version="v0")
    assert [r.group_id for r in rollouts] == expected
    assert [(r.prompt_id, r.rollout_index) for r in rollouts] == [(p, k) for p in range(3) for k in range(3)]
    assert rollouts[4].example_id == "5-1-1" and rollouts[4].source_id == "doc:1"
    assert rollouts[4].prompt == PROMPTS[1][1] and rollouts[4].prompt_token_ids == encode_prompt(tok, PROMPTS[1][1])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_rescoring_forward_pass(temperature, top_p):
    model, tok = tiny_generator()
    cfg = RolloutConfig(n_rollouts=2, max_new_tokens=15, temperature=temperature, top_p=top_p, batch_size=4)
    rollouts = sample_rollouts(model, tok, PROMPTS, cfg, 0, "v0")
    with torch.no_grad():
        rescored = sequence_logprobs(model, [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts])
    for r, lp in zip(rollouts, rescored):
        # stored = plain softmax at temperature 1 over the full vocabulary, whatever the sampling settings
        assert torch.allclose(torch.tensor(r.logprobs), lp, atol=1e-5, rtol=0)


def test_eos_ends_a_completion_and_is_its_last_token():
    model, tok = tiny_generator()
    handle = favour_eos(model, 2.5)  # p(eos) ~ 0.3 per step: some rollouts stop, some run to the limit
    rollouts = sample_rollouts(model, tok, PROMPTS, RolloutConfig(n_rollouts=4, max_new_tokens=6), 0, "v0")
    handle.remove()
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}
    for r in rollouts:
        assert len(r.token_ids) == len(r.logprobs) >= 1
        assert 1 not in r.token_ids[:-1]  # nothing is sampled after an end token
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == 1 and "<eos>" not in r.text
        else:
            assert len(r.token_ids) == 6 and r.token_ids[-1] != 1


def test_eos_first_gives_an_empty_completion_that_is_kept_and_marked():
    model, tok = tiny_generator()
    handle = favour_eos(model, 40.0)
    rollouts = sample_rollouts(model, tok, PROMPTS[:1], RolloutConfig(n_rollouts=2, max_new_tokens=5), 0, "v0")
    handle.remove()
    assert [r.token_ids for r in rollouts] == [[1], [1]]
    assert all(is_empty(r) and r.finish_reason == "stop" and r.logprobs[0] > -1e-6 for r in rollouts)


def test_sequence_logprobs_is_differentiable_and_batch_independent():
    model, _ = tiny_generator()
    prompts, completions = [[3, 4], [5, 6, 7, 8, 9]], [[10, 11, 1], [12]]
    batched = sequence_logprobs(model, prompts, completions)
    single = [sequence_logprobs(model, [p], [c])[0] for p, c in zip(prompts, completions)]
    assert [x.shape for x in batched] == [(3,), (1,)]
    for x, y in zip(batched, single):
        assert torch.allclose(x, y, atol=1e-6)
    sum(x.sum() for x in batched).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    for p, c, got in zip(prompts, completions, batched):
        with torch.no_grad():  # by hand: log softmax of the logits at the position before each completion token
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)  # (len(p + c), V)
        expected = logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), c]
        assert torch.allclose(got.detach(), expected, atol=1e-6)


def test_a_shared_prompt_is_encoded_once_with_the_same_logprobs_and_gradients():
    """A prompt's rollouts share one forward of it (KV cache copied to each completion): log-probs and their
    gradients are those of separate full passes, to float64 rounding."""
    model, _ = tiny_generator()
    model = model.double()
    prompts = [[3, 4, 5], [3, 4, 5], [6, 7], [3, 4, 5]]
    completions = [[10, 11, 1], [12], [13, 14], [15, 16, 17, 18]]

    def grads(logps):
        model.zero_grad(set_to_none=True)
        sum((x * torch.arange(1, len(x) + 1)).sum() for x in logps).backward()  # a different weight per token
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    shared = sequence_logprobs(model, prompts, completions)
    g_shared = grads(shared)
    alone = [sequence_logprobs(model, [p], [c])[0] for p, c in zip(prompts, completions)]
    g_alone = grads(alone)
    assert [x.shape for x in shared] == [(3,), (1,), (2,), (4,)]
    for x, y in zip(shared, alone):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert g_shared.keys() == g_alone.keys()
    for n in g_alone:
        torch.testing.assert_close(g_shared[n], g_alone[n], rtol=0, atol=1e-12, msg=n)


def test_rollouts_of_a_shared_prefill_match_their_rescoring():
    """Sampling encodes each prompt once for its n rollouts: the stored log-probs are what a full pass
    gives, and each rollout's tokens do not depend on how many rollouts share its prompt's batch."""
    model, tok = tiny_generator()
    model = model.double()
    four = sample_rollouts(model, tok, PROMPTS, RolloutConfig(n_rollouts=4, max_new_tokens=6, batch_size=12), 0, "v")
    one = sample_rollouts(model, tok, PROMPTS, RolloutConfig(n_rollouts=4, max_new_tokens=6, batch_size=1), 0, "v")
    assert [r.token_ids for r in four] == [r.token_ids for r in one]
    rescored = [sequence_logprobs(model, [r.prompt_token_ids], [r.token_ids])[0] for r in four]
    for r, lp in zip(four, rescored):
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), lp.detach(), rtol=0, atol=1e-10)


def test_sequence_logprobs_rejects_mismatched_or_empty_prompts():
    model, _ = tiny_generator()
    with pytest.raises(DPGError, match="2 prompts but 1 completions"):
        sequence_logprobs(model, [[3], [4]], [[5]])
    with pytest.raises(DPGError, match="empty prompt"):
        sequence_logprobs(model, [[]], [[5]])


def test_to_target_examples_truncates_pads_masks_and_keeps_empty_completions_in_their_slots(caplog):
    tok = make_tokenizer()  # pad id 0, eos id 1
    rollouts = [rollout("the cat sat", 0), rollout("", 1), rollout("a dog ran far away from home", 2),
                rollout("  \n", 3), rollout("mat", 4)]
    with caplog.at_level(logging.WARNING, logger="dpg.generator"):
        ids, mask, empty, n_tokens = to_target_examples(rollouts, tok, max_len=5)
    assert empty == [False, True, False, True, False] and n_tokens == [4, 1, 5, 1, 2]
    assert "2 of 5 completions are empty" in caplog.text
    assert ids.tolist() == [[3, 4, 5, 1, 0], [1, 0, 0, 0, 0], [8, 9, 10, 11, 12], [1, 0, 0, 0, 0],
                            [7, 1, 0, 0, 0]]  # row 2: truncated, no eos; rows 1 and 3: one eos token
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_to_target_examples_pads_with_eos_without_a_pad_token_and_never_masks_by_id():
    tok = make_tokenizer(pad_token=None)
    ids, mask, empty, _ = to_target_examples([rollout("the cat"), rollout("dog")], tok, max_len=4)
    assert ids.tolist() == [[3, 4, 1, 1], [9, 1, 1, 1]] and empty == [False, False]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]  # the real eos counts, the eos padding does not


def test_to_target_examples_keeps_a_batch_of_only_empty_completions():
    ids, mask, empty, _ = to_target_examples([rollout(""), rollout(" ")], make_tokenizer(pad_token=None), max_len=3)
    assert empty == [True, True] and ids.tolist() == [[1, 1, 1], [1, 1, 1]] and mask.tolist() == [[1, 0, 0]] * 2
    with pytest.raises(DPGError, match="max_len=1"):
        to_target_examples([rollout("cat")], make_tokenizer(), max_len=1)


def test_plain_prompt_without_chat_template():
    tok = make_tokenizer()
    assert encode_prompt(tok, "the cat sat") == [3, 4, 5]


@pytest.mark.parametrize("key, value, message", [
    ("n_rollouts", 0, "rollouts.n_rollouts=0 is invalid; use an integer >= 1"),
    ("temperature", 0.0, "rollouts.temperature=0.0 is invalid; use a number > 0"),
    ("top_p", 1.5, "rollouts.top_p=1.5 is invalid; use a number in (0, 1]"),
    ("max_new_tokens", 2.0, "rollouts.max_new_tokens=2.0 is invalid"),
    ("grouping", "pairs", "rollouts.grouping='pairs' is invalid; use one of ['inverse', 'cross']"),
    ("seed", -1, "rollouts.seed=-1 is invalid"),
])
def test_rollout_config_errors_name_key_value_and_fix(key, value, message):
    with pytest.raises(DPGError) as e:
        RolloutConfig(**{key: value})
    assert message in str(e.value)
    with pytest.raises(DPGError, match="unknown key.*rollouts.n"):
        RolloutConfig.from_dict({"n": 4})
    assert RolloutConfig.from_dict(RolloutConfig(seed=3).to_dict()) == RolloutConfig(seed=3)


def test_load_generator_full_or_lora_from_a_local_folder(tmp_path):
    model, tok = tiny_generator()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    full, full_tok = load_generator(str(tmp_path))
    assert full_tok.padding_side == "left" and all(p.requires_grad for p in full.parameters())
    lora, _ = load_generator(str(tmp_path), lora_rank=4)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    rollouts = sample_rollouts(lora, tok, PROMPTS[:1], RolloutConfig(n_rollouts=2, max_new_tokens=4), 0, "v0")
    lp = sequence_logprobs(lora, [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts])
    assert torch.allclose(torch.tensor(rollouts[0].logprobs), lp[0].detach(), atol=1e-5)
    lp[0].sum().backward()  # gradients reach the adapters only
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad and "lora_B" in n)


def test_load_generator_lora_is_a_function_of_the_seed_and_leaves_the_global_rng_alone(tmp_path):
    model, tok = tiny_generator()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def adapters(seed):
        state = torch.get_rng_state()
        lora, _ = load_generator(str(tmp_path), lora_rank=4, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither advanced nor reseeded
        return {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}

    a, b = adapters(3), adapters(3)
    torch.rand(5)  # whatever the global RNG did in between
    c, other = adapters(3), adapters(4)
    assert a and a.keys() == b.keys() == c.keys() == other.keys()
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    assert any(not torch.equal(a[n], other[n]) for n in a if "lora_A" in n)


def test_load_generator_bad_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(DPGError, match="is not a readable model folder"):
        load_generator(str(tmp_path / "missing"))
    with pytest.raises(DPGError, match="cannot load model"):
        load_generator(str(tmp_path))  # exists, but holds no model
    with pytest.raises(DPGError, match="only when already in the local cache"):
        load_generator("no-such-org/no-such-model")
    with pytest.raises(DPGError, match="lora_rank=0"):
        load_generator(str(tmp_path), lora_rank=0)
    with pytest.raises(DPGError, match="lora_alpha=16"):
        load_generator(str(tmp_path), lora_alpha=16)


@pytest.mark.smollm2
def test_smollm2_rollouts_use_the_chat_template_and_their_logprobs_rescore(smollm2):
    model, tok = smollm2
    prompts = [("a", "Rephrase this article in different terms.\n\nArticle:\nBees make honey from nectar."),
               ("b", "Rephrase this article in different terms.\n\nArticle:\nThe river rose after the rain.")]
    cfg = RolloutConfig(n_rollouts=2, max_new_tokens=16, seed=0)
    rollouts = sample_rollouts(model, tok, prompts, cfg, 0, "smollm2")
    assert len(rollouts) == 4
    prompt_text = tok.decode(rollouts[0].prompt_token_ids)
    assert prompt_text.startswith("<|im_start|>system") and prompt_text.endswith("<|im_start|>assistant\n")
    assert "Bees make honey" in prompt_text
    assert all(r.text.strip() and len(r.token_ids) <= 16 for r in rollouts)
    assert all((r.finish_reason == "stop") == (r.token_ids[-1] == tok.eos_token_id) for r in rollouts)
    with torch.no_grad():
        rescored = sequence_logprobs(model, [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts])
    worst = max(float((torch.tensor(r.logprobs) - lp).abs().max()) for r, lp in zip(rollouts, rescored))
    assert worst < 1e-4, worst  # fp32, KV-cached left-padded sampling vs one right-padded forward pass
