"""Does a reward rank data usefully for the human metric? A selection test with no policy learning.

For a config (e.g. experiments/pattern-67.yaml) and its *initial* generator, each of `--batches` outer
iterations samples the iteration's rollouts and rewards them exactly as a dpg run does
(`dpg.loop.sample`, `dpg.loop.group_rewards`). Then, within every prompt, it picks the rollout with the
highest reward, one at random and the lowest, and fine-tunes a fresh target on each pick set (one example
per prompt) as the evaluation stage does (`dpg.loop.evaluate`). If the reward carries information about
the metric, best > random > worst on average; the policy gradient can only climb what this shows.

    .venv/bin/python benchmarks/reward_signal.py experiments/pattern-67.yaml --batches 15
    .venv/bin/python benchmarks/reward_signal.py experiments/pattern-67.yaml --set sft.optimizer=sgd --set sft.lr=0.5

Prints per batch and at the end the mean metric per pick and the paired differences best − worst and
best − random with their standard errors over batches.

`--consistency` asks a second question: is the reward *learnable*, i.e. does the same token earn the same
per-token credit (rewards.credit=token, in units of each batch's tau std) in different batches? It prints
the Pearson correlation, over token ids seen >= 3 times in both halves, of the mean credit per token id in
the even vs the odd batches. Near 0, what a token is worth is batch-specific noise that no policy can learn,
however well the reward ranks one batch's samples. It then runs the selection test on the odd batches with
a *learnable* ranking: each rollout is scored by the sum over its tokens of their mean credit in the even
batches (no reward of its own batch is used). A gain there is what a policy that learns token preferences
could get at best.

    .venv/bin/python benchmarks/reward_signal.py experiments/pattern-67.yaml --batches 30 --consistency

With `--consistency` it also splits that credit into what the token is and where it stands: the share of the
credit's variance that the token id explains, and the split-half correlation, over (previous token, token) pairs
seen >= 3 times in both halves, of the mean residual credit (credit minus its token's mean in that half). Near 0,
the credit has no learnable context part at the bigram level: a policy can learn which tokens to write, not where.
Both are printed for all completion tokens and for the target's own tokens (a pattern's patch columns).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup(cfg):
    """(generator, its tokenizer, target model, target tokenizer, target) of a config, as a run builds them."""
    from dpg import loop
    from dpg.generator import load_generator

    g = cfg.generator
    generator, tokenizer = load_generator(g.source, g.lora_rank, g.lora_alpha, seed=cfg.seed, toy=g.toy)
    return (generator, tokenizer, *loop.load_target(cfg, tokenizer))


def rewards_of(cfg, rollouts, target_model, target_tokenizer, target) -> tuple[dict, dict]:
    """({example_id: tau}, {example_id: per-token credit}) of one batch, every SFT group."""
    from dpg import loop

    taus, credit = {}, {}
    for group in loop.group_ids(cfg):
        scores, _, group_credit = loop.group_rewards(cfg, rollouts, group, target_model, target_tokenizer, target)
        taus.update(scores)
        credit.update(group_credit)
    return taus, credit


def token_credit(cfg, rollouts, *target_parts) -> list[tuple[int, int, float]]:
    """(previous token id, token id, credit in units of the batch's tau std) for every completion token of one
    batch (token credit); the first completion token's previous id is -1."""
    taus, credit = rewards_of(cfg, rollouts, *target_parts)
    scale = statistics.pstdev([t for t in taus.values() if math.isfinite(t)]) or 1.0
    return [(prev, token, c / scale) for r in rollouts
            for prev, token, c in zip([-1, *r.token_ids], r.token_ids, credit.get(r.example_id, []))]


def grouped(pairs) -> dict:
    """{key: [values]} of (key, value) pairs."""
    out: dict = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


def split_half_r(first: dict, second: dict, min_count: int = 3, scale: float = 0.0) -> tuple[float, int]:
    """(Pearson r between the two halves' mean values per key seen >= `min_count` times in each, how many keys);
    NaN with fewer than 3 keys, or when a half's means spread no more than 1e-9 × `scale` (rounding level)."""
    import numpy as np

    keys = [k for k in first if len(first[k]) >= min_count and len(second.get(k, [])) >= min_count]
    x = np.array([[np.mean(first[k]), np.mean(second[k])] for k in keys]).reshape(-1, 2)
    ok = len(keys) > 2 and x.std(0).min() > 1e-9 * scale
    return (float(np.corrcoef(x.T)[0, 1]) if ok else float("nan")), len(keys)


def context_split(halves: list[list[tuple[int, int, float]]], min_count: int = 3) -> dict:
    """What a token's credit owes to its id and to its context. `halves`: two lists of (previous id, id, credit).
    identity_share: the share of the credit's variance (both halves) explained by the token id's mean;
    context_r: the Pearson correlation between the halves of the mean residual (credit minus the token's mean in
    the same half) per (previous id, id) pair seen >= `min_count` times in each half (NaN with fewer than 3 pairs)."""
    import numpy as np

    rows = [row for half in halves for row in half]
    credit = np.array([c for _, _, c in rows], dtype=np.float64)
    mean = {t: float(np.mean(v)) for t, v in grouped((t, c) for _, t, c in rows).items()}
    fitted = np.array([mean[t] for _, t, _ in rows])
    total = float(((credit - credit.mean()) ** 2).sum())
    share = float(((fitted - credit.mean()) ** 2).sum() / total) if total > 0 else float("nan")
    residuals = []
    for half in halves:  # each half centred on its own token means, so noise leaves r at 0
        own = {t: float(np.mean(v)) for t, v in grouped((t, c) for _, t, c in half).items()}
        residuals.append(grouped(((p, t), c - own[t]) for p, t, c in half))
    r, n = split_half_r(*residuals, min_count, scale=float(credit.std()) if len(rows) else 0.0)
    return {"identity_share": share, "context_r": r, "pairs": n, "tokens": len(rows)}


def select(cfg, rollouts, score, rng, picks, metric, target_model, target_tokenizer, target) -> str:
    """Per prompt, the best, a random and the worst rollout by `score` (rollouts scored NaN left out), a fresh SFT
    on each pick set, and its metric appended to `picks`; returns the metric key."""
    from dpg import loop

    chosen = {k: [] for k in picks}
    for p in sorted({r.prompt_id for r in rollouts}):
        ranked = sorted((r for r in rollouts if r.prompt_id == p and score(r) == score(r)), key=score)
        if len(ranked) >= 2:
            chosen["best"].append(ranked[-1])
            chosen["worst"].append(ranked[0])
            chosen["random"].append(rng.choice(ranked))
    for k, rows in chosen.items():
        metrics, _ = loop.evaluate(cfg, rows, target_model, target_tokenizer, target)
        key = metric or next((m for m in metrics if m not in ("eval_phi", "eval_examples")), "eval_phi")
        picks[k].append(metrics[key])
    return key


def report(picks: dict, key: str, label: str, over: str) -> None:
    """The paired differences best − worst and best − random with their standard errors."""
    n = len(picks["best"])
    for a, b in (("best", "worst"), ("best", "random")):
        d = [x - y for x, y in zip(picks[a], picks[b])]
        se = statistics.stdev(d) / n ** 0.5 if n > 1 else float("nan")
        print(f"{label}{key}: {a} - {b} = {statistics.mean(d):+.4f} ± {se:.4f} ({over.format(n=n)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a dpg config file (YAML/JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batches", type=int, default=15, help="batches (outer iterations) to sample")
    parser.add_argument("--metric", help="metric key of the evaluation (default: the first human metric)")
    parser.add_argument("--consistency", action="store_true", help="split-half consistency of per-token credit")
    args = parser.parse_args()
    if args.consistency:
        return consistency(args)

    import torch

    from dpg import loop
    from dpg.runconfig import load_config

    cfg = load_config(args.config, args.set)
    generator, tokenizer, *target_parts = setup(cfg)
    print(f"{args.config} {' '.join(args.set)}: reward {cfg.rewards.name}, sft {cfg.sft.optimizer} lr {cfg.sft.lr}, "
          f"{cfg.prompts.per_iteration} prompts x {cfg.rollouts.n_rollouts} rollouts, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rng = random.Random(cfg.seed)
    picks = {"best": [], "random": [], "worst": []}
    start = time.perf_counter()
    for it in range(args.batches):
        rollouts = loop.sample(cfg, it, generator, tokenizer, "base")
        taus, _ = rewards_of(cfg, rollouts, *target_parts)
        key = select(cfg, rollouts, lambda r: taus[r.example_id], rng, picks, args.metric, *target_parts)
        print(f"batch {it}: " + "  ".join(f"{k} {statistics.mean(v):.4f}" for k, v in picks.items()) +
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    report(picks, key, "", "standard error over {n} batches")
    return 0


def consistency(args) -> int:
    from dpg import loop
    from dpg.runconfig import load_config

    cfg = load_config(args.config, [*args.set, "rewards.credit=token"])
    generator, tokenizer, *target_parts = setup(cfg)
    rows, held_out = [[], []], []  # (previous id, id, credit) of the even and the odd batches
    for it in range(args.batches):
        rollouts = loop.sample(cfg, it, generator, tokenizer, "base")
        rows[it % 2].extend(token_credit(cfg, rollouts, *target_parts))
        if it % 2:
            held_out.append(rollouts)
    even, odd = (grouped((t, c) for _, t, c in half) for half in rows)
    r, n = split_half_r(even, odd)
    print(f"{args.config} {' '.join(args.set)}: per-token credit, split-half correlation over {n} token ids "
          f"({args.batches} batches, sft {cfg.sft.optimizer} lr {cfg.sft.lr}): {r:+.3f}")
    own = set(target_parts[2].token_ids)  # the generator and target share a vocabulary in the pattern demos
    for name, keep in (("all tokens", lambda t: True), ("the target's tokens", lambda t: t in own)):
        split = context_split([[row for row in half if keep(row[1])] for half in rows])
        print(f"context, {name}: token id explains {split['identity_share']:.3f} of the credit's variance over "
              f"{split['tokens']} tokens; residual split-half r over {split['pairs']} (previous, token) pairs: "
              f"{split['context_r']:+.3f}")
    value = {k: statistics.mean(v) for k, v in even.items()}
    rng = random.Random(cfg.seed)
    picks = {"best": [], "random": [], "worst": []}
    for rollouts in held_out:
        key = select(cfg, rollouts, lambda r: sum(value.get(t, 0.0) for t in r.token_ids), rng, picks, args.metric,
                     *target_parts)
    report(picks, key, "learnable ranking, ", "over {n} held-out batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
