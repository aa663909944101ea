"""The DPG loop in one process, without Prefect, storage or MLflow: a fast bench for reward/credit studies.

Runs `--iterations` outer iterations of a config exactly as the pipeline's stages do (dpg.loop: sample,
group rewards, advantages, GRPO update, evaluation), for each `--seeds` seed, and appends one JSON line
per iteration to OUT (metrics of the evaluation, reward and policy statistics, mean completion length).
With `--deltas` a pattern target's rows also hold the patch change of the batch's eval SFT (`eval_delta`) and of
each reward SFT group's own plain SFT (`group_delta`): what each reward is taken against.
With `--set rewards.credit=token-own` it uses per-token metagradients (dpg.credit).
`--reward-lr X` takes the rewards against SFTs with learning rate X while every eval keeps sft.lr: a reward from the
same SFT at another step size (RESULTS-reproduce.md §7h). `--reward-base wide` starts the reward SFTs from the
target as the latest `--eval-sizes` eval left it: a reward taken near where the metric is read.

    .venv/bin/python benchmarks/policy_study.py experiments/pattern-67.yaml --seeds 0 1 2 --out /tmp/s.jsonl \
        --set rewards.name=random --set rewards.credit=sequence

`--oracle N` asks whether the *policy step* can climb a reward that is known to be learnable. Each token id
gets a fixed value: its mean per-token credit (rewards.credit=token-own, in units of each batch's tau std)
over N batches of the initial generator, standardised over token ids. The run then replaces the reward by
these values: every completion token's advantage is its token's value. The column `token_value` is the
mean value of the sampled tokens. If it stays flat, the generator cannot follow even a noise-free signal,
and the fault lies in the update (step size, adapters), not in the reward.

`--eval-sizes 32 128 512` asks how good the data the generator writes is beyond one batch: every `--eval-every`
iterations (and at the last) it samples max(sizes) fresh completions of the current generator (their own prompts
and draws) and reports the human metric after the eval's SFT on the first n of them (`wide<n>_*` columns).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_signal import rewards_of, setup, token_credit  # noqa: E402


def token_values(cfg, batches: int, generator, tokenizer, *target_parts) -> dict[int, float]:
    """Token id -> standardised mean per-token credit over `batches` batches of `generator` (ids it never wrote:
    absent). The batches use outer iterations 10**6, 10**6 + 1, ... so their prompts and samples are not the run's."""
    from dataclasses import replace

    from dpg import loop

    credit_cfg = replace(cfg, rewards=replace(cfg.rewards, name="dpg", credit="token-own"))
    seen = defaultdict(list)
    for it in range(batches):
        rollouts = loop.sample(credit_cfg, 10 ** 6 + it, generator, tokenizer, "base")
        for token, c in token_credit(credit_cfg, rollouts, *target_parts):
            seen[token].append(c)
    means = {k: statistics.mean(v) for k, v in seen.items()}
    mu, sd = statistics.mean(means.values()), statistics.pstdev(means.values()) or 1.0
    return {k: (v - mu) / sd for k, v in means.items()}


def oracle_rewards(rollouts, value: dict[int, float]) -> list:
    from dpg.records import Reward

    return [Reward(r.example_id, r.outer_iteration, r.group_id, "oracle", 0.0, 1.0, 0.0,
                   token_advantages=[value.get(t, 0.0) for t in r.token_ids]) for r in rollouts]


def wide_eval(cfg, it: int, generator, tokenizer, sizes: list[int], target_model, target_tokenizer, target):
    """(metrics, the target tuned on the last size): the human metric after the eval's SFT on the first n of
    max(sizes) fresh completions of the current generator, for each n in sizes (prompts and samples of outer
    iteration 10**7 + it, not the run's); for a pattern target also the patch's change Δ (`wide<n>_delta`)."""
    from dataclasses import replace

    from dpg import loop

    fresh = 10**7 + it  # an outer iteration no run reaches: prompts and draws of its own
    per = -(-max(sizes) // cfg.rollouts.n_rollouts)
    wide = replace(cfg, prompts=replace(cfg.prompts, per_iteration=per))
    texts = [r.text for r in loop.sample(wide, fresh, generator, tokenizer, "wide")]
    got = {}
    for n in sizes:
        tuned = loop.fine_tune(cfg, texts[:n], target_model, target_tokenizer, fresh)
        got |= {f"wide{n}_{k}": v for k, v in target.report(tuned).items()}
        if target.image is not None:  # the patch's change, for a per-pixel look at what a run reaches
            got[f"wide{n}_delta"] = target.image(tuned)["delta"].tolist()
    return got, tuned


def patch_token_advantage(rollouts, rewards, patch: list[int]) -> dict:
    """Mean per-token advantage of the generator tokens that are patch tokens, and of the others (token credit;
    the toy generator and the tiny target share their vocabulary): which way the update pushes the patch tokens.
    Per column of the patch (patch[c]) also how often the rollouts write it (`patch_column_count`) and its mean
    advantage (`patch_column_advantage`, None where it is not written)."""
    by_id = {r.example_id: r for r in rewards}
    column = {token: c for c, token in enumerate(patch)}
    on, off, per = [], [], [[] for _ in patch]
    for r in rollouts:
        adv = by_id[r.example_id].token_advantages if r.example_id in by_id else None
        for token, a in zip(r.token_ids, adv or []):
            if token in column:
                on.append(a)
                per[column[token]].append(a)
            else:
                off.append(a)
    got = {"patch_token_advantage": on, "other_token_advantage": off}  # absent where no token (or no token credit)
    out = {k: statistics.mean(v) for k, v in got.items() if v and patch}
    if on:
        out |= {"patch_column_count": [len(v) for v in per],
                "patch_column_advantage": [statistics.mean(v) if v else None for v in per]}
    return out


def group_deltas(cfg, rollouts, target_model, target_tokenizer, target) -> list:
    """The patch change Δ (rows × cols) of each reward SFT group's own plain SFT, in group order: what the reward
    of that group is taken against, to compare with the fresh eval's Δ."""
    from dpg import loop

    it = rollouts[0].outer_iteration
    return [target.image(loop.fine_tune(cfg, [r for r in rollouts if r.group_id == g], target_model,
                                        target_tokenizer, it))["delta"].tolist() for g in loop.group_ids(cfg)]


def run(cfg, iterations: int, label: str, out, oracle: int = 0, eval_sizes: list[int] | None = None,
        eval_every: int = 5, deltas: bool = False, reward_lr: float | None = None,
        reward_base: str = "target") -> None:
    from dataclasses import replace

    from dpg import loop
    from dpg.policy import policy_optimizer

    reward_cfg = cfg if reward_lr is None else replace(cfg, sft=replace(cfg.sft, lr=reward_lr))
    generator, tokenizer, *target_parts = setup(cfg)
    base = target_parts[0]
    optimizer = policy_optimizer(generator, cfg.policy)
    ref = copy.deepcopy(generator).eval() if loop.needs_reference(cfg) else None  # the KL anchor: a frozen copy
    value = token_values(cfg, oracle, generator, tokenizer, *target_parts) if oracle else None
    start = time.perf_counter()
    for it in range(iterations):
        rollouts = loop.sample(cfg, it, generator, tokenizer, f"v{it}")
        metrics, pictures = loop.evaluate(cfg, rollouts, *target_parts)
        if deltas and "delta" in pictures:
            metrics |= {"eval_delta": pictures["delta"].tolist(),
                        "group_delta": group_deltas(reward_cfg, rollouts, *target_parts)}
        if eval_sizes and (it % eval_every == 0 or it == iterations - 1):
            wide, tuned = wide_eval(cfg, it, generator, tokenizer, eval_sizes, *target_parts)
            metrics |= wide
            if reward_base == "wide":
                base = tuned
        if value is None:
            taus, credit = rewards_of(reward_cfg, rollouts, base, *target_parts[1:])
            rewards = loop.advantages(cfg, rollouts, taus, credit)
        else:
            rewards = oracle_rewards(rollouts, value)
            tokens = [t for r in rollouts for t in r.token_ids]
            metrics["token_value"] = sum(value.get(t, 0.0) for t in tokens) / max(len(tokens), 1)
        metrics |= patch_token_advantage(rollouts, rewards, list(target_parts[2].token_ids))
        stats = loop.update(cfg, generator, optimizer, rollouts, rewards, ref)
        row = {"label": label, "seed": cfg.seed, "iteration": it, **metrics,
               **{f"policy_{k}": v for k, v in stats.items()},
               "mean_tokens": sum(len(r.token_ids) for r in rollouts) / len(rollouts),
               "seconds": time.perf_counter() - start}
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{label} seed {cfg.seed} it {it}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                             if isinstance(v, float)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--oracle", type=int, default=0, metavar="N",
                        help="reward each token by its value from N batches of the initial generator")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[], metavar="N",
                        help="every --eval-every iterations, also fine-tune on N fresh completions (a larger eval)")
    parser.add_argument("--eval-every", type=int, default=5, metavar="K",
                        help="iterations between the --eval-sizes evals (the last iteration always has one)")
    parser.add_argument("--deltas", action="store_true",
                        help="also record the patch change of the batch's eval SFT and of each reward SFT group")
    parser.add_argument("--reward-lr", type=float, default=None, metavar="X",
                        help="take the rewards against SFTs with learning rate X (the evals keep sft.lr)")
    parser.add_argument("--reward-base", choices=["target", "wide"], default="target",
                        help="the target the reward SFTs start from: the target itself, or the model of the latest "
                             "--eval-sizes eval (its largest size)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.reward_base == "wide" and not args.eval_sizes:
        parser.error("--reward-base wide starts the rewards from the --eval-sizes eval's model: give --eval-sizes")
    from dpg.runconfig import load_config

    with open(args.out, "a") as out:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.set, f"seed={seed}"])
            run(cfg, args.iterations, args.label or " ".join(args.set) or "config", out, args.oracle,
                args.eval_sizes, args.eval_every, args.deltas, args.reward_lr, args.reward_base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
