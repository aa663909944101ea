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

`--linear N` asks the same question of a large eval (`--batch 512`), where a search by SFTs is too slow, to first
order: a pattern's patch moves only by its own gradient, so after a plain SFT from theta_0 the change is about
-c * sum_x dL_x/dP at theta_0 (c > 0: the sign, which pixel accuracy reads, needs no scale). The bench takes N
completions of the initial generator, each one's patch gradient, and: (a) an LP, the largest margin t with which
some distribution w over the pool moves every pixel its goal's way, S * (-sum_x w_x dL_x/dP) >= t (t > 0: every
pixel is reachable at first order; scipy's HiGHS, which mlflow installs), and the share of pixels that at least one
text moves its goal's way (`reachable_first_order`, a first-order bound on any data of the pool); (b) a greedy
choice of `--batch` texts of the pool for the most pixels, to first order; (c) the eval's real SFT of that choice,
of the `--batch` texts with the largest first-order alignment sum S * (-dL_x/dP) (what a reward that is linear in
the text would pick), and of random ones, each in 4 orders.

`--cone N` asks which placements of a pattern's patch a policy can reach when it only changes *how often* it
writes each patch token. For a tied head, descent of the summed token NLL moves the head row of token c by

    -dL/dW[c] = sum over occurrences of c of (h_t - dL/de_{t+1})  -  sum over all positions of p_t(c) h_t
              = n_c v_c - N u_c

(h_t the final hidden state before the label c, e_{t+1} the embedding c feeds as the next input, p_t(c) the
model's probability of c), so at first order the column's change lies in the cone {a v_c - b u_c : a, b >= 0}.
The bench takes N completions of the initial generator and reports, for every hidden offset of the patch's rows,
a ceiling: the mean over columns of the best sign agreement with the goal anywhere in that cone (`per_offset`); the
configured offset's (`ceiling`), the best offset, and how many offsets reach 0.8. Measured on "67", the ceiling
does not predict which targets DPG lifts, and moving the patch to its best offset does not help
(RESULTS-reproduce.md §7e).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
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


def patch_gradients(cfg, texts: list[str], target_model, target_tokenizer, target):
    """(n, rows, cols): dL_x/dP of each text's SFT loss (its token NLL sum over sft.max_len, as dpg.sft's default
    normalisation) at the target's initial weights, through the tied head and embedding alike."""
    import torch
    import torch.nn.functional as F

    from dpg.generator import to_target_examples
    from dpg.targets import output_matrix

    ids, mask, _, _ = to_target_examples(texts, target_tokenizer, cfg.sft.max_len)
    W = output_matrix(target_model)
    cols = torch.tensor(target.token_ids)
    rows = len(target.image(target_model)["goal"])
    offset = (cfg.target.options or {}).get("hidden_offset", 0)
    out = []
    for i in range(len(texts)):
        x, m = ids[i:i + 1], mask[i:i + 1]
        logits = target_model(input_ids=x, attention_mask=m).logits
        keep = (m[:, 1:] * m[:, :-1]).float()
        loss = (F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none") * keep).sum()
        (g,) = torch.autograd.grad(loss / cfg.sft.max_len, W)
        out.append(g[cols, offset:offset + rows].T.clone())
    return torch.stack(out)  # (n, rows, cols)


def pattern_pool(cfg, pool_size: int, flag: str):
    """(target model, its tokenizer, target, goal image (rows, cols) of +-1, `pool_size` completions of the initial
    generator: prompts and samples of outer iteration 10**6) for the benches that need a pattern target."""
    from dpg import loop

    generator, tokenizer, target_model, target_tokenizer, target = setup(cfg)
    pictures = target.image(target_model) if target.image is not None else {}
    if "goal" not in pictures:
        raise SystemExit(f"{flag} needs a pattern target")
    wide = replace(cfg, prompts=replace(cfg.prompts, per_iteration=-(-pool_size // cfg.rollouts.n_rollouts)))
    pool = [r.text for r in loop.sample(wide, 10**6, generator, tokenizer, "initial")][:pool_size]
    return target_model, target_tokenizer, target, pictures["goal"], pool


def linear_reach(cfg, pool_size: int, batch: int) -> dict:
    import numpy as np
    import torch
    from scipy.optimize import linprog

    from dpg import loop

    target_model, target_tokenizer, target, goal, pool = pattern_pool(cfg, pool_size, "--linear")
    goal = torch.as_tensor(goal).double().flatten()  # (pixels,)
    A = -patch_gradients(cfg, pool, target_model, target_tokenizer, target).double().flatten(1)  # (n, pixels)
    aligned = A * goal  # > 0 where a text moves a pixel its goal's way
    # (a) max t s.t. aligned^T w >= t, w >= 0, sum w = 1; variables (w, t), minimise -t
    n, pixels = aligned.shape
    scale = float(aligned.abs().mean())
    lp = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.c_[-aligned.T.numpy() / scale, np.ones(pixels)],
                 b_ub=np.zeros(pixels), A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0],
                 bounds=[(0, None)] * n + [(None, None)], method="highs")
    support = int((lp.x[:n] > 1e-9).sum()) if lp.success else -1
    reachable = float((aligned.max(0).values > 0).double().mean())  # pixels some text moves the goal's way

    def first_order(chosen) -> float:
        return float((aligned[chosen].sum(0) > 0).double().mean())

    # (b) greedy: each step adds the unused text that most raises sum_p tanh(margin_p / tau)
    tau = float(aligned.std()) * batch ** 0.5
    margin, used, chosen = torch.zeros(pixels, dtype=torch.float64), torch.zeros(n, dtype=torch.bool), []
    for _ in range(batch):
        gain = torch.tanh((margin + aligned) / tau).sum(1)
        gain[used] = -float("inf")
        k = int(gain.argmax())
        chosen.append(k)
        used[k] = True
        margin += aligned[k]
    top = aligned.sum(1).argsort(descending=True)[:batch].tolist()
    rng = random.Random(cfg.seed)
    randoms = [rng.sample(range(n), batch) for _ in range(4)]

    def real(picks: list[int], orders: int = 4) -> float:
        got = []
        for j in range(orders):
            perm = random.Random(cfg.seed + 10 + j).sample(picks, len(picks))
            tuned = loop.fine_tune(cfg, [pool[k] for k in perm], target_model, target_tokenizer, 0)
            got.append(target.report(tuned)["pixel_accuracy"])
        return statistics.mean(got)

    return {"metric": "pixel_accuracy", "pool": n, "batch": batch,
            "lp_margin": float(-lp.fun) if lp.success else None, "lp_support": support,
            "reachable_first_order": reachable,
            "greedy_first_order": first_order(chosen), "greedy_real": real(chosen),
            "aligned_first_order": first_order(top), "aligned_real": real(top),
            "random_first_order": statistics.mean(first_order(r) for r in randoms),
            "random_real": statistics.mean(real(r, 1) for r in randoms),
            "greedy_distinct_texts": len({pool[k] for k in chosen}),
            "texts": [pool[k] for k in chosen[:64]]}


def frequency_directions(model, ids, mask, cols: list[int], chunk: int = 64):
    """(V, U, counts, positions) with V[j] = sum over occurrences of cols[j] as a label of (h_t - dL/de_{t+1})
    (input parts only where the head is tied to the embedding, also that of a row's first token, which is no
    label) and U[j] = sum over all label positions of p_t(cols[j]) h_t, all hidden dims, float64:
    -dL/dW[cols[j]] = V[j] - U[j] exactly, for L the summed token NLL of the rows."""
    import torch
    import torch.nn.functional as F

    embed = model.get_input_embeddings()
    tied = embed.weight is model.get_output_embeddings().weight
    hidden = embed.weight.shape[1]
    V, U = (torch.zeros(len(cols), hidden, dtype=torch.float64) for _ in range(2))
    counts, positions = torch.zeros(len(cols), dtype=torch.long), 0
    for b in range(0, len(ids), chunk):
        x, m = ids[b:b + chunk], mask[b:b + chunk]
        emb = embed(x).detach().requires_grad_()
        out = model(inputs_embeds=emb, attention_mask=m, output_hidden_states=True)
        keep = (m[:, 1:] * m[:, :-1]).bool()  # label x[:, t + 1] predicted from position t
        loss = (F.cross_entropy(out.logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none") * keep).sum()
        g_in = torch.autograd.grad(loss, emb)[0].double()
        h = out.hidden_states[-1][:, :-1].detach().double()  # the head's input (after the final norm)
        p = torch.softmax(out.logits[:, :-1].detach().double(), -1)
        positions += int(keep.sum())
        for j, c in enumerate(cols):
            occ = keep & (x[:, 1:] == c)
            V[j] += h[occ].sum(0)
            if tied:
                first = m[:, 0].bool() & (x[:, 0] == c)
                V[j] -= g_in[:, 1:][occ].sum(0) + g_in[:, 0][first].sum(0)
            U[j] += (p[..., c, None] * h)[keep].sum(0)
            counts[j] += int(occ.sum())
    return V, U, counts, positions


def cone_ceiling(v, u, goal) -> float:
    """The best share of sign agreement with `goal` of a v - b u over a, b >= 0 (a grid of 361 angles)."""
    import numpy as np

    return max(float((np.sign(np.cos(a) * v - np.sin(a) * u) == goal).mean())
               for a in np.linspace(0, np.pi / 2, 361))


def frequency_cone(cfg, pool_size: int) -> dict:
    import numpy as np

    from dpg.generator import to_target_examples

    target_model, target_tokenizer, target, goal, texts = pattern_pool(cfg, pool_size, "--cone")
    goal = np.asarray(goal)  # (rows, cols) of +-1
    rows = goal.shape[0]
    ids, mask, _, _ = to_target_examples(texts, target_tokenizer, cfg.sft.max_len)
    cols = list(target.token_ids)
    V, U, counts, positions = frequency_directions(target_model, ids, mask, cols)
    v, u = (V / counts.clamp(min=1)[:, None]).numpy(), (U / positions).numpy()
    per_offset = [float(np.mean([cone_ceiling(v[j, o:o + rows], u[j, o:o + rows], goal[:, j])
                                 for j in range(len(cols))])) for o in range(v.shape[1] - rows + 1)]
    offset = (cfg.target.options or {}).get("hidden_offset", 0)
    best = int(np.argmax(per_offset))
    return {"metric": "pixel_accuracy", "pool": len(texts), "hidden_offset": offset,
            "ceiling": per_offset[offset], "best_offset": best, "best_ceiling": per_offset[best],
            "offsets_reaching_0.8": sum(x >= 0.8 for x in per_offset),
            "median_ceiling": float(np.median(per_offset)), "per_offset": per_offset,
            "occurrences": counts.tolist()}


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
    parser.add_argument("--linear", type=int, default=0, metavar="N",
                        help="first-order reach of a pool of N texts instead of the search (pattern targets)")
    parser.add_argument("--cone", type=int, default=0, metavar="N",
                        help="the frequency cone's ceiling per hidden offset, from N texts (pattern targets)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from dpg.runconfig import load_config

    with open(args.out, "a") as out:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.set, f"seed={seed}"])
            start = time.perf_counter()
            got = (frequency_cone(cfg, args.cone) if args.cone else
                   linear_reach(cfg, args.linear, args.batch) if args.linear else
                   search(cfg, args.pool, args.pool_kind, args.batch, args.passes, args.candidates,
                          args.objective, args.orders))
            got |= {"seed": seed, "pool_kind": args.pool_kind, "objective": args.objective, "orders": args.orders,
                    "set": args.set,
                    "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps({k: v for k, v in got.items() if k != "texts"}), flush=True)
            out.write(json.dumps(got) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
