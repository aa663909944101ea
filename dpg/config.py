"""Validated configuration of the differentiable SFT. Every error names the key, the value and the fix.

A frozen dataclass (no pydantic) so that dpg/ runs on a GPU box that has only torch and transformers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from dpg.errors import DPGError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "loss_normalization": ("max_len", "tokens"),
    "dtype": tuple(DTYPES),
    "checkpoint": ("disk", "host", "recompute"),
    "reverse": ("forward_over_reverse", "reverse_over_forward", "double_backward"),
}


@dataclass(frozen=True)
class SFTConfig:
    """The differentiable, weighted SFT of the target model (SPEC §2) and its reverse pass (SPEC §3)."""

    optimizer: str = "adamw"
    """Inner optimizer: `sgd` (no weight decay) or `adamw`."""
    lr: float = 5e-6
    """Inner learning rate (reference: AdamW 5e-6; SGD 5.12e-4 for "67", 1.28e-4 for l2)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon added outside the square root."""
    eps_root: float = 1e-9
    """AdamW epsilon inside the square root; > 0 keeps the reverse pass finite where v ~ 0."""
    weight_decay: float | None = None
    """AdamW decoupled weight decay on every parameter; None means 1e-4 for AdamW (SGD has none)."""
    microbatch: int = 8
    """Examples per microbatch; the loss is the mean over a microbatch."""
    grad_accum: int = 1
    """Microbatches per optimizer step; their gradients are summed (reference convention)."""
    max_len: int = 128
    """Tokens per example; longer examples are an error, shorter ones are padded."""
    loss_normalization: str = "max_len"
    """Per-example loss = summed token CE over real tokens / max_len (reference) or / real tokens (`tokens`)."""
    dtype: str = "float32"
    """Dtype of weights, optimizer state and adjoints (float64 for exactness checks)."""
    checkpoint: str = "disk"
    """`disk`: every (theta_t, state_t, g_t) goes to disk, memory flat in T. `host`: they stay in host memory
    (pinned, copied asynchronously from and to a CUDA device; host memory grows with T). `recompute`: every k-th
    step stays in memory and the others are recomputed in the reverse pass."""
    checkpoint_every: int | None = None
    """k for `recompute` (None: ceil(sqrt(T)))."""
    checkpoint_dir: str | None = None
    """Where `disk` checkpoints go (None: a fresh temporary folder, removed afterwards)."""
    reverse: str = "forward_over_reverse"
    """How a reverse step gets H_t u and the per-example scores (see benchmarks/metagrad_cost.py).
    `reverse_over_forward` is wrong through nn.LayerNorm in torch <= 2.13 (pytorch/pytorch#196700)."""
    sweep_microbatch: int | None = None
    """Examples per call of the reverse pass's sweep (None: microbatch; the scores are the same). The sweep holds
    primal and tangent activations, about twice a plain backward's: microbatch / 2 keeps the reverse pass's peak
    memory near plain SFT's, at some cost in time (benchmarks/RESULTS-metagrad.md)."""

    def __post_init__(self) -> None:
        for key, options in CHOICES.items():
            _require(getattr(self, key) in options, key, getattr(self, key), f"use one of {list(options)}")
        for key in ("lr", "eps", "eps_root"):
            value = getattr(self, key)
            _require(_real(value) and (value > 0 if key == "lr" else value >= 0), key, value,
                     "use a positive number" if key == "lr" else "use a number >= 0")
        for key in ("microbatch", "grad_accum", "max_len", "checkpoint_every", "sweep_microbatch"):
            value = getattr(self, key)
            if value is not None or key not in ("checkpoint_every", "sweep_microbatch"):
                _require(_int(value) and value >= (2 if key == "max_len" else 1), key, value,
                         f"use an integer >= {2 if key == 'max_len' else 1}")
        b = self.betas
        _require(isinstance(b, (tuple, list)) and len(b) == 2 and all(_real(x) and 0 <= x < 1 for x in b),
                 "betas", b, "use two numbers in [0, 1), e.g. (0.9, 0.95)")
        object.__setattr__(self, "betas", tuple(b))
        if self.weight_decay is not None:
            _require(_real(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                     "use a number >= 0")
            _require(self.optimizer == "adamw" or self.weight_decay == 0, "weight_decay", self.weight_decay,
                     "SGD has no weight decay; leave it unset or use optimizer='adamw'")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "sft") -> SFTConfig:
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error naming them."""
        return build(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def decay(self) -> float:
        """The weight decay actually applied."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "adamw" else 0.0

    @property
    def step_size(self) -> int:
        """Examples per optimizer step."""
        return self.microbatch * self.grad_accum

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def inner_steps(self, n: int) -> int:
        """T for n examples; raises unless n is a positive multiple of microbatch * grad_accum."""
        s = self.step_size
        if n <= 0 or n % s:
            lo = n // s * s
            fix = f"use {lo} or {lo + s}" if lo > 0 else f"use {s}"
            raise DPGError(f"number of examples n={n} is not a multiple of sft.microbatch*sft.grad_accum="
                           f"{self.microbatch}*{self.grad_accum}={s}; {fix}")
        return n // s

    def recompute_every(self, steps: int) -> int:
        return self.checkpoint_every or max(1, math.ceil(math.sqrt(steps)))


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """`cls(**data)` for a config dataclass; unknown keys and wrong shapes are errors naming `prefix.key`."""
    if not isinstance(data, dict):
        raise DPGError(f"{prefix} must be a mapping of keys, not {type(data).__name__} {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DPGError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                       f"valid keys: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except TypeError as e:  # e.g. a wrongly typed value that fails before validation
        raise DPGError(f"{prefix}: {e}") from None


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(ok: bool, key: str, value: Any, fix: str, prefix: str = "sft") -> None:
    if not ok:
        raise DPGError(f"{prefix}.{key}={value!r} is invalid; {fix}")
