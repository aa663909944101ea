"""The prepared GPU benchmark runs end to end at CPU sizes (`benchmarks/gpu.sh --dry`): both of its tables come
out with finite figures, and its JSON results parse; the data-ceiling search behaves as its docstring says. Speed
and effect sizes are measured in benchmarks/, never here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import PATTERN_67_BEFORE_PK1

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_dry_run_writes_both_tables(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "results.md").read_text()
    assert "| T | plain torch loop s | dpg metagrad s" in report and "| sft + metagradients |" in report, report
    sft = json.loads((tmp_path / "sft.json").read_text())
    assert {r["mode"] for r in sft} == {"torch", "metagrad"} and {r["T"] for r in sft} == {1, 2}
    assert all(math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["peak_abs"] > 0 for r in sft)
    iteration = json.loads((tmp_path / "iteration.json").read_text())
    assert set(iteration["stages"]) == {"sample", "sft + metagradients", "advantages", "generator update",
                                        "eval sft"}
    assert iteration["tokens"] > 0 and all(s["seconds"] >= 0 for s in iteration["stages"].values())


def test_the_data_ceiling_search_only_keeps_improvements_and_is_seeded():
    """benchmarks/data_ceiling.py: the searched score never falls, the chosen batch comes from the pool, the
    held-out orders are scored, and the same config gives the same search."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_ceiling import search

    from dpg.runconfig import load_config

    cfg = load_config(str(ROOT / "experiments" / "pattern-67.yaml"),
                      [*PATTERN_67_BEFORE_PK1, "target.tiny_pretrain_steps=20", "prompts.per_iteration=4", "seed=3"])
    got = [search(cfg, pool_batches=2, pool_kind="generator", batch=8, passes=2, candidates=3, objective="human",
                  orders=2) for _ in range(2)]
    a = got[0]
    assert a["metric"] == "pixel_accuracy" and len(a["texts"]) == 8 and len(a["after_pass"]) == 2
    trace = [a["start"], *a["after_pass"]]
    assert all(x <= y for x, y in zip(trace, trace[1:]))
    assert 0 <= a["start_held_out"] <= 1 and 0 <= a["final_held_out"] <= 1
    assert got[0] == got[1]


def test_the_frequency_cone_directions_sum_to_the_head_rows_gradient():
    """benchmarks/data_ceiling.py --cone: the occurrence part V and the generic part U of a tied head's rows give
    exactly -dL/dW[c] = V - U (float64, padded rows), and the cone's ceiling reads signs."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_ceiling import cone_ceiling, frequency_directions

    from dpg.loop import small_llama

    model = small_llama(12, 32, 2, seed=0).double()
    ids = torch.randint(0, 12, (5, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    cols = [2, 5, 7]
    V, U, counts, positions = frequency_directions(model, ids, mask, cols, chunk=2)
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = (mask[:, 1:] * mask[:, :-1]).double()
    loss = (F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * keep).sum()
    (g,) = torch.autograd.grad(loss, model.get_output_embeddings().weight)  # head and embedding: tied
    assert torch.allclose(V - U, -g[cols], rtol=1e-10, atol=1e-12), (V - U + g[cols]).abs().max()
    assert counts.tolist() == [int(((ids[:, 1:] == c) & keep.bool()).sum()) for c in cols]
    assert positions == int(keep.sum())
    goal = np.array([1.0, -1.0, 1.0, 1.0])
    assert cone_ceiling(goal, -goal, goal) == 1.0 and cone_ceiling(-goal, goal, goal) == 0.0
    assert cone_ceiling(np.array([1.0, 1, 1, 1]), np.array([1.0, 1, -1, -1]), goal) == 0.75


def test_the_rank_one_look_at_a_patch_change(tmp_path):
    """benchmarks/patch_rank.py: a change that is exactly d aᵀ is all one direction, its signs are read per pixel
    and per column, the rank-one ceilings of '67' are those of a brute force over every sign pattern, and the
    script reads policy_study rows; the ceiling along the run's own d is the best over every column sign;
    --over-time averages over seeds per run label and iteration, and draws the curves."""
    import itertools

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from patch_rank import pushed, rank_one, rank_one_ceilings

    from dpg.targets import IMAGE_67

    goal = np.array(IMAGE_67)
    d, a = np.array([1.0, -2, 1, -1, 0.5, 3]), np.array([1.0, 2, -1, 0.5, 3, -2, 1])
    look = rank_one(np.outer(d, a), goal)
    assert abs(look["share"] - 1) < 1e-12
    assert look["accuracy"] == look["rank1"] == (np.sign(np.outer(d, a)) == goal).mean()
    ideal = np.sign(np.sign(d) @ goal)
    assert look["agree"] == sum(i == 0 or np.sign(x) == i for x, i in zip(a, ideal))
    brute = max((np.sign(np.outer(s, t)) == goal).mean() for s in itertools.product((-1, 1), repeat=6)
                for t in itertools.product((-1, 1), repeat=7))
    same, free = rank_one_ceilings(goal)
    assert free == brute and same <= free and abs(same - 25 / 42) < 1e-12
    own = max((np.sign(np.outer(np.sign(d), t)) == goal).mean() for t in itertools.product((-1, 1), repeat=7))
    assert look["ceiling"] == own and look["rank1"] <= own
    assert (look["rank1"] == own) == (look["agree"] == 7)
    # the most written token (column 4, a_4 > 0) fixes the orientation; column 1 needs a_1 > 0 (a tie would be
    # left out), so a positive advantage there counts as pushed its way and a negative one does not
    assert ideal[1] == 1

    def rows_with(advantage):
        return [{"iteration": 40, "patch_column_count": [1, 0, 0, 0, 9, 0, 0],
                 "patch_column_advantage": [None, advantage, None, None, None, None, None]}]

    assert pushed(look, rows_with(0.5)) == (1, 1) and pushed(look, rows_with(-0.5)) == (0, 1)
    rows = rows_with(0.5)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"seed": 0, "iteration": 59, "wide512_delta": np.outer(d, a).tolist(), **rows[0]}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "patch_rank.py"), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"| 0 | {look['accuracy']:.2f} | 1.00 |" in proc.stdout
    # --over-time: the means over seeds at each eval (seed 0's row above is at iteration 40, from rows_with); seed 1
    # has the sign-flipped change there, and a row without an eval
    flipped = rank_one(-np.outer(d, a), goal)
    with path.open("a") as f:
        f.write("\n" + json.dumps({"seed": 1, "iteration": 40, "wide512_delta": (-np.outer(d, a)).tolist()}))
        f.write("\n" + json.dumps({"seed": 1, "iteration": 3}))
    plot = tmp_path / "over-time.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "patch_rank.py"), "--over-time", str(path),
                           "--plot", str(plot)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|  | 40 |")]
    mean = (look["accuracy"] + flipped["accuracy"]) / 2
    assert lines == [f"|  | 40 | 2 | {mean:.3f} | 1.000 | {(look['rank1'] + flipped['rank1']) / 2:.3f} | "
                     f"{look['ceiling']:.3f} | {(look['agree'] + flipped['agree']) / 2:.3f} |"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 |" not in proc.stdout and mean < look["accuracy"]
    # rows of another label are their own line
    with path.open("a") as f:
        f.write("\n" + json.dumps({"label": "x", "seed": 0, "iteration": 40, "wide512_delta": np.outer(d, a).tolist()}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "patch_rank.py"), "--over-time", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert f"| x | 40 | 1 | {look['accuracy']:.3f} |" in proc.stdout and lines[0] in proc.stdout


def test_policy_study_records_each_reward_groups_patch_change():
    """policy_study --deltas: one Δ per reward SFT group; with one group (rollouts.grouping=cross) it is the batch
    eval's own Δ, with inverse groups each differs from it; recording them leaves the run's later draws alone."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from policy_study import group_deltas
    from reward_signal import setup

    from dpg import loop
    from dpg.runconfig import load_config

    small = [*PATTERN_67_BEFORE_PK1, "target.tiny_pretrain_steps=0", "prompts.per_iteration=4",
             "rollouts.max_new_tokens=6"]
    for grouping, groups in (("inverse", 4), ("cross", 1)):
        cfg = load_config(ROOT / "experiments" / "pattern-67.yaml", [*small, f"rollouts.grouping={grouping}"])
        generator, tokenizer, *target_parts = setup(cfg)
        rollouts = loop.sample(cfg, 0, generator, tokenizer, "v0")
        _, pictures = loop.evaluate(cfg, rollouts, *target_parts)
        deltas = np.array(group_deltas(cfg, rollouts, *target_parts))
        assert deltas.shape == (groups, 6, 7) and np.abs(deltas).max() > 0
        if grouping == "cross":
            assert np.array_equal(deltas[0], pictures["delta"])
        else:  # four SFTs of one rollout per prompt each: four different changes, none the batch's
            assert not np.array_equal(deltas[0], deltas[1])
            assert not any(np.array_equal(d, pictures["delta"]) for d in deltas)
        again = loop.sample(cfg, 1, generator, tokenizer, "v1")
        generator2, tokenizer2, *_ = setup(cfg)
        loop.sample(cfg, 0, generator2, tokenizer2, "v0")
        assert [r.text for r in loop.sample(cfg, 1, generator2, tokenizer2, "v1")] == [r.text for r in again]


def test_policy_study_reward_lr_and_base_change_the_reward_and_leave_the_evals():
    """policy_study --reward-lr / --reward-base wide: the rewards (and so the update) change, every eval of the
    iteration stays the same; --reward-lr equal to sft.lr is the default run."""
    import io

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from policy_study import run

    from dpg.runconfig import load_config

    small = [*PATTERN_67_BEFORE_PK1, "target.tiny_pretrain_steps=0", "prompts.per_iteration=4",
             "rollouts.max_new_tokens=6"]
    cfg = load_config(ROOT / "experiments" / "pattern-67.yaml", small)

    def first_row(**kw):
        out = io.StringIO()
        run(cfg, 1, "t", out, eval_sizes=[8], **kw)
        row = json.loads(out.getvalue().splitlines()[0])
        row.pop("seconds")
        return row

    default = first_row()
    assert first_row(reward_lr=cfg.sft.lr) == default
    evals = ("eval_phi", "eval_pixel_accuracy", "wide8_phi", "wide8_pixel_accuracy")
    for kw in ({"reward_lr": cfg.sft.lr / 8}, {"reward_base": "wide"}):
        row = first_row(**kw)
        assert all(row[k] == default[k] for k in evals), kw
        assert row["other_token_advantage"] != default["other_token_advantage"], kw
        assert row["policy_grad_norm"] != default["policy_grad_norm"], kw


def test_the_context_split_of_token_credit_separates_identity_from_context():
    """benchmarks/reward_signal.py's context_split: credit that is a function of the token id alone is all identity
    and has no context part to learn; a consistent per-bigram part is found in both halves, noise is not."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reward_signal import context_split

    rng = np.random.default_rng(0)
    value = {t: float(rng.normal()) for t in range(12)}
    bigram = {(p, t): float(rng.normal()) for p in range(-1, 12) for t in range(12)}

    def halves(context: float, noise: float):
        out = [[], []]
        for h in range(2):
            for _ in range(4000):
                p, t = int(rng.integers(-1, 12)), int(rng.integers(0, 12))
                out[h].append((p, t, value[t] + context * bigram[(p, t)] + noise * float(rng.normal())))
        return out

    only_id = context_split(halves(0.0, 0.0))
    assert only_id["identity_share"] > 1 - 1e-12 and only_id["pairs"] == 156 and only_id["tokens"] == 8000
    assert only_id["context_r"] != only_id["context_r"]  # no residual spread: NaN, not a fake correlation
    with_context = context_split(halves(1.0, 0.1))
    assert 0.2 < with_context["identity_share"] < 0.8 and with_context["context_r"] > 0.95
    noise = context_split(halves(0.0, 1.0))
    assert abs(noise["context_r"]) < 0.3 and noise["pairs"] == 156  # 156 independent pairs: r's sd is about 0.08
