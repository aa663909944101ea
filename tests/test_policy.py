"""The GRPO generator update: gradients against hand derivations, a toy RL run, and bit-identical resume."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dpg.advantages import group_advantages
from dpg.errors import DPGError
from dpg.generator import sequence_logprobs
from dpg.policy import (
    PolicyConfig,
    grpo_loss,
    load_policy_state,
    policy_optimizer,
    policy_update,
    save_policy_state,
)

GOOD = 5  # the toy reward: how often the completion contains this token
PROMPTS = [[1, 2, 3], [4, 6, 7], [8, 9, 10], [11, 12, 13]]


pytestmark = pytest.mark.usefixtures("one_thread")


def generator(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32,
                                        attn_implementation="eager")).eval()


def sample(model, n: int, length: int, gen: torch.Generator | None = None):
    """n completions of `length` tokens per prompt at temperature 1 (no KV cache: the model is tiny)."""
    ids = torch.tensor(PROMPTS).repeat_interleave(n, 0)  # (P*n, 3)
    with torch.no_grad():
        for _ in range(length):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)  # (P*n, V)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids[:, :3].tolist(), ids[:, 3:].tolist()


def rl_step(model, optimizer, config, n=8, length=8, gen=None) -> float:
    """Sample, reward (frequency of GOOD), group-normalise by prompt, update; returns the mean reward."""

    prompts, completions = sample(model, n, length, gen)
    rewards = torch.tensor([c.count(GOOD) / len(c) for c in completions], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, torch.arange(len(PROMPTS)).repeat_interleave(n))
    with torch.no_grad():
        old = sequence_logprobs(model, prompts, completions)
    policy_update(model, optimizer, prompts, completions, old, advantages, config)
    return rewards.mean().item()


# --- the loss against hand derivations (a logits-only policy: log pi(x) = log_softmax(theta)[x]) -------------

TOKENS = [[0, 2, 2], [1, 3]]  # two sequences of lengths 3 and 2


def hand_grad(theta, A, weights):
    """-(1/S) sum_i A_i (1/L_i) sum_t w_it (e_x - pi), the gradient of the surrogate in its unclipped branch."""
    pi = torch.softmax(theta.detach(), -1)
    g = torch.zeros_like(theta)
    for i, toks in enumerate(TOKENS):
        for t, x in enumerate(toks):
            g += -A[i] * weights[i][t] * (F.one_hot(torch.tensor(x), theta.numel()).double() - pi) / len(toks)
    return g / len(TOKENS)


def policy_logprobs(theta):
    logp = F.log_softmax(theta, -1)
    return [logp[torch.tensor(t)] for t in TOKENS]


def test_surrogate_gradient_at_ratio_one_is_minus_advantage_times_grad_log_pi():
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    A = torch.tensor([1.5, -0.7], dtype=torch.float64)
    new = policy_logprobs(theta)
    loss, stats = grpo_loss(new, [x.detach() for x in new], A, clip_eps=0.2)
    loss.backward()
    torch.testing.assert_close(theta.grad, hand_grad(theta, A, [[1.0] * 3, [1.0] * 2]), rtol=1e-12, atol=1e-15)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == 1.0 and stats["tokens"] == 5.0
    # the value: -(1/S) sum_i A_i (token mean of r = 1)
    assert loss.item() == pytest.approx(-(1.5 - 0.7) / 2, rel=1e-15)


def test_clipped_tokens_give_zero_gradient_and_unclipped_side_keeps_it():
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    new = policy_logprobs(theta)
    # sequence 0: r = 1.5 > 1.2 with A > 0; sequence 1: r = 0.5 < 0.8 with A < 0: both clipped -> no gradient
    old = [new[0].detach() - math.log(1.5), new[1].detach() + math.log(2.0)]
    loss, stats = grpo_loss(new, old, torch.tensor([2.0, -1.0], dtype=torch.float64), clip_eps=0.2)
    loss.backward()
    assert torch.equal(theta.grad, torch.zeros_like(theta)) and stats["clip_fraction"] == 1.0
    # the same ratios with the advantages' signs flipped: min() picks the unclipped r*A, gradient -A r grad log pi
    theta.grad = None
    A = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(policy_logprobs(theta), old, A, clip_eps=0.2)
    loss.backward()
    torch.testing.assert_close(theta.grad, hand_grad(theta, A, [[1.5] * 3, [0.5] * 2]), rtol=1e-12, atol=1e-15)
    assert stats["clip_fraction"] == 0.0


def test_k3_kl_penalty_value_and_gradient():
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    ref = [x.detach() for x in policy_logprobs(torch.randn(5, dtype=torch.float64, generator=g))]
    new = policy_logprobs(theta)
    beta = 0.3
    loss, stats = grpo_loss(new, [x.detach() for x in new], torch.zeros(2, dtype=torch.float64), 0.2, ref, beta)
    loss.backward()
    d = [r - n.detach() for r, n in zip(ref, new)]  # ref - new per token
    k3 = [torch.exp(x) - x - 1 for x in d]
    assert loss.item() == pytest.approx(beta * sum(k.mean().item() for k in k3) / 2, rel=1e-12)
    assert stats["kl"] == pytest.approx(torch.cat(k3).mean().item(), rel=1e-12) and stats["kl"] > 0
    # d k3 / d new = 1 - exp(ref - new): the hand gradient with A = -beta and per-token weights (1 - exp(d))
    weights = [(1 - torch.exp(x)).tolist() for x in d]
    torch.testing.assert_close(theta.grad, hand_grad(theta, [-beta, -beta], weights), rtol=1e-12, atol=1e-15)


def test_grpo_loss_rejects_empty_or_mismatched_sequences():
    with pytest.raises(DPGError, match="non-empty completion"):
        grpo_loss([torch.zeros(0)], [torch.zeros(0)], torch.zeros(1), 0.2)
    with pytest.raises(DPGError, match="one per completion token"):
        grpo_loss([torch.zeros(3)], [torch.zeros(2)], torch.zeros(1), 0.2)


def test_policy_config_errors_name_key_value_and_fix():
    with pytest.raises(DPGError, match=r"policy\.clip_eps=1\.5 is invalid; use a number in \(0, 1\)"):
        PolicyConfig(clip_eps=1.5)
    with pytest.raises(DPGError, match=r"policy\.minibatch=0 is invalid"):
        PolicyConfig(minibatch=0)
    with pytest.raises(DPGError, match=r"unknown key\(s\) policy\.learning_rate"):
        PolicyConfig.from_dict({"learning_rate": 1e-5})
    assert PolicyConfig.from_dict(PolicyConfig(lr=1e-6).to_dict()) == PolicyConfig(lr=1e-6)


# --- policy_update --------------------------------------------------------------------------------------------


def test_microbatching_gives_the_same_update_and_updates_are_deterministic():
    results = []  # plain SGD: Adam would turn rounding noise in near-zero gradients into whole lr-sized steps
    for microbatch in (None, 1, 3, None):
        model = generator(0)
        config = PolicyConfig(epochs=2, minibatch=6, microbatch=microbatch)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        rl_step(model, optimizer, config, n=2, length=4, gen=torch.Generator().manual_seed(0))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[3])  # same seed, same everything: bit-identical
    for other in results[1:3]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-7)
    initial = torch.cat([p.detach().flatten() for p in generator(0).parameters()])
    assert (results[0] - initial).abs().max() > 1e-4  # the update did move the weights


def test_mean_reward_rises_on_a_toy_token_frequency_reward():
    start = time.perf_counter()
    for seed in range(3):
        model = generator(seed)
        config = PolicyConfig(lr=1e-2, epochs=2, minibatch=16, seed=seed)
        optimizer = policy_optimizer(model, config)
        gen = torch.Generator().manual_seed(seed)
        means = [rl_step(model, optimizer, config, gen=gen) for _ in range(12)]
        first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
        assert first < 0.1 and last > first + 0.3, (seed, means)
    assert time.perf_counter() - start < 60


def test_kl_penalty_needs_a_reference_and_a_peft_model_serves_as_its_own():

    prompts, completions = sample(generator(0), 2, 4, torch.Generator().manual_seed(0))
    advantages = torch.tensor([1.0, -1.0] * len(PROMPTS), dtype=torch.float64)
    config = PolicyConfig(lr=1e-2, kl_coef=0.1)
    model = generator(0)
    with torch.no_grad():
        old = sequence_logprobs(model, prompts, completions)
    with pytest.raises(DPGError, match="policy.kl_coef=0.1 needs the initial generator"):
        policy_update(model, policy_optimizer(model, config), prompts, completions, old, advantages, config)
    kls = []
    for ref_model in (None, generator(0)):  # peft adapters switched off, or the base model passed explicitly
        model = lora(0)
        optimizer = policy_optimizer(model, config)
        for _ in range(2):
            with torch.no_grad():
                old = sequence_logprobs(model, prompts, completions)
            stats = policy_update(model, optimizer, prompts, completions, old, advantages, config, ref_model)
        kls.append(stats["kl"])
    assert kls[0] == kls[1] > 0


# --- resumable state ------------------------------------------------------------------------------------------


def lora(seed: int):
    peft = pytest.importorskip("peft")
    base = generator(0)  # the same "pretrained" weights every time: only the adapters are saved
    torch.manual_seed(seed)  # adapter init differs with the seed
    return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights="gaussian"))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_save_load_continue_is_bit_identical_to_not_stopping(kind, tmp_path):
    make = generator if kind == "full" else lora
    config = PolicyConfig(lr=1e-2, epochs=2, minibatch=8, seed=3)

    def run(model, optimizer, steps):  # samples with the global torch RNG, so its saved state matters
        for _ in range(steps):
            rl_step(model, optimizer, config, n=4, length=4)

    torch.manual_seed(123)
    straight = make(0)
    opt = policy_optimizer(straight, config)
    torch.manual_seed(7)
    run(straight, opt, 4)

    resumed = make(0)
    opt = policy_optimizer(resumed, config)
    torch.manual_seed(7)
    run(resumed, opt, 2)
    save_policy_state(tmp_path / "state", resumed, opt, {"outer_iteration": 2})
    resumed, opt = make(1), None  # a fresh process: other initial weights, no optimizer state, another RNG state
    opt = policy_optimizer(resumed, config)
    torch.manual_seed(999)
    assert load_policy_state(tmp_path / "state", resumed, opt) == {"outer_iteration": 2}
    run(resumed, opt, 2)

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "state" / "trainable.safetensors")
    trainable = {k for k, p in straight.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    if kind == "lora":
        assert all("lora_" in k for k in saved) and len(saved) == 4  # A and B of q_proj and v_proj


def test_failed_save_keeps_the_previous_state_and_leaves_no_temporary_files(tmp_path):
    model = generator(0)
    opt = policy_optimizer(model, PolicyConfig())
    save_policy_state(tmp_path / "state", model, opt, {"outer_iteration": 1})
    with pytest.raises(DPGError, match="not JSON-serialisable"):
        save_policy_state(tmp_path / "state", model, opt, {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert load_policy_state(tmp_path / "state", model, opt) == {"outer_iteration": 1}
    save_policy_state(tmp_path / "state", model, opt, {"outer_iteration": 2})  # overwrite an existing state
    assert load_policy_state(tmp_path / "state", model, opt) == {"outer_iteration": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_loading_into_a_different_model_is_an_error(tmp_path):
    model = generator(0)
    save_policy_state(tmp_path / "state", model, policy_optimizer(model, PolicyConfig()), {})
    model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(DPGError, match="does not fit the model: missing \\[\\], unexpected \\['model.embed_tokens"):
        load_policy_state(tmp_path / "state", model, policy_optimizer(model, PolicyConfig()))
    with pytest.raises(DPGError, match="holds no complete policy state"):
        load_policy_state(tmp_path / "nowhere", model, policy_optimizer(model, PolicyConfig()))
