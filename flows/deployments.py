"""Workers mode: the two GPU stages as their own flows on a GPU work pool, and the deployments that run them.

`execution.mode="inline"` (the default) runs every stage as a task of the iteration's flow run. In
`execution.mode="workers"` the iteration (on the CPU pool) dispatches its GPU stages with `run_deployment`:

    run_sft_groups        one `dpg-sft-group/<gpu_pool>` flow run per group, all created before any is
                          waited for, so several GPU workers (or one worker without a limit) run them at once
    run_update_generator  one `dpg-update-generator/<gpu_pool>` flow run

Both return the stage URLs that inline mode returns (`tasks.stages.stage_url` is deterministic), so the
iteration flow reads the same in both modes. Every child flow run has an idempotency key
`<run_id>-<it>-<stage>`: a retried or resumed parent finds the child it launched instead of launching a
duplicate; a child that ended without completing its stage is rescheduled (its task skips whatever its stage
manifest says is done). A stage whose manifest is already complete launches nothing.

The workers exchange data only through storage: `storage.url` must be s3://... or an absolute path on a folder
that every worker mounts at the same path. `deploy` registers the deployments (`dpg deploy`, tests/test_workers.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.states import Scheduled

from dpg import loop
from dpg.errors import DPGError
from dpg.runconfig import DPGConfig
from tasks.stages import done, sft_group, stage_url, update_generator

REPO = Path(__file__).resolve().parents[1]
"""The repository root: workers run the flows from here (pull step `set_working_directory`)."""
SFT_FLOW, UPDATE_FLOW = "dpg-sft-group", "dpg-update-generator"
POLL_SECONDS = 2.0


def api_url() -> str | None:
    """The Prefect API that deployments are registered with (env or profile), None in ephemeral mode."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


# --- the GPU-stage flows (what a GPU worker runs) ---------------------------------------------------------


@flow(name=SFT_FLOW, flow_run_name="{cfg.name}-iter-{it}-sft-g{group}", validate_parameters=True)
def sft_group_flow(cfg: DPGConfig, it: int, rollouts_url: str, group: int) -> str:
    """Differentiable SFT of the target on one group + its per-example attribution rewards."""
    return sft_group(cfg, it, rollouts_url, group)


@flow(name=UPDATE_FLOW, flow_run_name="{cfg.name}-iter-{it}-generator", validate_parameters=True)
def update_generator_flow(cfg: DPGConfig, it: int, rollouts_url: str, rewards_url: str) -> str:
    """GRPO update of the generator on the iteration's rollouts and advantages."""
    return update_generator(cfg, it, rollouts_url, rewards_url)


# --- dispatch: the iteration flow calls these in both modes ------------------------------------------------


def run_sft_groups(cfg: DPGConfig, it: int, rollouts_url: str) -> list[str]:
    """Stage URLs of every group's SFT + attribution: tasks here (inline) or flow runs on the GPU pool (workers)."""
    if cfg.execution.mode == "inline":
        return [sft_group(cfg, it, rollouts_url, g) for g in loop.group_ids(cfg)]
    return dispatch(cfg, it, [Child(SFT_FLOW, f"sft-g{g}", {"it": it, "rollouts_url": rollouts_url, "group": g})
                              for g in loop.group_ids(cfg)])


def run_update_generator(cfg: DPGConfig, it: int, rollouts_url: str, rewards_url: str) -> str:
    """Stage URL of the generator update: a task here (inline) or a flow run on the GPU pool (workers)."""
    if cfg.execution.mode == "inline":
        return update_generator(cfg, it, rollouts_url, rewards_url)
    [url] = dispatch(cfg, it, [Child(UPDATE_FLOW, "generator", {"it": it, "rollouts_url": rollouts_url,
                                                                "rewards_url": rewards_url})])
    return url


@dataclass(frozen=True)
class Child:
    """One GPU stage as a flow run: its flow, its stage name (sft-g0, generator) and its parameters but cfg."""

    flow: str
    stage: str
    parameters: dict[str, Any]


def check_shared_storage(cfg: DPGConfig) -> None:
    """Workers on other machines must see the same store: s3://... or an absolute path, never a relative one."""
    url = cfg.storage.url
    local = url.removeprefix("file://") if url.startswith("file://") or "://" not in url else None
    if local is not None and not os.path.isabs(os.path.expanduser(local)):
        raise DPGError(f"storage.url={url!r} is a relative local path, but execution.mode='workers' runs stages on "
                       "other workers that must share the store; use s3://bucket/prefix or an absolute path on a "
                       "shared folder (e.g. --set storage.url=/mnt/shared/dpg-runs)")


def idempotency_key(cfg: DPGConfig, it: int, stage: str) -> str:
    return f"{cfg.run_id}-{it}-{stage}"


def dispatch(cfg: DPGConfig, it: int, children: list[Child]) -> list[str]:
    """Create a flow run for every child whose stage is incomplete, wait for all, return every stage URL.

    Waits without a timeout (a stage waits for a free GPU worker). Raises one DPGError naming each stage and
    child flow run that did not complete (or completed without writing its stage where this flow can read it,
    i.e. storage that is not shared).
    """
    check_shared_storage(cfg)
    urls = [stage_url(cfg, it, c.stage) for c in children]
    todo = [(c, url) for c, url in zip(children, urls) if not done(cfg, url)]
    if not todo:
        return urls
    with get_client(sync_client=True) as client:
        runs = [submit(cfg, it, c, client) for c, _ in todo]
        _log_waiting(cfg, it, runs, client)
        while not all(r.state is not None and r.state.is_final() for r in runs):
            time.sleep(POLL_SECONDS)
            runs = [client.read_flow_run(r.id) for r in runs]
    failed = [f"{c.stage} (flow run {r.name!r}, id {r.id}: {r.state.type.value}"
              f"{': ' + r.state.message if r.state.message else ''})"
              for (c, _), r in zip(todo, runs) if not r.state.is_completed()]
    if failed:
        raise DPGError(f"iteration {it}: GPU stage(s) on work pool {cfg.execution.gpu_pool!r} did not complete: "
                       f"{'; '.join(failed)}. See `prefect flow-run logs <id>`, fix the cause, then resume the run "
                       "(finished stages are kept; the failed flow runs are rescheduled)")
    unseen = [f"{c.stage} (flow run id {r.id}) -> {url}" for (c, url), r in zip(todo, runs) if not done(cfg, url)]
    if unseen:
        raise DPGError(f"iteration {it}: GPU flow runs completed but their stages are not complete here: "
                       f"{'; '.join(unseen)}. The workers do not share storage.url={cfg.storage.url!r}; use "
                       "s3://bucket/prefix or a folder mounted at the same absolute path on every worker")
    return urls


def submit(cfg: DPGConfig, it: int, child: Child, client) -> Any:
    """The child's flow run on the GPU pool: created, or found by its idempotency key (and rescheduled if it
    ended, since its stage is still incomplete). Returns at once."""
    name = f"{child.flow}/{cfg.execution.gpu_pool}"
    try:
        run = run_deployment(name, parameters={"cfg": cfg.to_dict(), **child.parameters}, timeout=0,
                             idempotency_key=idempotency_key(cfg, it, child.stage),
                             flow_run_name=f"{cfg.name}-iter-{it}-{child.stage}")
    except ObjectNotFound:
        raise DPGError(f"deployment {name!r} is not registered with the Prefect API; register the deployments of "
                       f"execution.gpu_pool={cfg.execution.gpu_pool!r} with `dpg deploy` (infra/README.md)") from None
    if run.state is not None and run.state.is_final():  # a retried parent: run the same child again
        client.set_flow_run_state(run.id, Scheduled(message=f"rescheduled by {cfg.run_id} iteration {it}"),
                                  force=True)
        run = client.read_flow_run(run.id)
    return run


def _log_waiting(cfg: DPGConfig, it: int, runs: list, client) -> None:
    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger(__name__)
    pool = cfg.execution.gpu_pool
    logger.info("iteration %d: waiting for %s on work pool %r", it, ", ".join(r.name for r in runs), pool)
    online = client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(
        status=WorkerFilterStatus(any_=["ONLINE"])))
    if not online:
        logger.warning("work pool %r has no online worker; start one: prefect worker start --pool %s", pool, pool)


# --- registration (dpg deploy) -------------------------------------------------------------------------------


def workers_config(cfg: DPGConfig, gpu_pool: str | None = None, cpu_pool: str | None = None) -> DPGConfig:
    """`cfg` with execution.mode="workers" (and the given pools); checks that storage is shared."""
    execution = dataclasses.replace(cfg.execution, mode="workers", gpu_pool=gpu_pool or cfg.execution.gpu_pool,
                                    cpu_pool=cpu_pool or cfg.execution.cpu_pool)
    cfg = dataclasses.replace(cfg, execution=execution)
    check_shared_storage(cfg)
    return cfg


def ensure_process_pools(*names: str) -> list[str]:
    """Create each missing work pool as a `process` pool; returns the names it created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
                    created.append(name)
                except ObjectAlreadyExists:  # a worker started meanwhile creates its pool too
                    pass
    return created


def deploy(cfg: DPGConfig, iterations: int = 1, cron: str | None = None,
           interval: float | None = None) -> dict[str, str]:
    """Register the deployments of a workers-mode run with the Prefect API (PREFECT_API_URL): {name: work pool}.

    - `dpg-sft-group/<gpu_pool>`, `dpg-update-generator/<gpu_pool>` on the GPU pool (any run's cfg is a parameter)
    - `dpg-advance/<run_id>` on the CPU pool: parameters {cfg, iterations}, with the cron or interval schedule
      (every scheduled run advances the same optimization by `iterations` outer iterations; one at a time)
    - `dpg-optimization/<run_id>` on the CPU pool: run it to reach cfg.outer_iterations

    Missing pools are created as process pools. The flows are loaded from this repository, and the pull step
    `set_working_directory` points workers at the same path (no image, no code upload).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    if cfg.execution.mode != "workers":
        raise DPGError(f"execution.mode={cfg.execution.mode!r}: deployments dispatch GPU stages to workers; use "
                       "flows.deployments.workers_config(cfg) (dpg deploy does)")
    check_shared_storage(cfg)
    if cron is not None and interval is not None:
        raise DPGError("give a cron schedule or an interval, not both")
    gpu, cpu, params = cfg.execution.gpu_pool, cfg.execution.cpu_pool, {"cfg": cfg.to_dict()}
    ensure_process_pools(cpu, gpu)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    specs = [  # (entrypoint, deployment name, pool, keyword arguments)
        ("flows/deployments.py:sft_group_flow", gpu, gpu, {"tags": ["dpg", "gpu"]}),
        ("flows/deployments.py:update_generator_flow", gpu, gpu, {"tags": ["dpg", "gpu"]}),
        ("flows/optimize.py:advance", cfg.run_id, cpu,
         {"parameters": params | {"iterations": iterations}, "cron": cron, "interval": interval,
          "concurrency_limit": one_at_a_time, "tags": ["dpg", cfg.run_id]}),
        ("flows/optimize.py:optimize", cfg.run_id, cpu,
         {"parameters": params, "concurrency_limit": one_at_a_time, "tags": ["dpg", cfg.run_id]}),
    ]
    names = {}
    for entrypoint, name, pool, kwargs in specs:
        deployment = RunnerDeployment.from_storage(storage=LocalStorage(str(REPO)), entrypoint=entrypoint, name=name,
                                                   work_pool_name=pool, **kwargs)
        deployment.apply()
        names[f"{deployment.flow_name}/{name}"] = pool
    return names
