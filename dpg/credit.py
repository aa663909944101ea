"""Token credit: per-token metagradients turned into per-token advantages of the generator's tokens.

With `rewards.credit: token` or `token-own`, the SFT weights are per token (dpg.sft): tau_is = dPhi/dw_is
scores the loss term that predicts target token s of example i, and sum_s tau_is = tau_i. Generator token j
of a completion is credited (c_ij) with every target term whose token starts inside j's characters (the text
is retokenised for the target, so the two tokenisations differ in general). Its action value R_ij is, for
`token`, the reward-to-go

    R_ij = sum_{j' >= j} c_ij'

since token j shapes its own label and, as context, every later one (R_i0 = tau_i up to truncation at
sft.max_len); for `token-own`, R_ij = c_ij, its own label terms only (less variance, no context credit). The
advantage of token j is R_ij minus the mean R at position j over the other rollouts of
the same prompt (a leave-one-out baseline; a rollout that ended before j counts as 0, as it earns nothing
more), divided by the batch's std of these differences: the token-level form of the group-normalised
sequence advantage (dpg.advantages).

`token-context` keeps only where a token stands, not what it is: R_ij = c_ij as for `token-own`, and after the
leave-one-out baseline each token also loses the batch mean of those differences over every token with its id
(a token whose id occurs once in the batch gets 0). What a token id is worth on average, the part that makes a
policy write more of the patch tokens (RESULTS-reproduce.md §7j), is then no signal; only its contexts are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpg.errors import DPGError
from dpg.records import Rollout


def token_ends(tokenizer, token_ids: list[int], stop: bool, text: str) -> list[int]:
    """Character end in `text` (the decode of the completion) of each completion token; an end token (`stop`)
    ends at len(text). Ends never decrease, so a byte-level BPE split inside a character still works."""
    body = token_ids[:-1] if stop else token_ids
    ends, previous = [], 0
    for j in range(len(body)):
        previous = max(previous, min(len(text), len(tokenizer.decode(body[:j + 1], skip_special_tokens=True))))
        ends.append(previous)
    return ends + [len(text)] * (len(token_ids) - len(body))


def target_starts(target_tokenizer, text: str, n_tokens: int) -> list[int]:
    """Character start of each of the first `n_tokens` target tokens of `text` as `to_target_examples` builds
    them (an appended end token, beyond the text, starts at len(text))."""
    offsets = target_tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return [offsets[s][0] if s < len(offsets) else len(text) for s in range(n_tokens)]


def generator_credit(rollout: Rollout, target_scores: Tensor, n_target_tokens: int, target_tokenizer) -> Tensor:
    """(L_gen,) float64: each generator token's share of the row's per-token scores (their sum is kept)."""
    if len(rollout.token_ends) != len(rollout.token_ids):
        raise DPGError(f"rollout {rollout.example_id} has no token_ends; sample it with this version of dpg")
    credit = torch.zeros(len(rollout.token_ids), dtype=torch.float64)
    if not rollout.token_ids:
        return credit
    ends = torch.tensor(rollout.token_ends)
    starts = target_starts(target_tokenizer, rollout.text, n_target_tokens)
    for s in range(1, n_target_tokens):  # column 0 predicts nothing
        j = int(torch.searchsorted(ends, starts[s], right=True))  # first token that ends after the start
        credit[min(j, len(ends) - 1)] += float(target_scores[s])
    return credit


def reward_to_go(credit: Tensor) -> Tensor:
    return credit.flip(0).cumsum(0).flip(0)


def token_advantages(rollouts: list[Rollout], returns: dict[str, Tensor], eps_fraction: float = 1e-3,
                     context_only: bool = False) -> tuple[dict[str, Tensor], float]:
    """({example_id: (L_i,) float64 advantages}, scale) from per-token returns R_ij (module docstring);
    `context_only` also takes each token id's batch mean out (rewards.credit=token-context).

    Rollouts without an entry in `returns` (e.g. empty completions) get zeros. scale is the std of the
    centred returns over all tokens (0.0 when they are all equal: every advantage is then 0).
    """
    by_prompt: dict[int, list[Rollout]] = {}
    for r in rollouts:
        if r.example_id in returns:
            by_prompt.setdefault(r.prompt_id, []).append(r)
    centred: dict[str, Tensor] = {}
    for members in by_prompt.values():
        longest = max(len(returns[r.example_id]) for r in members)
        padded = torch.zeros(len(members), longest, dtype=torch.float64)
        present = torch.zeros(len(members), longest, dtype=torch.bool)
        for m, r in enumerate(members):
            padded[m, :len(returns[r.example_id])] = returns[r.example_id]
            present[m, :len(returns[r.example_id])] = True
        for m, r in enumerate(members):
            others = present.clone()
            others[m] = False
            count = others.sum(0)
            baseline = torch.where(count > 0, (padded * others).sum(0) / count.clamp(min=1), 0.0)
            centred[r.example_id] = returns[r.example_id] - baseline[:len(returns[r.example_id])]
    if context_only and centred:
        ids = {r.example_id: torch.tensor(r.token_ids[:len(centred[r.example_id])], dtype=torch.long)
               for r in rollouts if r.example_id in centred}  # long even for a completion with no tokens
        all_ids, all_values = torch.cat(list(ids.values())), torch.cat([centred[k] for k in ids])
        sums = torch.zeros(int(all_ids.max()) + 1, dtype=torch.float64).index_add_(0, all_ids, all_values)
        counts = torch.zeros_like(sums).index_add_(0, all_ids, torch.ones_like(all_values))
        means = sums / counts.clamp(min=1)
        centred = {k: v - means[ids[k]] for k, v in centred.items()}
    values = torch.cat(list(centred.values())) if centred else torch.zeros(0, dtype=torch.float64)
    scale = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    out = {}
    for r in rollouts:
        if r.example_id in centred and scale > 0:
            out[r.example_id] = centred[r.example_id] / (scale * (1 + eps_fraction))
        else:
            out[r.example_id] = torch.zeros(len(r.token_ids), dtype=torch.float64)
    return out, scale
