"""Group-relative advantages for the GRPO update (SPEC §6).

GRPO compares each rollout with the other rollouts *of the same prompt*, so the grouping key is the
rollout's `prompt_id` (records.Rollout.prompt_id), not its SFT `group_id` (the inverse group it was
trained in). For rewards r_i in GRPO groups G(i):

    A_i = (r_i − mean_{j∈G(i)} r_j) / (std_{j∈G(i)} r_j + ε),      ε = eps_fraction · std_batch(r)

Both standard deviations are population ones (divide by the count, so a group of one has std 0).
ε is relative to the batch's spread: raw DPG rewards are ~1e-9, and an absolute ε (TRL's 1e-4, verl's
1e-6) would dwarf the group std and flatten every advantage to ~0. With ε relative, multiplying all
rewards by any c > 0 leaves the advantages unchanged.

Failures are errors, never zeros: a non-finite reward, or a batch whose rewards are all equal (no
learning signal at all: usually a broken reward or target), raises `DPGError` naming the iteration,
the group and the values. With `constant_ok=True` a constant (flat) batch instead gives advantages
exactly 0 and scale 0.0, for a caller that handles it (`dpg.loop.advantages` skips the generator update
and stops the run after rewards.max_flat_batches flat batches in a row); non-finite rewards still raise.
A *single* constant group inside a varying batch is a legitimate outcome (every rollout of that prompt
did equally well), and its members get advantage exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpg.errors import DPGError

_SHOW = 8  # values shown in an error message


def group_advantages(rewards: Tensor, group_ids: Tensor, eps_fraction: float = 1e-3,
                     where: str = "this batch", constant_ok: bool = False) -> tuple[Tensor, float]:
    """(advantages float64 (n,), scale) with scale = std_batch(r), the batch's population std.

    rewards: (n,) raw rewards (e.g. tau_i = dPhi/dw_i); computed in float64 whatever their dtype.
    group_ids: (n,) integer GRPO group of each reward; pass the rollouts' prompt_id.
    eps_fraction: ε as a fraction of std_batch (> 0). where: names the batch in errors, e.g. "outer iteration 3".
    constant_ok: a batch whose rewards are all equal returns (zeros, 0.0) instead of raising.
    """
    r = torch.as_tensor(rewards).detach().to(device="cpu", dtype=torch.float64)
    g = torch.as_tensor(group_ids).detach().cpu()
    if r.ndim != 1 or g.shape != r.shape or r.numel() == 0 or g.is_floating_point() or g.is_complex():
        raise DPGError(f"{where}: rewards {tuple(r.shape)} and group_ids {tuple(g.shape)} must both be (n,) "
                       "with n >= 1 and integer group_ids; pass one reward and one prompt_id per rollout")
    if not (isinstance(eps_fraction, (int, float)) and 0 < eps_fraction < float("inf")):
        raise DPGError(f"eps_fraction={eps_fraction!r} is invalid; use a positive number such as 1e-3")
    groups = [(int(k), torch.nonzero(g == k).flatten()) for k in torch.unique(g)]  # (group, rows) pairs
    for k, rows in groups:
        if not torch.isfinite(r[rows]).all():
            raise DPGError(f"{where}: non-finite reward in group (prompt_id) {k}: {_values(r[rows])}; "
                           "the reward computation failed: check its SFT run (lower sft.lr) or the target")
    scale = float(r.std(correction=0))
    if scale == 0.0 or bool((r == r[0]).all()):
        if constant_ok:
            return torch.zeros_like(r), 0.0
        raise DPGError(f"{where}: all {r.numel()} rewards equal {float(r[0])!r} across {len(groups)} group(s) "
                       f"(e.g. group {groups[0][0]}: {_values(r[groups[0][1]])}); there is no learning signal: "
                       "check the reward, the target metric and that sft.lr moves the target")
    eps = eps_fraction * scale
    advantages = torch.zeros_like(r)
    for _, rows in groups:
        # Group-relative advantage: each rollout is compared only with the rollouts of its own prompt,
        # so a prompt that is easy (all rewards high) teaches nothing by itself.
        rg = r[rows]
        if bool((rg == rg[0]).all()):
            continue  # a constant group: exactly 0 (not ~1e-17 of rounding from its mean)
        advantages[rows] = (rg - rg.mean()) / (rg.std(correction=0) + eps)
    return advantages, scale


def _values(x: Tensor) -> str:
    shown = ", ".join(f"{v:.6g}" for v in x[:_SHOW].tolist())
    return f"[{shown}{', ...' if x.numel() > _SHOW else ''}] ({x.numel()} values)"
