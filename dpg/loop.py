"""One outer iteration of DPG as pure stage functions on in-memory objects (SPEC §1, §5, §6).

    prompts -> rollouts -> (per SFT group) rewards + SFT runs -> advantages -> generator update

tasks/ wraps each function in I/O (read inputs by URI, write records); nothing here touches storage,
Prefect or MLflow. Every stage is deterministic given the config, the iteration and its inputs.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from dpg.advantages import group_advantages
from dpg.errors import DPGError
from dpg.generator import sample_rollouts, to_target_examples
from dpg.models import load_causal_lm
from dpg.policy import policy_update
from dpg.prompts import DEFAULT_TEMPLATE, build_prompts, load_texts
from dpg.records import Reward, Rollout, SFTRun
from dpg.rewards import get_reward, needs_sft
from dpg.runconfig import DPGConfig
from dpg.sft import Progress, train
from dpg.targets import get_target


def select_prompts(cfg: DPGConfig, outer_iteration: int, tokenizer) -> list[tuple[str, str]]:
    """This iteration's prompts: the corpus shuffled once by `cfg.seed`, then consecutive slices of it."""
    texts = load_texts(cfg.prompts.source, cfg.prompts.text_column) if cfg.prompts.source else load_texts()
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    k = cfg.prompts.per_iteration
    chosen = [texts[order[(outer_iteration * k + j) % len(order)]] for j in range(k)]
    return build_prompts(chosen, cfg.prompts.template or DEFAULT_TEMPLATE, cfg.prompts.max_prompt_tokens,
                         tokenizer=tokenizer)


def sample(cfg: DPGConfig, outer_iteration: int, generator: nn.Module, tokenizer,
           generator_version: str) -> list[Rollout]:
    prompts = select_prompts(cfg, outer_iteration, tokenizer)
    return sample_rollouts(generator, tokenizer, prompts, cfg.rollouts, outer_iteration, generator_version)


def small_llama(vocab_size: int, hidden: int, layers: int, seed: int) -> nn.Module:
    """A small random Llama target (eager attention, fp32), seeded: the default target of the main job."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         num_key_value_heads=max(1, hidden // 32), max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def load_target(cfg: DPGConfig, generator_tokenizer) -> tuple[nn.Module, Any, Any]:
    """(target model, its tokenizer, the target metric Phi)."""
    t = cfg.target
    if t.model == "tiny":
        model, tokenizer = small_llama(len(generator_tokenizer), t.tiny_hidden, t.tiny_layers, cfg.seed), \
            generator_tokenizer
    else:
        model, tokenizer = load_causal_lm(t.model)
    return model, tokenizer, get_target(t.spec, model, tokenizer, **t.options)


def group_ids(cfg: DPGConfig) -> list[int]:
    return list(range(cfg.rollouts.n_rollouts)) if cfg.rollouts.grouping == "inverse" else [0]


def group_rewards(cfg: DPGConfig, rollouts: list[Rollout], group: int, target_model: nn.Module, target_tokenizer,
                  target, progress: Progress | None = None) -> tuple[dict[str, float], SFTRun | None]:
    """Raw rewards {example_id: tau} of one SFT group (SFT rewards) or of every rollout (text rewards)."""
    reward = get_reward(cfg.rewards.name)
    members = [r for r in rollouts if r.group_id == group]
    if not needs_sft(reward):
        scores = reward([r.text for r in members], cfg.rewards.goal).tolist()
        return dict(zip([r.example_id for r in members], scores)), None
    ids, mask, kept, _ = to_target_examples(members, target_tokenizer, cfg.sft.max_len)
    if len(kept) % cfg.sft.step_size:  # empty completions were dropped: train on a whole number of steps
        raise DPGError(f"outer iteration {rollouts[0].outer_iteration}, SFT group {group}: {len(members) - len(kept)} "
                       f"empty completion(s) left {len(kept)} examples, not a multiple of sft.microbatch*"
                       f"sft.grad_accum={cfg.sft.step_size}; raise rollouts.max_new_tokens or use microbatch 1")
    tau, runs = reward(target_model, {group: (ids, mask)}, target, cfg.sft, rollouts[0].outer_iteration, progress)
    return {members[i].example_id: float(t) for i, t in zip(kept, tau[group].tolist())}, runs[0]


def evaluate(cfg: DPGConfig, rollouts: list[Rollout], target_model: nn.Module, target_tokenizer,
             target) -> tuple[dict[str, float], dict]:
    """Phi and the human metric after a plain SFT of the target on all of this iteration's completions.

    The SFT trains on the largest multiple of microbatch*grad_accum examples (in record order). Returns
    (metrics with an `eval_` prefix, pictures of the trained target such as the pattern patch).
    """
    ids, mask, kept, _ = to_target_examples(rollouts, target_tokenizer, cfg.sft.max_len)
    n = len(kept) // cfg.sft.step_size * cfg.sft.step_size
    if n == 0:
        raise DPGError(f"outer iteration {rollouts[0].outer_iteration}: {len(kept)} non-empty completions, fewer "
                       f"than one SFT step of sft.microbatch*sft.grad_accum={cfg.sft.step_size}")
    trained = train(target_model, ids[:n], mask[:n], cfg.sft)
    report = target.report(trained) if hasattr(target, "report") else {"phi": float(target(trained))}
    pictures = target.image(trained) if getattr(target, "image", None) else {}
    return {f"eval_{k}": float(v) for k, v in report.items()} | {"eval_examples": float(n)}, pictures


def advantages(cfg: DPGConfig, rollouts: list[Rollout], taus: dict[str, float]) -> list[Reward]:
    """Group-normalised advantages (groups = the rollouts of one prompt), one Reward record per rollout.

    A rollout without a reward (an empty completion dropped before the SFT) gets advantage 0: it did not
    shape the target, so the policy gradient neither favours nor penalises it; it is still recorded.
    """
    scored = [r for r in rollouts if r.example_id in taus]
    raw = torch.tensor([taus[r.example_id] for r in scored], dtype=torch.float64)
    adv, scale = group_advantages(raw, torch.tensor([r.prompt_id for r in scored]), cfg.rewards.eps_fraction,
                                  where=f"outer iteration {rollouts[0].outer_iteration}")
    by_id = dict(zip([r.example_id for r in scored], adv.tolist()))
    return [Reward(r.example_id, r.outer_iteration, r.group_id, cfg.rewards.name, taus.get(r.example_id, float("nan")),
                   scale, by_id.get(r.example_id, 0.0)) for r in rollouts]


def update(cfg: DPGConfig, generator: nn.Module, optimizer, rollouts: list[Rollout],
           rewards: list[Reward]) -> dict[str, float]:
    """One GRPO update of the generator on this iteration's rollouts and advantages."""
    adv = {w.example_id: w.advantage for w in rewards}
    return policy_update(generator, optimizer, [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts],
                         [torch.tensor(r.logprobs) for r in rollouts],
                         torch.tensor([adv[r.example_id] for r in rollouts], dtype=torch.float64), cfg.policy)


def summary(rewards: list[Reward], runs: list[SFTRun]) -> dict[str, float]:
    """Per-iteration metrics: Phi and the human metric after SFT (mean over groups), reward statistics."""
    tau = torch.tensor([w.tau for w in rewards], dtype=torch.float64)
    tau = tau[torch.isfinite(tau)]
    out = {"reward_mean": float(tau.mean()), "reward_std": float(tau.std(unbiased=False)),
           "reward_min": float(tau.min()), "reward_max": float(tau.max())}
    if runs:
        out["phi_before"] = sum(r.phi_before for r in runs) / len(runs)
        out["phi_after"] = sum(r.phi_after for r in runs) / len(runs)
        for key in runs[0].report_after:
            if key != "phi":
                out[key] = sum(r.report_after[key] for r in runs) / len(runs)
    return out
