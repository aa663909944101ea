"""Cost of exact metagradients vs plain SFT: wall time and peak memory for T inner steps.

A plain script in the style of nanoGPT's bench.py (argparse, no pytest). For every T it measures, on the
same model, data and `SFTConfig`,

    plain     = dpg.train(model, ids, mask, config)                     (T AdamW steps)
    metagrad  = dpg.metagradients(model, ids, mask, target, config)     (forward + reverse, tau for all n)

and prints a markdown table (time ratio = metagrad s / plain s, memory ratio = metagrad peak / plain peak).

Every measurement runs in a fresh subprocess (this script re-invoked with `--one`), so that one run's
allocations cannot hide in another's peak. In that subprocess:

1. build the model and the random-token data, then record the baseline memory;
2. warm up once: the same function on the first min(T, 2) steps of the data (pays one-time costs: lazy
   initialisation, first torch.func traces, allocator growth; 2 steps so that the metagradient warm-up
   also runs a reverse step with an HVP);
3. time `--repeats` calls with time.perf_counter (the fastest is reported);
4. peak memory:
   - CPU: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end (absolute), and that minus the resident
     set size at the baseline (the "Δ" columns: what the call itself added on top of the loaded model and
     data; it covers the warm-up too, which does a prefix of the same work). If loading the model peaked
     higher than the call (ru_maxrss did not grow), the Δ is only an upper bound and is marked "<=".
   - CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` (reset after the warm-up),
     absolute, and minus `memory_allocated()` at the baseline.

Also, from the `progress` callback, the metagradient run is split into its forward phase (T checkpointed
SFT steps) and its reverse phase (metric gradient + T reverse steps, incl. recomputation in `recompute`).

Examples::

    python benchmarks/metagrad_cost.py --model small --steps 1 2 4 8
    python benchmarks/metagrad_cost.py --model small --steps 8 --checkpoint recompute
    python benchmarks/metagrad_cost.py --model small --compare-reverse --steps 4
    python benchmarks/metagrad_cost.py --model smollm2 --seq 32 --microbatch 2 --steps 1 2 4
    python benchmarks/metagrad_cost.py --model gpt2-small --seq 128 --microbatch 8   # on a GPU box

Needs only torch + transformers (and dpg/); picks `cuda` when available (`--device` overrides).
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

MODELS = ("tiny", "small", "smollm2", "gpt2-small")
REVERSES = ("forward_over_reverse", "reverse_over_forward", "double_backward")
TAG = "RESULT "


# --- one measurement (child process) ----------------------------------------------------------------------


def build_model(name: str, device: str):
    if name == "tiny":  # benchmarks/gpu.sh --dry
        from dpg.exact import tiny_model

        model = tiny_model("llama", vocab=256, hidden=32, layers=2, dtype=torch.float32)
    elif name == "small":
        from dpg.exact import tiny_model

        model = tiny_model("llama", vocab=4096, hidden=256, layers=4, dtype=torch.float32)
    elif name == "smollm2":
        from dpg.models import load_causal_lm

        model = load_causal_lm("smollm2")[0]
    elif name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    else:
        raise SystemExit(f"--model {name!r}: use one of {MODELS}")
    return model.to(device).eval()


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; falls back to ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss()


def max_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def torch_loop(model, ids, mask, config, weights):
    """What users would otherwise run: `loss.backward()` + `torch.optim.AdamW`, dpg's loss convention (token CE
    summed over real tokens / max_len, mean per microbatch, summed over accumulation)."""
    import copy

    import torch.nn.functional as F

    work = copy.deepcopy(model)
    opt = torch.optim.AdamW(work.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    mb, steps = config.microbatch, ids.shape[0] // config.step_size
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        for a in range(t * config.step_size, (t + 1) * config.step_size, mb):
            x, m = ids[a:a + mb], mask[a:a + mb]
            logits = work(input_ids=x, attention_mask=m).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            (weights[a:a + mb] * (nll * m[:, 1:]).sum(1) / config.max_len).mean().backward()
        opt.step()
    return work


def bergson_magic(model, ids, mask, config):
    """EleutherAI bergson's MAGIC on the same model, data and AdamW: forward with every step checkpointed
    (save_mode "all", as dpg's `disk`), then its backward; the target gradient is 2 theta_T (an l2 target, in
    closed form). Runs in bergson's own venv (--bergson-python). Returns the per-example scores."""
    import copy
    import tempfile
    from functools import partial

    import datasets
    import torchopt
    from bergson.magic import BackwardState, DataStream, Trainer
    from bergson.utils.math import weighted_causal_lm_ce
    from torchopt.pytree import tree_iter

    work = copy.deepcopy(model)
    work.loss_function = partial(weighted_causal_lm_ce, reduction="mean")
    trainer, state = Trainer.initialize(work, torchopt.adamw(config.lr, betas=config.betas, eps=config.eps,
                                                             eps_root=config.eps_root,
                                                             weight_decay=config.weight_decay))
    stream = DataStream(datasets.Dataset.from_dict({"input_ids": ids.tolist()}), config.step_size,
                        device=ids.device)
    with tempfile.TemporaryDirectory(prefix="bergson-ckpt-") as tmp:
        final = trainer.train(state, stream, save_dir=tmp, save_mode="all",
                              grad_accum_steps=config.grad_accum)
        stream.requires_grad = True
        zeros = [torch.zeros_like(b) for b in tree_iter(final.opt_state)
                 if isinstance(b, torch.Tensor) and b.is_floating_point()]
        start = BackwardState({k: 2 * v.detach() for k, v in final.params.items()}, zeros,
                              torch.zeros_like(stream.weights))
        return trainer.backward(tmp, stream, start, final, save_mode="all",
                                grad_accum_steps=config.grad_accum).weight_grads


def run_one(args) -> dict:
    import dpg

    device = args.device
    load_start_avg = os.getloadavg()[0]
    load_start = time.perf_counter()
    model = build_model(args.model, device)
    load_s = time.perf_counter() - load_start
    config = dpg.SFTConfig(optimizer="adamw", lr=1e-5, microbatch=args.microbatch, grad_accum=args.grad_accum,
                           max_len=args.seq, dtype=args.dtype, checkpoint=args.checkpoint, reverse=args.reverse,
                           weight_decay=1e-4, sweep_microbatch=args.sweep_microbatch)
    n = args.T * config.step_size
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (n, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    # Weights passed explicitly on the model's device: with weights=None, dpg.sft.prepare makes them with
    # torch.ones(n) on the CPU (see benchmarks/RESULTS-metagrad.md, "CUDA").
    weights = torch.ones(n, device=device)
    target = dpg.get_target("l2_norm", model)

    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if done == total:
            sync(device)
            marks[stage] = time.perf_counter()

    def call(k: int):
        rows = k * config.step_size
        if args.one == "plain":
            return dpg.train(model, ids[:rows], mask[:rows], config, weights=weights[:rows])
        if args.one == "torch":
            return torch_loop(model, ids[:rows], mask[:rows], config, weights[:rows])
        if args.one == "bergson":
            return bergson_magic(model, ids[:rows], mask[:rows], config)
        return dpg.metagradients(model, ids[:rows], mask[:rows], target, config, weights=weights[:rows],
                                 progress=progress)

    sync(device)
    base_rss, base_maxrss = rss_now(), max_rss()
    base_cuda = torch.cuda.memory_allocated() if device == "cuda" else 0

    warm_start = time.perf_counter()
    out = call(min(args.T, 2))
    sync(device)
    warm_s = time.perf_counter() - warm_start
    del out
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, phases = [], []
    for _ in range(args.repeats):
        marks.clear()
        sync(device)
        start = time.perf_counter()
        out = call(args.T)
        sync(device)
        end = time.perf_counter()
        times.append(end - start)
        if args.one == "metagrad":
            phases.append({"forward_s": marks["forward"] - start, "reverse_s": marks["reverse"] - marks["forward"],
                           "finish_s": end - marks["reverse"]})
            if not torch.isfinite(out.scores).all():
                raise SystemExit("non-finite metagradient scores")
        del out
    best = min(range(len(times)), key=times.__getitem__)
    peak_rss = max_rss()
    result = {
        "mode": args.one, "model": args.model, "device": device, "dtype": args.dtype, "T": args.T, "n": n,
        "seq": args.seq, "microbatch": args.microbatch, "grad_accum": args.grad_accum,
        "checkpoint": args.checkpoint, "reverse": args.reverse, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "loadavg_start": load_start_avg,
        "loadavg_end": os.getloadavg()[0], "load_s": load_s, "warmup_s": warm_s,
        "seconds": times[best], "all_seconds": times,
        "params": sum(p.numel() for p in model.parameters()),
        "base_rss": base_rss, "peak_rss": peak_rss, "rss_delta": peak_rss - base_rss,
        "rss_delta_upper_bound": peak_rss <= base_maxrss,
    }
    if phases:
        result.update(phases[best])
    if device == "cuda":
        result.update(peak_abs=torch.cuda.max_memory_allocated(), base_abs=base_cuda,
                      peak_delta=torch.cuda.max_memory_allocated() - base_cuda, delta_upper_bound=False)
    else:
        result.update(peak_abs=peak_rss, base_abs=base_rss, peak_delta=peak_rss - base_rss,
                      delta_upper_bound=peak_rss <= base_maxrss)
    return result


# --- driver (parent process) ------------------------------------------------------------------------------


def spawn(args, mode: str, T: int, reverse: str, python: str | None = None) -> dict:
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--one", mode, "--T", str(T), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--seq", str(args.seq), "--microbatch",
           str(args.microbatch), "--grad-accum", str(args.grad_accum), "--checkpoint", args.checkpoint,
           "--reverse", reverse, "--repeats", str(args.repeats), "--seed", str(args.seed)]
    cmd += ["--sweep-microbatch", str(args.sweep_microbatch)] if args.sweep_microbatch else []
    env = dict(os.environ)
    if args.omp_wait != "default" and args.device == "cpu":
        env.setdefault("OMP_WAIT_POLICY", args.omp_wait.upper())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def gb(x: float) -> str:
    return f"{x / 2**30:.2f} GB" if x >= 2**30 / 10 else f"{x / 2**20:.0f} MB"


def ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}"


def cell(r: dict, key: str, fmt) -> str:
    if "error" in r:
        return "error"
    mark = "<=" if key == "peak_delta" and r.get("delta_upper_bound") else ""
    return mark + fmt(r[key])


def secs(x: float) -> str:
    return f"{x:.2f}"


def table(rows: list[tuple[str, dict, dict]], first: str) -> str:
    """Markdown table; each row is (label, plain result, metagrad result)."""
    head = (f"| device | dtype | model | {first} | plain s | metagrad s | time ratio | plain peak Δ | metagrad peak Δ "
            "| memory ratio (Δ) | plain peak abs | metagrad peak abs | memory ratio (abs) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for label, p, m in rows:
        ref = m if "error" not in m else p
        lines.append(" | ".join([
            f"| {ref.get('device', '?')}", ref.get("dtype", "?"), ref.get("model", "?"), label,
            cell(p, "seconds", secs), cell(m, "seconds", secs), ratio(m, p, "seconds"),
            cell(p, "peak_delta", gb), cell(m, "peak_delta", gb), ratio(m, p, "peak_delta"),
            cell(p, "peak_abs", gb), cell(m, "peak_abs", gb), ratio(m, p, "peak_abs")]) + " |")
    return "\n".join(lines)


def phase_table(rows: list[tuple[str, dict, dict]], first: str) -> str:
    """Where the metagradient time goes: forward phase vs reverse phase, per step relative to plain."""
    head = (f"| {first} | plain s/step | metagrad forward s (÷ plain) | metagrad reverse s | reverse s/step "
            "| reverse step ÷ plain step |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for label, p, m in rows:
        if "error" in p or "error" in m or "forward_s" not in m:
            lines.append(f"| {label} | - | - | - | - | - |")
            continue
        T = m["T"]
        plain_step, rev_step = p["seconds"] / T, m["reverse_s"] / T
        lines.append(f"| {label} | {plain_step:.3f} | {m['forward_s']:.2f} ({m['forward_s'] / p['seconds']:.2f}) | "
                     f"{m['reverse_s']:.2f} | {rev_step:.3f} | {rev_step / plain_step:.2f} |")
    return "\n".join(lines)


def tokens_per_s(r: dict) -> str:
    """Training tokens (examples x seq) per second of wall time."""
    return "-" if "error" in r else f"{r['n'] * r['seq'] / r['seconds']:,.0f}"


def peer_table(rows: list[tuple[int, dict, dict, dict | None]]) -> str:
    """Per T: a plain torch loop, dpg.metagradients and bergson's MAGIC, as times and peaks over the plain loop."""
    head = ("| T | plain torch loop s | dpg metagrad s (÷ plain) | bergson MAGIC s (÷ plain) | bergson ÷ dpg "
            "| plain tokens/s | dpg tokens/s | plain peak | dpg peak (÷ plain) | bergson peak (÷ plain) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for T, p, m, b in rows:
        peer = (lambda key, fmt: f"{cell(b, key, fmt)} ({ratio(b, p, key)})") if b else (lambda key, fmt: "not run")
        lines.append(" | ".join([
            f"| {T}", cell(p, "seconds", secs), f"{cell(m, 'seconds', secs)} ({ratio(m, p, 'seconds')})",
            peer("seconds", secs), ratio(b, m, "seconds") if b else "-", tokens_per_s(p), tokens_per_s(m),
            cell(p, "peak_abs", gb), f"{cell(m, 'peak_abs', gb)} ({ratio(m, p, 'peak_abs')})",
            peer("peak_abs", gb)]) + " |")
    return "\n".join(lines)


def run_peers(args) -> None:
    """--peers: the plain torch loop, dpg and (with --bergson-python) bergson, each in a fresh process, per T."""
    rows, results, start = [], [], time.perf_counter()
    for T in args.steps:
        plain, meta = spawn(args, "torch", T, args.reverse), spawn(args, "metagrad", T, args.reverse)
        peer = spawn(args, "bergson", T, args.reverse, args.bergson_python) if args.bergson_python else None
        for r in (plain, meta, peer):
            if r and "error" in r:
                print(f"# T={T} {r.get('mode', '')}: {r['error']}", file=sys.stderr, flush=True)
        results += [r for r in (plain, meta, peer) if r]
        rows.append((T, plain, meta, peer))
        took = {name: r.get("seconds", float("nan")) for name, r in (("plain loop", plain), ("dpg", meta),
                                                                      ("bergson", peer)) if r}
        print(f"# T={T}: " + ", ".join(f"{name} {x:.2f} s" for name, x in took.items())
              + f" [{time.perf_counter() - start:.0f} s elapsed]", file=sys.stderr, flush=True)
    omp = os.environ.get("OMP_WAIT_POLICY") or (args.omp_wait.upper() if args.omp_wait != "default" else "default")
    print(f"\nseq {args.seq}, microbatch {args.microbatch}, grad_accum {args.grad_accum}, AdamW lr 1e-5 wd 1e-4, "
          f"target l2_norm, dpg checkpoint {args.checkpoint}, reverse {args.reverse}, repeats {args.repeats} "
          f"(fastest reported)" + (f", OMP_WAIT_POLICY {omp}" if args.device == "cpu" else "")
          + (f", dpg sweep_microbatch {args.sweep_microbatch}" if args.sweep_microbatch else "") + "\n")
    print(peer_table(rows))
    print(f"\n# total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=MODELS)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="inner steps T to measure")
    ap.add_argument("--seq", type=int, default=64, help="tokens per example (= SFTConfig.max_len)")
    ap.add_argument("--microbatch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--checkpoint", default="disk", choices=("disk", "host", "recompute"))
    ap.add_argument("--reverse", default="forward_over_reverse", choices=REVERSES)
    ap.add_argument("--sweep-microbatch", type=int, help="SFTConfig.sweep_microbatch of the metagradient runs "
                    "(rows per call of the reverse sweep; default: the microbatch)")
    ap.add_argument("--compare-reverse", action="store_true",
                    help="one plain run and one metagradient run per reverse mode, at each T in --steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (fastest reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement subprocess")
    ap.add_argument("--omp-wait", default="passive", choices=("passive", "active", "default"),
                    help="OMP_WAIT_POLICY for the CPU subprocesses (unless already set). With the default spin-wait, "
                         "another busy process on a small CPU makes every parallel region wait for a descheduled "
                         "thread: fwd+bwd measured 5-70x slower. PASSIVE keeps torch's thread count and is robust.")
    ap.add_argument("--json", help="also write all raw results to this file")
    ap.add_argument("--peers", action="store_true",
                    help="side by side per T: a plain torch loop (loss.backward + torch.optim.AdamW), dpg, and bergson")
    ap.add_argument("--bergson-python", default=os.environ.get("BERGSON_PYTHON"),
                    help="python of a venv with bergson (it pins its own transformers; see RESULTS-metagrad.md)")
    ap.add_argument("--one", choices=("plain", "torch", "metagrad", "bergson"), help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.one:
        print(TAG + json.dumps(run_one(args)), flush=True)
        return

    import transformers

    print(f"# {platform.node()}: {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""), flush=True)
    print("# " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    if args.peers:
        return run_peers(args)
    results, rows, extra = [], [], []
    start = time.perf_counter()
    for T in args.steps:
        plain = spawn(args, "plain", T, args.reverse)
        results.append(plain)
        reverses = REVERSES if args.compare_reverse else (args.reverse,)
        for rev in reverses:
            meta = spawn(args, "metagrad", T, rev)
            results.append(meta)
            label = f"{T} ({rev}, {args.checkpoint})" if args.compare_reverse else str(T)
            rows.append((label, plain, meta))
            for r in (plain, meta):
                if "error" in r:
                    print(f"# T={T} {rev}: {r['error']}", file=sys.stderr, flush=True)
            print(f"# T={T} {rev}: plain {plain.get('seconds', float('nan')):.2f} s, "
                  f"metagrad {meta.get('seconds', float('nan')):.2f} s "
                  f"[{time.perf_counter() - start:.0f} s elapsed]", file=sys.stderr, flush=True)
        if any(r.get("delta_upper_bound") for r in (plain, *results[-len(reverses):])):
            extra.append(T)
    first = "T (reverse, checkpoint)" if args.compare_reverse else "T"
    loads = [r[k] for r in results if "error" not in r for k in ("loadavg_start", "loadavg_end")]
    omp = os.environ.get("OMP_WAIT_POLICY") or (args.omp_wait.upper() if args.omp_wait != "default" else "default")
    cfg = (f"seq {args.seq}, microbatch {args.microbatch}, grad_accum {args.grad_accum}, AdamW lr 1e-5, "
           f"target l2_norm, checkpoint {args.checkpoint}"
           + ("" if args.compare_reverse else f", reverse {args.reverse}")
           + f", repeats {args.repeats} (fastest reported)"
           + (f", OMP_WAIT_POLICY {omp}" if args.device == "cpu" else "")
           + (f", 1-min load average {min(loads):.1f}..{max(loads):.1f}" if loads else ""))
    print(f"\n{cfg}\n")
    print(table(rows, first))
    print()
    print(phase_table(rows, first))
    if extra:
        print(f"\n'<=': loading the model peaked higher than the run at T={extra}; that Δ is an upper bound.")
    print(f"\n# total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
