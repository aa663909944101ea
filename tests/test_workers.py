"""Workers mode on a real Prefect server: `prefect server start` on 127.0.0.1, process work pools dpg-cpu and
dpg-gpu, one `prefect worker start` per pool, the deployments registered by `dpg deploy`'s code path, and one
scheduled-style run of `dpg-advance` whose GPU stages become flow runs on the GPU pool (tiny models, CPU only).

Every process the test starts is a new session; teardown ends it, its process group and its descendants (the
process worker starts each flow run in a session of its own), first with SIGTERM, then SIGKILL.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from test_pipeline import texts_file, tiny_config  # noqa: F401 (texts_file is a fixture)

from dpg.errors import DPGError
from dpg.runconfig import load_config
from flows.cli import main, open_run, run_status
from flows.deployments import REPO, check_shared_storage
from tasks import io
from tasks.stages import stage_url

PREFECT = str(Path(sys.executable).with_name("prefect"))
STAGES = ["rollouts", "sft-g0", "sft-g1", "rewards", "generator", "report"]


# --- processes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(home: Path, api_url: str) -> dict[str, str]:
    """This environment without the session's Prefect settings, pointed at our server and home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false", "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(home / "mpl"),
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
    }


class Service:
    """A subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self, n: int = 40) -> str:
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def strays(self) -> list[psutil.Process]:
        """Descendants outside the service's process group (the worker starts each flow run in a new session)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if _pgid(p) not in (None, self.proc.pid)]


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:
        return None


def stop(*services: Service, grace: float = 5) -> None:
    """SIGTERM to each service's process group and its strays, SIGKILL to whatever is left after `grace`
    seconds (a Prefect 3.9.1 process worker sometimes hangs in its graceful shutdown)."""
    strays = [p for s in services for p in s.strays()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for s in services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, sig)
        for p in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + grace
        _, strays = psutil.wait_procs(strays, timeout=grace)
        if not strays and all(_exits_by(s.proc, deadline) for s in services):
            return


def _exits_by(proc: subprocess.Popen, deadline: float) -> bool:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME (scheduler off: schedules are only registered)."""
    home, port = tmp_path_factory.mktemp("prefect-home"), free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = service_env(home, url)
    server = Service("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with direct.open(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.proc.poll() is None, server.tail()
            assert time.monotonic() < deadline, "server not healthy after 120 s\n" + server.tail()
            time.sleep(0.5)
        yield url, env, home
    finally:
        stop(server)


@pytest.fixture
def prefect_api(prefect_server):
    """This process's Prefect client settings pointed at the test server (over any session harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server[0]}):
        yield prefect_server


# --- tests ----------------------------------------------------------------------------------------------------


def flow_runs(flow: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])))


def test_gpu_stages_run_as_flow_runs_on_the_gpu_pool(prefect_api, tiny_generator_dir, texts_file, tmp_path,  # noqa: F811
                                                     capsys):
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.deployments import SFT_FLOW, Child, deploy, dispatch, ensure_process_pools, workers_config

    t0, (_, env, _) = time.monotonic(), prefect_api
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/mlflow.db",
                      outer_iterations=1)
    cfg = workers_config(cfg)  # what `dpg deploy` does: execution.mode=workers, storage checked
    assert cfg.execution.mode == "workers" and os.path.isabs(cfg.storage.url)
    assert set(ensure_process_pools("dpg-cpu", "dpg-gpu")) == {"dpg-cpu", "dpg-gpu"}
    workers = [Service(f"worker-{pool}", [PREFECT, "worker", "start", "--pool", pool, "--name", f"test-{pool}"],
                       env, tmp_path) for pool in ("dpg-cpu", "dpg-gpu")]
    try:
        names = deploy(cfg, iterations=1, interval=3600)  # while the workers start
        assert names == {"dpg-sft-group/dpg-gpu": "dpg-gpu", "dpg-update-generator/dpg-gpu": "dpg-gpu",
                         f"dpg-advance/{cfg.run_id}": "dpg-cpu", f"dpg-optimization/{cfg.run_id}": "dpg-cpu"}
        t1 = time.monotonic()
        advance = run_deployment(f"dpg-advance/{cfg.run_id}", timeout=300, poll_interval=1, as_subflow=False)
        assert advance.state.is_completed(), f"{advance.state}\n" + "\n".join(w.tail() for w in workers)
        t2 = time.monotonic()

        runs = {f: flow_runs(f) for f in ("dpg-advance", "dpg-optimization", "dpg-iteration", "dpg-sft-group",
                                          "dpg-update-generator")}
        gpu, sft = runs["dpg-sft-group"] + runs["dpg-update-generator"], runs["dpg-sft-group"]
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(f"dpg-advance/{cfg.run_id}")
            parent = lambda run: client.read_task_run(run.parent_task_run_id).flow_run_id
            [optimization], [iteration] = runs["dpg-optimization"], runs["dpg-iteration"]
            # the optimization and its iteration are subflows inside the advance run's process on dpg-cpu
            assert parent(optimization) == advance.id and parent(iteration) == optimization.id
            parents = {parent(r) for r in gpu}
        assert [r.id for r in runs["dpg-advance"]] == [advance.id] and advance.work_pool_name == "dpg-cpu"
        assert optimization.state.is_completed() and iteration.state.is_completed()
        assert sorted(r.name for r in gpu) == [f"{cfg.name}-iter-0-generator", f"{cfg.name}-iter-0-sft-g0",
                                               f"{cfg.name}-iter-0-sft-g1"]
        for r in gpu:
            assert r.state.is_completed() and r.work_pool_name == "dpg-gpu" and r.deployment_id, r
        assert parents == {iteration.id}  # the children show up inside the iteration's flow run
        assert max(r.created for r in sft) < min(r.end_time for r in sft)  # both submitted before either finished
        for name in STAGES:
            assert io.verify_stage(stage_url(cfg, 0, name)), name
        assert deployment.parameters["iterations"] == 1 and deployment.work_pool_name == "dpg-cpu"
        assert deployment.parameters["cfg"]["execution"]["mode"] == "workers"
        assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [3600]

        # A retried parent finds its children by idempotency key: a lost stage reruns in the same flow run
        # (rescheduled, not duplicated), a finished one launches nothing, and a failing child fails loudly.
        (tmp_path / "store" / cfg.run_id / "iter-0000" / "sft-g0" / "manifest.json").unlink()
        children = [Child(SFT_FLOW, f"sft-g{g}", {"it": 0, "rollouts_url": stage_url(cfg, 0, "rollouts"),
                                                  "group": g}) for g in (0, 1)]
        broken = Child(SFT_FLOW, "sft-g9", {"it": 0, "rollouts_url": stage_url(cfg, 0, "missing"), "group": 9})
        with pytest.raises(DPGError, match=r"iteration 0: GPU stage\(s\) on work pool 'dpg-gpu' did not complete: "
                                           r"sft-g9 \(flow run 'dpg-iter-0-sft-g9', id [0-9a-f-]{36}: FAILED") as e:
            dispatch(cfg, 0, children + [broken])
        assert "sft-g0" not in str(e.value) and "sft-g1" not in str(e.value)
        assert io.verify_stage(stage_url(cfg, 0, "sft-g0"))
        again = {r.name: r for r in flow_runs("dpg-sft-group")}
        assert {n: r.run_count for n, r in again.items()} == {f"{cfg.name}-iter-0-sft-g0": 2,
                                                               f"{cfg.name}-iter-0-sft-g1": 1,
                                                               f"{cfg.name}-iter-0-sft-g9": 1}
        assert {r.id for r in sft} < {r.id for r in again.values()}

        # The schedule's next tick: a second advance adds iteration 1, and `dpg status` on the run folder shows both
        # (config.json still says outer_iterations=1, the first advance's).
        second = run_deployment(f"dpg-advance/{cfg.run_id}", timeout=300, poll_interval=1, as_subflow=False)
        assert second.state.is_completed(), f"{second.state}\n" + "\n".join(w.tail() for w in workers)
        status = run_status(open_run(str(tmp_path / "store" / cfg.run_id)))
        assert [i["iteration"] for i in status["iterations"]] == [0, 1]
        assert all(why == "done" for i in status["iterations"] for why in i["stages"].values()), status
        assert main(["status", str(tmp_path / "store" / cfg.run_id), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert [i["iteration"] for i in printed["iterations"]] == [0, 1] and "pixel_accuracy" in str(printed)
    finally:
        stop(*workers)
    print(f"\nworkers + deploy {t1 - t0:.0f} s, dpg-advance run {t2 - t1:.0f} s, "
          f"retry and a second advance {time.monotonic() - t2:.0f} s")


def test_workers_mode_refuses_a_relative_store():
    cfg = load_config(None, ["execution.mode=workers", "storage.url=runs"])
    with pytest.raises(DPGError, match=r"storage.url='runs' is a relative local path.*s3://bucket/prefix"):
        check_shared_storage(cfg)
    check_shared_storage(load_config(None, ["execution.mode=workers", "storage.url=s3://bucket/runs"]))
    check_shared_storage(load_config(None, ["execution.mode=workers", "storage.url=/mnt/shared/runs"]))


def test_prefect_yaml_deploys_the_flows_on_their_pools():
    """infra/prefect.yaml names real entrypoints, and each flow sits on the pool its stage needs."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    [pull] = spec["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull
    pools = {}
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        pools[flow.name] = d["work_pool"]["name"]
    assert pools == {"dpg-optimization": "dpg-cpu", "dpg-advance": "dpg-cpu", "dpg-sft-group": "dpg-gpu",
                     "dpg-update-generator": "dpg-gpu"}
    advance = next(d for d in spec["deployments"] if d["entrypoint"].endswith(":advance"))
    assert advance["schedules"] and advance["parameters"]["iterations"] >= 1


def test_prefect_yaml_config_is_the_main_recipe_with_a_kl_anchor():
    """The deployments' example config is valid, and it is the main job's recipe plus the KL anchor a long run needs."""
    from dpg.runconfig import PROFILES, DPGConfig

    cfg = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["definitions"]["cfg"]
    DPGConfig.from_dict(cfg)
    main = PROFILES["main"]
    for section in ("target", "generator", "prompts", "rollouts", "sft", "rewards"):
        assert cfg[section] == main[section], section
    assert cfg["policy"] == {**main["policy"], "kl_coef": 0.1}
