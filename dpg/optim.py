"""Functional optimizers: pure, out-of-place, differentiable (SPEC §2).

An optimizer is two pure functions, as in optax::

    init(theta) -> state
    update(theta, state, g) -> (theta, state)

`theta`, `g` and the moments are `dict[str, Tensor]`. `update` mutates nothing, so `torch.func.vjp`
through `update` gives the adjoints of `theta`, of the state and of `g` (the `u` of SPEC §3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]


class SGDState(NamedTuple):
    count: int


class AdamWState(NamedTuple):
    count: int  # steps taken so far
    m: Params  # first moment
    v: Params  # second moment


State = SGDState | AdamWState


class Optimizer(NamedTuple):
    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]
    vjp: Callable | None = None
    """Closed-form VJP of `update` for one parameter: (theta, moments, g, count, adj theta', adj moments') ->
    (adj theta, adj moments, adj g); None: dpg.metagrad differentiates `update` with torch.func."""


def sgd(lr: float) -> Optimizer:
    """Plain SGD, no weight decay: ``theta <- theta - lr * g``."""

    def init(theta: Params) -> SGDState:
        return SGDState(0)

    def update(theta: Params, state: SGDState, g: Params) -> tuple[Params, SGDState]:
        return {k: theta[k] - lr * g[k] for k in theta}, SGDState(state.count + 1)

    def vjp(theta: Tensor, moments: tuple, g: Tensor, count: int, a_theta: Tensor, a_moments: tuple):
        return a_theta, (), -lr * a_theta

    return Optimizer(init, update, vjp)


def adamw(
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    eps_root: float = 1e-9,
    weight_decay: float = 1e-4,
) -> Optimizer:
    """AdamW with ``eps_root`` inside the square root (decoupled decay on every parameter).

    At step t = count + 1::

        m <- b1 m + (1 - b1) g                  v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)                  v_hat = v / (1 - b2^t)
        theta <- theta - lr * (m_hat / (sqrt(v_hat + eps_root) + eps) + wd * theta)

    ``eps_root > 0`` keeps the reverse pass finite where v ~ 0 (d sqrt(v)/dv = 1/(2 sqrt(v))).
    With ``eps_root = 0`` this is exactly ``torch.optim.AdamW``.
    """
    b1, b2 = betas

    def init(theta: Params) -> AdamWState:
        return AdamWState(0, {k: torch.zeros_like(p) for k, p in theta.items()},
                          {k: torch.zeros_like(p) for k, p in theta.items()})

    def update(theta: Params, state: AdamWState, g: Params) -> tuple[Params, AdamWState]:
        t = state.count + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        # fused ops (lerp, addcmul, addcdiv), out of place: differentiable, and fewer passes over memory
        m = {k: torch.lerp(state.m[k], g[k], 1 - b1) for k in theta}
        v = {k: torch.addcmul(b2 * state.v[k], g[k], g[k], value=1 - b2) for k in theta}
        new = {k: torch.addcdiv((1 - lr * weight_decay) * theta[k], m[k], torch.sqrt(v[k] / c2 + eps_root) + eps,
                                value=-lr / c1) for k in theta}
        return new, AdamWState(t, m, v)

    def vjp(theta: Tensor, moments: tuple[Tensor, Tensor], g: Tensor, count: int, a_theta: Tensor,
            a_moments: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """The update's VJP in closed form: with m', v' the new moments and d = sqrt(v'/c2 + eps_root) + eps,
        theta' depends on m' through -lr/(c1 d) and on v' through lr m' / (2 c1 c2 d^2 sqrt(v'/c2 + eps_root)).
        In place: the moments, g and the adjoints are consumed, and their buffers hold the results (the reverse
        pass reuses the same memory every step); theta is left as it is."""
        t = count + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        m_old, v_old = moments
        root = v_old.mul_(b2).addcmul_(g, g, value=1 - b2).div_(c2).add_(eps_root).sqrt_()
        d = root + eps
        a_m = a_moments[0].addcdiv_(a_theta, d, value=-lr / c1)  # total adjoint of m'
        denom = d.square_().mul_(root)
        m_new_a = m_old.lerp_(g, 1 - b1).mul_(a_theta)
        a_v = a_moments[1].addcdiv_(m_new_a, denom, value=lr / (2 * c1 * c2))  # total adjoint of v'
        u = g.mul_(a_v).mul_(2 * (1 - b2)).add_(a_m, alpha=1 - b1)
        return a_theta.mul_(1 - lr * weight_decay), (a_m.mul_(b1), a_v.mul_(b2)), u

    return Optimizer(init, update, vjp)


def state_tensors(state: State) -> tuple[Params, ...]:
    """The differentiable parts of a state (the moments), in a fixed order."""
    return tuple(state[1:])


def with_tensors(state: State, tensors: tuple[Params, ...]) -> State:
    """`state` with its moments replaced by `tensors` (inverse of `state_tensors`)."""
    return type(state)(state.count, *tensors)
