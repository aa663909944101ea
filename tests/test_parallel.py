"""Data-parallel attribution (dpg.parallel): one metagradient over 2 processes joined by gloo gives the scores of
one process, in float64, for SGD and AdamW, per-example and per-token weights, every checkpoint mode, and a step
whose microbatches do not split evenly over the ranks."""

import torch
from test_pipeline import texts_file, tiny_config  # noqa: F401 (texts_file: a fixture)

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


def test_a_stage_with_two_attribution_ranks_writes_the_rewards_of_one_process(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    from flows.optimize import optimize
    from tasks import io
    from tasks.stages import stage_url

    settings = {"outer_iterations": 1, "prompts.per_iteration": 4, "sft.grad_accum": 2, "sft.dtype": "float64"}
    taus = []
    for ranks in (1, 2):
        cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / f"store-{ranks}"),
                          f"sqlite:///{tmp_path}/m{ranks}.db", **settings, **{"execution.attribution_ranks": ranks})
        optimize(cfg)
        taus.append([io.read_table(stage_url(cfg, 0, f"sft-g{g}"), "tau.parquet") for g in (0, 1)])
    for one, two in zip(*taus):
        assert list(one["example_id"]) == list(two["example_id"]) and one["tau"].abs().max() > 0
        assert list(one["target_tokens"]) == list(two["target_tokens"])
        # the spawned ranks run stock transformers Llama, whose RMSNorm rounds float64 to float32 (this process
        # has conftest's float64 patch), hence 1e-6; the first test checks the ranks in exact float64
        torch.testing.assert_close(torch.tensor(two["tau"].to_numpy()), torch.tensor(one["tau"].to_numpy()),
                                   rtol=1e-6, atol=1e-12)
