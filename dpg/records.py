"""Record schemas: each Parquet row is defined once here (tasks/ converts them to and from Parquet).

Rollouts and rewards join one-to-one on `example_id`. Units: `tau` is raw dPhi/dw_i in float64 (the
reference reports microbatch * tau); `advantage` is dimensionless (group-normalised).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of the generator."""

    example_id: str  # f"{outer_iteration}-{prompt_id}-{rollout_index}"
    outer_iteration: int
    prompt_id: int  # index of the prompt in this iteration's prompt batch
    rollout_index: int  # k in 0 .. n_rollouts-1
    group_id: int  # SFT group: k for inverse groups, 0 for cross-group batching
    prompt: str  # the prompt text (after the template, before the chat template)
    text: str  # the completion text
    prompt_token_ids: list[int]  # generator tokens of the chat-formatted prompt
    token_ids: list[int]  # generator tokens of the completion
    logprobs: list[float]  # sampling log-probs of `token_ids` under the generator (float32 precision)
    finish_reason: str  # "stop" (eos) or "length" (max_new_tokens)
    generator_version: str  # digest or name of the generator weights that sampled it
    source_id: str = ""  # id of the source text the prompt was built from
    token_ends: list[int] = field(default_factory=list)  # char end in `text` of each of `token_ids` (token credit)


@dataclass(frozen=True)
class Reward:
    """The reward of one rollout, stored beside it."""

    example_id: str
    outer_iteration: int
    group_id: int
    reward: str  # reward name: dpg, naive, levenshtein, embedding, langid, random or a plugin
    tau: float  # raw reward (for dpg: dPhi/dw_i, float64); NaN for an empty completion under an SFT reward
    tau_scale: float  # scale used to normalise (the batch's std of tau); 0.0 for a flat batch (no spread)
    advantage: float  # group-normalised advantage fed to the policy update (0 without a reward)
    target_tokens: int = -1  # real target tokens of its SFT row (dpg.generator.target_rows); -1: not known
    empty: bool = False  # an empty completion (dpg.generator.is_empty)
    token_advantages: list[float] = field(default_factory=list)  # per completion token (rewards.credit=token)


@dataclass(frozen=True)
class SFTRun:
    """One differentiable SFT run (one group): the target metric before and after."""

    outer_iteration: int
    group_id: int
    n_examples: int
    inner_steps: int
    phi_before: float
    phi_after: float
    report_before: dict[str, float] = field(default_factory=dict)
    report_after: dict[str, float] = field(default_factory=dict)


def as_rows(records: list) -> list[dict]:
    """Plain dicts, one per record (for pandas)."""
    return [dataclasses.asdict(r) for r in records]
