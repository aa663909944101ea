"""The DPG loop in one process, without Prefect, storage or MLflow: a fast bench for reward/credit studies.

Runs `--iterations` outer iterations of a config exactly as the pipeline's stages do (dpg.loop: sample,
group rewards, advantages, GRPO update, evaluation), for each `--seeds` seed, and appends one JSON line
per iteration to OUT (metrics of the evaluation, reward and policy statistics, mean completion length).
With `--set rewards.credit=token` it uses per-token metagradients (dpg.credit).

    .venv/bin/python benchmarks/policy_study.py experiments/pattern-67.yaml --seeds 0 1 2 --out /tmp/s.jsonl \
        --set rewards.credit=token
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(cfg, iterations: int, label: str, out) -> None:
    from dpg import loop
    from dpg.generator import load_generator
    from dpg.policy import policy_optimizer

    g = cfg.generator
    generator, tokenizer = load_generator(g.source, g.lora_rank, g.lora_alpha, seed=cfg.seed, toy=g.toy)
    optimizer = policy_optimizer(generator, cfg.policy)
    target_model, target_tokenizer, target = loop.load_target(cfg, tokenizer)
    start = time.perf_counter()
    for it in range(iterations):
        rollouts = loop.sample(cfg, it, generator, tokenizer, f"v{it}")
        metrics, _ = loop.evaluate(cfg, rollouts, target_model, target_tokenizer, target)
        taus, credit = {}, {}
        for group in loop.group_ids(cfg):
            scores, _, group_credit = loop.group_rewards(cfg, rollouts, group, target_model, target_tokenizer, target)
            taus.update(scores)
            credit.update(group_credit)
        rewards = loop.advantages(cfg, rollouts, taus, credit)
        stats = loop.update(cfg, generator, optimizer, rollouts, rewards)
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
    parser.add_argument("--label", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from dpg.runconfig import load_config

    with open(args.out, "a") as out:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.set, f"seed={seed}"])
            run(cfg, args.iterations, args.label or " ".join(args.set), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
