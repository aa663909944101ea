"""Prefect tasks, one per stage of an outer iteration. Each reads its inputs by URI, calls one dpg.loop
function and writes its records as a stage (content-addressed files + a manifest written last).

Idempotent by construction: a task whose stage already has a verified manifest returns it without
recomputing, so a retried task, `prefect flow-run retry`, `dpg resume` or a rerun of the same config all
continue from the first incomplete stage. The manifests are the cache (PITFALLS: Prefect's default cache
only lives within one flow run), so the tasks use `NO_CACHE`. Only storage-bound work gets retries.

Lineage: every manifest's meta holds `inputs`, what the stage was computed from (the config identity and the
content digest of each upstream stage, `upstream`), and `code` (dpg's version and git commit, recorded for
audit, not compared: upgrading dpg mid-run does not recompute finished work). A stage whose recorded inputs
differ from its upstream stages' current content counts as not done, so a recomputed stage that produced new
data is followed by everything computed from it; one that reproduced the same bytes is not.
"""

from __future__ import annotations

import copy
import functools
import io as stdio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dpg import loop
from dpg.errors import DPGError
from dpg.generator import load_generator, target_rows
from dpg.models import resolve_device, seeded
from dpg.policy import load_policy_state, policy_optimizer, save_policy_state
from dpg.records import Reward, Rollout, SFTRun, as_rows
from dpg.runconfig import NOT_IDENTITY, DPGConfig, differing_keys
from tasks import io

TARGET_FILE = "model.safetensors"


def run_url(cfg: DPGConfig) -> str:
    return io.join(cfg.storage.url, cfg.run_id)


def stage_url(cfg: DPGConfig, it: int, name: str) -> str:
    return io.join(run_url(cfg), f"iter-{it:04d}", name)


def stage_names(cfg: DPGConfig) -> list[str]:
    """The stages of one outer iteration, in the order they run."""
    return ["rollouts", *(f"sft-g{g}" for g in loop.group_ids(cfg)), "rewards", "generator", "eval", "report"]


def stage_of(cfg: DPGConfig, url: str) -> tuple[int, str]:
    """(iteration, stage name) of a stage URL of this run."""
    folder, name = url.rstrip("/").split("/")[-2:]
    if not folder.startswith("iter-") or stage_url(cfg, int(folder[5:]), name) != url:
        raise DPGError(f"{url} is not a stage of run {cfg.run_id} at {run_url(cfg)}")
    return int(folder[5:]), name


def upstream(cfg: DPGConfig, it: int, name: str) -> list[tuple[int, str]]:
    """The stages (iteration, name) whose records stage `name` of iteration `it` is computed from."""
    before = [(it - 1, "generator")] if it > 0 else []
    if name == "rollouts":
        return before
    if name.startswith("sft-g"):
        return [(it, "rollouts")]
    if name == "eval":  # the fresh eval samples from the generator of the iteration's rollouts
        return [(it, "rollouts"), *(before if loop.fresh_due(cfg, it) else [])]
    if name == "rewards":  # the previous rewards: flat batches in a row
        return [(it, "rollouts"), *((it, f"sft-g{g}") for g in loop.group_ids(cfg)),
                *([(it - 1, "rewards")] if it > 0 else [])]
    if name == "generator":
        return [(it, "rollouts"), (it, "rewards"), *before]
    if name == "report":
        return [(it, "rewards"), (it, "generator"), (it, "eval")]
    raise DPGError(f"unknown stage {name!r}")


def content_digest(manifest: dict) -> str:
    """Digest of a stage's content (its files' digests), independent of when and how fast it was written."""
    return io.digest(json.dumps({k: v["sha256"] for k, v in manifest["files"].items()}, sort_keys=True).encode())[:16]


def stage_inputs(cfg: DPGConfig, it: int, name: str) -> dict[str, str]:
    """{"config": identity hash, "iter-0003/rollouts": content digest, ...} of the stage's current inputs."""
    inputs = {"config": cfg.hash}
    for i, n in upstream(cfg, it, name):
        manifest = io.read_manifest(stage_url(cfg, i, n), cfg.storage.storage_options)
        inputs[f"iter-{i:04d}/{n}"] = content_digest(manifest) if manifest else "missing"
    return inputs


def stage_state(cfg: DPGConfig, it: int, name: str) -> tuple[dict | None, str]:
    """(manifest if the stage counts as done, else None; why, in a few words)."""
    url, options = stage_url(cfg, it, name), cfg.storage.storage_options
    manifest = io.read_manifest(url, options)
    if manifest is None:
        return None, "not written" if not io.exists(io.join(url, io.MANIFEST), options) else "unreadable manifest"
    if io.verify_stage(url, options) is None:
        return None, "a file is missing or does not match its digest"
    recorded = manifest["meta"].get("inputs")
    if recorded is None:  # written before manifests recorded their inputs
        return manifest, "done (no lineage recorded)"
    current = stage_inputs(cfg, it, name)
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if changed:
        return None, "inputs changed: " + ", ".join(changed)
    return manifest, "done"


def done(cfg: DPGConfig, url: str) -> dict | None:
    """The stage's manifest if it is complete, verified and computed from the current upstream records."""
    it, name = stage_of(cfg, url)
    manifest, why = stage_state(cfg, it, name)
    if manifest is None and why not in ("not written",):
        logging.getLogger("dpg.store").warning("%s: %s; recomputing it", url, why)
    return manifest


def lineage(cfg: DPGConfig, it: int, name: str) -> dict:
    """The meta keys every stage records: its inputs and the code that computed it."""
    return {"config_hash": cfg.hash, "inputs": stage_inputs(cfg, it, name), "code": code_version()}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    import dpg
    from tasks.tracking import git_sha

    return f"dpg {dpg.__version__} git {git_sha()}"


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def completed_iterations(cfg: DPGConfig) -> int:
    """How many outer iterations of this run are finished (their report stage is complete), counting from 0."""
    it = 0
    while io.read_manifest(stage_url(cfg, it, "report"), cfg.storage.storage_options) is not None:
        it += 1
    return it


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_run(cfg: DPGConfig) -> str:
    """Write the run's config.json, or check that an existing run has the same identity (resume)."""
    url, options = io.join(run_url(cfg), "config.json"), cfg.storage.storage_options
    try:
        stored = json.loads(io.read_bytes(url, options))
    except FileNotFoundError:
        io.write_bytes(url, json.dumps(cfg.to_dict(), indent=1, sort_keys=True, default=str).encode(), options)
        store_target(cfg)
        return run_url(cfg)
    keys = differing_keys({k: v for k, v in stored.items() if k not in NOT_IDENTITY}, cfg.identity())
    if keys:
        raise DPGError(f"run {cfg.run_id} at {run_url(cfg)} was started with a different config "
                       f"({', '.join(keys)}); resume with the original config or start a new run")
    store_target(cfg)
    return run_url(cfg)


# --- models, cached per process (loading SmolLM2 from GGUF takes ~20 s) ---------------------------------


def stage_device(cfg: DPGConfig) -> str:
    """execution.device resolved in this process (each worker resolves `auto` on its own machine)."""
    return str(resolve_device(cfg.execution.device))


@functools.lru_cache(maxsize=2)
def _base_generator(source: str, lora_rank: int | None, lora_alpha: float | None, seed: int = 0, toy: str = "{}",
                    device: str = "cpu"):
    """The initial generator on `device`; its LoRA adapters (and a toy's weights) are drawn on the CPU from `seed`,
    the run's seed."""
    model, tokenizer = load_generator(source, lora_rank, lora_alpha, seed=seed, toy=json.loads(toy))
    return model.to(device), tokenizer


def base_generator(cfg: DPGConfig, device: str | None = None):
    """(generator, tokenizer) before any update, on `device` (None: execution.device)."""
    g = cfg.generator
    return _base_generator(g.source, g.lora_rank, g.lora_alpha, cfg.seed, json.dumps(g.toy, sort_keys=True),
                           device or stage_device(cfg))


_targets: dict[tuple[str, str, str], tuple] = {}  # this process's targets, the last two asked for


def _load_target(cfg: DPGConfig, device: str):
    state, url, options = None, stored_target(cfg), cfg.storage.storage_options
    manifest = io.read_manifest(url, options) if url else None
    if manifest is not None and manifest["meta"].get("inputs") == target_inputs(cfg):
        from safetensors.torch import load

        try:  # read once; read_file checks the digest (stored_target_manifest would read the weights twice)
            state = load(io.read_file(url, TARGET_FILE, options, manifest))
        except (DPGError, FileNotFoundError):
            state = None  # missing or corrupted: pretrain again, as for no stored target
    return loop.load_target(cfg, base_generator(cfg, device)[1], device, state)


def stored_target_manifest(cfg: DPGConfig) -> dict | None:
    """The manifest of the run's stored target when it is complete, intact and built from this config's inputs."""
    url = stored_target(cfg)
    manifest = io.verify_stage(url, cfg.storage.storage_options) if url else None
    return manifest if manifest is not None and manifest["meta"].get("inputs") == target_inputs(cfg) else None


def target_inputs(cfg: DPGConfig) -> dict:
    """What the target is built from (load_target): seed, target, generator (its tokenizer), prompts (the corpus)."""
    return json.loads(json.dumps({k: cfg.to_dict()[k] for k in ("seed", "target", "generator", "prompts")},
                                 sort_keys=True, default=str))


def stored_target(cfg: DPGConfig) -> str:
    """The run-level stage that holds a pretrained `tiny` target's weights, or "" when the target is not one."""
    pretrained = cfg.target.model == "tiny" and cfg.target.tiny_pretrain_steps > 0
    return io.join(run_url(cfg), "target") if pretrained else ""


def target_for(cfg: DPGConfig, device: str | None = None):
    """(target model, tokenizer, Phi) on `device` (None: execution.device), cached for this process. A pretrained
    `tiny` target is loaded from its run's `target` stage when store_target wrote it, and pretrained otherwise."""
    key = (json.dumps(target_inputs(cfg), sort_keys=True), device or stage_device(cfg), stored_target(cfg))
    if key not in _targets:
        if len(_targets) >= 2:
            _targets.pop(next(iter(_targets)))
        _targets[key] = _load_target(cfg, key[1])
    return _targets[key]


def store_target(cfg: DPGConfig) -> None:
    """Store a pretrained `tiny` target's weights with the run (`<run>/target/`) unless they are there: a resumed
    run, every worker process, audit, export and finetune load them in place of pretraining again."""
    if not stored_target(cfg) or stored_target_manifest(cfg) is not None:
        return
    from safetensors.torch import save

    model = target_for(cfg, preflight_device(cfg))[0]
    io.write_stage(stored_target(cfg), {TARGET_FILE: save(loop.tiny_state(model))},
                   {"inputs": target_inputs(cfg), "code": code_version()}, cfg.storage.storage_options)


def preflight_device(cfg: DPGConfig) -> str:
    """Where the flow's own process builds the models: execution.device inline; the CPU when workers run the stages."""
    return stage_device(cfg) if cfg.execution.mode == "inline" else "cpu"


def generator_at(cfg: DPGConfig, it: int):
    """(model, tokenizer, optimizer, version) of the generator that samples iteration `it`."""
    base, tokenizer = base_generator(cfg)
    model = copy.deepcopy(base)
    optimizer = policy_optimizer(model, cfg.policy)
    version = "base"
    if it > 0:
        url = stage_url(cfg, it - 1, "generator")
        manifest = done(cfg, url)
        if manifest is None:
            raise DPGError(f"iteration {it} needs the generator of iteration {it - 1}, but {url} is incomplete; "
                           "resume the run so that it is recomputed")
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):  # the RNG it stores stays there
            for name in manifest["files"]:
                Path(tmp, name).write_bytes(io.read_file(url, name, cfg.storage.storage_options, manifest))
            load_policy_state(tmp, model, optimizer)
        version = manifest["meta"]["version"]
    return model, tokenizer, optimizer, version


def read_records(cfg: DPGConfig, url: str, name: str, cls) -> list:
    """Records of type `cls` from a stage's Parquet file (numpy values back to plain Python)."""
    frame = io.read_table(url, name, cfg.storage.storage_options)
    plain = lambda v: v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v
    return [cls(**{k: plain(v) for k, v in row.items()}) for row in frame.to_dict("records")]


# --- before any flow starts ----------------------------------------------------------------------------------

GOAL_REWARDS = {"levenshtein": "the goal text, e.g. a UUID", "embedding": "the goal text",
                "langid": "a language code, e.g. fr"}


def preflight(cfg: DPGConfig, models: bool = True) -> None:
    """Every check that can fail on the inputs, before a flow starts: one DPGError, nothing written.

    The reward resolves and has its goal; the prompt corpus reads, with its column and rows; the text metrics
    parse; with `models`, the generator and the target load (both stay cached for this process's stages), the
    template and max_prompt_tokens fit, a completion fits sft.max_len; the store takes a write; the tracking
    URI (when one is set) answers.
    """
    from dpg.rewards import get_reward, needs_ids, needs_sft
    from dpg.textmetrics import text_metrics

    reward = get_reward(cfg.rewards.name)
    if cfg.rewards.name in GOAL_REWARDS and not cfg.rewards.goal:
        raise DPGError(f"rewards.name={cfg.rewards.name!r} needs rewards.goal ({GOAL_REWARDS[cfg.rewards.name]})")
    if not needs_sft(reward):  # a text reward scores a probe text now, not after the first sampling
        extra = {"example_ids": ["probe"], "seed": cfg.seed, "outer_iteration": 0} if needs_ids(reward) else {}
        reward(["a probe text"], cfg.rewards.goal, **extra)
    texts = loop.corpus(cfg)
    if not texts:
        raise DPGError(f"prompts.source={cfg.prompts.source!r} holds no text in column "
                       f"{cfg.prompts.text_column!r}; give a corpus with at least one non-blank text")
    text_metrics(["a probe text"], list(cfg.target.text_metrics))
    if models:  # inline, the stages of this process use these; a worker resolves execution.device itself
        device = preflight_device(cfg)
        _, tokenizer = base_generator(cfg, device)
        loop.select_prompts(cfg, 0, tokenizer)  # the template's slot, max_prompt_tokens
        _, target_tokenizer, _ = target_for(cfg, device)
        if cfg.target.model == "tiny" or target_tokenizer is tokenizer:  # one tokenizer: the bound is exact
            extra = len(target_tokenizer("a")["input_ids"]) - len(target_tokenizer("a", add_special_tokens=False)[
                "input_ids"]) + int(target_tokenizer.eos_token_id is not None)
            if cfg.rollouts.max_new_tokens + extra > cfg.sft.max_len:
                raise DPGError(f"rollouts.max_new_tokens={cfg.rollouts.max_new_tokens} (+{extra} special token(s)) "
                               f"does not fit sft.max_len={cfg.sft.max_len}: completions would be cut before the "
                               f"SFT; raise sft.max_len to {cfg.rollouts.max_new_tokens + extra} or lower "
                               "max_new_tokens")
    probe = io.join(cfg.storage.url, f".dpg-write-probe-{os.getpid()}")
    io.write_bytes(probe, b"", cfg.storage.storage_options)
    io.remove(probe, cfg.storage.storage_options)
    if cfg.tracking.uri:
        from tasks.tracking import client

        try:
            client(cfg).search_experiments(max_results=1)
        except Exception as e:  # unknown scheme (KeyError), connection refused, ...
            raise DPGError(f"MLflow tracking at {cfg.tracking.uri} is unusable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}); start it or fix "
                           "tracking.uri") from None


# --- the stages ---------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def sample_rollouts(cfg: DPGConfig, it: int) -> str:
    url = stage_url(cfg, it, "rollouts")
    if done(cfg, url):
        return url
    model, tokenizer, _, version = generator_at(cfg, it)
    start = time.perf_counter()
    rollouts = loop.sample(cfg, it, model, tokenizer, version)
    seconds = time.perf_counter() - start
    io.write_stage(url, {"rollouts.parquet": pd.DataFrame(as_rows(rollouts))},
                   {**lineage(cfg, it, "rollouts"), "n": len(rollouts), "seconds": seconds},
                   cfg.storage.storage_options)
    get_run_logger().info("iteration %d: %d rollouts in %.1f s", it, len(rollouts), seconds)
    return url


@task(cache_policy=NO_CACHE)
def sft_group(cfg: DPGConfig, it: int, rollouts_url: str, group: int) -> str:
    """Differentiable SFT of the target on one group + per-example attribution rewards."""
    url = stage_url(cfg, it, f"sft-g{group}")
    if done(cfg, url):
        return url
    rollouts = read_records(cfg, rollouts_url, "rollouts.parquet", Rollout)
    start = time.perf_counter()
    if cfg.execution.attribution_ranks > 1:
        from dpg.parallel import launch

        taus, run, credit, lengths = launch(cfg.execution.attribution_ranks, rank_group_rewards, cfg, rollouts,
                                            group)[0]
    else:
        taus, run, credit, lengths = rank_group_rewards(None, 0, cfg, rollouts, group)
    seconds = time.perf_counter() - start
    frame = pd.DataFrame({"example_id": list(taus), "tau": list(taus.values())})
    frame["target_tokens"] = lengths
    if credit:  # token credit: one value per generator token, [] for an empty completion
        frame["credit"] = [credit.get(k, []) for k in taus]
    files = {"tau.parquet": frame}
    if run is not None:
        files["sft.json"] = json.dumps(as_rows([run])[0]).encode()
    io.write_stage(url, files, {**lineage(cfg, it, f"sft-g{group}"), "group": group, "seconds": seconds},
                   cfg.storage.storage_options)
    get_run_logger().info("iteration %d, group %d: %d rewards in %.1f s", it, group, len(taus), seconds)
    return url


def rank_group_rewards(process_group, rank: int, cfg: DPGConfig, rollouts: list[Rollout], group: int):
    """One SFT group's (taus, SFT run, credit, target tokens per rollout), in this process (no `process_group`)
    or as one rank of a data-parallel group (dpg.parallel.launch: its own target, its own GPU with NCCL)."""
    import torch.distributed as dist

    device = None if process_group is None else \
        f"cuda:{rank}" if dist.get_backend(process_group) == "nccl" else "cpu"
    model, tokenizer, target = target_for(cfg, device)
    taus, run, credit = loop.group_rewards(cfg, rollouts, group, model, tokenizer, target,
                                           process_group=process_group)
    members = {r.example_id: r for r in rollouts if r.group_id == group}
    lengths = [len(row) for row in target_rows([members[k] for k in taus], tokenizer, cfg.sft.max_len)]
    return taus, run, credit, lengths


def flat_in_a_row(cfg: DPGConfig, it: int) -> int:
    """Flat batches in a row that end with iteration `it`, from its stored rewards stage (0 before iteration 0)."""
    manifest = io.read_manifest(stage_url(cfg, it, "rewards"), cfg.storage.storage_options) if it >= 0 else None
    return int(manifest["meta"]["metrics"].get("flat_batches_in_a_row", 0)) if manifest else 0


@task(cache_policy=NO_CACHE)
def compute_advantages(cfg: DPGConfig, it: int, rollouts_url: str, group_urls: list[str]) -> str:
    """Join the groups' rewards, normalise them, and write the audit table (rollouts + rewards, one row each).

    Metrics add flat_batches_in_a_row (from the previous iteration's stored metrics, so resume counts alike);
    the run stops here, also when resumed, at the rewards.max_flat_batches-th flat batch in a row.
    """
    url = stage_url(cfg, it, "rewards")
    if done(cfg, url):
        loop.check_flat_batches(cfg, it, flat_in_a_row(cfg, it))
        return url
    options = cfg.storage.storage_options
    rollouts = read_records(cfg, rollouts_url, "rollouts.parquet", Rollout)
    taus, runs, credit, lengths = {}, [], {}, {}
    for g in group_urls:
        manifest = done(cfg, g)
        frame = io.read_table(g, "tau.parquet", options)
        taus.update(zip(frame["example_id"], frame["tau"].astype(float)))
        if "target_tokens" in frame:  # not in stages written by dpg <= 0.1
            lengths.update(zip(frame["example_id"], frame["target_tokens"].astype(int)))
        if "credit" in frame:
            credit.update((k, list(map(float, v))) for k, v in zip(frame["example_id"], frame["credit"]) if len(v))
        if "sft.json" in manifest["files"]:
            runs.append(SFTRun(**json.loads(io.read_file(g, "sft.json", options, manifest))))
    rewards = loop.advantages(cfg, rollouts, taus, credit, lengths)
    table = pd.DataFrame(as_rows(rollouts)).merge(
        pd.DataFrame(as_rows(rewards)).drop(columns=["outer_iteration", "group_id"]), on="example_id",
        validate="one_to_one")
    table["n_tokens"] = table["token_ids"].map(len)
    metrics = loop.summary(rewards, runs)
    metrics["flat_batches_in_a_row"] = float(flat_in_a_row(cfg, it - 1) + 1 if metrics["flat_batch"] else 0)
    io.write_stage(url, {"rewards.parquet": pd.DataFrame(as_rows(rewards)), "records.parquet": table,
                         "sft_runs.parquet": pd.DataFrame(as_rows(runs))},
                   {**lineage(cfg, it, "rewards"), "metrics": metrics}, options)
    if metrics["empty_completions"]:
        get_run_logger().warning("iteration %d: %d empty completion(s) got no reward (tau NaN, advantage 0)", it,
                                 int(metrics["empty_completions"]))
    loop.check_flat_batches(cfg, it, int(metrics["flat_batches_in_a_row"]))
    return url


@task(cache_policy=NO_CACHE)
def evaluate_target(cfg: DPGConfig, it: int, rollouts_url: str) -> str:
    """Phi and its human metric after SFT on all of the iteration's data, plus pictures (e.g. the patch); where the
    fresh eval is due (target.eval_fresh), the same after SFT on new completions of the generator (fresh.parquet)."""
    url = stage_url(cfg, it, "eval")
    if done(cfg, url):
        return url
    rollouts = read_records(cfg, rollouts_url, "rollouts.parquet", Rollout)
    model, tokenizer, target = target_for(cfg)
    metrics, pictures = loop.evaluate(cfg, rollouts, model, tokenizer, target)
    files = {}
    if loop.fresh_due(cfg, it):
        start = time.perf_counter()
        generator, generator_tokenizer, _, version = generator_at(cfg, it)
        fresh = loop.sample_fresh(cfg, it, generator, generator_tokenizer, version)
        metrics |= loop.evaluate_fresh(cfg, fresh, model, tokenizer, target)
        files["fresh.parquet"] = pd.DataFrame(as_rows(fresh))
        get_run_logger().info("iteration %d: fresh eval on %d new completions in %.1f s: %s", it, len(fresh),
                              time.perf_counter() - start,
                              {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_fresh_")})
    files["metrics.json"] = json.dumps(metrics).encode()
    for name, array in pictures.items():
        buffer = stdio.BytesIO()
        np.save(buffer, array)
        files[f"{name}.npy"] = buffer.getvalue()
    io.write_stage(url, files, {**lineage(cfg, it, "eval"), "metrics": metrics}, cfg.storage.storage_options)
    return url


@task(cache_policy=NO_CACHE)
def update_generator(cfg: DPGConfig, it: int, rollouts_url: str, rewards_url: str) -> str:
    url = stage_url(cfg, it, "generator")
    if done(cfg, url):
        return url
    rollouts = read_records(cfg, rollouts_url, "rollouts.parquet", Rollout)
    rewards = read_records(cfg, rewards_url, "rewards.parquet", Reward)
    options, start = cfg.storage.storage_options, time.perf_counter()
    if loop.is_flat(rewards) and it > 0:  # no update: iteration it-1's state, file for file (the same version)
        previous = stage_url(cfg, it - 1, "generator")
        manifest = done(cfg, previous)
        if manifest is None:
            raise DPGError(f"iteration {it} keeps the generator of iteration {it - 1}, but {previous} is incomplete; "
                           "resume the run so that it is recomputed")
        files = {name: io.read_file(previous, name, options, manifest) for name in manifest["files"]}
        stats, version = {"skipped": 1.0}, manifest["meta"]["version"]
    else:
        model, _, optimizer, _ = generator_at(cfg, it)
        ref = base_generator(cfg)[0].eval() if loop.needs_reference(cfg) else None  # the KL anchor's initial generator
        # the update's draws (if any) and the RNG state saved with the policy: a function of the run, not the process
        with seeded(loop.stage_seed(cfg.seed, it, "generator")), tempfile.TemporaryDirectory() as tmp:
            stats = loop.update(cfg, model, optimizer, rollouts, rewards, ref)  # {"skipped": 1.0} for a flat batch
            state = save_policy_state(Path(tmp, "state"), model, optimizer, {"outer_iteration": it})
            files = {p.name: p.read_bytes() for p in sorted(state.iterdir())}
        version = io.digest(b"".join(files.values()))[:16]
    seconds = time.perf_counter() - start
    io.write_stage(url, files, {**lineage(cfg, it, "generator"), "version": version, "stats": stats,
                                "seconds": seconds}, options)
    if stats.get("skipped"):
        get_run_logger().warning("iteration %d: a flat batch (no reward spread): the generator update is skipped, "
                                 "the generator stays at version %s", it, version)
    else:
        get_run_logger().info("iteration %d: generator update %s in %.1f s", it, stats, seconds)
    return url
