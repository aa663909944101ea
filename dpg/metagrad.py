"""Exact per-example metagradients through the unrolled SFT (SPEC §3).

tau_i = dPhi(theta_T(w)) / dw_i, computed in three phases:

1. forward (`unrolled_sft`): run the T optimizer steps, checkpointing (theta_t, state_t, g_t) on
   disk (memory flat in T) or every k-th step in memory (the others recomputed in phase 3);
2. evaluate (`metric_grad`): a = dPhi/dtheta_T;
3. backward (`reverse_step`, t = T-1 .. 0), with a the adjoint of (theta_{t+1}, state_{t+1}):
   - the VJP of the optimizer update gives the adjoints of theta_t (direct part), state_t and
     u = adjoint of g_t;
   - since dg_t/dw_i = grad l_i(theta_t) / microbatch, tau_i += <grad l_i(theta_t), u> / microbatch:
     one forward-mode JVP of the per-example losses along u gives every such score at once;
   - adjoint of theta_t += H_t u, H_t = dg_t/dtheta_t (skipped at t = 0). Forward-over-reverse (the JVP
     along u of a function returning (g_t, per-example losses)) gives H_t u and all scores in one sweep.

Scores are raw dPhi/dw_i in float64 (the reference returns microbatch * tau_i).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp

from dpg.config import SFTConfig
from dpg.errors import DPGError
from dpg.optim import Optimizer, Params, State, state_tensors, with_tensors
from dpg.sft import (
    Batch,
    FiniteChecks,
    Progress,
    all_reduce,
    check_finite,
    grads,
    load_weights,
    make_optimizer,
    microbatches,
    mine,
    model_device,
    prepare,
    release_weights,
    step_grad,
    steps,
    token_losses,
    working_copy,
)
from dpg.targets import report_of

Target = Callable[[nn.Module], Tensor]


class Checkpoint(NamedTuple):
    theta: Params  # theta_t
    state: State  # optimizer state before step t
    g: Params | None  # g_t (needed by the AdamW VJP; None where not kept)


class Adjoint(NamedTuple):
    theta: Params  # dPhi/dtheta_t
    moments: tuple[Params, ...]  # dPhi/d(optimizer moments at t)


@dataclass(frozen=True)
class MetagradResult:
    scores: Tensor
    """float64 (n,): tau_i = dPhi/dw_i at the given weights (raw; the reference reports microbatch * tau_i);
    (n, L) tau_it = dPhi/dw_it for per-token weights (row sums are the per-example scores)."""
    value_before: float
    """Phi of the model before the SFT."""
    value_after: float
    """Phi of the model after the SFT."""
    report_before: dict[str, float]
    report_after: dict[str, float]
    inner_steps: int


class DiskStore:
    """Checkpoints as one file per step; writes overlap compute (one in flight).

    On a CUDA device a step is a torch.save file and reads prefetch the next one. On the CPU a step is the raw bytes
    of its tensors, read back into one set of buffers that every reverse step reuses: no prefetch (it would hold a
    fourth of the reverse pass's memory) and no fresh allocation per step (torch.load of a step from the page cache
    took as long as the prefetch saved; benchmarks/RESULTS-metagrad.md)."""

    def __init__(self, root: str | None):
        self.dir = Path(tempfile.mkdtemp(prefix="dpg-ckpt-", dir=root))
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None
        self.prefetched: dict[int, Future] = {}
        self.raw: tuple[list, list[Tensor]] | None = None  # CPU: the layout (part, name), and the reused buffers
        self.counts: dict[int, int] = {}

    def put(self, t: int, c: Checkpoint) -> None:
        if self.pending:
            self.pending.result()
        if next(iter(c.theta.values())).device.type == "cuda":
            blob = {"theta": c.theta, "count": c.state.count, "moments": state_tensors(c.state), "g": c.g}
            self.pending = self.pool.submit(torch.save, blob, self.dir / f"{t}.pt")
            return
        parts = {"theta": c.theta, **{f"moment{i}": m for i, m in enumerate(state_tensors(c.state))},
                 "g": c.g or {}}
        if self.raw is None:  # every step has the same tensors
            layout = [(part, name) for part, tensors in parts.items() for name in tensors]
            self.raw = (layout, [torch.empty_like(parts[part][name]) for part, name in layout])
        self.counts[t] = c.state.count
        self.pending = self.pool.submit(_write_raw, self.dir / f"{t}.bin", [parts[p][n] for p, n in self.raw[0]])

    def get(self, t: int, like: State) -> Checkpoint:
        if self.pending:
            self.pending.result()
            self.pending = None
        if self.raw is not None:
            layout, buffers = self.raw
            _read_raw(self.dir / f"{t}.bin", buffers)
            parts: dict[str, Params] = {}
            for (part, name), x in zip(layout, buffers):
                parts.setdefault(part, {})[name] = x
            moments = tuple(parts.get(f"moment{i}", {}) for i in range(len(state_tensors(like))))
            return Checkpoint(parts["theta"], type(like)(self.counts[t], *moments), parts.get("g"))
        fut = self.prefetched.pop(t, None) or self.pool.submit(self._load, t)
        if t > 0:
            self.prefetched[t - 1] = self.pool.submit(self._load, t - 1)
        blob = fut.result()
        return Checkpoint(blob["theta"], type(like)(blob["count"], *blob["moments"]), blob["g"])

    def _load(self, t: int) -> dict:
        return torch.load(self.dir / f"{t}.pt", weights_only=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _bytes(x: Tensor):
    return x.detach().reshape(-1).view(torch.uint8).numpy()


def _write_raw(path: Path, tensors: list[Tensor]) -> None:
    with open(path, "wb") as f:
        for x in tensors:
            f.write(_bytes(x.contiguous()))


def _read_raw(path: Path, buffers: list[Tensor]) -> None:
    with open(path, "rb", buffering=0) as f:
        for x in buffers:
            view = memoryview(_bytes(x))
            while view.nbytes:  # a read may return fewer bytes than asked
                got = f.readinto(view)
                if not got:
                    raise DPGError(f"checkpoint {path} is truncated; is its folder (sft.checkpoint_dir) shared?")
                view = view[got:]


class HostStore:
    """Checkpoints in host memory: from a CUDA device into pinned buffers by asynchronous copies (and back the
    same way), so the device holds one step at a time; on the CPU they are kept as they are. Host memory grows
    with T."""

    def __init__(self) -> None:
        self.kept: dict[int, dict] = {}
        self.device: torch.device | None = None

    def put(self, t: int, c: Checkpoint) -> None:
        blob = {"theta": c.theta, "count": c.state.count, "moments": state_tensors(c.state), "g": c.g}
        self.kept[t] = _map_tensors(blob, self._to_host)

    def get(self, t: int, like: State) -> Checkpoint:
        blob = _map_tensors(self.kept.pop(t), self._to_device)
        return Checkpoint(blob["theta"], type(like)(blob["count"], *blob["moments"]), blob["g"])

    def _to_host(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            return x
        self.device = x.device
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x, non_blocking=True)

    def _to_device(self, x: Tensor) -> Tensor:
        return x if self.device is None else x.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.kept.clear()


def _map_tensors(x, fn):
    """`fn` on every tensor of nested dicts, tuples and lists (other leaves as they are)."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def unrolled_sft(work: nn.Module, theta: Params, batch: Batch, config: SFTConfig, opt: Optimizer,
                 save: Callable[[int, Checkpoint], None], progress: Progress | None = None, group=None) -> Params:
    """Phase 1: the T steps of SFT, handing (theta_t, state_t, g_t) of every step to `save`."""
    state = opt.init(theta)
    total = config.inner_steps(batch.input_ids.shape[0])
    checks = FiniteChecks()
    for t, rows in steps(batch, config):
        g = step_grad(work, theta, batch, rows, config, group)
        checks.add(g, f"gradient at inner step {t}")
        save(t, Checkpoint(theta, state, g))
        theta, state = opt.update(theta, state, g)
        if progress:
            progress("forward", t + 1, total)
    checks.raise_first()
    return theta


def metric_grad(work: nn.Module, theta: Params, target: Target) -> tuple[float, Params]:
    """Phase 2: Phi(theta_T) and a = dPhi/dtheta_T."""
    load_weights(work, theta, requires_grad=True)
    params = dict(work.named_parameters())
    with torch.enable_grad():
        phi = target(work)
        if phi.ndim != 0 or not torch.isfinite(phi):
            raise DPGError(f"target metric after the SFT is {phi.detach().tolist()}; it must be a finite scalar "
                           "(lower sft.lr or check the target)")
        a = grads(phi, params)
    check_finite(a, "target-metric gradient")
    load_weights(work, theta, requires_grad=False)
    return float(phi.detach()), a


def optimizer_vjp(opt: Optimizer, c: Checkpoint, adj: Adjoint) -> tuple[Adjoint, Params]:
    """VJP of (theta_{t+1}, state_{t+1}) = update(theta_t, state_t, g_t): adjoints at t and u.

    The update is elementwise, so it is differentiated one parameter at a time (in closed form where the
    optimizer gives `vjp`, by torch.func otherwise), and each input is
    released as soon as it is used: `adj`, `c.state`'s moments and `c.g` are consumed (emptied, and with a
    closed form their tensors are overwritten by the results); `c.theta` is kept for the sweep. Peak memory stays
    near one parameter copy above the inputs.
    """
    adj_theta, adj_moments, u = {}, tuple({} for _ in adj.moments), {}
    moments = state_tensors(c.state)
    for k in list(c.theta):
        def one(theta_k, moments_k, g_k, k=k):
            state = with_tensors(c.state, tuple({k: m} for m in moments_k))
            new, new_state = opt.update({k: theta_k}, state, {k: g_k})
            return new[k], tuple(m[k] for m in state_tensors(new_state))

        # SGD's update is linear in g, so its VJP needs no g_t: any tensor of the right shape serves.
        g_k = c.g.pop(k) if c.g is not None else c.theta[k]
        moments_k = tuple(m.pop(k) for m in moments)
        adjoints_k = (adj.theta.pop(k), tuple(m.pop(k) for m in adj.moments))
        if opt.vjp is not None:  # closed form: a few elementwise ops
            d_theta, d_moments, d_g = opt.vjp(c.theta[k], moments_k, g_k, c.state.count, *adjoints_k)
        else:
            d_theta, d_moments, d_g = vjp(one, c.theta[k], moments_k, g_k)[1](adjoints_k)
        adj_theta[k], u[k] = d_theta, d_g
        for out, d in zip(adj_moments, d_moments):
            out[k] = d
    return Adjoint(adj_theta, adj_moments), u


def sweep(work: nn.Module, theta: Params, batch: Batch, rows: slice, u: Params, config: SFTConfig,
          need_hvp: bool, group=None) -> tuple[Params | None, Tensor]:
    """(H_t u or None, ldot) for one step's rows: ldot_i = <grad l_i(theta_t), u>, or ldot_it = <grad l_it, u>
    (rows, L) where the weights are per token. With a process group: this rank's microbatches only (the HVP
    part is summed by the caller, ldot is 0 on the other ranks' rows)."""
    hvp, ldots = None, []
    size = config.sweep_microbatch or config.microbatch
    for i, whole in enumerate(microbatches(rows, config)):
        if not mine(i, group):
            ldots.append(torch.zeros(batch.weights[whole].shape, dtype=config.torch_dtype, device=batch.weights.device))
            continue
        for a in range(whole.start, whole.stop, size):
            h, ld = _sweep_rows(work, theta, batch, slice(a, min(a + size, whole.stop)), u, config, need_hvp)
            ldots.append(ld.detach())
            if h is None:
                continue
            if hvp is None:
                hvp = h
            else:
                for k in hvp:
                    hvp[k].add_(h.pop(k))
    return hvp, torch.cat(ldots)


def _sweep_rows(work: nn.Module, theta: Params, batch: Batch, mb: slice, u: Params, config: SFTConfig,
                need_hvp: bool) -> tuple[Params | None, Tensor]:
    """(H u or None, ldot) of the rows `mb`, each weighted by w_i / microbatch as in the SFT loss."""
    w = batch.weights[mb] / config.microbatch
    per_token = w.ndim == 2

    def losses(th):
        terms = token_losses(work, th, batch, mb, config)  # (b, L)
        return terms if per_token else terms.sum(1)

    if not need_hvp:
        return None, jvp(losses, (theta,), (u,))[1]
    if config.reverse == "reverse_over_forward":
        def tangent_dot(th):
            ld = jvp(losses, (th,), (u,))[1]
            return (w * ld).sum(), ld  # w (b,) or (b, L) matches ld
        return grad(tangent_dot, has_aux=True)(theta)
    if config.reverse == "forward_over_reverse":
        def grad_and_losses(th):
            return grad(lambda x: ((w * (ls := losses(x))).sum(), ls), has_aux=True)(th)
        return jvp(grad_and_losses, (theta,), (u,))[1]
    # double_backward: HVP by autograd.grad(create_graph=True), scores by a separate JVP
    params = {k: v.detach().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        g = torch.autograd.grad((w * losses(params)).sum(), list(params.values()), create_graph=True)
        h = grads(g, params, grad_outputs=[u[k] for k in params])
    return h, jvp(losses, (theta,), (u,))[1]


def reverse_step(work: nn.Module, opt: Optimizer, c: Checkpoint, adj: Adjoint, batch: Batch, rows: slice,
                 config: SFTConfig, t: int, checks: FiniteChecks | None = None, group=None
                 ) -> tuple[Adjoint, Tensor]:
    """Phase 3, one step: adjoint of (theta_{t+1}, state_{t+1}) -> adjoint at t, and tau for step t's rows."""
    adj, u = optimizer_vjp(opt, c, adj)
    hvp, ldot = sweep(work, c.theta, batch, rows, u, config, need_hvp=t > 0, group=group)
    if group is not None and t > 0:
        hvp = all_reduce(hvp if hvp is not None else {k: torch.zeros_like(v) for k, v in u.items()}, group)
    theta = adj.theta
    if hvp is not None:
        for k in theta:
            theta[k].add_(hvp.pop(k))  # in place: a fresh copy of the adjoint per step fragments the heap (CPU)
    what = f"adjoint at inner step {t} (reverse pass)"
    check_finite(theta, what) if checks is None else checks.add(theta, what)
    return Adjoint(theta, adj.moments), ldot.double() / config.microbatch


def metagradients(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target: Target,
                  config: SFTConfig, weights: Tensor | None = None,
                  progress: Progress | None = None, group=None) -> MetagradResult:
    """tau_i = dPhi(train(model, data, w)) / dw_i for every example, exactly (see the module docstring).

    Data parallel with a torch.distributed process `group` (gloo on CPUs, NCCL on GPUs): every rank calls it
    with the same model and data; each takes its share of every step's microbatches (microbatch i to rank
    i mod R, so R <= sft.grad_accum keeps every rank busy), gradients and HVPs are summed over the ranks, each
    rank scores its own examples, and every rank returns all the scores (those of one process, up to the order
    of float sums)."""
    batch = prepare(input_ids, attention_mask, config, weights, device=model_device(model))
    if config.reverse == "reverse_over_forward" and any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise DPGError("sft.reverse='reverse_over_forward' gives wrong second derivatives through nn.LayerNorm "
                       "(pytorch/pytorch#196700); use sft.reverse='forward_over_reverse'")
    work, theta0 = working_copy(model, config)
    opt = make_optimizer(config)
    total = config.inner_steps(batch.input_ids.shape[0])
    with torch.no_grad():
        report_before = report_of(target, work)
    store = DiskStore(config.checkpoint_dir) if config.checkpoint == "disk" else \
        HostStore() if config.checkpoint == "host" else None
    k = config.recompute_every(total)
    kept: dict[int, Checkpoint] = {}

    def save(t: int, c: Checkpoint) -> None:
        if store:
            store.put(t, c if config.optimizer == "adamw" else c._replace(g=None))
        elif t % k == 0:
            kept[t] = c._replace(g=None)

    try:
        theta_T = unrolled_sft(work, theta0, batch, config, opt, save, progress, group)
        value_after, a = metric_grad(work, theta_T, target)
        report_after = report_of(target, work)
        release_weights(work)  # the reverse pass calls the model functionally; drop theta_T now
        adj = Adjoint(a, tuple({key: torch.zeros_like(v) for key, v in m.items()}
                               for m in state_tensors(opt.init(theta_T))))
        del theta_T, a
        # (n,) or (n, L) per token; on the model's device, so the loop never waits for the host
        scores = torch.zeros(tuple(batch.weights.shape), dtype=torch.float64, device=batch.weights.device)
        rows_of = dict(steps(batch, config))
        checks = FiniteChecks()
        done = 0
        for start in reversed(range(0, total, 1 if store else k)):
            if store:
                segment = [(start, store.get(start, like=opt.init({})))]
            else:  # replay steps start .. start+k-1 from the kept checkpoint
                segment, c = [], kept.pop(start)
                for t in range(start, min(start + k, total)):
                    g = step_grad(work, c.theta, batch, rows_of[t], config, group)
                    segment.append((t, c._replace(g=g)))
                    c = Checkpoint(*opt.update(c.theta, c.state, g), None)
            while segment:  # pop, so each step's checkpoint is freed once reversed
                t, c = segment.pop()
                adj, tau_t = reverse_step(work, opt, c, adj, batch, rows_of[t], config, t, checks, group)
                scores[rows_of[t]] += tau_t
                done += 1
                if progress:
                    progress("reverse", done, total)
        checks.raise_first()
        if group is not None:
            torch.distributed.all_reduce(scores, group=group)  # each rank filled its own rows
    finally:
        if store:
            store.close()
    return MetagradResult(scores.cpu(), report_before["phi"], value_after, report_before, report_after, total)


