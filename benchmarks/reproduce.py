"""The demo x reward method x seed grid: one dpg run per cell, then a CSV, a Markdown summary and plots.

Each cell (demo, method, seed) is `python -m flows.cli run <demo config> --set ...` with the run's seed `seed`
(every stage seed derives from it), `outer_iterations=--iterations`, `storage.url=<out>/runs`, the method's
overrides from `DEMOS`, then every `--set`. Cells run one after another, or `--jobs N` at a time (each is a
process: `--jobs 2` with `OMP_NUM_THREADS=1` on a 2-core machine). dpg runs resume (every finished stage is
skipped), so a killed grid continues where it stopped when the same command runs again, and a cell whose run is
complete costs only a look at its last report stage. Each cell's output goes to `<out>/logs/<cell>.log`.

Outputs, rebuilt from the store after the grid (or alone with `--report-only`):

- `<out>/results.csv`: one row per demo, method, seed and outer iteration; the columns are the eval stage's
  metrics (`eval_*`, `text_*`), the rewards stage's reward statistics and the generator update's `policy_*` stats.
- `<out>/results.md`: per demo and human metric, one row per method: the metric at the first and at the final
  iteration, mean ± sample std over seeds, the per-seed final values, and DPG − method at the final iteration with a
  verdict: "DPG ahead by > 2x spread" when DPG's advantage (in the metric's better direction) exceeds twice the
  spread, the larger of the two methods' sample std over seeds; "method ahead by > 2x spread" the other way round;
  otherwise "not separated". Less noisy columns follow: the mean over the last quarter of the iterations,
  DPG − method over that quarter paired by seed (mean ± std of the per-seed differences), and its verdict (the
  mean against twice the std of those differences). The final iteration is the last one that every cell of the
  demo reached.
- `<out>/<demo>.png`: each human metric against the outer iteration, per method the mean over seeds and a ±std band
  (of each seed's moving average over 1/12 of the iterations, centred: one eval SFT per iteration is noisy),
  a dotted chance line where one exists; for pattern demos `<out>/<demo>-patch.png`: sign(Δ) of the LM-head patch
  after the final iteration's eval SFT, of the best dpg seed, next to the goal image.

Example::

    .venv/bin/python benchmarks/reproduce.py --demo 67 --seeds 0 1 2 --iterations 40 --out benchmarks/reproduce
    .venv/bin/python benchmarks/reproduce.py --demo uuid --methods dpg levenshtein --seeds 0 --iterations 5
    .venv/bin/python benchmarks/reproduce.py --demo 67 --seeds 0 1 2 --iterations 40 --report-only
"""

from __future__ import annotations

import argparse
import io as stdio
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FRENCH_GOAL = "Le chat dort sur le canapé pendant que la pluie tombe doucement sur la vieille ville."
UUID_GOAL = "6f1c2a9e-4b7d-4e21-9c3a-8d5f0b7e1a42"  # the UUID of experiments/uuid.yaml

# demo -> its config file, the human metrics (True: higher is better), chance levels, whether the eval stage
# stores an LM-head patch, and the reward methods with their config overrides (the whole grid at a glance).
# dpg as the demo's config has it, with sequence and with token (reward-to-go) credit, and the baselines every demo
# runs: naive and the no-information control (these give rewards per rollout, hence sequence credit).
CONTROLS = {"dpg": {"rewards.name": "dpg"}, "dpg-sequence": {"rewards.name": "dpg", "rewards.credit": "sequence"},
            "dpg-token": {"rewards.name": "dpg", "rewards.credit": "token"},
            "naive": {"rewards.name": "naive", "rewards.credit": "sequence"},
            "random": {"rewards.name": "random", "rewards.credit": "sequence"}}
DEMOS = {
    "67": {"config": "experiments/pattern-67.yaml", "metrics": {"eval_pixel_accuracy": True},
           "chance": {"eval_pixel_accuracy": 0.5}, "patch": True,
           "methods": CONTROLS},
    "qr": {"config": "experiments/pattern-qr.yaml", "metrics": {"eval_pixel_accuracy": True},
           "chance": {"eval_pixel_accuracy": 0.5}, "patch": True,
           "methods": CONTROLS},
    "l2": {"config": "experiments/l2-norm.yaml", "metrics": {"eval_l2_norm": False}, "chance": {}, "patch": False,
           "methods": CONTROLS},
    "language": {"config": "experiments/language.yaml", "metrics": {"text_share_fr": True, "eval_val_loss": False},
                 "chance": {}, "patch": False,
                 "methods": CONTROLS | {"langid": {"rewards.name": "langid", "rewards.goal": "fr",
                                                   "rewards.credit": "sequence"},
                                        "embedding": {"rewards.name": "embedding", "rewards.goal": FRENCH_GOAL,
                                                      "rewards.credit": "sequence"}}},
    "uuid": {"config": "experiments/uuid.yaml", "metrics": {"text_share_contains": True, "text_edit_distance": False,
                                                          "eval_val_loss": False},
             "chance": {}, "patch": False,
             "methods": CONTROLS | {"levenshtein": {"rewards.name": "levenshtein", "rewards.goal": UUID_GOAL,
                                                            "rewards.credit": "sequence"}}},
}


def fresh(key: str) -> str:
    """The fresh eval's name of a metric (target.eval_fresh; dpg.loop.evaluate_fresh)."""
    return key.replace("eval_", "eval_fresh_", 1).replace("text_", "text_fresh_", 1)


for spec in DEMOS.values():  # the fresh eval's metrics, shown where a grid has them
    spec["metrics"] |= {fresh(k): v for k, v in spec["metrics"].items()}
    spec["chance"] |= {fresh(k): v for k, v in spec["chance"].items()}
KEYS = ["demo", "method", "seed", "iteration"]
PREFECT_LOG = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| ")  # "08:34:51.422 | INFO    | prefect - ..."


# --- cells ------------------------------------------------------------------------------------------------


def cell_name(demo: str, method: str, seed: int) -> str:
    return f"{demo}-{method}-s{seed}"


def cell_overrides(demo: str, method: str, seed: int, iterations: int, out: Path, extra: list[str] = ()) -> list[str]:
    """The --set overrides of one cell: seeds, iterations, store, the method's overrides (JSON values), then `extra`."""
    method_sets = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in DEMOS[demo]["methods"][method].items()]
    return [f"seed={seed}", f"outer_iterations={iterations}",
            f"storage.url={out / 'runs'}", *method_sets, *extra]


def cell_command(config_file: str, overrides: list[str]) -> list[str]:
    """[python, -m, flows.cli, run, FILE, --set, KEY=VALUE, ...]."""
    return [sys.executable, "-m", "flows.cli", "run", config_file, *[a for o in overrides for a in ("--set", o)]]


def cell_config(config_file: str, overrides: list[str]):
    """The cell's DPGConfig, built as `dpg run` builds it (so its run folder is known without guessing the hash)."""
    from dpg.runconfig import load_config

    return load_config(config_file, overrides)


def stage(run: str, it: int, name: str) -> str:
    """A stage folder of a run folder (the layout of tasks.stages.stage_url)."""
    from tasks import io

    return io.join(run, f"iter-{it:04d}", name)


def same_config_run(cfg) -> str | None:
    """A run folder under cfg's local store whose stored config, read by this version of dpg, has cfg's identity:
    a run made before dpg gained a config field (new fields take their defaults, but the hash changed)."""
    from dpg.runconfig import DPGConfig

    root = Path(cfg.storage.url)
    for path in sorted(root.glob(f"{cfg.name}-*/config.json")) if root.is_dir() else []:
        try:
            if DPGConfig.from_dict(json.loads(path.read_text())).identity() == cfg.identity():
                return str(path.parent)
        except Exception:  # noqa: BLE001 (a config of another dpg version that no longer loads is simply no match)
            continue
    return None


def cell_run(cell: tuple, ledger: dict) -> tuple[str, dict, int]:
    """(run folder, storage options, outer iterations) of a cell: `tasks.stages.run_url` of its config, else the
    folder recorded when it ran or a folder with the same config (dpg's defaults, hence the hash, changed since)."""
    from tasks import io
    from tasks.stages import run_url

    cfg = cell_config(*cell[3:])
    url, options = run_url(cfg), cfg.storage.storage_options
    exists = lambda run: io.filesystem(io.join(run, "config.json"), options)[0].exists(io.join(run, "config.json"))
    if not exists(url):
        recorded = ledger.get(cell_name(*cell[:3]), {}).get("run")
        found = recorded if recorded and exists(recorded) else same_config_run(cfg)
        if found:
            print(f"note: {cell_name(*cell[:3])}: using the run {found}; its config now hashes to {url}, "
                  "which does not exist (a rerun would start a new run)", file=sys.stderr)
            url = found
    return url, options, cfg.outer_iterations


def cell_complete(cfg) -> bool:
    from tasks import io
    from tasks.stages import stage_url

    return io.read_manifest(stage_url(cfg, cfg.outer_iterations - 1, "report"), cfg.storage.storage_options) is not None


def run_cell(command: list[str], log: Path, prefect_home: Path) -> tuple[int, str, str | None]:
    """Run one cell, stdout and stderr appended to `log`: (exit code, the last non-empty stderr line that is not a
    Prefect log line, the run id that `dpg run` announced on its first stderr line, None if it never did)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key, value in {"OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(prefect_home)}.items():
        env.setdefault(key, value)
    last, run_id = "", None
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            f.write(line)
            f.flush()
            if line.strip() and not (PREFECT_LOG.match(line) and last):  # Prefect's "Stopping ..." comes after
                last = line.strip()                                       # dpg's error line: skip such lines
            if run_id is None and (found := re.match(r"dpg run (\S+): ", line)):
                run_id = found.group(1)
        return proc.wait(), last, run_id


def run_grid(cells: list[tuple], out: Path, ledger: dict, save, jobs: int = 1) -> int:
    """Run the cells, `jobs` at a time (in order when 1), with one progress line each as a cell ends, `save()`
    after each run; returns how many failed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tasks import io
    from tasks.stages import run_url

    start, ran, done, failed, lock = time.perf_counter(), [], 0, 0, threading.Lock()

    def one(cell: tuple) -> None:
        nonlocal done, failed
        demo, method, seed, config_file, overrides = cell
        name, t0 = cell_name(demo, method, seed), time.perf_counter()
        cfg = cell_config(config_file, overrides)
        if cell_complete(cfg):
            status = "complete (skipped)"
        else:
            rc, last, run_id = run_cell(cell_command(config_file, overrides), out / "logs" / f"{name}.log",
                                        out / "prefect")
            seconds = time.perf_counter() - t0
            run = io.join(cfg.storage.url, run_id) if run_id else run_url(cfg)  # the child's, should the code differ
            status = f"ran {seconds:.0f} s" if rc == 0 else f"FAILED (exit {rc}): {last}"
            with lock:
                ran.append(seconds)
                entry = ledger.setdefault(name, {"seconds": 0.0})
                entry |= {"seconds": entry["seconds"] + seconds, "rc": rc, "run": run}
                failed += rc != 0
                save()
        with lock:
            done += 1
            elapsed = time.perf_counter() - start
            eta = f"{sum(ran) / len(ran) * (len(cells) - done) / jobs:.0f} s" if ran else "?"
            print(f"cell {done}/{len(cells)} {name}: {status}; elapsed {elapsed:.0f} s, ETA {eta}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, cell) for cell in cells]:
            future.result()
    return failed


# --- results from the store ---------------------------------------------------------------------------------


def collect(cells: list[tuple], ledger: dict) -> list[dict]:
    """One row per cell and outer iteration whose eval stage is complete: eval, reward and policy metrics."""
    from tasks import io

    rows = []
    for cell in cells:
        demo, method, seed = cell[:3]
        run, options, iterations = cell_run(cell, ledger)
        for it in range(iterations):
            meta = {s: (io.read_manifest(stage(run, it, s), options) or {}).get("meta", {})
                    for s in ("rewards", "generator", "eval")}
            if "metrics" not in meta["eval"]:
                if it == 0:
                    print(f"note: {cell_name(demo, method, seed)}: no completed iteration in {run}", file=sys.stderr)
                break
            row = dict(zip(KEYS, (demo, method, seed, it))) | meta["rewards"].get("metrics", {})
            row |= {f"policy_{k}": v for k, v in meta["generator"].get("stats", {}).items()} | meta["eval"]["metrics"]
            rows.append(row)
    return rows


def final_iteration(frame) -> int:
    """The last outer iteration that every cell (demo, method, seed) in `frame` reached."""
    return int(frame.groupby(["method", "seed"])["iteration"].max().min())


def verdict(dpg_values, other_values, higher_is_better: bool) -> tuple[float, str]:
    """(mean DPG − mean other, verdict); spread = the larger sample std over seeds of the two methods."""
    import numpy as np

    a, b = np.asarray(dpg_values, dtype=float), np.asarray(other_values, dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, "not separated (fewer than 2 seeds)"
    return diff, separation(diff if higher_is_better else -diff, max(float(a.std(ddof=1)), float(b.std(ddof=1))))


def separation(advantage: float, spread: float) -> str:
    """DPG's advantage (in the metric's better direction) against twice the spread."""
    if advantage > 2 * spread:
        return "DPG ahead by > 2x spread"
    if -advantage > 2 * spread:
        return "method ahead by > 2x spread"
    return "not separated"


def paired_verdict(differences, higher_is_better: bool) -> str:
    """The verdict of DPG − method paired by seed: its mean against twice the std of the per-seed differences."""
    import numpy as np

    d = np.asarray(list(differences), dtype=float)
    if len(d) < 2:
        return "not separated (fewer than 2 seeds)"
    return separation(float(d.mean()) * (1 if higher_is_better else -1), float(d.std(ddof=1)))


def mean_std(values) -> str:
    values = list(values)
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.4g} ± {std:.2g}"


def last_quarter(frame, metric: str, method: str, final: int) -> dict[int, float]:
    """{seed: mean of `metric` over the last quarter of iterations 0..final} for one method (less noisy than one
    iteration)."""
    start = final - max(1, (final + 1) // 4) + 1
    part = frame[(frame["method"] == method) & (frame["iteration"] >= start) & (frame["iteration"] <= final)]
    return part.groupby("seed")[metric].mean().dropna().to_dict()


def method_table(frame, metric: str, higher_is_better: bool, final: int) -> list[dict]:
    """One row per method of one demo: n seeds, first and final iteration mean ± std, per-seed finals, DPG − method,
    and the last quarter's mean with DPG − method paired by seed (same seed: same target, generator and prompts)."""
    at = lambda it, m: frame[(frame["iteration"] == it) & (frame["method"] == m)].sort_values("seed")
    dpg_final = at(final, "dpg")[metric].dropna()
    dpg_quarter = last_quarter(frame, metric, "dpg", final)
    rows = []
    for method in dict.fromkeys(frame["method"]):  # registry order
        first, last = at(0, method)[metric].dropna(), at(final, method)
        row = {"method": method, "n": len(last[metric].dropna()), "first": mean_std(first),
               "final": mean_std(last[metric].dropna()),
               "per seed": ", ".join(f"s{s}: {v:.4g}" for s, v in zip(last["seed"], last[metric]))}
        if method != "dpg" and len(dpg_final) and len(last[metric].dropna()):
            diff, word = verdict(dpg_final, last[metric].dropna(), higher_is_better)
            row |= {"DPG − method": f"{diff:+.3g}", "verdict": word}
        else:
            row |= {"DPG − method": "", "verdict": ""}
        quarter = last_quarter(frame, metric, method, final)
        paired = [dpg_quarter[k] - v for k, v in quarter.items() if k in dpg_quarter]
        row |= {"last quarter": mean_std(quarter.values()),
                "paired DPG − method, last quarter": mean_std(paired) if method != "dpg" and paired else "",
                "paired verdict": paired_verdict(paired, higher_is_better) if method != "dpg" and paired else ""}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows)])


def commands_of(ledger: dict) -> list[str]:
    """The invocations that built a grid (several when its cells ran side by side), oldest first."""
    return ledger.get("commands") or ([ledger["command"]] if "command" in ledger else [])


def write_report(frame, cells: list[tuple], out: Path, ledger: dict) -> None:
    lines = ["# DPG reproduction grid", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{platform.system()} {platform.release()}, Python {platform.python_version()}.",
             *(f"Command: `{c}`" for c in commands_of(ledger) or ["(not recorded)"]), ""]
    for demo, config_file in dict.fromkeys((c[0], c[3]) for c in cells):
        part = frame[frame["demo"] == demo] if len(frame) else frame
        shown = os.path.relpath(config_file, ROOT) if config_file.startswith(f"{ROOT}/") else config_file
        lines += [f"## {demo} ({shown})", ""]
        if not len(part):
            lines += ["No completed iterations yet.", ""]
            continue
        final = final_iteration(part)
        walls = {m: [e["seconds"] for n, e in ledger.get("cells", {}).items() if n.startswith(f"{demo}-{m}-s")]
                 for m in dict.fromkeys(part["method"])}
        for metric, higher in DEMOS[demo]["metrics"].items():
            if metric not in part or part[metric].isna().all():
                if "_fresh_" not in metric:  # the fresh eval is optional
                    lines += [f"`{metric}`: not in the stored metrics.", ""]
                continue
            lines += [f"`{metric}` ({'higher' if higher else 'lower'} is better); first = iteration 0, "
                      f"final = iteration {final}, mean ± sample std over seeds:", ""]
            lines += [markdown(method_table(part, metric, higher, final)), ""]
        walls = "; ".join(f"{m} {mean_std(w)} (n {len(w)})" for m, w in walls.items() if w) or "not recorded"
        lines += [f"Wall time per cell, s (summed over the invocations that ran it): {walls}", ""]
    (out / "results.md").write_text("\n".join(lines))


# --- plots --------------------------------------------------------------------------------------------------


def pyplot():
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_demo(frame, demo: str, out: Path) -> None:
    plt = pyplot()
    metrics = [m for m in DEMOS[demo]["metrics"] if m in frame and frame[m].notna().any()]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    window = max(1, (int(frame["iteration"].max()) + 1) // 12)  # each eval is one SFT run: noisy per iteration
    for ax, metric in zip(axes[0], metrics):
        for method, part in frame.groupby("method", sort=False):
            sparse = part[metric].isna().any()  # the fresh eval, every target.eval_fresh_every iterations: unsmoothed
            part = part.dropna(subset=[metric]).sort_values(["seed", "iteration"])
            smooth = part.groupby("seed")[metric].transform(
                lambda x: x.rolling(1 if sparse else window, min_periods=1, center=True).mean())
            stats = smooth.groupby(part["iteration"]).agg(["mean", "std", "count"])
            line, = ax.plot(stats.index, stats["mean"], marker="o" if len(stats) <= 20 else None, markersize=3,
                            label=f"{method} (n={int(stats['count'].max())})")
            std = stats["std"].fillna(0)
            ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=line.get_color(), alpha=0.2)
        if metric in DEMOS[demo]["chance"]:
            ax.axhline(DEMOS[demo]["chance"][metric], color="gray", linestyle=":", label="chance")
        ax.set_xlabel("outer iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"{metric} ({'higher' if DEMOS[demo]['metrics'][metric] else 'lower'} is better)")
        ax.legend()
    smoothed = f" of a {window}-iteration moving average" if window > 1 else ""
    fig.suptitle(f"demo {demo}: mean ± std over seeds{smoothed}")
    fig.tight_layout()
    fig.savefig(out / f"{demo}.png", dpi=100)
    plt.close(fig)


def plot_patch(frame, demo: str, cells: list[tuple], out: Path, ledger: dict) -> None:
    """sign(Δ) of the best dpg seed's patch at the final iteration, next to the goal image."""
    import numpy as np

    from tasks import io

    final = final_iteration(frame)
    best = frame[(frame["method"] == "dpg") & (frame["iteration"] == final)].sort_values("eval_pixel_accuracy")
    if not len(best):
        return
    seed = int(best["seed"].iloc[-1])
    [cell] = [c for c in cells if c[:3] == (demo, "dpg", seed)]
    run, options, _ = cell_run(cell, ledger)
    delta, goal = (np.load(stdio.BytesIO(io.read_file(stage(run, final, "eval"), f"{n}.npy", options)))
                   for n in ("delta", "goal"))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    for ax, image, title in ((axes[0], np.sign(delta), "sign(Δ) after SFT"), (axes[1], goal, "goal S")):
        ax.imshow(image, cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"demo {demo}, dpg seed {seed}, iteration {final}: pixel accuracy "
                 f"{float((np.sign(delta) == goal).mean()):.3f}")
    fig.tight_layout()
    fig.savefig(out / f"{demo}-patch.png", dpi=100)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------


def build_cells(args: argparse.Namespace) -> list[tuple]:
    """(demo, method, seed, config file, overrides) for every cell, in run order."""
    from dpg.errors import DPGError

    cells = []
    for demo in args.demo:
        known = DEMOS[demo]["methods"]
        methods = args.methods or list(known)
        if unknown := [m for m in methods if m not in known]:
            sys.exit(f"reproduce: error: --methods {' '.join(unknown)} not in demo {demo}; "
                     f"use some of {', '.join(known)}")
        config_file = str(Path(args.config or ROOT / DEMOS[demo]["config"]).resolve())
        if not Path(config_file).is_file():
            sys.exit(f"reproduce: error: config file {config_file} of demo {demo} not found; write it or pass --config")
        for method in methods:
            for seed in args.seeds:
                overrides = cell_overrides(demo, method, seed, args.iterations, args.out, args.set)
                try:
                    cell_config(config_file, overrides)  # a bad file or --set fails here, before any cell runs
                except DPGError as e:
                    sys.exit(f"reproduce: error: cell {cell_name(demo, method, seed)}: {e}")
                cells.append((demo, method, seed, config_file, overrides))
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Demos and methods:\n" + "\n".join(
                                         f"  {d}: {', '.join(v['methods'])} ({v['config']})" for d, v in DEMOS.items()))
    parser.add_argument("--demo", nargs="+", required=True, choices=list(DEMOS), help="demo(s) to run")
    parser.add_argument("--methods", nargs="+", help="reward methods to run (default: every method of the demo)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--iterations", type=int, default=40, help="outer iterations per cell (default 40)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reproduce",
                        help="output folder: runs/, logs/, results.csv, results.md, plots "
                        "(default benchmarks/reproduce)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every cell, after the method's (repeatable)")
    parser.add_argument("--config", help="config file instead of the demo's (for trials; one demo only)")
    parser.add_argument("--report-only", action="store_true", help="rebuild csv/md/plots from the store, run nothing")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="cells run at a time, each a process (default 1; e.g. 2 on a 2-core machine with "
                        "OMP_NUM_THREADS=1)")
    args = parser.parse_args()
    if args.config and len(args.demo) > 1:
        parser.error("--config replaces one demo's file; give a single --demo with it")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is invalid; use an integer >= 1")
    if args.iterations < 1:
        parser.error(f"--iterations={args.iterations} is invalid; use an integer >= 1")
    args.out = args.out.resolve()
    cells = build_cells(args)
    args.out.mkdir(parents=True, exist_ok=True)
    ledger_file = args.out / "cells.json"
    ledger = json.loads(ledger_file.read_text()) if ledger_file.is_file() else {}
    failed = 0
    if not args.report_only:
        command = shlex.join([os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(
            ROOT) else sys.executable, "benchmarks/reproduce.py", *sys.argv[1:]])
        ledger["commands"] = list(dict.fromkeys([*commands_of(ledger), command]))
        def save() -> None:  # merge with what other grid processes wrote meanwhile, then replace atomically
            on_disk = json.loads(ledger_file.read_text()) if ledger_file.is_file() else {}
            merged = on_disk | ledger | {"cells": on_disk.get("cells", {}) | ledger.get("cells", {}),
                                         "commands": list(dict.fromkeys(commands_of(on_disk) + commands_of(ledger)))}
            merged.pop("command", None)
            tmp = ledger_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, ledger_file)
        save()
        failed = run_grid(cells, args.out, ledger.setdefault("cells", {}), save, args.jobs)

    import pandas as pd

    frame = pd.DataFrame(collect(cells, ledger.get("cells", {})))
    frame.to_csv(args.out / "results.csv", index=False)
    write_report(frame, cells, args.out, ledger)
    for demo in args.demo:
        part = frame[frame["demo"] == demo] if len(frame) else frame
        if len(part):
            plot_demo(part, demo, args.out)
            if DEMOS[demo]["patch"]:
                plot_patch(part, demo, cells, args.out, ledger.get("cells", {}))
    print(f"{len(frame)} rows: {args.out / 'results.csv'}, {args.out / 'results.md'}; "
          f"{failed} of {len(cells)} cells failed" if not args.report_only else f"{len(frame)} rows: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
