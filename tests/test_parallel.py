"""Data-parallel attribution (dpg.parallel): one metagradient over 2 processes joined by gloo gives the scores of
one process, in float64, for SGD and AdamW, per-example and per-token weights, every checkpoint mode, and a step
whose microbatches do not split evenly over the ranks."""

import torch

import dpg
from dpg.exact import float64_llama, random_data, tiny_model
from dpg.parallel import launch

LENGTH = 10
CASES = [  # (optimizer, per-token weights, checkpoint, grad_accum)
    ("sgd", False, "disk", 2), ("adamw", False, "disk", 2), ("adamw", True, "recompute", 2),
    ("adamw", False, "host", 3), ("sgd", True, "disk", 3)]


def all_scores(group, rank: int = 0) -> list[torch.Tensor]:
    """Every case's scores; in one process with group=None, or as one rank of `group`."""
    out = []
    with float64_llama():
        for optimizer, per_token, checkpoint, accum in CASES:
            model = tiny_model("llama")
            n = 4 * 2 * accum  # T = 4 steps of `accum` microbatches of 2
            ids, mask = random_data(n, LENGTH)
            mask[3, 7:] = 0  # some padding
            lr = dict(lr=0.3) if optimizer == "sgd" else dict(lr=1e-2, eps_root=1e-6)
            cfg = dpg.SFTConfig(optimizer=optimizer, microbatch=2, grad_accum=accum, max_len=LENGTH,
                                dtype="float64", checkpoint=checkpoint, **lr)
            weights = torch.ones(n, LENGTH, dtype=torch.float64) if per_token else None
            target = dpg.get_target("pattern:67", model)
            out.append(dpg.metagradients(model, ids, mask, target, cfg, weights=weights, group=group).scores)
    return out


def test_two_gloo_ranks_give_the_scores_of_one_process():
    alone = all_scores(None)
    ranks = launch(2, all_scores, backend="gloo")
    assert len(ranks) == 2
    for case, single, first, second in zip(CASES, alone, *ranks):
        assert torch.equal(first, second), case  # every rank returns all the scores
        assert single.abs().max() > 0, case
        torch.testing.assert_close(first, single, rtol=1e-12, atol=1e-15 * single.abs().max().item(), msg=str(case))
