"""Weighted, functional SFT of a causal LM (SPEC §2).

Example i sits in microbatch i // microbatch, and optimizer step t consumes microbatches
t*grad_accum ... (t+1)*grad_accum - 1. With per-example weights w, the step's gradient is

    g_t = sum_{microbatches} (1/microbatch) sum_{i in mb} w_i grad l_i(theta_t)

(mean within a microbatch, sum over accumulation: the reference convention), and
l_i = sum over real target tokens of the token cross-entropy / max_len (or / real tokens).
Padding never counts: the mask is the attention mask, never "label == pad id".

Weights may also be per token, shape (n, L): w_it scales the loss term that predicts token t of example i
(column 0 predicts nothing and is ignored), so that per-example weights are the case w_it = w_i.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dpg.config import SFTConfig
from dpg.errors import DPGError
from dpg.optim import Optimizer, Params, adamw, sgd

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Batch(NamedTuple):
    input_ids: Tensor  # (n, L) long
    attention_mask: Tensor  # (n, L) 0/1
    weights: Tensor  # (n,) per example or (n, L) per token, in the SFT dtype


def make_optimizer(config: SFTConfig) -> Optimizer:
    if config.optimizer == "sgd":
        return sgd(config.lr)
    return adamw(config.lr, config.betas, config.eps, config.eps_root, config.decay)


def prepare(input_ids: Tensor, attention_mask: Tensor, config: SFTConfig, weights: Tensor | None = None,
            device: torch.device | str = "cpu") -> Batch:
    """Check the data against the config, crop pure-padding columns beyond max_len, move it to `device`."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise DPGError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                       "must both be (n_examples, seq_len)")
    n, shape = input_ids.shape[0], tuple(input_ids.shape)
    config.inner_steps(n)
    mask = attention_mask.long()
    if not torch.all((mask == 0) | (mask == 1)):
        raise DPGError("attention_mask must hold only 0 and 1")
    lengths = mask.sum(1)
    if (lengths > config.max_len).any():
        i = int(torch.argmax(lengths))
        raise DPGError(f"example {i} has {int(lengths[i])} tokens > sft.max_len={config.max_len}; "
                       "truncate it or raise sft.max_len")
    if input_ids.shape[1] > config.max_len:  # only padding lies beyond max_len (checked above)
        keep = torch.nonzero(mask.any(0)).max().item() + 1 if mask.any() else 1
        if keep > config.max_len:
            raise DPGError(f"padding must be on the right: a real token sits at column {keep - 1} "
                           f">= sft.max_len={config.max_len}")
        input_ids, mask = input_ids[:, : config.max_len], mask[:, : config.max_len]
    w = torch.ones(n) if weights is None else torch.as_tensor(weights).detach()
    if w.shape != (n,) and w.shape != shape:
        raise DPGError(f"weights has shape {tuple(w.shape)}; expected ({n},), one per example, or {shape}, one "
                       "per token")
    w = w[:, : input_ids.shape[1]] if w.ndim == 2 else w  # cropped with the padding columns
    return Batch(input_ids.long().to(device), mask.to(device), w.to(device, config.torch_dtype))


def steps(batch: Batch, config: SFTConfig) -> Iterator[tuple[int, slice]]:
    """(t, rows of step t) for t = 0 .. T-1."""
    s = config.step_size
    for t in range(config.inner_steps(batch.input_ids.shape[0])):
        yield t, slice(t * s, (t + 1) * s)


def microbatches(rows: slice, config: SFTConfig) -> Iterator[slice]:
    for a in range(rows.start, rows.stop, config.microbatch):
        yield slice(a, a + config.microbatch)


def mine(i: int, group) -> bool:
    """Whether microbatch i of a step is this rank's: the i-th goes to rank i mod world size (all without a
    process group)."""
    return group is None or i % torch.distributed.get_world_size(group) == torch.distributed.get_rank(group)


def all_reduce(params: Params, group) -> Params:
    """The sum over the ranks of `group` (one flat buffer, one collective); `params` as they are without one."""
    if group is None:
        return params
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    torch.distributed.all_reduce(flat, group=group)
    out, at = {}, 0
    for k, v in params.items():
        out[k], at = flat[at:at + v.numel()].view_as(v), at + v.numel()
    return out


def token_losses(model: nn.Module, theta: Params, batch: Batch, rows: slice, config: SFTConfig) -> Tensor:
    """Per-token loss terms l_it(theta) for the given rows, shape (rows, L): l_i = sum_t l_it, and column 0
    (which predicts nothing) and padding are 0."""
    ids, mask = batch.input_ids[rows], batch.attention_mask[rows]  # (b, L)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding works too
    logits = functional_call(model, theta, (), {"input_ids": ids, "attention_mask": mask,
                                                "position_ids": position_ids}).logits  # (b, L, V)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (b, L-1)
    target = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)  # a real token predicted from a real token
    terms = F.pad(nll * target, (1, 0))  # (b, L): column t predicts token t
    if config.loss_normalization == "tokens":
        return terms / target.sum(1, keepdim=True).clamp(min=1)
    return terms / config.max_len


def weighted(weights: Tensor, terms: Tensor) -> Tensor:
    """sum_t w_it l_it per row, shape (b,), for per-example (b,) or per-token (b, L) weights."""
    return (weights[:, None] * terms if weights.ndim == 1 else weights * terms).sum(1)


def grads(output: Tensor, params: Params, **kwargs) -> Params:
    """`torch.autograd.grad` over a dict of parameters; parameters that `output` ignores get zeros."""
    parts = torch.autograd.grad(output, list(params.values()), allow_unused=True, **kwargs)
    return {k: torch.zeros_like(v) if d is None else d for (k, v), d in zip(params.items(), parts)}


def step_grad(model: nn.Module, theta: Params, batch: Batch, rows: slice, config: SFTConfig,
              group=None) -> Params:
    """g_t for the examples in `rows` (one optimizer step), by plain reverse mode; with a process group, each
    rank takes its microbatches (`mine`) and the parts are summed over the ranks."""
    params = {k: v.detach().requires_grad_() for k, v in theta.items()}
    g = None
    for i, mb in enumerate(microbatches(rows, config)):
        if not mine(i, group):
            continue
        with torch.enable_grad():
            loss = weighted(batch.weights[mb], token_losses(model, params, batch, mb, config)).sum() / config.microbatch
            part = grads(loss, params)
        g = part if g is None else {k: g[k] + part[k] for k in g}
    if group is not None:
        g = all_reduce(g if g is not None else {k: torch.zeros_like(v) for k, v in theta.items()}, group)
    return g


def check_finite(tensors: Params, what: str) -> None:
    checks = FiniteChecks()
    checks.add(tensors, what)
    checks.raise_first()


class FiniteChecks:
    """The finite checks of a loop, batched: on a CUDA device each check stays there and `raise_first` syncs
    the host once; on the CPU (where a sync is free) a failing check raises at once."""

    def __init__(self) -> None:
        self.flags: list[Tensor] = []
        self.names: list[tuple[str, list[str]]] = []

    def add(self, tensors: Params, what: str) -> None:
        # max and min propagate NaN and show an infinity: two reductions, no mask the size of the parameters
        self.flags.append(torch.isfinite(torch.stack([x for v in tensors.values() for x in (v.amax(), v.amin())]))
                          .view(-1, 2).all(1))
        self.names.append((what, list(tensors)))
        if self.flags[-1].device.type == "cpu":
            self.raise_first()

    def raise_first(self) -> None:
        """One DPGError naming the first non-finite check and parameter, if any; then start afresh."""
        if not self.flags:
            return
        flags, names = torch.cat(self.flags), self.names
        self.flags, self.names = [], []
        if bool(flags.all()):  # the one device sync
            return
        first = int((~flags).nonzero()[0])
        for what, keys in names:
            if first < len(keys):
                raise DPGError(f"non-finite {what} in parameter {keys[first]}; "
                               "lower sft.lr, use float32/float64, or check the data")
            first -= len(keys)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def working_copy(model: nn.Module, config: SFTConfig) -> tuple[nn.Module, Params]:
    """A private eval-mode copy of `model` in the SFT dtype, and its weights theta_0 (shared storage)."""
    if model.get_output_embeddings() is None:
        raise DPGError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None); "
                       "dpg needs a causal LM such as AutoModelForCausalLM")
    work = copy.deepcopy(model).to(config.torch_dtype).eval()  # eval: dropout off, replay is exact
    return work, {k: p.detach() for k, p in work.named_parameters()}


def release_weights(work: nn.Module) -> None:
    """Drop `work`'s own weights (it is only called functionally from here on)."""
    for p in work.parameters():
        p.data = p.data.new_empty(0)


def load_weights(work: nn.Module, theta: Params, requires_grad: bool = True) -> nn.Module:
    """Point `work`'s parameters at `theta` (no copy; tied weights stay tied)."""
    for k, p in work.named_parameters():
        p.data = theta[k]
        p.requires_grad_(requires_grad)
    return work


def train(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: SFTConfig,
          weights: Tensor | None = None, progress: Progress | None = None) -> nn.Module:
    """Weighted SFT; returns a new trained model in `config.dtype` and leaves `model` untouched."""
    batch = prepare(input_ids, attention_mask, config, weights, device=model_device(model))
    work, theta = working_copy(model, config)
    opt = make_optimizer(config)
    state = opt.init(theta)
    total = config.inner_steps(batch.input_ids.shape[0])
    checks = FiniteChecks()
    for t, rows in steps(batch, config):
        g = step_grad(work, theta, batch, rows, config)
        checks.add(g, f"gradient at inner step {t}")
        theta, state = opt.update(theta, state, g)
        if progress:
            progress("train", t + 1, total)
    checks.raise_first()
    return load_weights(work, theta)
