"""Scale-out across workers: one outer iteration in workers mode with 1 vs N process workers on the dpg-gpu pool.

Everything a user would run: `infra/start-prefect-server.sh` (a fresh PREFECT_HOME and port per measurement),
`infra/start-workers.sh` (one dpg-cpu worker, N dpg-gpu workers with `--limit 1` each), `dpg deploy`, then one
`dpg-advance` run of one outer iteration. The wall time is that of the `dpg-iteration` flow run (Prefect's
start and end times), plus each SFT group's child flow run: with N workers up to N groups run at once. Every
process gets OMP_NUM_THREADS=1, so on a CPU machine N workers use N cores.

    python benchmarks/scale_out.py --workers 1 2            # experiments/pattern-67.yaml, one iteration
    python benchmarks/scale_out.py --config my.yaml --set sft.microbatch=4 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (start-workers.sh forwards it, then SIGKILLs after its GRACE), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 40), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(n: int, args, tmp: Path) -> dict:
    from dpg.runconfig import load_config

    home, port = tmp / f"prefect-{n}", free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home), "PORT": str(port), "PREFECT_API_URL": api, "PREFECT": str(BIN / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "POOLS": "dpg-cpu dpg-gpu", "GPU_WORKERS": str(n), "GRACE": "10",
        "NO_PROXY": "127.0.0.1,localhost"}
    sets = [*args.set, f"storage.url={tmp / f'store-{n}'}", f"tracking.uri=sqlite:///{tmp}/mlflow-{n}.db",
            "outer_iterations=1"]
    cfg = load_config(args.config, sets)
    server = start(["bash", "infra/start-prefect-server.sh"], env, tmp / f"server-{n}.log")
    workers = None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 120
        while True:
            try:
                with opener.open(f"{api}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"Prefect server did not start; see {tmp / f'server-{n}.log'}") from None
                time.sleep(0.5)
        subprocess.run([str(BIN / "dpg"), "deploy", args.config, *[a for s in sets for a in ("--set", s)],
                        "--iterations", "1"], cwd=ROOT, env=env, check=True, capture_output=True)
        workers = start(["bash", "infra/start-workers.sh"], env, tmp / f"workers-{n}.log")
        time.sleep(5)  # the workers poll every second once started
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            from prefect import get_client
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName
            from prefect.deployments import run_deployment

            start_s = time.monotonic()
            advance = run_deployment(f"dpg-advance/{cfg.run_id}", timeout=args.timeout, poll_interval=1,
                                     as_subflow=False)
            advance_s = time.monotonic() - start_s
            if not advance.state.is_completed():
                raise SystemExit(f"{n} worker(s): dpg-advance ended {advance.state.type}; see {tmp}")
            with get_client(sync_client=True) as client:
                runs = {f: client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[f])))
                        for f in ("dpg-iteration", "dpg-sft-group", "dpg-update-generator")}
        [iteration] = runs["dpg-iteration"]
        span = lambda r: (r.end_time - r.start_time).total_seconds()
        sft = runs["dpg-sft-group"]
        return {"workers": n, "iteration_s": span(iteration), "advance_s": advance_s, "groups": len(sft),
                "group_s": sorted(span(r) for r in sft),
                "sft_stage_s": (max(r.end_time for r in sft) - min(r.start_time for r in sft)).total_seconds(),
                "update_s": sum(span(r) for r in runs["dpg-update-generator"])}
    finally:
        if workers:
            stop(workers)
        stop(server)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "experiments" / "pattern-67.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="dpg-scale-") as tmp:
        for n in args.workers:
            results.append(measure(n, args, Path(tmp)))
            print(f"# {n} worker(s): iteration {results[-1]['iteration_s']:.1f} s", file=sys.stderr, flush=True)
    base = results[0]["iteration_s"]
    print(f"\none outer iteration of {args.config} {' '.join(args.set)} in workers mode, {os.cpu_count()} CPUs, "
          "OMP_NUM_THREADS=1 per process\n")
    print("| dpg-gpu workers | iteration s | speed-up | SFT groups | SFT stage s (first start to last end) "
          "| each group's flow run s | generator update s |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['iteration_s']:.1f} | {base / r['iteration_s']:.2f}× | {r['groups']} | "
              f"{r['sft_stage_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['group_s'])} | {r['update_s']:.1f} |")


if __name__ == "__main__":
    main()
