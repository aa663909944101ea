"""The generator side of the outer loop (SPEC §5): load the generator, sample rollouts, rescore them.

Decisions the policy update relies on:

- **Log-probs.** `Rollout.logprobs[j] = log softmax(logits_j)[token_j]`: the generator's plain softmax at
  temperature 1 over the full vocabulary, whatever `temperature`/`top_p` the tokens were *sampled* with.
  That is the policy pi_theta whose ratio pi_theta / pi_old the GRPO update forms, and it is exactly what
  `sequence_logprobs` recomputes (with sampling at temperature 1 and top_p 1 the two coincide with the
  sampling distribution; otherwise the stored values are not the behaviour policy's, by design).
- **End of sequence.** When the generator emits an end token (eos / end-of-turn), sampling stops, the
  token *is* the last entry of `token_ids` and `logprobs` (choosing to stop is an action the policy
  gradient must reinforce or discourage, as in TRL), `finish_reason` is "stop", and `text` is the decoded
  completion without it (special tokens skipped). Otherwise `finish_reason` is "length" and
  `len(token_ids) == max_new_tokens`. So `token_ids` is never empty.
- **Empty completions** (eos first, or only special tokens/whitespace) are kept as records, with
  `text.strip() == ""` as their mark (`is_empty`). `to_target_examples` keeps each in its SFT slot as a
  one-token row that contributes nothing (loss and metagradient exactly 0), flags it and logs the count;
  `dpg.loop` records no reward for it (tau NaN, advantage 0). An empty completion never ends a run.
- **Reproducibility.** Rollout (prompt p, rollout k) draws from its own `torch.Generator`, seeded from
  (seed, outer_iteration, p, k): the same seed gives identical tokens whatever the batch size or order,
  and every outer iteration gets fresh samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg.config import _int, _real, _require, build
from dpg.credit import token_ends
from dpg.errors import DPGError
from dpg.models import SMOLLM2, load_causal_lm, seeded
from dpg.records import Rollout
from dpg.toy import toy_lm

log = logging.getLogger(__name__)
GROUPINGS = ("inverse", "cross")
TOY = "toy"


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled from the generator (SPEC §5; reference: n = 4, temperature 1, <= 128 tokens)."""

    n_rollouts: int = 4
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature (> 0). Stored log-probs are always at temperature 1 (see the module docstring)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 samples from the full vocabulary."""
    max_new_tokens: int = 128
    """Most tokens per completion, the end token included."""
    batch_size: int = 8
    """Sequences sampled together (memory knob; results do not depend on it)."""
    seed: int = 0
    """Base seed; each rollout's generator is seeded from (seed, outer_iteration, prompt_id, rollout_index)."""
    grouping: str = "inverse"
    """`inverse`: group k = the k-th rollout of every prompt, one SFT run each; `cross`: one group, one SFT run."""

    def __post_init__(self) -> None:
        req = lambda ok, key, fix: _require(ok, key, getattr(self, key), fix, prefix="rollouts")
        for key in ("n_rollouts", "max_new_tokens", "batch_size"):
            req(_int(getattr(self, key)) and getattr(self, key) >= 1, key, "use an integer >= 1")
        req(_real(self.temperature) and self.temperature > 0, "temperature",
            "use a number > 0 (1.0 samples from the model's own distribution)")
        req(_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "use a number in (0, 1]; 1.0 disables nucleus sampling")
        req(_int(self.seed) and self.seed >= 0, "seed", "use an integer >= 0")
        req(self.grouping in GROUPINGS, "grouping", f"use one of {list(GROUPINGS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "rollouts") -> RolloutConfig:
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error naming them."""
        return build(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def group_id(self, rollout_index: int) -> int:
        return rollout_index if self.grouping == "inverse" else 0


def load_generator(source: str = SMOLLM2, lora_rank: int | None = None, lora_alpha: float | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   toy: dict | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the generator: `smollm2` (offline GGUF), `toy` (a random word-level Llama built
    from `toy`'s options by `dpg.toy.toy_lm`, seeded by `seed`), a local model folder, or a cached hub id.

    With `lora_rank`, LoRA adapters (peft; alpha defaults to 2 * rank, no dropout so that log-probs are
    deterministic) go on every linear layer and only they are trainable; otherwise every weight is (full
    fine-tuning). The tokenizer pads on the left, as batched generation needs. Every random draw of the
    loading (peft's initialisation of the adapters' A matrices) comes from torch's CPU RNG seeded with
    `seed` inside `dpg.models.seeded`: the same seed gives the same adapters, and the caller's global RNG
    state is unchanged.
    """
    if lora_rank is not None and not (_int(lora_rank) and lora_rank >= 1):
        raise DPGError(f"generator.lora_rank={lora_rank!r} is invalid; use an integer >= 1, "
                       "or None for full fine-tuning")
    if not _int(seed):
        raise DPGError(f"seed={seed!r} is invalid; use an integer (the run's seed)")
    if lora_alpha is not None and (lora_rank is None or not (_real(lora_alpha) and lora_alpha > 0)):
        raise DPGError(f"generator.lora_alpha={lora_alpha!r} is invalid; use a number > 0 together with lora_rank")
    if source != SMOLLM2 and source.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(source)):
        raise DPGError(f"generator.source={source!r} is not a readable model folder; "
                       f"use an existing folder with config.json, a cached hub id, or {SMOLLM2!r}")
    with seeded(seed):
        # The generator is only differentiated once (policy gradient), so fused SDPA attention is fine and faster.
        if source == TOY:
            model, tokenizer = toy_lm(**(toy or {}), seed=seed)
            model = model.to(dtype)
        else:
            model, tokenizer = load_causal_lm(os.path.expanduser(source) if source != SMOLLM2 else source, dtype,
                                              "sdpa")
        tokenizer.padding_side = "left"
        if lora_rank is None:
            model.requires_grad_(True)
            return model, tokenizer
        from peft import LoraConfig, get_peft_model  # optional dependency: only LoRA needs it

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config).eval(), tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Generator token ids of one user prompt: the chat template with the assistant turn opened, or, for a
    tokenizer without a chat template, the plain text (with the tokenizer's own special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])  # the template holds the specials
    return list(tokenizer(text)["input_ids"])


def end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Tokens that end a completion: the tokenizer's eos and the model's generation-config eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else ({extra} if extra is not None else set())
    return ids


def sample_rollouts(model: nn.Module, tokenizer, prompts: list[tuple[str, str]], config: RolloutConfig,
                    outer_iteration: int, generator_version: str) -> list[Rollout]:
    """`config.n_rollouts` completions of each (source_id, prompt text), prompt-major: record r is prompt
    r // n, rollout r % n. See the module docstring for log-probs, end tokens and seeding."""
    if not prompts:
        raise DPGError("sample_rollouts got no prompts; build some with dpg.prompts.build_prompts")
    encoded = [encode_prompt(tokenizer, text) for _, text in prompts]
    for p, ids in enumerate(encoded):
        if not ids:
            raise DPGError(f"prompt {p} ({prompts[p][0]!r}) encodes to no tokens; give it some text")
    n = config.n_rollouts
    jobs = [(p, k) for p in range(len(prompts)) for k in range(n)]
    ends = end_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends, default=0)
    sampled: list[tuple[list[int], list[float]]] = []
    training = model.training
    model.eval()  # dropout off: the stored log-probs must be a deterministic function of the weights
    try:
        for a in range(0, len(jobs), config.batch_size):
            chunk = jobs[a:a + config.batch_size]
            seeds = [_rollout_seed(config.seed, outer_iteration, p, k) for p, k in chunk]
            sampled += _sample_batch(model, [encoded[p] for p, _ in chunk], seeds, ends, pad, config)
    finally:
        model.train(training)
    records = []
    for (p, k), (tokens, logprobs) in zip(jobs, sampled):
        stop = tokens[-1] in ends
        body = tokens[:-1] if stop else tokens
        text = tokenizer.decode(body, skip_special_tokens=True)
        records.append(Rollout(
            example_id=f"{outer_iteration}-{p}-{k}", outer_iteration=outer_iteration, prompt_id=p,
            rollout_index=k, group_id=config.group_id(k), prompt=prompts[p][1],
            text=text, prompt_token_ids=encoded[p],
            token_ids=tokens, logprobs=logprobs, finish_reason="stop" if stop else "length",
            generator_version=generator_version, source_id=prompts[p][0],
            token_ends=token_ends(tokenizer, tokens, stop, text)))
    return records


def _text(rollout: Rollout | str) -> str:
    return rollout if isinstance(rollout, str) else rollout.text


def is_empty(rollout: Rollout | str) -> bool:
    """A completion (a Rollout or its text) with no visible text (eos first, or only special tokens / whitespace)."""
    return not _text(rollout).strip()


def _rollout_seed(seed: int, outer_iteration: int, prompt_id: int, rollout_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{outer_iteration}:{prompt_id}:{rollout_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63, valid for torch.Generator


def _sampling_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution tokens are drawn from: softmax(logits / T), restricted to the top-p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs


@torch.no_grad()
def _sample_batch(model: nn.Module, prompts: list[list[int]], seeds: list[int], ends: set[int], pad: int,
                  config: RolloutConfig) -> list[tuple[list[int], list[float]]]:
    """Sample one completion per (left-padded) prompt with a KV cache; returns (token_ids, logprobs).

    Each distinct prompt is encoded once and its cache copied to every row that continues it (a prompt's n
    rollouts share one prefill)."""
    device = next(model.parameters()).device
    unique, row_of = shared_prefixes(prompts)
    U, L = len(unique), max(len(p) for p in unique)
    ids = torch.full((U, L), pad, dtype=torch.long, device=device)
    mask = torch.zeros((U, L), dtype=torch.long, device=device)
    for u, p in enumerate(unique):
        ids[u, L - len(p):], mask[u, L - len(p):] = torch.tensor(p, device=device), 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, L): left padding does not shift positions
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    cache_key = _cache_key(out)
    cache, B = getattr(out, cache_key), len(prompts)
    index = torch.tensor(row_of, device=device)
    if U < B:
        cache.reorder_cache(index)  # (U, ...) -> (B, ...): row b continues prompt row_of[b]
    logits, mask, next_pos = out.logits[index, -1], mask[index], position[index, -1:] + 1  # next_pos: (B, 1)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(config.max_new_tokens):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, V)
        logp = F.log_softmax(logits, dim=-1)  # temperature 1, full vocabulary: what the policy ratio needs
        probs = _sampling_probs(logits, config.temperature, config.top_p)
        step = torch.stack([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(B)])  # (B, 1)
        chosen, chosen_logp = step[:, 0].tolist(), logp.gather(1, step)[:, 0].tolist()  # one device sync
        for b in range(B):
            if not done[b]:
                tokens[b].append(chosen[b])
                logprobs[b].append(chosen_logp[b])
                done[b] = chosen[b] in ends
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)  # finished rows keep going, ignored
        out = model(input_ids=step, attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_key: cache})
        logits, cache, next_pos = out.logits[:, -1], getattr(out, cache_key), next_pos + 1
    return list(zip(tokens, logprobs))


def _cache_key(out) -> str:
    """The name of a model output's KV cache, as the forward pass also takes it (renamed in transformers 5.x)."""
    return "cache" if hasattr(out, "cache") else "past_key_values"


def shared_prefixes(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """(the distinct prompts in order of first appearance, the index into them of each prompt)."""
    first: dict[tuple[int, ...], int] = {}
    row_of = [first.setdefault(tuple(p), len(first)) for p in prompts]
    return [list(p) for p in first], row_of


def sequence_logprobs(model: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[Tensor]:
    """Per-token log-probs of each completion given its prompt, under `model` at temperature 1.

    One batched forward pass over `prompt + completion` rows, right-padded (position ids from the attention
    mask), differentiable: the GRPO update calls it with gradients on. Completions of a repeated prompt (a
    prompt's n rollouts) share one encoding of it instead: one forward of the prompt, its KV cache copied to
    each completion. Row b returns a tensor of shape
    (len(completion_ids[b]),): `log softmax(logits[j - 1])[x_j]` for every completion token x_j. Call it in
    eval mode (no dropout) to reproduce `Rollout.logprobs`.
    """
    if len(prompt_ids) != len(completion_ids):
        raise DPGError(f"sequence_logprobs got {len(prompt_ids)} prompts but {len(completion_ids)} completions; "
                       "pass one prompt per completion")
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise DPGError("sequence_logprobs got an empty prompt; every completion needs at least one context token")
    unique, row_of = shared_prefixes(prompt_ids)
    if len(unique) < len(prompt_ids) and all(len(c) for c in completion_ids):
        result: list[Tensor] = [torch.empty(0)] * len(prompt_ids)
        for u, prompt in enumerate(unique):
            members = [b for b, r in enumerate(row_of) if r == u]
            for b, lp in zip(members, _continuation_logprobs(model, prompt, [completion_ids[b] for b in members])):
                result[b] = lp
        return result
    device = next(model.parameters()).device
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.zeros((B, L), dtype=torch.long, device=device)  # pad id 0: masked, never scored
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r, device=device), 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    # LM-head logits only from the first scored position on: memory grows with completions, not prompts
    first = min(len(p) for p in prompt_ids) - 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                   logits_to_keep=L - first).logits  # (B, L - first, V), or (B, L, V) if the model ignores it
    offset = L - logits.shape[1]
    result = []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        start, n = len(p), len(c)
        row = logits[b, start - 1 - offset:start - 1 - offset + n]  # (n, V): position j - 1 predicts token j
        row = row.to(torch.promote_types(row.dtype, torch.float32))
        result.append(F.log_softmax(row, dim=-1).gather(-1, ids[b, start:start + n, None]).squeeze(-1))  # (n,)
    return result


def _continuation_logprobs(model: nn.Module, prompt: list[int], completions: list[list[int]]) -> list[Tensor]:
    """sequence_logprobs of several non-empty completions of one prompt: the prompt is encoded once (with
    gradients) and its KV cache copied to every completion, which the backward pass sums back."""
    device = next(model.parameters()).device
    P, G, C = len(prompt), len(completions), max(len(c) for c in completions)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    key = _cache_key(out)
    cache = getattr(out, key)
    cache.reorder_cache(torch.zeros(G, dtype=torch.long, device=device))  # (1, ...) -> (G, ...)
    ids = torch.zeros((G, C), dtype=torch.long, device=device)  # pad id 0: masked, never scored
    mask = torch.zeros((G, P + C), dtype=torch.long, device=device)
    mask[:, :P] = 1
    for b, c in enumerate(completions):
        ids[b, :len(c)], mask[b, P:P + len(c)] = torch.tensor(c, device=device), 1
    position = torch.arange(P, P + C, device=device).expand(G, C)
    rest = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                 **{key: cache}).logits  # (G, C, V)
    logits = torch.cat([out.logits[:, -1:].expand(G, 1, -1), rest[:, :-1]], dim=1)  # (G, C, V): j predicts j
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return [F.log_softmax(logits[b, :len(c)], dim=-1).gather(-1, ids[b, :len(c), None]).squeeze(-1)
            for b, c in enumerate(completions)]


def target_rows(rollouts: list[Rollout] | list[str], target_tokenizer, max_len: int) -> list[list[int]]:
    """The target tokens of each completion (a Rollout or its text) as the SFT sees them: retokenised with the
    target's tokenizer, its eos appended (if it has one), cut at `max_len`; [] for an empty completion."""
    eos = target_tokenizer.eos_token_id
    rows = []
    for r in rollouts:
        ids = [] if is_empty(r) else list(target_tokenizer(_text(r))["input_ids"])
        if ids and eos is not None and ids[-1] != eos:
            ids.append(eos)
        rows.append(ids[:max_len])
    return rows


def to_target_examples(rollouts: list[Rollout] | list[str], target_tokenizer, max_len: int
                       ) -> tuple[Tensor, Tensor, list[bool], list[int]]:
    """Target-model training examples from completions: (input_ids, attention_mask, empty, n_target_tokens).

    Row i is `rollouts[i]` (a Rollout or its text), always. Each completion text is retokenised with the
    target's tokenizer (its own special tokens, then its eos if it has one), truncated to `max_len` tokens and
    right-padded to `max_len` with the pad id (else eos, else 0); the mask comes from the lengths, never from
    "id == pad", and row i has
    `n_target_tokens[i]` real tokens. An empty completion (`is_empty`, `empty[i]` True) or one with no target
    tokens keeps its slot as a one-token row (the eos, else the pad id; mask 1 at position 0 only): it has no
    predicted token, so its loss l_i is exactly 0 whatever the weights, it adds nothing to any gradient, its
    metagradient is exactly 0, and every other example keeps its microbatch position. Empty rows are
    counted in a log warning.
    """
    if not (_int(max_len) and max_len >= 2):
        raise DPGError(f"max_len={max_len!r} is invalid; use an integer >= 2 (sft.max_len)")
    eos = target_tokenizer.eos_token_id
    pad = next((t for t in (target_tokenizer.pad_token_id, eos) if t is not None), 0)
    empty = [is_empty(r) for r in rollouts]
    rows = [ids or [eos if eos is not None else pad] for ids in target_rows(rollouts, target_tokenizer, max_len)]
    if any(empty):
        log.warning("%d of %d completions are empty: one-token rows in the target SFT that contribute nothing",
                    sum(empty), len(rollouts))
    input_ids = torch.full((len(rows), max_len), pad, dtype=torch.long)  # (n, max_len)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (n,)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
    attention_mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()  # (n, max_len)
    return input_ids, attention_mask, empty, lengths.tolist()
