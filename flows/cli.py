"""`dpg` command line, the shell around dpg/, tasks/ and flows/ (pyproject's `dpg` script).

Bad input prints one line (`dpg: error: ...`) and exits 2; nothing is half-written."""

from __future__ import annotations

import argparse
import os
import sys
import time

# Offline, telemetry-free, quiet defaults for Prefect, MLflow and Hugging Face (explicit settings win). Set on
# import, before dpg's own imports load transformers and tqdm (tqdm reads TQDM_DISABLE when it is imported).
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # GGUF/weights progress bars
             "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's own console handler
             "PREFECT_HOME": os.path.abspath(".dpg/prefect"),
             # a dead tracking server fails in seconds, not after MLflow's 7 retries x 120 s timeouts
             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
             # the temporary API server can take over 20 s to start on a busy 2-core machine
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

from dpg.errors import DPGError  # noqa: E402 (after the environment above)

DEMO_TEXTS = [
    "The river rose quickly after three days of rain, and the old bridge was closed to traffic.",
    "She opened the letter, read the first line twice, and then laughed out loud!",
    "Bees visit thousands of flowers a day; each trip brings back a little nectar.",
    "The museum's new wing holds paintings, maps, and a 200-year-old clock.",
    "\"Are we there yet?\" asked the child, for the fifth time in an hour.",
    "Bread rises because yeast turns sugar into gas & the dough traps it.",
    "In 1969, two astronauts walked on the Moon while a third orbited above.",
    "Wind turbines turn slowly, but each one can power hundreds of homes.",
]


def progress_line(stage: str, done: int, total: int) -> None:
    end = "\n" if done == total else ""
    print(f"\r  {stage:8s} step {done}/{total}", end=end, file=sys.stderr, flush=True)


def cmd_verify(args: argparse.Namespace) -> int:
    """Tiny float64 models: every score against a central finite difference of dpg.train."""
    from dpg.config import SFTConfig
    from dpg.exact import finite_difference, float64_llama, random_data, tiny_model
    from dpg.metagrad import metagradients
    from dpg.targets import get_target

    archs = ["llama", "gpt2"] if args.arch == "all" else [args.arch]
    optimizers = ["sgd", "adamw"] if args.optimizer == "all" else [args.optimizer]
    print(f"{'arch':6s} {'optimizer':9s} {'target':12s} {'T':>2s} {'n':>3s} {'max |tau|':>10s} "
          f"{'max rel err':>11s}  ok")
    worst = 0.0
    with float64_llama():
        for arch in archs:
            model = tiny_model(arch, hidden=24)
            ids, mask = random_data(12, 10, vocab=64, seed=args.seed)
            for optimizer in optimizers:
                lr = {"lr": 0.3} if optimizer == "sgd" else {"lr": 1e-2, "eps_root": 1e-6}
                cfg = SFTConfig(optimizer=optimizer, microbatch=2, grad_accum=2, max_len=10, dtype="float64",
                                **lr)
                for spec in args.target:
                    target = get_target(spec, model)
                    scores = metagradients(model, ids, mask, target, cfg).scores
                    fd = finite_difference(model, ids, mask, target, cfg)
                    err = float((scores - fd).abs().max() / fd.abs().max())
                    worst = max(worst, err)
                    print(f"{arch:6s} {optimizer:9s} {spec[:12]:12s} {cfg.inner_steps(12):2d} {12:3d} "
                          f"{float(scores.abs().max()):10.3e} {err:11.2e}  {'yes' if err <= args.tolerance else 'NO'}")
    print(f"worst relative error {worst:.2e} (tolerance {args.tolerance:.0e}; "
          "normwise: max|tau - fd| / max|fd|, fd = 4-point central difference, h = 1e-4)")
    return 0 if worst <= args.tolerance else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Per-example metagradients of a real target, SmolLM2-135M, in float32 on this machine."""
    import torch

    from dpg.config import SFTConfig
    from dpg.metagrad import metagradients
    from dpg.models import load_causal_lm
    from dpg.targets import get_target

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_causal_lm(args.model)
    cfg = SFTConfig(optimizer="sgd", lr=args.lr, microbatch=2, grad_accum=2, max_len=args.max_len)
    enc = tokenizer(DEMO_TEXTS, truncation=True, max_length=cfg.max_len, padding="max_length", return_tensors="pt")
    target = get_target(args.target, model, tokenizer)
    print(f"target {args.target}; {len(DEMO_TEXTS)} examples, T={cfg.inner_steps(len(DEMO_TEXTS))} SGD steps "
          f"(lr {cfg.lr:g}), max_len {cfg.max_len}", file=sys.stderr)
    result = metagradients(model, enc["input_ids"], enc["attention_mask"], target, cfg, progress=progress_line)
    change, predicted = result.value_after - result.value_before, float(result.scores.sum())
    print(f"\n{'i':>2s} {'tau_i = dPhi/dw_i':>18s}  text")
    for i in torch.argsort(result.scores, descending=True).tolist():
        print(f"{i:2d} {float(result.scores[i]):18.3e}  {DEMO_TEXTS[i][:70]}")
    print(f"\nPhi before {result.value_before:.6e}, after {result.value_after:.6e}: change {change:.3e}; "
          f"sum of tau (first-order prediction of the change) {predicted:.3e}")
    for key in result.report_after:
        if key != "phi":
            print(f"{key}: {result.report_before[key]:.4f} -> {result.report_after[key]:.4f}")
    agree = torch.isfinite(result.scores).all() and (change > 0) == (predicted > 0)
    print(f"scores finite and sign of the change agrees with sum of tau: {'yes' if agree else 'NO'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if agree else 1


def prefect_home() -> None:
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


LOG = {"path": None}  # the log file of this command, named in its error line


def log_path(cfg) -> str:
    """The run folder's dpg.log for a local store; .dpg/logs/<run_id>.log here for a remote one."""
    from tasks.stages import run_url

    url = run_url(cfg)
    if "://" in url and not url.startswith("file://"):
        return os.path.abspath(os.path.join(".dpg", "logs", f"{cfg.run_id}.log"))
    return os.path.join(os.path.abspath(url.removeprefix("file://")), "logs", "dpg.log")


def start_run(cfg, args: argparse.Namespace):
    """Quiet environment, logs to the run's log file, the checks of tasks.stages.preflight: then the flow."""
    prefect_home()
    from rich.console import Console

    from flows.console import route_logs

    console = Console(stderr=True)
    LOG["path"] = log_path(cfg)
    route_logs(LOG["path"], 2 if args.debug else args.verbose, console)
    print(f"dpg {args.command} {cfg.run_id}: {cfg.outer_iterations} outer iterations, target {cfg.target.spec} on "
          f"{cfg.target.model}, generator {cfg.generator.source}, rewards {cfg.rewards.name}; log {LOG['path']}",
          file=sys.stderr)
    from tasks.stages import preflight

    preflight(cfg)
    return console


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or continue) a DPG optimization: config file < --set overrides; prints where everything went."""
    from dpg.runconfig import load_config

    cfg = load_config(args.config, args.set or [])
    return run_flow(cfg, args)


def run_flow(cfg, args: argparse.Namespace) -> int:
    console = start_run(cfg, args)
    from flows.console import progress
    from flows.optimize import optimize

    t0 = time.perf_counter()
    with progress(cfg, console):
        optimize(cfg, force=args.force)
    print_status(cfg)
    print_plots(cfg)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; log {LOG['path']}", file=sys.stderr)
    return 0


def print_plots(cfg) -> None:
    """Where to look: the HTML report (Phi curve, LM-head patches, top examples) and the plots in MLflow."""
    from tasks.report import write_report
    from tasks.tracking import client, find_run, plot_artifacts

    mlflow_run_id = find_run(cfg)
    print(report_line(write_report(cfg, mlflow_run_id=mlflow_run_id)))
    if mlflow_run_id:
        where = client(cfg).get_run(mlflow_run_id).info.artifact_uri
        print(f"MLflow run {mlflow_run_id}, artifacts in {where}: "
              f"{', '.join([*plot_artifacts(cfg, mlflow_run_id), 'report.html'])}")


def report_line(url: str) -> str:
    return f"report: {url}" + ("" if "://" in url else f"   open with: xdg-open {os.path.abspath(url)}")


def open_run(path: str, storage_options: str | None = None):
    """The config of the run stored at `path` (a folder or URL, as given), addressing that very folder."""
    import json

    from dpg.runconfig import DPGConfig
    from tasks import io

    try:
        options = json.loads(storage_options) if storage_options else {}
    except ValueError as e:
        raise DPGError(f"--storage-options={storage_options!r} is not JSON ({e}); use e.g. "
                       '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'') from None
    path = path.rstrip("/")
    try:
        data = json.loads(io.read_bytes(io.join(path, "config.json"), options))
    except FileNotFoundError:
        raise DPGError(f"{path} holds no config.json; give a run folder, e.g. runs/dpg-<hash>") from None
    except ValueError as e:
        raise DPGError(f"{path}/config.json does not parse ({e}); it is not a dpg run folder") from None
    parent, _, name = path.rpartition("/")
    data["storage"] = {"url": parent or ".", "storage_options": options}
    cfg = DPGConfig.from_dict(data)
    if cfg.run_id != name:
        raise DPGError(f"{path} holds the config of run {cfg.run_id}; a run folder is named by its run id, so "
                       f"rename the folder back to {cfg.run_id}")
    return cfg


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a stored run from its first incomplete stage (its config.json is the config)."""
    from dpg.runconfig import NOT_IDENTITY, load_config

    cfg = open_run(args.run, args.storage_options)
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key.split(".")[0] not in NOT_IDENTITY:
            raise DPGError(f"--set {key} would change the run's results; only outer_iterations, storage.*, "
                           "tracking.* and execution.* can change on resume")
    return run_flow(load_config(None, args.set or [], base=cfg.to_dict()), args)


def run_status(cfg) -> dict:
    """Every iteration in the store (also those a schedule added): each stage's state and the iteration's metrics."""
    from tasks import io
    from tasks.stages import run_url, stage_names, stage_state, stage_url
    from tasks.tracking import tracking_uri

    options = cfg.storage.storage_options
    fs, root = io.filesystem(run_url(cfg), options)
    stored = [int(p.rstrip("/").rsplit("iter-", 1)[1]) for p in fs.glob(f"{root}/iter-*")
              if p.rstrip("/").rsplit("iter-", 1)[1].isdigit()]
    iterations = []
    for it in range(max([cfg.outer_iterations - 1, *stored]) + 1):
        stages = {n: stage_state(cfg, it, n)[1] for n in stage_names(cfg)}
        report = io.read_manifest(stage_url(cfg, it, "report"), options) if stages["report"] == "done" else None
        iterations.append({"iteration": it, "stages": stages, "metrics": (report or {"meta": {}})["meta"].get(
            "metrics", {})})
    last = next((i["iteration"] for i in reversed(iterations) if i["stages"]["rewards"].startswith("done")), None)
    audit = None
    if last is not None:
        entry = io.read_manifest(stage_url(cfg, last, "rewards"), options)["files"]["records.parquet"]
        audit = io.join(stage_url(cfg, last, "rewards"), entry["file"])
    return {"run_id": cfg.run_id, "store": run_url(cfg), "outer_iterations": cfg.outer_iterations,
            "iterations": iterations, "audit_table": audit, "mlflow": tracking_uri(cfg)}


def print_status(cfg, as_json: bool = False) -> None:
    import json

    from dpg.audit import human_metric

    status = run_status(cfg)
    if as_json:
        print(json.dumps(status, indent=1, sort_keys=True, default=float))
        return
    print(f"\nrun {status['run_id']}  store {status['store']}")
    print(f"{'iter':>4s}  {'stages done':30s} {'Phi after SFT':>13s} {'human metric':>24s} {'reward mean':>12s}")
    for row in status["iterations"]:
        m, stages = row["metrics"], row["stages"]
        finished = [n for n, why in stages.items() if why.startswith("done")]
        human = human_metric(m)
        done = "all" if len(finished) == len(stages) else ",".join(s.split("-")[0] for s in finished) or "none"
        print(f"{row['iteration']:4d}  {len(finished)}/{len(stages)} {done[:24]:24s} "
              f"{m.get('eval_phi', float('nan')):13.6g} {(f'{human[0]}={human[1]:.3g}' if human else ''):>24s} "
              f"{m.get('reward_mean', float('nan')):12.3e}")
        for name, why in stages.items():
            if not why.startswith("done") and why != "not written":  # why a written stage does not count
                print(f"      {name}: {why}")
    if status["audit_table"]:
        last = max(r["iteration"] for r in status["iterations"] if r["stages"]["rewards"].startswith("done"))
        print(f"audit table (rollouts + rewards) of iteration {last}: {status['audit_table']}")
    uri = status["mlflow"]
    print(f"MLflow: {uri}   open with: mlflow ui --backend-store-uri {uri}")
    print("Prefect: prefect server start   (then open http://127.0.0.1:4200; runs of this machine's PREFECT_HOME)")


def cmd_status(args: argparse.Namespace) -> int:
    print_status(open_run(args.run, args.storage_options), as_json=args.json)
    return 0


def stage_url_of(cfg, it: int, name: str) -> str:
    from tasks.stages import stage_url

    return stage_url(cfg, it, name)


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from tasks.audit import audit

    if args.top < 1:
        raise DPGError(f"--top={args.top} is invalid; use an integer >= 1")
    cfg = open_run(args.run, args.storage_options)
    if args.generator:
        from tasks.audit import find_generator, lineage_of

        chain = lineage_of(cfg, find_generator(cfg, args.generator))
        if args.json:
            print(json.dumps(chain, indent=1, default=float))
            return 0
        print(f"generator {chain['updates'][-1]['version']} of run {chain['run_id']} (config {chain['config_hash']}):")
        for u in reversed(chain["updates"]):
            print(f"  {u['version']}  <- iteration {u['iteration']:4d}: {u['rollouts']} rollouts of {u['from_version']}"
                  f", mean |advantage| {u['mean_abs_advantage']:.3f}, {u['policy_steps']:g} policy steps, code "
                  f"{u['code']}  {u['records']}")
        print(f"  base: {chain['base']}")
        return 0
    if args.verify:
        from tasks.audit import audited_iterations, verify

        it = args.iteration if args.iteration is not None else audited_iterations(cfg)[-1]
        result = verify(cfg, it, subsets=args.subsets)
        if args.json:
            print(json.dumps(result, indent=1, default=float))
            return 0
        print(f"verify iteration {it} of run {cfg.run_id}: Phi change when examples are left out, actual vs tau's "
              "first-order prediction (sum over the left-out of -tau), over every SFT group")
        for name in ("proponents", "opponents", "random"):
            r = result["summary"][name]
            label = {"proponents": "the top proponents", "opponents": "the top opponents", "random": "random ones"}
            print(f"  without {label[name]:18s} actual {r['actual']:11.3e}  predicted {r['predicted']:11.3e}")
        print(f"  linear datamodeling score (Spearman over {args.subsets} random halves, mean over groups): "
              f"{result['summary']['lds_mean']:.3f}")
        print(f"stored in {stage_url_of(cfg, it, 'verify')} and logged to MLflow")
        return 0
    result = audit(cfg, args.iteration, args.top)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
        return 0
    scope = "the whole run" if args.iteration is None else f"iteration {args.iteration}"
    print(f"audit of run {result['run_id']} ({scope})  store {result['store']}")
    for by in ("tau", "advantage"):
        for side in ("proponents", "opponents"):
            rows = result[f"by_{by}"][side]
            push = "up" if side == "proponents" else "down"
            print(f"\ntop {len(rows)} {side} by {by} (pushed Phi {push}):")
            print(f"  {'example':>10s} {'group':>5s} {'tau':>11s} {'tau/std':>8s} {'adv':>7s} {'generator':>16s}  text")
            for r in rows:
                print(f"  {r['example_id']:>10s} {r['sft_group']:5d} {r['tau']:11.3e} {r['tau_normalised']:8.2f} "
                      f"{r['advantage']:7.2f} {r['generator_version']:>16s}  {r['text'][:70]}")
    if result["sft_runs"]:
        print("\nSFT runs: measured Phi change vs sum of tau (first order), share of |tau| in the top 1 % / 10 %:")
        print(f"  {'iter':>4s} {'group':>5s} {'n':>4s} {'dPhi':>11s} {'sum tau':>11s} {'ratio':>7s} {'top1%':>6s} "
              f"{'top10%':>6s}")
        shown = result["sft_runs"] if len(result["sft_runs"]) <= 16 else result["sft_runs"][-8:]
        if len(shown) < len(result["sft_runs"]):
            print(f"  ... the last {len(shown)} of {len(result['sft_runs'])} (--iteration K or --json for the others)")
        for r in shown:
            print(f"  {r['iteration']:4d} {r['sft_group']:5d} {r['examples']:4d} {r['phi_change']:11.3e} "
                  f"{r['sum_tau']:11.3e} {r['ratio']:7.2f} {r['top_1pct_share']:6.2f} {r['top_10pct_share']:6.2f}")
        a = result["agreement"]
        print(f"  over {a['sft_runs']} SFT runs: sum tau has the sign of dPhi in {a['same_sign_share']:.0%}, "
              f"Pearson {a['pearson']:.2f}, median ratio {a['median_ratio']:.2f}")
    print("\nper iteration:")
    keys = [k for k in result["iterations"][0] if k not in ("iteration", "rollouts", "generator_version")]
    print("  " + f"{'iter':>4s} " + " ".join(f"{k[:14]:>14s}" for k in keys))
    for r in result["iterations"]:
        print("  " + f"{r['iteration']:4d} " + " ".join(f"{r.get(k, float('nan')):14.4g}" for k in keys))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.export import export_dataset, export_generator

    cfg = open_run(args.run, args.storage_options)
    data = export_dataset(cfg, args.iteration, args.out)
    m = data["metrics"]
    print(f"dataset of iteration {data['iteration']} ({data['rows']} rows, Phi {m.get('eval_phi', float('nan')):.4g}):"
          f" {data['out']}/data.parquet, {data['out']}/dataset (datasets.load_from_disk), {data['out']}/README.md")
    if args.generator:
        gen = export_generator(cfg, str(data["iteration"]), args.out, register=not args.no_register)
        print(f"generator {gen['version']} (after iteration {gen['iteration']}'s update, "
              f"{len(gen['lineage']['updates'])} updates from {gen['lineage']['base']}): {gen['out']} "
              "(AutoModelForCausalLM.from_pretrained)")
        if "registered" in gen:
            r = gen["registered"]
            print(f"registered in MLflow as {r['model']} version {r['version']} ({r['tracking_uri']})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import json

    from tasks.export import finetune

    result = finetune(args.data, args.out, args.model)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    print(f"{result['target_model']} fine-tuned on {result['examples']} examples of {args.data} for {result['target']}")
    for key in result["after"]:
        print(f"  {key:>16s} {result['before'][key]:12.6g} -> {result['after'][key]:12.6g}")
    if "out" in result:
        print(f"saved to {result['out']} (AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.report import write_report

    print(report_line(write_report(open_run(args.run, args.storage_options), track=not args.no_track)))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register a workers-mode run's deployments with the Prefect server at PREFECT_API_URL (see infra/README.md)."""
    from dpg.runconfig import load_config

    cfg = load_config(args.config, args.set or [])
    prefect_home()
    from flows.deployments import api_url, deploy, workers_config

    api = api_url()
    if not api:
        raise DPGError("PREFECT_API_URL is not set: deployments live on a Prefect server; start one "
                       "(infra/start-prefect-server.sh) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if args.iterations < 1:
        raise DPGError(f"--iterations={args.iterations} is invalid; use an integer >= 1")
    cfg = workers_config(cfg, args.gpu_pool, args.cpu_pool)
    names = deploy(cfg, iterations=args.iterations, cron=args.cron, interval=args.interval)
    schedule = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s" if args.interval else "none"
    print(f"registered with {api} (run {cfg.run_id}, store {cfg.storage.url}):")
    for name, pool in names.items():
        print(f"  {name:48s} work pool {pool}")
    print(f"schedule of dpg-advance/{cfg.run_id}: {schedule}; each run advances {args.iterations} outer iteration(s)")
    print("start the workers (the GPU pool on every GPU machine, the repo at the same path):\n"
          f"  prefect worker start --pool {cfg.execution.cpu_pool}\n"
          f"  prefect worker start --pool {cfg.execution.gpu_pool} --limit 1   # one per GPU\n"
          f"run now: prefect deployment run dpg-advance/{cfg.run_id}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Print the commands that open the Prefect and MLflow UIs of a run."""
    prefect_home()
    from tasks.tracking import tracking_uri

    cfg = open_run(args.run, args.storage_options)

    if api := os.environ.get("PREFECT_API_URL"):  # workers mode: the server that runs the deployments
        print(f"# Prefect UI of the server at {api}: open {api.removesuffix('/').removesuffix('/api')}")
    else:  # inline runs: the flow runs recorded in this machine's PREFECT_HOME
        home = os.environ["PREFECT_HOME"]
        print(f"# Prefect UI (flow runs of PREFECT_HOME={home}); then open http://127.0.0.1:4200")
        print(f"PREFECT_HOME={home} PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start --host 127.0.0.1")
    print(f"# MLflow UI of run {cfg.run_id}; then open http://127.0.0.1:5000")
    print("MLFLOW_DISABLE_TELEMETRY=true mlflow ui --host 127.0.0.1 --port 5000 "
          f"--backend-store-uri {tracking_uri(cfg)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpg", description="Dataset Policy Gradient: synthetic data for any "
                                     "differentiable target (exact per-example metagradients + policy gradient).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show INFO lines and other libraries' warnings on the console (the log file has them)")
    parser.add_argument("--debug", action="store_true", help="everything on the console, and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run or continue a DPG optimization (Prefect flow, MLflow tracking)")
    p.add_argument("config", nargs="?",
                   help="YAML/JSON config file, or a profile name (default: main, README's main job)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set outer_iterations=5 --set sft.lr=0.1 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="take over the lock of a writer of this run that is no longer running (e.g. killed)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a stored run from its first incomplete stage")
    p.add_argument("run", help="the run folder or URL, e.g. runs/dpg-1a2b3c4d5e6f or s3://bucket/prefix/dpg-...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="only outer_iterations, storage.*, tracking.*, execution.* may change")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.add_argument("--force", action="store_true",
                   help="take over the lock of a writer of this run that is no longer running (e.g. killed)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="stages done and metrics per iteration of a stored run")
    p.add_argument("run", help="the run folder or URL")
    p.add_argument("--json", action="store_true", help="machine-readable: per-iteration stage states and metrics")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="which synthetic examples pushed the target where, and can tau be trusted")
    p.add_argument("run", help="the run folder or URL")
    p.add_argument("--iteration", type=int, metavar="K", help="one iteration (default: the whole run)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="proponents and opponents to show (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable: every table as JSON")
    p.add_argument("--verify", action="store_true",
                   help="retrain the target without the top/bottom/random examples of each SFT group of --iteration "
                        "(default: the last) and over --subsets random halves; compare with tau's prediction")
    p.add_argument("--subsets", type=int, default=20, metavar="N", help="random halves for --verify (default 20)")
    p.add_argument("--generator", metavar="VERSION", help="the lineage of one generator version, back to the base")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("export", help="write a run's synthetic dataset (Parquet, datasets folder, card) or generator")
    p.add_argument("run", help="the run folder or URL")
    p.add_argument("--iteration", default="best", metavar="K",
                   help="an iteration, last, or best (best human metric after SFT on its data; default)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--generator", action="store_true",
                   help="also the generator after that iteration's update: LoRA merged, save_pretrained, registered "
                        "in MLflow's model registry with its lineage")
    p.add_argument("--no-register", action="store_true", help="with --generator: do not touch MLflow")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a target on a dataset from `dpg export`, as the run's eval did")
    p.add_argument("data", help="the folder `dpg export RUN --out DIR` wrote")
    p.add_argument("--out", metavar="DIR", help="save the tuned target here (save_pretrained)")
    p.add_argument("--model", metavar="PATH", help="your own target: a Hugging Face model folder (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="one self-contained HTML report of a run, in its folder and in MLflow")
    p.add_argument("run", help="the run folder or URL")
    p.add_argument("--no-track", action="store_true", help="do not log it to the run's MLflow run")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("deploy", help="register the Prefect deployments of a run on GPU/CPU work pools (workers mode)")
    p.add_argument("config", nargs="?",
                   help="YAML/JSON config file, or a profile name (default: main, README's main job)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (repeatable); storage.url must be s3://... or an absolute shared path")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help='schedule of the dpg-advance deployment, e.g. "0 * * * *"')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="schedule as an interval in seconds")
    p.add_argument("--iterations", type=int, default=1, help="outer iterations per scheduled run (default 1)")
    p.add_argument("--gpu-pool", help="work pool of the GPU stages (default: execution.gpu_pool, dpg-gpu)")
    p.add_argument("--cpu-pool", help="work pool of the optimization flow (default: execution.cpu_pool, dpg-cpu)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("ui", help="print the commands that open the Prefect and MLflow UIs of a run")
    p.add_argument("run", help="the run folder or URL, e.g. runs/dpg-1a2b3c4d5e6f")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options of the store, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("verify", help="check every metagradient against finite differences on tiny float64 models")
    p.add_argument("--arch", choices=["llama", "gpt2", "all"], default="all")
    p.add_argument("--optimizer", choices=["sgd", "adamw", "all"], default="all")
    p.add_argument("--target", nargs="+", default=["l2_norm", "pattern:67"],
                   help="target specs (default: l2_norm pattern:67)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest accepted relative error (default 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="per-example metagradients of a target on the real offline SmolLM2-135M")
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline GGUF) or a local model folder")
    p.add_argument("--target", default="pattern:67", help="target spec (default pattern:67)")
    p.add_argument("--lr", type=float, default=2e-3, help="SGD learning rate (default 2e-3)")
    p.add_argument("--max-len", type=int, default=32)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    LOG["path"] = None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dpg: interrupted; resume the run to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as e:  # a bad input (DPGError) or a stage that failed: one line, the last one printed
        import logging

        if LOG["path"]:  # the traceback, in the log file (the console filter keeps errors off the screen)
            logging.getLogger("dpg").error("the command failed", exc_info=True)
        if args.debug:
            raise
        where = f" (traceback in {LOG['path']}; --debug prints it)" if LOG["path"] else ""
        text = str(e) if isinstance(e, DPGError) else f"{type(e).__name__}: {e}"
        sys.stdout.flush()
        print(f"dpg: error: {text.splitlines()[0] if text else type(e).__name__}"
              f"{where if not isinstance(e, DPGError) else ''}", file=sys.stderr, flush=True)
        return 2
    finally:
        from flows.console import unroute_logs

        unroute_logs()


if __name__ == "__main__":
    sys.exit(main())
