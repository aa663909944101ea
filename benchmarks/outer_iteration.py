"""One whole outer iteration through dpg/ alone (no Prefect, no MLflow): wall time and peak memory per stage.

For a GPU box that has only torch and transformers (benchmarks/gpu.sh). Everything is built in code, seeded:
the generator is dpg's toy (a random Llama over a word vocabulary of the offline corpus, fully fine-tuned), the
target a random Llama of the generator's vocabulary (`target.model: tiny`; by default GPT-2-small-sized, 12 × 768).
The stages are those of a pipeline iteration: sample the rollouts, one differentiable SFT + metagradient per SFT
group, advantages, the generator's GRPO update, the eval SFT.

    python benchmarks/outer_iteration.py                 # GPU sizes (see --help)
    python benchmarks/outer_iteration.py --dry           # seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DRY = {"prompts": 2, "rollouts": 2, "new_tokens": 8, "vocab": 256, "gen_hidden": 32, "gen_layers": 1,
       "target_hidden": 32, "target_layers": 1, "microbatch": 1, "grad_accum": 1, "max_len": 16}
FULL = {"prompts": 16, "rollouts": 4, "new_tokens": 128, "vocab": 8192, "gen_hidden": 512, "gen_layers": 8,
        "target_hidden": 768, "target_layers": 12, "microbatch": 8, "grad_accum": 2, "max_len": 160}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU-sized: " + json.dumps(DRY))
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} ({DRY[key]} with --dry)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:k")
    ap.add_argument("--checkpoint", default="host", choices=("disk", "host", "recompute"))
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    size = {k: getattr(args, k) if getattr(args, k) is not None else (DRY if args.dry else FULL)[k] for k in FULL}

    from dpg import loop
    from dpg.generator import load_generator
    from dpg.models import resolve_device
    from dpg.policy import policy_optimizer
    from dpg.runconfig import load_config

    device = resolve_device(args.device)
    toy = {"corpora": ["wiki-vital"], "vocab": size["vocab"], "hidden": size["gen_hidden"],
           "layers": size["gen_layers"]}
    cfg = load_config(None, [
        "generator.source=toy", "generator.lora_rank=null", f"generator.toy={json.dumps(toy)}",
        f"target.tiny_hidden={size['target_hidden']}", f"target.tiny_layers={size['target_layers']}",
        f"prompts.per_iteration={size['prompts']}", "prompts.max_prompt_tokens=64",
        f"rollouts.n_rollouts={size['rollouts']}", f"rollouts.max_new_tokens={size['new_tokens']}",
        "sft.optimizer=adamw", "sft.lr=1e-4", f"sft.microbatch={size['microbatch']}",
        f"sft.grad_accum={size['grad_accum']}", f"sft.max_len={size['max_len']}", f"sft.checkpoint={args.checkpoint}",
        "policy.microbatch=4", f"execution.device={args.device}"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    stages: dict[str, dict] = {}

    def timed(name: str, fn):
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn()
        sync()
        stages[name] = {"seconds": time.perf_counter() - start}
        if device.type == "cuda":
            stages[name]["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    t0 = time.perf_counter()
    generator, tokenizer = load_generator("toy", None, seed=cfg.seed, toy=cfg.generator.toy)
    generator = generator.to(device)
    target_model, target_tokenizer, target = loop.load_target(cfg, tokenizer, device)
    optimizer = policy_optimizer(generator, cfg.policy)
    load_s = time.perf_counter() - t0

    rollouts = timed("sample", lambda: loop.sample(cfg, 0, generator, tokenizer, "base"))
    taus, credit = {}, {}

    def rewards_of_every_group() -> None:
        for group in loop.group_ids(cfg):
            t, _, c = loop.group_rewards(cfg, rollouts, group, target_model, target_tokenizer, target)
            taus.update(t)
            credit.update(c)

    timed("sft + metagradients", rewards_of_every_group)
    rewards = timed("advantages", lambda: loop.advantages(cfg, rollouts, taus, credit or None))
    timed("generator update", lambda: loop.update(cfg, generator, optimizer, rollouts, rewards))
    metrics = timed("eval sft", lambda: loop.evaluate(cfg, rollouts, target_model, target_tokenizer, target)[0])

    total = sum(s["seconds"] for s in stages.values())
    tokens = sum(len(r.token_ids) for r in rollouts)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.node()} CPU"
    print(f"# one outer iteration on {where}, torch {torch.__version__}: {size}, checkpoint {args.checkpoint}; "
          f"models built in {load_s:.1f} s; {len(rollouts)} rollouts, {tokens} generated tokens, "
          f"{len(loop.group_ids(cfg))} SFT groups\n")
    print("| stage | seconds | share | peak GPU memory |\n|---|---|---|---|")
    for name, s in stages.items():
        peak = f"{s['peak_gb']:.2f} GB" if "peak_gb" in s else "-"
        print(f"| {name} | {s['seconds']:.2f} | {s['seconds'] / total:.0%} | {peak} |")
    print(f"| **total** | **{total:.2f}** | | |")
    print(f"\neval: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k.startswith('eval_'))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "device": str(device), "where": where, "load_s": load_s,
                                               "stages": stages, "total_s": total, "tokens": tokens}, indent=1))


if __name__ == "__main__":
    main()
