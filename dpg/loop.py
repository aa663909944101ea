"""One outer iteration of DPG as pure stage functions on in-memory objects (SPEC §1, §5, §6).

    prompts -> rollouts -> (per SFT group) rewards + SFT runs -> advantages -> generator update

tasks/ wraps each function in I/O (read inputs by URI, write records); nothing here touches storage,
Prefect or MLflow. Every stage is deterministic given the config, the iteration and its inputs: any
random draw comes from a generator seeded from the config (rollouts: `dpg.generator`; models, rewards,
evaluation and update: torch's CPU RNG inside `dpg.models.seeded(stage_seed(...))`), never from the
global RNG, whose state no stage changes.

Two outcomes that do not end a run: an empty completion (it keeps its SFT slot but gets no reward:
tau NaN, advantage 0, `empty` in the audit table), and a flat batch (no reward spread: every advantage
0, the generator update skipped), until rewards.max_flat_batches flat batches in a row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Any

import torch
from torch import nn

from dpg.advantages import group_advantages
from dpg.credit import generator_credit, reward_to_go, token_advantages
from dpg.errors import DPGError
from dpg.generator import is_empty, sample_rollouts, target_rows, to_target_examples
from dpg.models import load_causal_lm, seeded, stage_seed
from dpg.policy import policy_update
from dpg.prompts import DEFAULT_TEMPLATE, build_prompts, load_texts
from dpg.records import Reward, Rollout, SFTRun
from dpg.rewards import get_reward, needs_ids, needs_sft
from dpg.runconfig import DPGConfig
from dpg.sft import Progress, train
from dpg.targets import get_target, report_of
from dpg.textmetrics import text_metrics

log = logging.getLogger(__name__)


def corpus(cfg: DPGConfig) -> list[tuple[str, str]]:
    """(source_id, text) pairs of the prompt corpus (prompts.source, else the default corpus)."""
    return load_texts(cfg.prompts.source, cfg.prompts.text_column) if cfg.prompts.source else load_texts()


def select_prompts(cfg: DPGConfig, outer_iteration: int, tokenizer) -> list[tuple[str, str]]:
    """This iteration's prompts: the corpus shuffled once by `cfg.seed`, then consecutive slices of it."""
    texts = corpus(cfg)
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
    """A small random Llama target (eager attention, fp32), initialised from `seed` (the global RNG is untouched):
    the default target of the main job."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         num_key_value_heads=max(1, hidden // 32), max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="eager")
    with seeded(seed):
        return LlamaForCausalLM(config).eval()


def pretrain(model: nn.Module, tokenizer, texts: list[str], steps: int, seed: int, batch: int = 32,
             length: int = 32, lr: float = 3e-3) -> nn.Module:
    """`steps` AdamW steps of plain next-token training on random windows of the concatenated texts (each text
    ends with eos), in place; windows are drawn from a generator seeded by `seed`. Returns the model in eval mode."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = torch.tensor([i for text in texts for i in [*tokenizer(text)["input_ids"], eos]])
    if len(stream) <= length:
        raise DPGError(f"target.tiny_pretrain_steps needs more than {length} tokens of prompt corpus; "
                       f"it has {len(stream)}")
    g = torch.Generator().manual_seed(seed)  # windows are drawn on the CPU: the same on every device
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - length, (batch,), generator=g)
        x = torch.stack([stream[a:a + length] for a in starts.tolist()]).to(device)  # (batch, length)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def load_target(cfg: DPGConfig, generator_tokenizer, device: torch.device | str = "cpu",
                state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Any, Any]:
    """(target model on `device`, its tokenizer, the target metric Phi); any draw while building them is seeded
    by cfg.seed (a `tiny` target's by target.tiny_seed when it is set); the weights are drawn on the CPU, so a
    `tiny` target starts the same on every device.
    A `tiny` target is pretrained on the prompt corpus first when target.tiny_pretrain_steps > 0, unless `state`
    holds its weights after that pretraining (`tiny_state`, e.g. as a run stored them): they are loaded instead."""
    t = cfg.target
    seed = t.tiny_seed if t.model == "tiny" and t.tiny_seed is not None else cfg.seed
    options = dict(t.options)
    commonest = options.get("token_ids") == "commonest"  # the patch on the prompt corpus's commonest tokens
    pretraining = t.model == "tiny" and t.tiny_pretrain_steps and state is None
    texts = [text for _, text in corpus(cfg)] if commonest or pretraining else []
    if commonest:
        options["texts"] = texts
    with seeded(seed):
        if t.model == "tiny":
            model, tokenizer = small_llama(len(generator_tokenizer), t.tiny_hidden, t.tiny_layers, seed).to(device), \
                generator_tokenizer
            if state is not None:
                try:
                    got = model.load_state_dict(state, strict=False)  # the tied head is the embedding: one tensor
                except RuntimeError:  # a shape differs
                    got = None
                if got is None or got.unexpected_keys or tiny_state(model).keys() != state.keys():
                    raise DPGError(f"the stored weights do not fit the tiny target (target.tiny_hidden="
                                   f"{t.tiny_hidden}, tiny_layers={t.tiny_layers}); delete them to pretrain anew")
            elif pretraining:
                pretrain(model, tokenizer, texts, t.tiny_pretrain_steps, seed)
        else:
            model, tokenizer = load_causal_lm(t.model)
            model = model.to(device)
        return model, tokenizer, get_target(t.spec, model, tokenizer, **options)


def tiny_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A `tiny` target's weights on the CPU, each shared tensor once (its head is tied to its embedding)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().cpu().contiguous()
    return state


def group_ids(cfg: DPGConfig) -> list[int]:
    return list(range(cfg.rollouts.n_rollouts)) if cfg.rollouts.grouping == "inverse" else [0]


def group_rewards(cfg: DPGConfig, rollouts: list[Rollout], group: int, target_model: nn.Module, target_tokenizer,
                  target, progress: Progress | None = None, process_group=None
                  ) -> tuple[dict[str, float], SFTRun | None, dict[str, list[float]]]:
    """Raw rewards {example_id: tau} of one SFT group's rollouts, its SFT run (None for text rewards), and,
    with token credit (rewards.credit token / token-own / token-context), each rollout's per-generator-token credit
    {example_id: [c_ij]} ({} otherwise; sum_j c_ij = tau_i up to truncation at sft.max_len, see dpg.credit).

    Every member gets an entry. SFT rewards: an empty completion keeps its SFT slot as a one-token row that
    contributes nothing (`to_target_examples`: its loss and metagradient are exactly 0), and its tau is NaN
    (no reward, never a silent 0); a group of only empty completions is skipped (every tau NaN, no SFT run).
    Both with a warning. Text rewards score every text; `random` also gets the example ids, the run's seed
    and the iteration. A torch.distributed `process_group` makes the `dpg` reward's SFT run data parallel
    (every rank calls this with the same arguments and gets the same result).
    """
    reward = get_reward(cfg.rewards.name)
    members = [r for r in rollouts if r.group_id == group]
    it = rollouts[0].outer_iteration
    with seeded(stage_seed(cfg.seed, it, f"sft-g{group}")):  # for rewards that draw (plugins): seeded, not global
        if not needs_sft(reward):
            extra = {"example_ids": [r.example_id for r in members], "seed": cfg.seed,
                     "outer_iteration": it} if needs_ids(reward) else {}
            scores = reward([r.text for r in members], cfg.rewards.goal, **extra).tolist()
            return dict(zip([r.example_id for r in members], scores)), None, {}
        ids, mask, empty, n_tokens = to_target_examples(members, target_tokenizer, cfg.sft.max_len)
        if all(empty):
            log.warning("outer iteration %d, SFT group %d: all %d completions are empty; the group is skipped "
                        "(tau = NaN, advantage 0)", it, group, len(members))
            return {r.example_id: math.nan for r in members}, None, {}
        if any(empty):
            log.warning("outer iteration %d, SFT group %d: %d empty completion(s) get no reward (tau = NaN)", it,
                        group, sum(empty))
        per_token = cfg.rewards.credit != "sequence"
        tau, runs = reward(target_model, {group: (ids, mask)}, target, cfg.sft, it, progress,
                           **({"per_token": True} if per_token else {}),
                           **({"process_group": process_group} if process_group is not None else {}))
    scores = tau[group]
    credit = {r.example_id: generator_credit(r, row, n, target_tokenizer).tolist()
              for r, e, row, n in zip(members, empty, scores, n_tokens) if not e} if per_token else {}
    totals = scores.sum(1) if per_token else scores
    return ({r.example_id: math.nan if e else float(t) for r, e, t in zip(members, empty, totals.tolist())}, runs[0],
            credit)


def evaluate(cfg: DPGConfig, rollouts: list[Rollout], target_model: nn.Module, target_tokenizer,
             target) -> tuple[dict[str, float], dict]:
    """Phi and the human metric after a plain SFT of the target on all of this iteration's completions.

    The SFT trains on the first multiple of microbatch*grad_accum rollouts (in record order); empty
    completions stay in as one-token rows that contribute nothing. Returns (metrics with an `eval_` prefix,
    pictures of the trained target such as the pattern patch), plus `cfg.target.text_metrics` of the
    completions themselves (dpg.textmetrics: e.g. the share in the goal language).
    """
    with seeded(stage_seed(cfg.seed, rollouts[0].outer_iteration, "eval")):
        trained = fine_tune(cfg, rollouts, target_model, target_tokenizer, rollouts[0].outer_iteration)
        report = report_of(target, trained)
        pictures = target.image(trained) if getattr(target, "image", None) else {}
    texts = text_metrics([r.text for r in rollouts], list(cfg.target.text_metrics))
    if getattr(target, "token_ids", ()):
        texts["text_patch_token_share"] = patch_token_share(rollouts, target_tokenizer, cfg.sft.max_len,
                                                            target.token_ids)
    n = len(rollouts) // cfg.sft.step_size * cfg.sft.step_size
    return {f"eval_{k}": float(v) for k, v in report.items()} | {"eval_examples": float(n)} | texts, pictures


def fresh_due(cfg: DPGConfig, outer_iteration: int) -> bool:
    """Whether iteration `outer_iteration` has the fresh eval (target.eval_fresh > 0): at iteration 0, and where
    outer_iteration + 1 is a multiple of target.eval_fresh_every."""
    t = cfg.target
    return t.eval_fresh > 0 and (outer_iteration == 0 or (outer_iteration + 1) % t.eval_fresh_every == 0)


def sample_fresh(cfg: DPGConfig, outer_iteration: int, generator: nn.Module, tokenizer,
                 generator_version: str) -> list[Rollout]:
    """target.eval_fresh new completions of `generator` (the one that sampled `outer_iteration`), with prompts and
    draws of their own: the corpus in an order seeded by stage_seed(seed, it, "fresh"), as many prompts as the
    completions need, rollouts seeded from that same seed. Their example ids are `fresh-<it>-<prompt>-<rollout>`."""
    seed = stage_seed(cfg.seed, outer_iteration, "fresh")
    texts = corpus(cfg)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n = cfg.target.eval_fresh
    chosen = [texts[order[j % len(order)]] for j in range(-(-n // cfg.rollouts.n_rollouts))]
    prompts = build_prompts(chosen, cfg.prompts.template or DEFAULT_TEMPLATE, cfg.prompts.max_prompt_tokens,
                            tokenizer=tokenizer)
    rollouts = sample_rollouts(generator, tokenizer, prompts, dataclasses.replace(cfg.rollouts, seed=seed),
                               outer_iteration, generator_version)[:n]
    return [dataclasses.replace(r, example_id=f"fresh-{r.example_id}") for r in rollouts]


def evaluate_fresh(cfg: DPGConfig, fresh: list[Rollout], target_model: nn.Module, target_tokenizer,
                   target) -> dict[str, float]:
    """`evaluate` on `sample_fresh`'s completions: its metrics renamed eval_fresh_* and text_fresh_*."""
    metrics, _ = evaluate(cfg, fresh, target_model, target_tokenizer, target)
    return {k.replace("eval_", "eval_fresh_", 1).replace("text_", "text_fresh_", 1): v for k, v in metrics.items()}


def fine_tune(cfg: DPGConfig, rollouts: list[Rollout] | list[str], target_model: nn.Module, target_tokenizer,
              outer_iteration: int) -> nn.Module:
    """The target after a plain SFT (cfg.sft) on the first multiple of microbatch*grad_accum completions (Rollouts
    or texts, in order), seeded like `evaluate`: `dpg finetune` of an exported dataset gives the eval's model."""
    ids, mask, _, _ = to_target_examples(rollouts, target_tokenizer, cfg.sft.max_len)
    n = len(rollouts) // cfg.sft.step_size * cfg.sft.step_size
    if n == 0:
        raise DPGError(f"outer iteration {outer_iteration}: {len(rollouts)} completions are fewer than one "
                       f"SFT step of sft.microbatch*sft.grad_accum={cfg.sft.step_size}; raise prompts.per_iteration "
                       "or lower sft.microbatch")
    with seeded(stage_seed(cfg.seed, outer_iteration, "eval")):
        return train(target_model, ids[:n], mask[:n], cfg.sft)


def patch_token_share(rollouts: list[Rollout], target_tokenizer, max_len: int, token_ids) -> float:
    """Share of the target SFT's label tokens (every real token after the first of each row) that are in
    `token_ids`: how often the completions write the tokens a pattern patch lives on (0.0 with no labels)."""
    labels = [t for row in target_rows(rollouts, target_tokenizer, max_len) for t in row[1:]]
    ids = set(token_ids)
    return sum(t in ids for t in labels) / len(labels) if labels else 0.0


def advantages(cfg: DPGConfig, rollouts: list[Rollout], taus: dict[str, float],
               credit: dict[str, list[float]] | None = None, target_tokens: dict[str, int] | None = None
               ) -> list[Reward]:
    """Group-normalised advantages (groups = the rollouts of one prompt), one Reward record per rollout.

    With per-token `credit` (rewards.credit token / token-own / token-context) each record also gets `token_advantages`
    (dpg.credit.token_advantages of the credit itself or of its reward-to-go), which the update then uses in
    place of `advantage`. `target_tokens` ({example_id: dpg.generator.target_rows length}) fills each record's
    `target_tokens`, the real target tokens the SFT saw (-1 where it is not given).

    `taus` holds every rollout's raw reward. An empty completion without a reward (tau NaN: SFT rewards)
    gets advantage 0: it did not shape the target, so the policy gradient neither favours nor penalises
    it; it is still recorded (`empty`). Any other non-finite tau is an error. A *flat* batch (no reward
    spread: every tau equal, or no tau at all) gives every rollout advantage 0 and tau_scale 0.0, with a
    warning: `is_flat` is then True, `update` skips the GRPO step, and `check_flat_batches` stops the run
    at the rewards.max_flat_batches-th flat batch in a row.
    """
    it = rollouts[0].outer_iteration
    missing = [r.example_id for r in rollouts if r.example_id not in taus]
    if missing:
        raise DPGError(f"outer iteration {it}: no reward for {len(missing)} rollout(s) ({', '.join(missing[:4])}); "
                       "rerun their SFT stages (delete the stage manifests and resume)")
    scored = [r for r in rollouts if not (is_empty(r) and math.isnan(taus[r.example_id]))]
    by_id, scale = {}, 0.0
    if scored:
        raw = torch.tensor([taus[r.example_id] for r in scored], dtype=torch.float64)
        adv, scale = group_advantages(raw, torch.tensor([r.prompt_id for r in scored]), cfg.rewards.eps_fraction,
                                      where=f"outer iteration {it}", constant_ok=True)
        by_id = dict(zip([r.example_id for r in scored], adv.tolist()))
    if scale == 0.0:
        log.warning("outer iteration %d: a flat batch (all %d rewards equal, %d empty completions): every "
                    "advantage is 0 and the generator update is skipped", it, len(scored), len(rollouts) - len(scored))
    per_token = {}
    if credit and scale > 0.0:
        to_go = reward_to_go if cfg.rewards.credit == "token" else (lambda c: c)
        returns = {k: to_go(torch.tensor(v, dtype=torch.float64)) for k, v in credit.items()}
        per_token, _ = token_advantages(rollouts, returns, cfg.rewards.eps_fraction,
                                        context_only=cfg.rewards.credit == "token-context")
    return [Reward(r.example_id, r.outer_iteration, r.group_id, cfg.rewards.name, taus[r.example_id], scale,
                   by_id.get(r.example_id, 0.0), target_tokens=int((target_tokens or {}).get(r.example_id, -1)),
                   empty=is_empty(r),
                   token_advantages=per_token[r.example_id].tolist() if per_token else []) for r in rollouts]


def is_flat(rewards: list[Reward]) -> bool:
    """True for a batch without reward spread: `advantages` gave it tau_scale 0.0 (a varying batch has std > 0)."""
    return all(w.tau_scale == 0.0 for w in rewards)


def check_flat_batches(cfg: DPGConfig, outer_iteration: int, flat_in_a_row: int) -> None:
    """Raise at the rewards.max_flat_batches-th flat batch in a row (counted from the stored iterations)."""
    k = cfg.rewards.max_flat_batches
    if flat_in_a_row >= k:
        raise DPGError(f"outer iteration {outer_iteration}: {flat_in_a_row} flat batches in a row "
                       f"(rewards.max_flat_batches={k}): every rollout got the same reward, so the generator has "
                       f"no learning signal; check rewards.name={cfg.rewards.name!r}, the target and that sft.lr "
                       "moves the target, or start a run with a larger rewards.max_flat_batches")


def needs_reference(cfg: DPGConfig) -> bool:
    """Whether `update` needs the initial generator as ref_model: policy.kl_coef > 0 on a fully fine-tuned
    generator (a LoRA generator is its own reference, with its adapters switched off)."""
    return cfg.policy.kl_coef > 0 and cfg.generator.lora_rank is None


def update(cfg: DPGConfig, generator: nn.Module, optimizer, rollouts: list[Rollout],
           rewards: list[Reward], ref_model: nn.Module | None = None) -> dict[str, float]:
    """One GRPO update of the generator on this iteration's rollouts and advantages.

    A flat batch (`is_flat`) skips it: generator and optimizer are untouched and the stats are {"skipped": 1.0}.
    `ref_model` is the initial generator of policy.kl_coef's anchor, where `needs_reference(cfg)`.
    """
    if is_flat(rewards):
        return {"skipped": 1.0}
    by_id = {w.example_id: w for w in rewards}
    if any(w.token_advantages for w in rewards):  # token credit: one advantage per completion token
        adv = [torch.tensor(by_id[r.example_id].token_advantages, dtype=torch.float64) for r in rollouts]
    else:
        adv = torch.tensor([by_id[r.example_id].advantage for r in rollouts], dtype=torch.float64)
    with seeded(stage_seed(cfg.seed, rollouts[0].outer_iteration, "generator")):
        return policy_update(generator, optimizer, [r.prompt_token_ids for r in rollouts],
                             [r.token_ids for r in rollouts], [torch.tensor(r.logprobs) for r in rollouts],
                             adv, cfg.policy, ref_model)


def summary(rewards: list[Reward], runs: list[SFTRun]) -> dict[str, float]:
    """Per-iteration metrics: Phi and the human metric after SFT (mean over groups), reward statistics (over
    the finite taus; NaN without any), empty_completions (count) and flat_batch (1.0 for a flat batch, else 0.0)."""
    tau = torch.tensor([w.tau for w in rewards], dtype=torch.float64)
    tau = tau[torch.isfinite(tau)]
    stats = (tau.mean(), tau.std(unbiased=False), tau.min(), tau.max()) if tau.numel() else (math.nan,) * 4
    out = dict(zip(("reward_mean", "reward_std", "reward_min", "reward_max"), map(float, stats)))
    out |= {"empty_completions": float(sum(w.empty for w in rewards)), "flat_batch": float(is_flat(rewards))}
    if runs:
        out["phi_before"] = sum(r.phi_before for r in runs) / len(runs)
        out["phi_after"] = sum(r.phi_after for r in runs) / len(runs)
        for key in runs[0].report_after:
            if key != "phi":
                out[key] = sum(r.report_after[key] for r in runs) / len(runs)
    return out
