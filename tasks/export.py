"""`dpg export`: a stored run's synthetic dataset (Parquet, a `datasets` folder, a dataset card) and its tuned
generator (LoRA merged, `save_pretrained`, registered in MLflow's model registry with its lineage)."""

from __future__ import annotations

import json
import os

from dpg.audit import human_metric
from dpg.errors import DPGError
from dpg.prompts import corpus_licence
from dpg.runconfig import DPGConfig
from tasks import io
from tasks.audit import audited_iterations, lineage_of
from tasks.stages import code_version, generator_at, run_url, stage_url

COLUMNS = ["example_id", "outer_iteration", "prompt_id", "rollout_index", "source_id", "prompt", "text", "empty",
           "generator_version", "tau", "advantage"]


def report_metrics(cfg: DPGConfig, it: int) -> dict:
    report = io.read_manifest(stage_url(cfg, it, "report"), cfg.storage.storage_options)
    return (report or {"meta": {}})["meta"].get("metrics", {})


def resolve_iteration(cfg: DPGConfig, spec: str) -> int:
    """An iteration number, `last` (the last with finished rewards) or `best` (the best human metric after SFT on
    the iteration's data, in its own direction: dpg.audit.human_metric; ties go to the earlier iteration)."""
    its = audited_iterations(cfg)
    if not its:
        raise DPGError(f"run {cfg.run_id} at {run_url(cfg)} has no finished rewards stage yet; nothing to export")
    if spec == "last":
        return its[-1]
    if spec == "best":
        scored = [(human_metric(report_metrics(cfg, it)), it) for it in its]
        scored = [(h[1] if h[2] else -h[1], it) for h, it in scored if h is not None]
        if not scored:
            raise DPGError(f"run {cfg.run_id} has no finished report stage, so no iteration is 'best'; "
                           "give --iteration K")
        return max(scored, key=lambda x: (x[0], -x[1]))[1]
    if not spec.isdigit() or int(spec) not in its:
        raise DPGError(f"--iteration {spec!r} is not a finished iteration of run {cfg.run_id}; use last, best or "
                       f"one of {', '.join(map(str, its))}")
    return int(spec)


def dataset_card(cfg: DPGConfig, it: int, rows: int, metrics: dict) -> str:
    human = human_metric(metrics)
    shown = f"{human[0]} = {human[1]:.4g}" if human else "(no human metric)"
    return f"""---
license: {corpus_licence(cfg.prompts.source)['spdx']}
tags: [synthetic, dpg, dataset-policy-gradient]
---
# Synthetic data of DPG run `{cfg.run_id}`, outer iteration {it}

{rows} completions written by the generator `{cfg.generator.source}` (version of iteration {it}) for the prompts
of `{cfg.prompts.source}`, each with its reward: `tau`, the exact metagradient dPhi/dw of the target metric
`{cfg.target.spec}` on the `{cfg.target.model}` target, and the group-normalised `advantage` the generator was
updated with.

- Source run: `{run_url(cfg)}` (config hash `{cfg.hash}`, dpg code `{code_version()}`)
- Target metric after fine-tuning on this iteration's data: Phi = {metrics.get('eval_phi', float('nan')):.6g},
  {shown}
- Prompt corpus licence: {corpus_licence(cfg.prompts.source)['text']}

Load it with `datasets.load_from_disk("dataset")` or `pandas.read_parquet("data.parquet")`; the column `text`
is what the target was fine-tuned on (empty completions are marked `empty`).

## Config

```json
{json.dumps(cfg.identity(), indent=1, sort_keys=True, default=str)}
```
"""


def export_dataset(cfg: DPGConfig, spec: str, out: str) -> dict:
    """`out`/data.parquet, `out`/dataset (datasets.save_to_disk) and `out`/README.md (the dataset card)."""
    import datasets

    it = resolve_iteration(cfg, spec)
    table = io.read_table(stage_url(cfg, it, "rewards"), "records.parquet", cfg.storage.storage_options)
    frame = table[COLUMNS].reset_index(drop=True)
    os.makedirs(out, exist_ok=True)
    frame.to_parquet(os.path.join(out, "data.parquet"), index=False)
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(os.path.join(out, "dataset"))
    metrics = report_metrics(cfg, it)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(dataset_card(cfg, it, len(frame), metrics))
    with open(os.path.join(out, "dpg_config.json"), "w") as f:  # what `dpg finetune` trains with
        json.dump({"config": cfg.to_dict(), "iteration": it}, f, indent=1)
    return {"iteration": it, "rows": len(frame), "out": os.path.abspath(out), "metrics": metrics}


def finetune(folder: str, out: str | None = None, model: str | None = None) -> dict:
    """Fine-tune a target on an exported dataset (`folder` as `export_dataset` wrote it) as the run's eval stage
    did: its target model (or `model`, a Hugging Face folder), SFT config and seed. Phi and the human metric
    before and after; the tuned model saved with save_pretrained to `out` when given."""
    import pandas as pd

    from dpg.loop import fine_tune
    from dpg.runconfig import load_config
    from tasks.stages import target_for

    path = os.path.join(folder, "dpg_config.json")
    if not os.path.isfile(path):
        raise DPGError(f"{folder!r} holds no dpg_config.json; give a folder written by `dpg export RUN --out DIR`")
    with open(path) as f:
        saved = json.load(f)
    cfg = load_config(base=saved["config"], overrides=[f"target.model={model}"] if model else [])
    texts = pd.read_parquet(os.path.join(folder, "data.parquet"))["text"].tolist()
    target_model, tokenizer, target = target_for(cfg)
    trained = fine_tune(cfg, texts, target_model, tokenizer, saved["iteration"])
    result = {"examples": len(texts) // cfg.sft.step_size * cfg.sft.step_size, "target_model": cfg.target.model,
              "target": cfg.target.spec, "before": target.report(target_model), "after": target.report(trained)}
    if out:
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
        result["out"] = os.path.abspath(out)
    return result


def export_generator(cfg: DPGConfig, spec: str, out: str, register: bool = True) -> dict:
    """The generator after iteration K's update, LoRA merged, saved by save_pretrained to `out`/generator; then
    logged to the optimization's MLflow run and registered as model `dpg-<run name>` with its lineage."""
    it = resolve_iteration(cfg, spec)
    lineage = lineage_of(cfg, it)
    model, tokenizer, _, version = generator_at(cfg, it + 1)
    if hasattr(model, "merge_and_unload"):  # peft: the adapters folded into the base weights
        model = model.merge_and_unload()
    folder = os.path.join(out, "generator")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "dpg_lineage.json"), "w") as f:
        json.dump(lineage, f, indent=1)
    result = {"iteration": it, "version": version, "out": os.path.abspath(folder), "lineage": lineage}
    if register:
        result["registered"] = register_generator(cfg, folder, lineage)
    return result


def register_generator(cfg: DPGConfig, folder: str, lineage: dict) -> dict:
    from tasks.tracking import client, find_run

    mc, run_id = client(cfg), find_run(cfg)
    if run_id is None:
        raise DPGError(f"no MLflow run of {cfg.run_id} at {mc.tracking_uri}; export with --no-register, or set "
                       "tracking.uri with --set to where the run was tracked")
    run = mc.get_run(run_id)
    last = lineage["updates"][-1]
    path = f"export/generator-iter-{last['iteration']:04d}"
    mc.log_artifacts(run.info.run_id, folder, path)
    mc.log_dict(run.info.run_id, lineage, f"{path}/lineage.json")
    name = f"dpg-{cfg.name}"
    if not mc.search_registered_models(f"name = '{name}'"):
        mc.create_registered_model(name, description=f"Generators tuned by DPG ({cfg.target.spec})")
    tags = {"dpg.run_id": cfg.run_id, "dpg.iteration": str(last["iteration"]), "dpg.generator_version":
            last["version"], "dpg.base": lineage["base"], "dpg.code": last["code"],
            "dpg.lineage": " <- ".join(u["version"] for u in reversed(lineage["updates"])) + f" <- {lineage['base']}"}
    mv = mc.create_model_version(name, f"{run.info.artifact_uri}/{path}", run_id=run.info.run_id, tags=tags)
    return {"model": name, "version": mv.version, "tracking_uri": mc.tracking_uri}
