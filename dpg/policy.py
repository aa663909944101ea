"""The generator update: a GRPO-style clipped policy gradient (SPEC §5) and its resumable state.

For rollout i (i = 1..S) with completion tokens t = 1..L_i, advantage A_i (dpg.advantages), and
per-token log-probs under the policy being trained (new), the policy that sampled (old) and the
initial generator (ref):

    r_it = exp(new_it − old_it)                                   probability ratio
    s_it = −min(r_it·A_i, clip(r_it, 1 − ε, 1 + ε)·A_i)           clipped surrogate (PPO)
    k_it = exp(ref_it − new_it) − (ref_it − new_it) − 1           k3 estimate of KL(π ‖ π_ref), >= 0
    loss = (1/S) Σ_i (1/L_i) Σ_t (s_it + β·k_it)                  β = kl_coef

A_i may also be per token, A_it (token credit: `dpg.credit`), in place of A_i in s_it.

Normalisation: a token mean within each sequence, then a mean over sequences (GRPO's original form),
so every rollout weighs the same whatever its length. At r = 1 the gradient is
−(1/S) Σ_i A_i (1/L_i) Σ_t ∇ log π(x_it | x_i,<t): REINFORCE with a group baseline. Where the clip is
active (r > 1 + ε with A > 0, or r < 1 − ε with A < 0) the token's surrogate gradient is 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpg.config import _int, _real, _require, build
from dpg.errors import DPGError
from dpg.generator import sequence_logprobs


@dataclass(frozen=True)
class PolicyConfig:
    """The generator's optimizer and GRPO update; errors name `policy.<key>`."""

    lr: float = 5e-6
    """AdamW learning rate (reference: 5e-6 for pattern / l2 targets, 1e-6 for language / UUID targets)."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate: ratios outside [1 − ε, 1 + ε] stop pushing."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty to the initial generator (reference: 0, i.e. no reference model needed)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm before every optimizer step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    epochs: int = 1
    """Passes over the batch of rollouts per update."""
    minibatch: int | None = None
    """Rollouts per optimizer step (None: the whole batch, one step per epoch)."""
    microbatch: int | None = None
    """Rollouts per forward/backward pass, for memory; gradients accumulate over a minibatch (None: = minibatch)."""
    seed: int = 0
    """Seed of the minibatch shuffle (the shuffle of update u uses seed and the optimizer's step count)."""

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, fix: str) -> None:
            _require(ok, key, getattr(self, key), fix, prefix="policy")

        for key in ("lr", "max_grad_norm", "eps"):
            require(_real(getattr(self, key)) and getattr(self, key) > 0, key, "use a positive number")
        require(_real(self.clip_eps) and 0 < self.clip_eps < 1, "clip_eps", "use a number in (0, 1), e.g. 0.2")
        for key in ("kl_coef", "weight_decay"):
            require(_real(getattr(self, key)) and getattr(self, key) >= 0, key, "use a number >= 0")
        require(_int(self.epochs) and self.epochs >= 1, "epochs", "use an integer >= 1")
        for key in ("minibatch", "microbatch"):
            value = getattr(self, key)
            require(value is None or (_int(value) and value >= 1), key, "use an integer >= 1 or None")
        require(_int(self.seed), "seed", "use an integer")
        b = self.betas
        require(isinstance(b, (tuple, list)) and len(b) == 2 and all(_real(x) and 0 <= x < 1 for x in b),
                "betas", "use two numbers in [0, 1), e.g. (0.9, 0.999)")
        object.__setattr__(self, "betas", tuple(b))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        return build(cls, data, "policy")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def policy_optimizer(model: nn.Module, config: PolicyConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW over the parameters with requires_grad (all, or a peft model's adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DPGError("the generator has no trainable parameter (requires_grad is False everywhere); "
                       "unfreeze it or add LoRA adapters")
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


def grpo_loss(new_logprobs: list[Tensor], old_logprobs: list[Tensor], advantages: Tensor | list[Tensor],
              clip_eps: float, ref_logprobs: list[Tensor] | None = None,
              kl_coef: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """(loss, stats) of the module docstring; `new_logprobs` carry the gradient, the others are constants.

    Each list holds one (L_i,) tensor per sequence; `advantages` is (S,), one per sequence, or a list of one
    (L_i,) tensor per sequence (per-token advantages). Stats (token means): kl (0 without ref),
    clip_fraction (tokens whose clipped branch is active), ratio_mean; and tokens.
    """
    S = len(new_logprobs)
    lengths = torch.tensor([x.numel() for x in new_logprobs])  # (S,)
    token_level = isinstance(advantages, (list, tuple))
    shape_ok = (len(advantages) == S and all(a.numel() == n for a, n in zip(advantages, lengths.tolist()))
                if token_level else advantages.shape == (S,))
    if S == 0 or len(old_logprobs) != S or not shape_ok or (lengths == 0).any():
        shape = [a.numel() for a in advantages] if token_level else tuple(advantages.shape)
        raise DPGError(f"grpo_loss got {S} sequences, {len(old_logprobs)} old log-prob lists and advantages "
                       f"{shape}; pass one non-empty completion, old log-probs and advantage (or one per "
                       "token) each")
    new = torch.cat(new_logprobs)  # (N,) all tokens of all sequences
    device, dtype = new.device, new.dtype
    old = torch.cat([o.detach().reshape(-1) for o in old_logprobs]).to(device, dtype)  # (N,)
    if old.shape != new.shape:
        raise DPGError(f"old log-probs have {old.numel()} tokens, new ones {new.numel()}; one per completion token")
    seq = torch.repeat_interleave(torch.arange(S, device=device), lengths.to(device))  # (N,) sequence of each token
    A = (torch.cat([a.detach().reshape(-1) for a in advantages]).to(device, dtype) if token_level
         else advantages.detach().to(device, dtype)[seq])  # (N,)
    ratio = torch.exp(new - old)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = torch.zeros_like(new)
    if ref_logprobs is not None:
        d = torch.cat([r.detach().reshape(-1) for r in ref_logprobs]).to(device, dtype) - new  # ref − new
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    per_seq = torch.zeros(S, device=device, dtype=dtype).index_add(0, seq, per_token) / lengths.to(device, dtype)
    loss = per_seq.mean()
    clipped = ((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))
    stats = {"loss": float(loss.detach()), "kl": float(kl.detach().mean()),
             "clip_fraction": float(clipped.to(dtype).mean()), "ratio_mean": float(ratio.detach().mean()),
             "tokens": float(new.numel())}
    return loss, stats


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far (AdamW keeps a per-parameter `step`); 0 before the first."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def _reference_logprobs(model, ref_model, prompt_ids, completion_ids, kl_coef, chunk):
    if ref_model is None and kl_coef > 0 and not hasattr(model, "disable_adapter"):
        raise DPGError(f"policy.kl_coef={kl_coef} needs the initial generator; pass ref_model=..., use a peft "
                       "model (its adapters are switched off for the reference) or set policy.kl_coef=0")
    if ref_model is None and kl_coef == 0:
        return None
    out = []
    with torch.no_grad():
        for a in range(0, len(prompt_ids), chunk):
            if ref_model is not None:
                out += sequence_logprobs(ref_model, prompt_ids[a:a + chunk], completion_ids[a:a + chunk])
            else:
                with model.disable_adapter():
                    out += sequence_logprobs(model, prompt_ids[a:a + chunk], completion_ids[a:a + chunk])
    return [x.detach() for x in out]


def policy_update(model: nn.Module, optimizer: torch.optim.Optimizer, prompt_ids: list[list[int]],
                  completion_ids: list[list[int]], old_logprobs: list[Tensor], advantages: Tensor | list[Tensor],
                  config: PolicyConfig, ref_model: nn.Module | None = None) -> dict[str, float]:
    """One GRPO update of `model` in place: `config.epochs` passes, each over shuffled minibatches.

    Dropout is off (eval mode) so that, with old_logprobs from the same weights, r = 1 at the first step;
    `ref_model` (the initial generator, needed when kl_coef > 0 unless `model` is a peft model, whose
    adapters are then switched off for the reference) should be in eval mode too.
    Every optimizer step clips the global gradient norm to `config.max_grad_norm`. Returns loss,
    clip_fraction, kl, ratio_mean (token means), grad_norm (mean pre-clip norm over steps) and steps.
    """
    S = len(prompt_ids)
    token_level = isinstance(advantages, (list, tuple))
    A = [torch.as_tensor(a).detach() for a in advantages] if token_level else torch.as_tensor(advantages).detach()
    if not (S == len(completion_ids) == len(old_logprobs) and len(A) == S and (token_level or A.ndim == 1)):
        raise DPGError(f"policy_update got {S} prompts, {len(completion_ids)} completions, {len(old_logprobs)} "
                       f"old log-prob lists and {len(A)} advantages; pass one of each per rollout")
    if not all(torch.isfinite(a).all() for a in (A if token_level else [A])):
        raise DPGError("advantages are not all finite; compute them with dpg.advantages.group_advantages")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    minibatch = min(config.minibatch or S, S)
    chunk = min(config.microbatch or minibatch, minibatch)
    was_training = model.training
    model.eval()
    ref = _reference_logprobs(model, ref_model, prompt_ids, completion_ids, config.kl_coef, chunk)
    totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0, "tokens": 0.0}
    steps = 0
    try:
        for _ in range(config.epochs):
            # Deterministic shuffle: a function of the seed and the steps taken, so a resumed run shuffles alike.
            gen = torch.Generator().manual_seed((config.seed * 1_000_003 + _optimizer_steps(optimizer)) % 2**63)
            order = torch.randperm(S, generator=gen).tolist() if minibatch < S else list(range(S))
            for a in range(0, S, minibatch):
                rows = order[a:a + minibatch]
                optimizer.zero_grad(set_to_none=True)
                for b in range(0, len(rows), chunk):
                    mb = rows[b:b + chunk]
                    new = sequence_logprobs(model, [prompt_ids[i] for i in mb], [completion_ids[i] for i in mb])
                    loss, stats = grpo_loss(new, [old_logprobs[i] for i in mb],
                                            [A[i] for i in mb] if token_level else A[mb], config.clip_eps,
                                            None if ref is None else [ref[i] for i in mb], config.kl_coef)
                    (loss * (len(mb) / len(rows))).backward()  # the minibatch's loss is the mean over its rows
                    totals["loss"] += stats["loss"] * len(mb) / len(rows)
                    for key in ("kl", "clip_fraction", "ratio_mean"):
                        totals[key] += stats[key] * stats["tokens"]
                    totals["tokens"] += stats["tokens"]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                if not torch.isfinite(torch.tensor(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    raise DPGError(f"non-finite generator gradient norm {grad_norm} at update step {steps}; "
                                   "lower policy.lr or check the advantages and log-probs")
                optimizer.step()
                totals["grad_norm"] += grad_norm
                steps += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    tokens = totals.pop("tokens")
    per_token = {k: totals[k] / tokens for k in ("kl", "clip_fraction", "ratio_mean")}
    return {"loss": totals["loss"] / steps, **per_token, "grad_norm": totals["grad_norm"] / steps,
            "steps": float(steps)}


# --- resumable state --------------------------------------------------------------------------------------

TRAINABLE, OPTIMIZER, META = "trainable.safetensors", "optimizer.safetensors", "policy_state.json"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer param group, in the optimizer's order."""
    name_of = {id(p): k for k, p in _trainable(model).items()}
    missing = [p.shape for g in optimizer.param_groups for p in g["params"] if id(p) not in name_of]
    if missing:
        raise DPGError(f"the optimizer updates {len(missing)} tensor(s) that are not trainable parameters of the model "
                       f"(shapes {missing[:3]}); build it with dpg.policy.policy_optimizer(model, config)")
    return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def save_policy_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                      extra: dict | None = None) -> Path:
    """Write the trainable parameters, the optimizer state, the torch CPU RNG state and `extra` (JSON).

    Files: trainable.safetensors (only requires_grad parameters: LoRA checkpoints stay small),
    optimizer.safetensors (tensors `state.<param>.<key>`, `rng.torch_cpu`) and policy_state.json (scalar
    state, param-group hyperparameters, parameter names, extra). Everything is written to a temporary
    sibling folder that then replaces `directory`, so a crash never leaves a half-written state there.
    """
    dest = Path(directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        groups = _optimizer_names(model, optimizer)
        names = [k for g in groups for k in g]  # optimizer index -> parameter name
        save_file({k: p.detach().cpu().contiguous() for k, p in _trainable(model).items()}, tmp / TRAINABLE)
        sd = optimizer.state_dict()
        tensors, scalars = {"rng.torch_cpu": torch.get_rng_state()}, {}
        for index, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"state.{names[index]}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{names[index]}.{key}"] = value
        save_file(tensors, tmp / OPTIMIZER)
        param_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": groups[i]}
                        for i, g in enumerate(sd["param_groups"])]
        meta = {"format": 1, "optimizer": type(optimizer).__name__, "param_groups": param_groups,
                "scalar_state": scalars, "extra": extra or {}}
        try:
            text = json.dumps(meta, indent=1)
        except TypeError as e:
            raise DPGError(f"policy state is not JSON-serialisable ({e}); give `extra` plain numbers/strings") from e
        (tmp / META).write_text(text)
        for f in (TRAINABLE, OPTIMIZER, META):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex}" if dest.exists() else None
        if old:
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_policy_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_policy_state` wrote into `model`, `optimizer` and the torch CPU RNG; return `extra`.

    The names, shapes and dtypes of the trainable parameters must match exactly (a mismatch is an error).
    """
    from safetensors.torch import load_file

    src = Path(directory)
    if not all((src / f).is_file() for f in (TRAINABLE, OPTIMIZER, META)):
        raise DPGError(f"{str(src)!r} holds no complete policy state ({TRAINABLE}, {OPTIMIZER}, {META}); "
                       "give a folder written by save_policy_state")
    meta = json.loads((src / META).read_text())
    saved, params = load_file(src / TRAINABLE), _trainable(model)
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved))[:5], sorted(set(saved) - set(params))[:5]
        raise DPGError(f"policy state {str(src)!r} does not fit the model: missing {missing}, unexpected "
                       f"{unexpected}; load it into the same architecture "
                       "with the same trainable parameters (same LoRA config)")
    for k, p in params.items():
        if saved[k].shape != p.shape or saved[k].dtype != p.dtype:
            raise DPGError(f"parameter {k}: saved {saved[k].dtype} {tuple(saved[k].shape)}, model has {p.dtype} "
                           f"{tuple(p.shape)}; use the same architecture and dtype")
    groups = _optimizer_names(model, optimizer)
    if groups != [g["params"] for g in meta["param_groups"]] or type(optimizer).__name__ != meta["optimizer"]:
        raise DPGError(f"the optimizer ({type(optimizer).__name__}) does not match the saved one ({meta['optimizer']}) "
                       "or its parameters differ; build it with dpg.policy.policy_optimizer(model, config)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    tensors = load_file(src / OPTIMIZER)
    index = {name: i for i, name in enumerate(k for g in groups for k in g)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            name, field = key[len("state."):].rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    for key, value in meta["scalar_state"].items():
        name, field = key.rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    param_groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                    | {"params": [index[name] for name in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    return meta["extra"]
