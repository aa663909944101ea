"""How much of a pattern run's patch change is one direction, and whether the reward pushes each token its way.

Reads policy_study.py rows (JSON lines with `wide<n>_delta`, `patch_column_count`, `patch_column_advantage`) and
prints, per seed, the SVD look of RESULTS-reproduce §7f at the last fresh eval:

- share: the fraction of Δ's energy in its first singular direction, Δ ≈ d aᵀ (d over hidden dims, a_c per token);
- rank1: the pixel accuracy of that rank-one part alone, sign(d) sign(a_c) per pixel;
- ceiling: the best pixel accuracy of any rank-one change along the run's own d (every column's sign free): rank1
  reaches it when every column agrees;
- agree: the columns whose sign(a_c) is the best one for the run's own d (a tie counts as agreeing);
- pushed: the columns whose mean token advantage over iterations >= --from has the sign that the best rank-one
  change needs (d oriented so that the most written token moves along +d; ties are left out);
- cos0: |cos| between the first fresh eval's d and the last's (near 1: d is the target's, not the run's).

`--over-time` prints instead, per run label and at each fresh eval's iteration, the means over seeds of accuracy,
share, rank1, ceiling and agree: whether a run gains by fixing its column signs (agree rises) or by moving d
(ceiling rises); `--plot FILE` draws accuracy and ceiling against the iteration.

    .venv/bin/python benchmarks/patch_rank.py /tmp/runs.jsonl --size 512
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict

import numpy as np


def rank_one(delta: np.ndarray, goal: np.ndarray) -> dict:
    """The rank-one look at one patch change `delta` against the ±1 image `goal` (same shape)."""
    u, s, vt = np.linalg.svd(delta)
    d, a = u[:, 0], s[0] * vt[0]
    if a.sum() < 0:
        d, a = -d, -a
    sd = np.sign(d)
    ideal = np.sign(sd @ goal)  # per column, the sign of a_c that gets most of the column right (0: either)
    return {"accuracy": float((np.sign(delta) == goal).mean()), "share": float(s[0] ** 2 / (s ** 2).sum()),
            "rank1": float((np.sign(np.outer(sd, np.sign(a))) == goal).mean()),
            "ceiling": free_sign_accuracy(sd, goal),
            "agree": int(sum(ideal[c] == 0 or np.sign(a[c]) == ideal[c] for c in range(goal.shape[1]))),
            "d": d, "a": a, "ideal": ideal}


def free_sign_accuracy(sd: np.ndarray, goal: np.ndarray) -> float:
    """The best pixel accuracy of a rank-one change along the ±1 direction `sd`, each column's sign chosen freely."""
    hits = (goal == sd[:, None]).sum(0)
    return float(np.maximum(hits, goal.shape[0] - hits).sum() / goal.size)


def rank_one_ceilings(goal: np.ndarray) -> tuple[float, float]:
    """The best pixel accuracy of any rank-one change: with every a_c > 0, and with the signs of a free."""
    same = free = 0.0
    for d in itertools.product((-1, 1), repeat=goal.shape[0]):
        same = max(same, float((goal == np.array(d)[:, None]).mean()))
        free = max(free, free_sign_accuracy(np.array(d), goal))
    return same, free


def pushed(look: dict, rows: list[dict]) -> tuple[int, int]:
    """(columns whose mean advantage has the rank-one ideal sign, columns counted), over `rows`."""
    counts = np.sum([r["patch_column_count"] for r in rows if r.get("patch_column_count")], axis=0)
    ideal = look["ideal"] * (1 if look["a"][int(np.argmax(counts))] > 0 else -1)
    good = total = 0
    for c, want in enumerate(ideal):
        values = [r["patch_column_advantage"][c] for r in rows
                  if r.get("patch_column_advantage") and r["patch_column_advantage"][c] is not None]
        if want and values:
            total += 1
            good += int(np.sign(np.mean(values)) == want)
    return good, total


def over_time(rows: list[dict], goal: np.ndarray, key: str, plot: str | None = None) -> int:
    """Print, per run label, the means over seeds of the rank-one look at each iteration that has a fresh eval;
    with `plot`, also draw accuracy and ceiling against the iteration, one colour per label."""
    looks = defaultdict(list)
    for row in rows:
        if key in row:
            looks[row.get("label", ""), row["iteration"]].append(rank_one(np.array(row[key]), goal))
    names = ("accuracy", "share", "rank1", "ceiling", "agree")
    print("| label | iteration | seeds | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
    curves = defaultdict(list)
    for (label, iteration), group in sorted(looks.items()):
        means = {n: float(np.mean([look[n] for look in group])) for n in names}
        curves[label].append((iteration, means))
        print(f"| {label} | {iteration} | {len(group)} | " + " | ".join(f"{means[n]:.3f}" for n in names) + " |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (label, points) in enumerate(sorted(curves.items())):
            its = [it for it, _ in points]
            ax.plot(its, [m["accuracy"] for _, m in points], color=f"C{i}", marker="o", label=f"{label} accuracy")
            ax.plot(its, [m["ceiling"] for _, m in points], color=f"C{i}", linestyle="--",
                    label=f"{label} ceiling of d")
        ax.axhline(rank_one_ceilings(goal)[1], color="grey", linewidth=0.8, label="best rank-one change")
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("pixel accuracy (mean over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")
    return 0


def main() -> int:
    from dpg.targets import IMAGE_67

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--size", type=int, default=512, help="the fresh eval's size (wide<size>_delta)")
    ap.add_argument("--from", dest="start", type=int, default=30, help="first iteration of the advantage means")
    ap.add_argument("--over-time", action="store_true", help="means over seeds at each fresh eval, per run label")
    ap.add_argument("--plot", help="with --over-time: a PNG of accuracy and ceiling against the iteration")
    args = ap.parse_args()
    goal = np.array(IMAGE_67)
    rows = [json.loads(line) for path in args.rows for line in open(path)]
    key = f"wide{args.size}_delta"
    same, free = rank_one_ceilings(goal)
    print(f"rank-one ceilings of '67': {same:.3f} with every a_c > 0, {free:.3f} with free signs")
    if args.over_time:
        return over_time(rows, goal, key, args.plot)
    by_seed = defaultdict(list)
    for row in rows:
        by_seed[row["seed"]].append(row)
    print("| seed | final | share | rank1 | ceiling | agree | pushed | cos0 |\n|---|---|---|---|---|---|---|---|")
    finals, fractions = [], []
    for seed, seed_rows in sorted(by_seed.items()):
        evals = [r for r in seed_rows if key in r]
        if not evals:
            continue
        look = rank_one(np.array(evals[-1][key]), goal)
        cos0 = abs(float(rank_one(np.array(evals[0][key]), goal)["d"] @ look["d"]))
        good, total = pushed(look, [r for r in seed_rows if r["iteration"] >= args.start])
        finals.append(look["accuracy"])
        fractions.append(good / total if total else float("nan"))
        print(f"| {seed} | {look['accuracy']:.2f} | {look['share']:.2f} | {look['rank1']:.2f} | "
              f"{look['ceiling']:.2f} | {look['agree']}/{goal.shape[1]} | {good}/{total} | {cos0:.2f} |")
    if len(finals) > 2:
        print(f"\nr(final, pushed share) = {np.corrcoef(finals, fractions)[0, 1]:.2f} over {len(finals)} seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
