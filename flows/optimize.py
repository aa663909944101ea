"""The DPG flows: an outer iteration (sample -> SFT + attribution per group -> advantages -> generator update ->
tracking), and the long-running optimization that runs outer iterations up to `cfg.outer_iterations`.

Every task skips work whose stage manifest is complete, so rerunning the same config, `dpg resume` or
`prefect flow-run retry` continues from the first incomplete stage.
"""

from __future__ import annotations

import dataclasses

from prefect import flow, runtime

from dpg.runconfig import DPGConfig
from flows.deployments import run_sft_groups, run_update_generator
from tasks.lock import run_lock
from tasks.stages import (
    completed_iterations,
    compute_advantages,
    evaluate_target,
    prepare_run,
    run_url,
    sample_rollouts,
)
from tasks.tracking import finish_tracking, log_iteration, start_tracking


@flow(name="dpg-iteration", flow_run_name="{cfg.name}-iter-{it}", validate_parameters=True)
def outer_iteration(cfg: DPGConfig, it: int, mlflow_run_id: str) -> str:
    rollouts = sample_rollouts(cfg, it)
    groups = run_sft_groups(cfg, it, rollouts)  # one SFT run per group; on GPU workers if execution.mode=workers
    rewards = compute_advantages(cfg, it, rollouts, groups)
    generator = run_update_generator(cfg, it, rollouts, rewards)
    evaluation = evaluate_target(cfg, it, rollouts)  # Phi after SFT on all of this iteration's data
    log_iteration(cfg, it, mlflow_run_id, rewards, generator, evaluation)
    return generator


@flow(name="dpg-optimization", flow_run_name="{cfg.name}")
def optimize(cfg: DPGConfig, force: bool = False) -> str:
    """Run (or continue) the optimization described by `cfg`; returns the last generator's stage URL.

    One writer per run (tasks.lock): `force` takes over the lock of a writer that died (e.g. killed with -9).
    """
    with run_lock(run_url(cfg), cfg.storage.storage_options, force):
        prepare_run(cfg)
        mlflow_run_id = start_tracking(cfg, str(runtime.flow_run.id or ""))
        generator = ""
        try:
            for it in range(cfg.outer_iterations):
                generator = outer_iteration(cfg, it, mlflow_run_id)
        except BaseException:
            finish_tracking(cfg, mlflow_run_id, "FAILED")
            raise
        finish_tracking(cfg, mlflow_run_id)
    return generator


@flow(name="dpg-advance", flow_run_name="{cfg.name}-advance-{iterations}")
def advance(cfg: DPGConfig, iterations: int = 1) -> str:
    """Advance the optimization by `iterations` outer iterations from where it stopped (for schedules)."""
    done = completed_iterations(cfg)
    return optimize(dataclasses.replace(cfg, outer_iterations=done + iterations))
