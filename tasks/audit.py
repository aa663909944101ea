"""`dpg audit`: a stored run's records, read from its store and tabled by dpg.audit."""

from __future__ import annotations

import pandas as pd

from dpg.audit import agreement, iteration_summary, sft_agreement, top_examples
from dpg.errors import DPGError
from dpg.runconfig import DPGConfig
from tasks import io
from tasks.stages import done, run_url, stage_url


def audited_iterations(cfg: DPGConfig) -> list[int]:
    """The iterations whose rewards stage is complete, in order."""
    fs, root = io.filesystem(run_url(cfg), cfg.storage.storage_options)
    stored = sorted(int(p.rstrip("/").rsplit("iter-", 1)[1]) for p in fs.glob(f"{root}/iter-*")
                    if p.rstrip("/").rsplit("iter-", 1)[1].isdigit())
    return [it for it in stored if done(cfg, stage_url(cfg, it, "rewards"))]


def audit(cfg: DPGConfig, iteration: int | None = None, top: int = 5) -> dict:
    """Top proponents and opponents (by tau and by advantage), the SFT runs' first-order agreement and |tau|
    concentration, for one iteration or (None) the whole run, plus every iteration's summary."""
    options = cfg.storage.storage_options
    its = audited_iterations(cfg)
    if not its:
        raise DPGError(f"run {cfg.run_id} at {run_url(cfg)} has no finished rewards stage yet; nothing to audit")
    if iteration is not None and iteration not in its:
        raise DPGError(f"iteration {iteration} of run {cfg.run_id} has no finished rewards stage; finished: "
                       + ", ".join(map(str, its)))
    records, runs, summaries = [], [], []
    for it in its:
        url = stage_url(cfg, it, "rewards")
        table = io.read_table(url, "records.parquet", options)
        report = io.read_manifest(stage_url(cfg, it, "report"), options)
        summaries.append(iteration_summary(table, (report or {"meta": {}})["meta"].get("metrics", {})))
        if iteration in (None, it):
            records.append(table)
            runs.append(io.read_table(url, "sft_runs.parquet", options))
    records, runs = pd.concat(records, ignore_index=True), pd.concat(runs, ignore_index=True)
    sft = sft_agreement(records, runs) if len(runs) else []
    return {"run_id": cfg.run_id, "store": run_url(cfg), "iteration": iteration, "top": top,
            "by_tau": top_examples(records, top, "tau"), "by_advantage": top_examples(records, top, "advantage"),
            "sft_runs": sft, "agreement": agreement(sft), "iterations": summaries}
