"""How far can data move the target at all? A local search over datasets, without any policy.

The evaluation of a run fine-tunes the target on one batch of completions (`dpg.loop.fine_tune`, the same SFT
as `evaluate`) and reads the target metric. This bench asks what the best such batch reaches when it may be
any `--batch` texts of a pool, so it separates "the policy cannot find the data" from "no data of this kind
moves the target further". The pool is `--pool` batches of the *initial* generator (prompts and samples of outer
iterations 10**6, 10**6 + 1, ..., not a run's), or with `--pool-kind random` texts of uniformly drawn
generator tokens (as long as the generator's completions), which no policy of this generator would write.

Search: start from a random batch of the pool; then, for `--passes` passes over the batch's slots, try
`--candidates` random pool texts in each slot and keep the best, if it beats the current batch: by the human
metric with Φ breaking ties (`--objective human`, the default: pixel accuracy counts signs, which Φ, nearly
linear in the patch's change at these step sizes, does not), or by Φ alone (`--objective phi`, what DPG optimises).
The SFT takes its examples in order, and one order of a batch can score far above the same texts shuffled, so a
batch is scored by its mean over `--orders` fixed shuffles and, at the start and the end, over 8 shuffles the
search never saw (`start_held_out`, `final_held_out`): what the chosen *set* is worth in any order, as a generator
that wrote those texts would deliver them. Every draw is seeded by the config's seed. One JSON line per seed goes
to OUT: the human metric of the start and after each pass (search orders), held out, and of the initial
generator's own batches (mean and max).

    .venv/bin/python benchmarks/data_ceiling.py experiments/pattern-67.yaml --seeds 0 1 2 --out /tmp/c.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_signal import setup  # noqa: E402


def search(cfg, pool_batches: int, pool_kind: str, batch: int, passes: int, candidates: int,
           objective: str, orders: int) -> dict:
    from dpg import loop

    generator, tokenizer, target_model, target_tokenizer, target = setup(cfg)
    batches = [loop.sample(cfg, 10**6 + j, generator, tokenizer, "initial") for j in range(pool_batches)]
    rng = random.Random(cfg.seed)
    pool = [r.text for b in batches for r in b]
    if pool_kind == "random":  # uniform draws over the generator's non-special tokens, same lengths
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        pool = [tokenizer.decode([rng.choice(ids) for _ in r.token_ids]) for b in batches for r in b]

    def report(texts: list[str]) -> dict[str, float]:
        return target.report(loop.fine_tune(cfg, texts, target_model, target_tokenizer, 0))

    def mean_over(chosen: list[int], perms: list[list[int]]) -> dict[str, float]:
        got = [report([pool[chosen[k]] for k in perm]) for perm in perms]
        return {key: statistics.mean(g[key] for g in got) for key in got[0]}

    human = next((k for k in ("pixel_accuracy", "l2_norm") if k in report(pool[:batch])), "phi")
    sign = -1.0 if human == "l2_norm" else 1.0  # every key higher is better

    def key(got: dict[str, float]) -> tuple[float, float]:
        return (sign * got[human], got["phi"]) if objective == "human" else (got["phi"], 0.0)

    def shuffled(n: int, seed: int) -> list[list[int]]:
        r = random.Random(seed)
        return [r.sample(range(batch), batch) for _ in range(n)]

    search_orders = [list(range(batch))] if orders == 1 else shuffled(orders, cfg.seed + 1)
    held_out = shuffled(8, cfg.seed + 2)  # orders the search never saw: what the chosen set is worth in any order
    own = [report([r.text for r in b][:batch])[human] for b in batches]
    current = rng.sample(range(len(pool)), batch)
    start_held_out = mean_over(current, held_out)[human]
    best = mean_over(current, search_orders)
    trace, start_phi = [best[human]], best["phi"]
    for _ in range(passes):
        for slot in range(batch):
            free = [i for i in range(len(pool)) if i not in current]
            for i in rng.sample(free, min(candidates, len(free))):
                trial = current.copy()
                trial[slot] = i
                got = mean_over(trial, search_orders)
                if key(got) > key(best):
                    current, best = trial, got
        trace.append(best[human])
    return {"metric": human, "own_batches_mean": statistics.mean(own), "own_batches_max": max(own),
            "start": trace[0], "after_pass": trace[1:], "start_phi": start_phi, "final_phi": best["phi"],
            "start_held_out": start_held_out, "final_held_out": mean_over(current, held_out)[human],
            "texts": [pool[i] for i in current]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pool", type=int, default=16, help="batches of the initial generator in the pool")
    parser.add_argument("--pool-kind", choices=["generator", "random"], default="generator")
    parser.add_argument("--batch", type=int, default=32, help="texts per searched batch (the eval's size)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--objective", choices=["human", "phi"], default="human")
    parser.add_argument("--orders", type=int, default=4,
                        help="score a batch by its mean over this many shuffled orders (1: the order as searched)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from dpg.runconfig import load_config

    with open(args.out, "a") as out:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.set, f"seed={seed}"])
            start = time.perf_counter()
            got = search(cfg, args.pool, args.pool_kind, args.batch, args.passes, args.candidates,
                         args.objective, args.orders)
            got |= {"seed": seed, "pool_kind": args.pool_kind, "objective": args.objective, "orders": args.orders,
                    "set": args.set,
                    "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps({k: v for k, v in got.items() if k != "texts"}), flush=True)
            out.write(json.dumps(got) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
