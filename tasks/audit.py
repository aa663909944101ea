"""`dpg audit`: a stored run's records, read from its store and tabled by dpg.audit."""

from __future__ import annotations

import pandas as pd

from dpg.audit import agreement, counterfactuals, iteration_summary, sft_agreement, top_examples
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


def lineage_of(cfg: DPGConfig, it: int) -> dict:
    """The chain from the base model to the generator that iteration `it`'s update wrote: per update, the
    iteration, the version it wrote, the rollouts and advantages it learned from, the config and code."""
    chain = []
    for k in range(it + 1):
        manifest = done(cfg, stage_url(cfg, k, "generator"))
        if manifest is None:
            raise DPGError(f"the generator of iteration {k} is not stored (finished); resume the run first")
        records = io.read_table(stage_url(cfg, k, "rewards"), "records.parquet", cfg.storage.storage_options)
        chain.append({"iteration": k, "version": manifest["meta"]["version"],
                      "from_version": str(records["generator_version"].iloc[0]), "rollouts": len(records),
                      "mean_abs_advantage": float(records["advantage"].abs().mean()),
                      "records": stage_url(cfg, k, "rewards") + "/records.parquet",
                      "policy_steps": manifest["meta"]["stats"].get("steps"),
                      "config_hash": manifest["meta"].get("config_hash", cfg.hash),
                      "code": manifest["meta"].get("code", "unknown")})
    return {"run_id": cfg.run_id, "config_hash": cfg.hash, "base": cfg.generator.source, "updates": chain}


def find_generator(cfg: DPGConfig, version: str) -> int:
    """The iteration whose update wrote generator `version` (a prefix is enough when it is unique)."""
    hits = []
    for it in audited_iterations(cfg):
        manifest = done(cfg, stage_url(cfg, it, "generator"))
        if manifest and manifest["meta"]["version"].startswith(version):
            hits.append(it)
    if len(hits) != 1:
        raise DPGError(f"generator version {version!r} is {'ambiguous' if hits else 'not'} in run {cfg.run_id}"
                       + (f" (iterations {hits})" if hits else "; `dpg audit RUN` lists the versions"))
    return hits[0]


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


def verify(cfg: DPGConfig, iteration: int, k: int | None = None, subsets: int = 20, track: bool = True) -> dict:
    """dpg.audit.counterfactuals for every SFT group of `iteration` (k: leave-out size per group, default a
    quarter of the group), stored as `iter-K/verify` beside the iteration and logged to the run's MLflow run."""
    import json

    import numpy as np

    from dpg.generator import to_target_examples
    from dpg.records import Rollout
    from tasks.stages import code_version, content_digest, read_records, target_for

    if cfg.rewards.name != "dpg":
        raise DPGError(f"--verify checks metagradient rewards; run {cfg.run_id} has rewards.name="
                       f"{cfg.rewards.name!r}, whose rewards are not predictions of a Phi change")
    if iteration not in audited_iterations(cfg):
        raise DPGError(f"iteration {iteration} of run {cfg.run_id} has no finished rewards stage; nothing to verify")
    if subsets < 3:
        raise DPGError(f"--subsets={subsets} is invalid; use an integer >= 3 (a rank correlation needs them)")
    options = cfg.storage.storage_options
    rollouts = read_records(cfg, stage_url(cfg, iteration, "rollouts"), "rollouts.parquet", Rollout)
    taus = io.read_table(stage_url(cfg, iteration, "rewards"), "records.parquet",
                         options).set_index("example_id")["tau"]
    model, tokenizer, target = target_for(cfg)
    groups = []
    for group in sorted({r.group_id for r in rollouts}):
        members = [r for r in rollouts if r.group_id == group]
        ids, mask, _, _ = to_target_examples(members, tokenizer, cfg.sft.max_len)
        tau = np.array([taus[r.example_id] for r in members], dtype=np.float64)
        rng = np.random.default_rng([cfg.seed, iteration, group, 0x7e51f7])
        result = counterfactuals(model, ids, mask, target, cfg.sft, tau, k or max(1, len(members) // 4), subsets,
                                 rng)
        result["left_out_ids"] = {name: [members[i].example_id for i in result[name]["left_out"]]
                                  for name in ("proponents", "opponents", "random")}
        groups.append({"sft_group": group, **result})
    summary = {name: {"actual": float(sum(g[name]["actual"] for g in groups)),
                      "predicted": float(sum(g[name]["predicted"] for g in groups))}
               for name in ("proponents", "opponents", "random")}
    summary["lds_mean"] = float(np.nanmean([g["subsets"]["lds"] for g in groups]))
    out = {"run_id": cfg.run_id, "iteration": iteration, "subsets": subsets, "groups": groups, "summary": summary}
    url = stage_url(cfg, iteration, "verify")
    rewards = done(cfg, stage_url(cfg, iteration, "rewards"))
    inputs = {"config": cfg.hash, f"iter-{iteration:04d}/rewards": content_digest(rewards)}
    io.write_stage(url, {"verify.json": json.dumps(out, indent=1).encode()},
                   {"config_hash": cfg.hash, "inputs": inputs, "code": code_version(), "summary": summary}, options)
    if track:
        from tasks.tracking import client, find_run

        mc, run_id = client(cfg), find_run(cfg)
        if run_id:
            for name in ("proponents", "opponents", "random"):
                for kind in ("actual", "predicted"):
                    mc.log_metric(run_id, f"verify_{name}_{kind}", summary[name][kind], step=iteration)
            mc.log_metric(run_id, "verify_lds", summary["lds_mean"], step=iteration)
            mc.log_dict(run_id, out, f"verify/iter-{iteration:04d}.json")
    return out


def stored_verify(cfg: DPGConfig) -> list[dict]:
    """Every iteration's stored verify results, in order."""
    import json

    out = []
    for it in audited_iterations(cfg):
        url = stage_url(cfg, it, "verify")
        manifest = io.read_manifest(url, cfg.storage.storage_options)
        if manifest:
            out.append(json.loads(io.read_file(url, "verify.json", cfg.storage.storage_options, manifest)))
    return out
