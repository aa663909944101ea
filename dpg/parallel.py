"""Data-parallel attribution: one SFT group's metagradient over R processes (torch.distributed).

`launch(R, fn, *args)` starts R fresh processes (spawn), joins them into one process group (NCCL where each rank
has a CUDA device, gloo otherwise), runs `fn(group, rank, *args)` in each and returns what each returned. `fn`
and `args` are pickled, so `fn` is a module-level function that builds its model, data and target itself (a
target's closures do not pickle). Inside, `dpg.metagradients(..., group=group)` splits every step's microbatches
over the ranks, sums gradients and HVPs, and gives every rank all the scores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dpg.errors import DPGError


def _worker(rank: int, ranks: int, init: str, backend: str, out: str, fn: Callable, args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=ranks)
    try:
        result = fn(dist.group.WORLD, rank, *args)
        torch.save(result, os.path.join(out, f"rank-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(ranks: int, fn: Callable, *args: Any, backend: str | None = None) -> list[Any]:
    """[fn(group, rank, *args) for each rank], each run in its own process of one R-rank process group.

    `backend`: None picks NCCL when this machine has at least `ranks` CUDA devices (rank r on cuda:r), else gloo.
    A rank that fails makes the whole call fail with its error (torch.multiprocessing.ProcessRaisedException).
    """
    import torch.multiprocessing as mp

    if not (isinstance(ranks, int) and ranks >= 1):
        raise DPGError(f"ranks={ranks!r}: use a positive number of processes")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= ranks else "gloo"
    with tempfile.TemporaryDirectory(prefix="dpg-parallel-") as tmp:
        mp.spawn(_worker, args=(ranks, f"file://{tmp}/rendezvous", backend, tmp, fn, args), nprocs=ranks, join=True)
        return [torch.load(os.path.join(tmp, f"rank-{r}.pt"), weights_only=False) for r in range(ranks)]
