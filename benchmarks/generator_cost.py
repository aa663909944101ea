"""Cost of the generator side: rollout sampling speed and one policy-gradient-like update, full vs LoRA.

A plain script in the style of nanoGPT's bench.py. For each mode (`full` fine-tuning, `lora` rank r) it runs,
in a fresh subprocess (this script re-invoked with `--one MODE`, so peaks do not mix):

1. `load_generator("smollm2", lora_rank=...)` and `build_prompts` on the first P default-corpus articles;
2. a warm-up `sample_rollouts` (4 new tokens) and a warm-up update, paying one-time costs;
   then `--repeats` times (the fastest is reported: other processes may share the cores):
3. rollouts: `sample_rollouts` with n rollouts x max_new_tokens (a fresh seed), timed; tokens/s counts the
   sampled completion tokens (end tokens included);
4. update: `sequence_logprobs` on those rollouts with gradients on, the loss
   `-(1/N) sum_i A_i * mean_j logp_ij` with random advantages A, `backward()` and one `torch.optim.AdamW`
   step over the trainable parameters: the shape of a GRPO step at ratio 1 (no clipping active), timed;
5. peak memory: `ru_maxrss` at the end (it includes loading the model).

On CPU the subprocesses get `OMP_WAIT_POLICY=PASSIVE` (`--omp-wait`), as in metagrad_cost.py: with OpenMP's
default spin-wait and other busy processes on a 2-core machine, decoding (many small ops) slowed ~5-10x.

Example::

    python benchmarks/generator_cost.py                       # 2 prompts x 2 rollouts x 32 tokens
    python benchmarks/generator_cost.py --threads 1           # steadier on a shared, busy CPU
    python benchmarks/generator_cost.py --prompts 8 --rollouts 4 --new-tokens 128 --device cuda

Needs only torch + transformers (+ peft for LoRA) and dpg/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def one(mode: str, args: argparse.Namespace) -> dict:
    from dpg.generator import RolloutConfig, load_generator, sample_rollouts, sequence_logprobs
    from dpg.prompts import build_prompts, load_texts

    t0 = time.perf_counter()
    model, tok = load_generator("smollm2", lora_rank=args.lora_rank if mode == "lora" else None)
    model.to(args.device)
    load_s = time.perf_counter() - t0
    prompts = build_prompts(load_texts(limit=args.prompts), max_prompt_tokens=args.max_prompt_tokens, tokenizer=tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def update(rollouts) -> None:
        logps = sequence_logprobs(model, [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts])
        advantages = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(0))
        loss = -sum(a * lp.mean() for a, lp in zip(advantages.tolist(), logps)) / len(rollouts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    warm = sample_rollouts(model, tok, prompts, RolloutConfig(n_rollouts=args.rollouts, max_new_tokens=4), 0, "warm")
    update(warm)
    cfg = RolloutConfig(n_rollouts=args.rollouts, max_new_tokens=args.new_tokens, batch_size=args.batch_size, seed=1)
    sample_s = update_s = float("inf")
    for _ in range(args.repeats):  # same seed: (nearly) the same rollouts; the fastest counts
        t0 = time.perf_counter()
        rollouts = sample_rollouts(model, tok, prompts, cfg, 1, "bench")
        sync()
        sample_s = min(sample_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        update(rollouts)
        update_s = min(update_s, time.perf_counter() - t0)
    tokens = sum(len(r.token_ids) for r in rollouts)
    return {"mode": mode if mode == "full" else f"lora r={args.lora_rank}", "load_s": load_s,
            "trainable": sum(p.numel() for p in params), "tokens": tokens,
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in rollouts), "sample_s": sample_s,
            "tokens_per_s": tokens / sample_s, "update_s": update_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--omp-wait", default="passive", choices=("passive", "active", "default"),
                        help="OMP_WAIT_POLICY of the CPU subprocesses (unless already set): with the default "
                             "spin-wait, a busy shared CPU slows decoding up to ~10x")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}"
    print(f"device {args.device} ({device}), {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, float32, SmolLM2-135M-Instruct; {args.prompts} prompts x {args.rollouts} "
          f"rollouts x <= {args.new_tokens} new tokens, batch {args.batch_size}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', args.omp_wait)}; load average before "
          f"{os.getloadavg()[0]:.2f}")
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--device", args.device]
        for key in ("prompts", "rollouts", "new_tokens", "batch_size", "max_prompt_tokens", "lora_rank", "repeats",
                    "threads"):
            if getattr(args, key) is None:
                continue
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = dict(os.environ)
        if args.omp_wait != "default" and args.device == "cpu":
            env.setdefault("OMP_WAIT_POLICY", args.omp_wait.upper())
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print("\n| mode | trainable params | load s | prompt tokens | sampled tokens | sample s | tokens/s "
          "| update s (fwd+bwd+AdamW) | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['load_s']:.1f} | {r['prompt_tokens']} | {r['tokens']} "
              f"| {r['sample_s']:.2f} | {r['tokens_per_s']:.1f} | {r['update_s']:.2f} | {r['peak_rss_gib']:.2f} |")
    print(f"\nload average after {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
