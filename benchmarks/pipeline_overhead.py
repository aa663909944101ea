"""Overhead of the pipeline: one outer iteration through the Prefect flow + tasks + MLflow + Parquet, against the
bare dpg calls of the same iteration (in memory, no I/O), with the same models and config.

For each config (`smollm2`: the default `DPGConfig` with outer_iterations=1, prompts.per_iteration=4 and
generator.lora_rank=8; `tiny`: the tests' tiny generator and target, to show the fixed overhead in seconds),
this script re-invokes itself in a fresh subprocess (`--one NAME`, env OMP_WAIT_POLICY=PASSIVE) that

1. loads the models into the per-process caches (`tasks.stages._base_generator`, `target_for`): excluded;
2. runs one warm-up flow on a cheap variant of the config (2 prompts, 2 new tokens; same models), paying the
   one-time costs of the process: the ephemeral Prefect API, the MLflow sqlite schema, imports, first kernels;
3. then `--repeats` times, alternating: the bare iteration (`dpg.loop.sample`, `group_rewards` per group,
   `advantages`, `summary`, `update`, `evaluate`, on a copy of the cached generator and its optimizer made
   outside the timer) and `flows.optimize.optimize(cfg)` with a fresh run name (nothing to resume; local
   store, sqlite tracking), timing each whole call. Both compute the same iteration: the script checks that
   the flow's stored rollouts and rewards equal the bare ones.

The flow's time is split by wrapping functions (exclusive time, innermost wins): dpg.loop compute; storage
(tasks.io: Parquet/JSON encode, digests, writes, verified reads, records <-> DataFrames); generator state
(`generator_at`: model copy, optimizer, `load_policy_state`; `save_policy_state`); MLflow (the tracking tasks'
bodies, the Phi plot included); task bodies (DataFrame joins); the rest is Prefect's flow/task-run bookkeeping.

`--iterations N` measures N outer iterations per call instead (one `optimize` with outer_iterations=N against N
bare iterations with the generator kept in memory), to show what is paid once per call and what per iteration.

Example::

    python benchmarks/pipeline_overhead.py                      # both configs, 3 repeats each
    python benchmarks/pipeline_overhead.py --iterations 2 --repeats 2
    python benchmarks/pipeline_overhead.py --configs tiny --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPUTE = "compute (dpg.loop)"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "from", "home", "and", "then",
         "came", "back"]


class Ledger:
    """Exclusive wall time per category of wrapped functions (a call's time goes to the innermost wrapper)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.active = False

    def wrap(self, owner, name: str, category: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            now = time.perf_counter()
            if self.stack:
                self.totals[self.stack[-1][0]] += now - self.stack[-1][1]
            self.stack.append([category, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                cat, since = self.stack.pop()
                self.totals[cat] += end - since
                if self.stack:
                    self.stack[-1][1] = end

        setattr(owner, name, timed)

    def measure(self, fn):
        self.totals.clear()
        self.active = True
        start = time.perf_counter()
        try:
            fn()
        finally:
            self.active = False
        return time.perf_counter() - start, dict(self.totals)


def instrument(ledger: Ledger) -> None:
    import dpg.loop
    import tasks.stages as stages
    import tasks.tracking as tracking
    from tasks import io

    for name in ("sample", "group_rewards", "advantages", "summary", "update", "evaluate"):
        if hasattr(dpg.loop, name):
            ledger.wrap(dpg.loop, name, COMPUTE)
    for name in ("write_stage", "read_table", "read_file", "read_manifest", "verify_stage", "read_bytes",
                 "write_bytes", "table_bytes"):
        ledger.wrap(io, name, "storage (Parquet/JSON, digests, reads)")
    ledger.wrap(stages, "read_records", "storage (Parquet/JSON, digests, reads)")
    for name in ("generator_at", "save_policy_state", "load_policy_state"):
        ledger.wrap(stages, name, "generator state (copy, save/load)")
    for task in (tracking.start_tracking, tracking.log_iteration, tracking.finish_tracking):
        ledger.wrap(task, "fn", "MLflow logging (+ plot)")
    for task in (stages.prepare_run, stages.sample_rollouts, stages.sft_group, stages.compute_advantages,
                 stages.update_generator, *([stages.evaluate_target] if hasattr(stages, "evaluate_target") else [])):
        ledger.wrap(task, "fn", "task bodies (DataFrames, joins)")


def prefect_skeleton(cfg):
    """The flows' shape with empty task bodies: 2 flow runs, the same task runs, `cfg` as parameter."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from dpg import loop

    @task(cache_policy=NO_CACHE)
    def step(cfg, *args) -> str:
        return "url"

    @flow(name="skeleton-iteration", validate_parameters=True)
    def iteration(cfg, it: int, run_id: str) -> str:
        rollouts = step(cfg, it)
        groups = [step(cfg, it, rollouts, g) for g in loop.group_ids(cfg)]
        rewards = step(cfg, it, rollouts, groups)
        generator = step(cfg, it, rollouts, rewards)
        evaluation = step(cfg, it, rollouts)
        step(cfg, it, run_id, rewards, generator, evaluation)
        return generator

    @flow(name="skeleton")
    def optimization(cfg) -> str:
        step(cfg)
        run_id = step(cfg, "flow-run")
        generator = iteration(cfg, 0, run_id)
        step(cfg, run_id)
        return generator

    return lambda: optimization(cfg)


def tiny_assets(folder: Path) -> tuple[str, str]:
    """The tests' tiny generator (1-layer Llama, word-level tokenizer) and a 6-text Parquet corpus."""
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=None, eos_token_id=1, pad_token_id=0,
                                         attn_implementation="eager"))
    model.save_pretrained(folder / "generator")
    tokenizer.save_pretrained(folder / "generator")
    rows = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(12)) for i in range(6)]
    pd.DataFrame({"text": rows}).to_parquet(folder / "texts.parquet")
    return str(folder / "generator"), str(folder / "texts.parquet")


def overrides(name: str, work: Path, iterations: int) -> tuple[list[str], list[str]]:
    """(overrides of the measured config, extra overrides of its cheap warm-up variant)."""
    common = [f"outer_iterations={iterations}", f"storage.url={work / 'runs'}", f"tracking.uri=sqlite:///{work}/mlflow.db"]
    if name == "smollm2":
        return common + ["prompts.per_iteration=4", "generator.lora_rank=8"], \
            ["prompts.per_iteration=2", "rollouts.max_new_tokens=2", "outer_iterations=1"]
    generator, texts = tiny_assets(work)
    return common + [f"generator.source={generator}", f"prompts.source={texts}", "prompts.per_iteration=2",
                     "prompts.max_prompt_tokens=40", "rollouts.n_rollouts=2", "rollouts.max_new_tokens=6",
                     "target.tiny_hidden=32", "target.tiny_layers=1", "sft.microbatch=1", "sft.max_len=12",
                     "sft.lr=0.5", "policy.lr=1e-3"], ["rollouts.max_new_tokens=2", "outer_iterations=1"]


def one(name: str, repeats: int, iterations: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"dpg-bench-{name}-"))
    os.environ.update({"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "MPLCONFIGDIR": str(work / "mpl"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    import torch

    from dpg import loop
    from dpg.policy import policy_optimizer
    from dpg.runconfig import load_config
    from flows.optimize import optimize
    from tasks import io
    from tasks.stages import base_generator, stage_url, target_for

    measured, cheap = overrides(name, work, iterations)
    cfg = load_config(None, measured)

    t0 = time.perf_counter()
    base, tokenizer = base_generator(cfg)
    target_model, target_tokenizer, target = target_for(cfg)
    load_s = time.perf_counter() - t0

    ledger = Ledger()
    instrument(ledger)
    warm = load_config(None, measured + cheap + ["name=warmup"])
    warm_s, _ = ledger.measure(lambda: optimize(warm))

    def bare() -> dict:
        model = copy.deepcopy(base)
        optimizer = policy_optimizer(model, cfg.policy)
        out = {}

        def iterations() -> None:  # the generator and its optimizer simply stay in memory between iterations
            out["rollouts"], out["rewards"] = [], []
            for it in range(cfg.outer_iterations):
                rollouts = loop.sample(cfg, it, model, tokenizer, f"in-memory-{it}")
                taus, runs = {}, []
                for group in loop.group_ids(cfg):
                    tau, run, _ = loop.group_rewards(cfg, rollouts, group, target_model, target_tokenizer, target)
                    taus.update(tau)
                    runs += [run] if run is not None else []
                rewards = loop.advantages(cfg, rollouts, taus)
                loop.summary(rewards, runs)
                loop.update(cfg, model, optimizer, rollouts, rewards)
                if hasattr(loop, "evaluate"):
                    loop.evaluate(cfg, rollouts, target_model, target_tokenizer, target)
                out["rollouts"].append(rollouts)
                out["rewards"].append(rewards)

        out["seconds"], out["split"] = ledger.measure(iterations)
        return out

    skeleton = prefect_skeleton(cfg)
    skeleton()  # its first call registers the flows
    bare_runs, flow_runs, skeleton_runs, same = [], [], [], True
    for r in range(repeats):  # alternate which goes first, so that a drift in the machine's load cancels
        run_cfg = load_config(None, measured + [f"name=bench-r{r}"])
        if r % 2:
            seconds, split = ledger.measure(lambda: optimize(run_cfg))  # noqa: B023
            b = bare()
        else:
            b = bare()
            seconds, split = ledger.measure(lambda: optimize(run_cfg))  # noqa: B023
        bare_runs.append(b)
        flow_runs.append({"seconds": seconds, "split": split})
        skeleton_runs.append(ledger.measure(skeleton)[0])
        for it in range(cfg.outer_iterations):
            stored = io.read_table(stage_url(run_cfg, it, "rollouts"), "rollouts.parquet")
            rewards = io.read_table(stage_url(run_cfg, it, "rewards"), "rewards.parquet").set_index("example_id")
            same &= [list(t) for t in stored["token_ids"]] == [r_.token_ids for r_ in b["rollouts"][it]]
            same &= all(abs(rewards.loc[w.example_id, "tau"] - w.tau) <= 1e-12 * max(1.0, abs(w.tau))
                        for w in b["rewards"][it] if w.tau == w.tau)
        print(f"[{name}] repeat {r}: bare {b['seconds']:.2f} s, flow {seconds:.2f} s", file=sys.stderr, flush=True)

    shutil.rmtree(work, ignore_errors=True)
    return {"config": name, "repeats": repeats, "load_s": load_s, "warmup_flow_s": warm_s,
            "bare_s": [b["seconds"] for b in bare_runs], "flow_s": [f["seconds"] for f in flow_runs],
            "flow_split": [f["split"] for f in flow_runs], "bare_split": [b["split"] for b in bare_runs],
            "skeleton_s": skeleton_runs,
            "same_results": bool(same), "iterations": iterations,
            "rollouts": sum(len(rs) for rs in bare_runs[0]["rollouts"]),
            "tokens": sum(len(r.token_ids) for rs in bare_runs[0]["rollouts"] for r in rs),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "config_overrides": measured}


def table(results: list[dict]) -> str:
    lines = ["| config | rollouts (tokens) | bare, s (median; min) | flow, s (median; min) "
             "| flow - bare, s (median) | ratio flow/bare (median; min/min) | flow's non-compute time, s (median) "
             "| 1 + non-compute / bare (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        bm, fm = statistics.median(r["bare_s"]), statistics.median(r["flow_s"])
        extra = statistics.median(f - s.get(COMPUTE, 0.0) for f, s in zip(r["flow_s"], r["flow_split"]))
        lines.append(f"| {r['config']} x{r.get('iterations', 1)} | {r['rollouts']} ({r['tokens']}) | "
                     f"{bm:.2f}; {min(r['bare_s']):.2f} | "
                     f"{fm:.2f}; {min(r['flow_s']):.2f} | {fm - bm:+.2f} | {fm / bm:.3f}; "
                     f"{min(r['flow_s']) / min(r['bare_s']):.3f} | {extra:.2f} | {1 + extra / bm:.3f} |")
    lines += ["", "Where the flow's time goes (median over repeats, seconds; exclusive time of wrapped calls):", ""]
    cats = sorted({c for r in results for s in r["flow_split"] for c in s})
    lines.append("| category | " + " | ".join(r["config"] for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for c in [*cats, "Prefect flow/task-run bookkeeping (rest)"]:
        cells = []
        for r in results:
            if c.startswith("Prefect"):
                vals = [f - sum(s.values()) for f, s in zip(r["flow_s"], r["flow_split"])]
            else:
                vals = [s.get(c, 0.0) for s in r["flow_split"]]
            cells.append(f"{statistics.median(vals):.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| config | Prefect skeleton (same flow/task runs, empty bodies), s (median) | model loading "
              "(excluded), s | first flow call in the process (warm-up variant), s | flow results == bare results |",
              "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {statistics.median(r['skeleton_s']):.2f} | {r['load_s']:.1f} | "
                     f"{r['warmup_flow_s']:.1f} | {'yes' if r['same_results'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--iterations", type=int, default=1, help="outer iterations per measured call (default 1)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.repeats, args.iterations)))
        return 0
    results = []
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                              "--iterations", str(args.iterations)], env=env,
                             stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = results[0]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {r['torch']} "
          f"({r['threads']} threads), python {platform.python_version()}, {args.repeats} repeats, "
          f"{args.iterations} outer iteration(s) per measured call\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
