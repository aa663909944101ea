"""Group-normalised advantages: hand cases and the failures that must be loud (SPEC §6)."""

import math

import pytest
import torch

from dpg import loop
from dpg.advantages import group_advantages
from dpg.errors import DPGError
from dpg.records import Rollout
from dpg.runconfig import DPGConfig, load_config


def test_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1])
    A, scale = group_advantages(rewards, groups, eps_fraction=1e-3)
    assert scale == pytest.approx(rewards.std(correction=0).item(), rel=1e-15)
    eps = 1e-3 * scale
    # group 0: mean 2, population std 1; group 1: mean 20, population std sqrt(200/3)
    s1 = math.sqrt(200 / 3)
    expected = [-1 / (1 + eps), 1 / (1 + eps), -10 / (s1 + eps), 0.0, 10 / (s1 + eps)]
    torch.testing.assert_close(A, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert A.dtype == torch.float64


def test_groups_need_not_be_contiguous():
    rewards = torch.tensor([1.0, 10.0, 3.0, 30.0], dtype=torch.float64)
    A, _ = group_advantages(rewards, torch.tensor([0, 1, 0, 1]))
    assert A[0] < 0 < A[2] and A[1] < 0 < A[3]
    torch.testing.assert_close(A[0], -A[2])
    torch.testing.assert_close(A[1], -A[3])


def test_rewards_of_1e_9_give_order_one_advantages_and_scale_invariance():
    base = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1, 0.0, -2.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    A_big, _ = group_advantages(base, groups)
    A_tiny, scale = group_advantages(base * 1e-9, groups)
    assert scale < 1e-8 and A_tiny.abs().max() > 0.5  # an absolute eps of 1e-4 would give ~1e-5 here
    torch.testing.assert_close(A_tiny, A_big, rtol=1e-12, atol=1e-12)


def test_a_constant_group_in_a_varying_batch_gets_exact_zeros():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0], dtype=torch.float64)  # mean of 0.1s is not 0.1 in fp
    A, _ = group_advantages(rewards, torch.tensor([7, 7, 7, 8, 8, 8]))
    assert A[:3].tolist() == [0.0, 0.0, 0.0] and (A[3:] != 0).all()


def test_a_group_of_one_rollout_gets_zero():
    A, _ = group_advantages(torch.tensor([5.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([0, 1, 1]))
    assert A[0] == 0.0 and A[1] < 0 < A[2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_advantages_raise_on_non_finite_reward_naming_iteration_and_group(bad):
    rewards = torch.tensor([1.0, 2.0, bad, 3.0], dtype=torch.float64)
    with pytest.raises(DPGError) as e:
        group_advantages(rewards, torch.tensor([0, 0, 5, 5]), where="outer iteration 3")
    msg = str(e.value)
    assert "outer iteration 3" in msg and "group (prompt_id) 5" in msg and str(bad) in msg and "3" in msg


def test_advantages_raise_on_constant_batch():
    rewards = torch.full((6,), 2.5e-9, dtype=torch.float64)
    with pytest.raises(DPGError, match=r"outer iteration 4: all 6 rewards equal 2\.5e-09 across 2 group"):
        group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), where="outer iteration 4")


def test_advantages_reject_bad_inputs():
    with pytest.raises(DPGError, match="must both be"):
        group_advantages(torch.ones(3, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(DPGError, match="integer group_ids"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(DPGError, match="eps_fraction"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), eps_fraction=0)


def test_constant_ok_gives_zeros_for_a_flat_batch_but_non_finite_still_raises():
    A, scale = group_advantages(torch.full((4,), 0.5, dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
                                constant_ok=True)
    assert A.tolist() == [0.0] * 4 and scale == 0.0
    with pytest.raises(DPGError, match="non-finite reward"):
        group_advantages(torch.tensor([0.5, math.nan, 0.5, 0.5], dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
                         constant_ok=True)


def rollouts(texts):
    return [Rollout(example_id=f"2-{p}-{k}", outer_iteration=2, prompt_id=p, rollout_index=k, group_id=k, prompt="",
                    text=texts[2 * p + k], prompt_token_ids=[3], token_ids=[4], logprobs=[-1.0], finish_reason="stop",
                    generator_version="v") for p in range(2) for k in range(2)]


def test_a_flat_batch_through_loop_advantages_gives_zeros_and_the_flag():
    cfg = DPGConfig()
    records = rollouts(["a", "b", "c", ""])
    flat = loop.advantages(cfg, records, {"2-0-0": 1e-9, "2-0-1": 1e-9, "2-1-0": 1e-9, "2-1-1": math.nan})
    assert [w.advantage for w in flat] == [0.0] * 4 and all(w.tau_scale == 0.0 for w in flat)
    assert loop.is_flat(flat) and [w.empty for w in flat] == [False, False, False, True]
    metrics = loop.summary(flat, [])
    assert metrics["flat_batch"] == 1.0 and metrics["empty_completions"] == 1.0 and metrics["reward_mean"] == 1e-9
    assert loop.update(cfg, None, None, records, flat) == {"skipped": 1.0}  # the GRPO step is skipped
    nothing = loop.advantages(cfg, records[3:], {"2-1-1": math.nan})  # only an empty completion: flat, no error
    assert loop.is_flat(nothing) and math.isnan(loop.summary(nothing, [])["reward_mean"])

    varying = loop.advantages(cfg, records, {"2-0-0": 1.0, "2-0-1": 2.0, "2-1-0": 3.0, "2-1-1": math.nan})
    assert not loop.is_flat(varying) and loop.summary(varying, [])["flat_batch"] == 0.0
    assert varying[0].advantage < 0 < varying[1].advantage and varying[3].advantage == 0.0
    assert math.isnan(varying[3].tau) and varying[2].advantage == 0.0  # prompt 1 has one reward: a group of one
    with pytest.raises(DPGError, match="non-finite reward"):  # NaN for a non-empty completion is a failure
        loop.advantages(cfg, records, {"2-0-0": 1.0, "2-0-1": math.nan, "2-1-0": 3.0, "2-1-1": 4.0})
    with pytest.raises(DPGError, match="no reward for 1 rollout"):
        loop.advantages(cfg, records, {"2-0-0": 1.0, "2-0-1": 2.0, "2-1-0": 3.0})


def test_the_run_stops_at_the_max_flat_batches_th_flat_batch_in_a_row():
    cfg = load_config(None, ["rewards.max_flat_batches=2"])
    loop.check_flat_batches(cfg, 4, 1)  # one flat batch: the run goes on
    with pytest.raises(DPGError, match=r"outer iteration 5: 2 flat batches in a row \(rewards.max_flat_batches=2\)"):
        loop.check_flat_batches(cfg, 5, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(DPGError, match=f"rewards.max_flat_batches={bad!r} is invalid; use an integer >= 1"):
            load_config(None, [f"rewards.max_flat_batches={bad}"])
