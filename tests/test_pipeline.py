"""The pipeline end to end on tiny models: real Prefect flow runs, real MLflow (sqlite), Parquet on a real S3
API (moto on 127.0.0.1) and on a local folder; resume after a failure recomputes nothing that was finished."""

import dataclasses
import json

import pandas as pd
import pytest
from conftest import WORDS

import dpg.loop
from dpg.runconfig import load_config
from tasks import io
from tasks.stages import run_url, stage_url
from tasks.tracking import tracking_uri

STAGES = ["rollouts", "sft-g0", "sft-g1", "rewards", "generator", "eval", "report"]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.parquet"
    rows = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(12)) for i in range(6)]
    pd.DataFrame({"text": rows}).to_parquet(path)
    return str(path)


def tiny_config(generator_dir, texts_file, store, tracking, **extra):
    overrides = [f"generator.source={generator_dir}", f"prompts.source={texts_file}", "prompts.per_iteration=2",
                 "prompts.max_prompt_tokens=40", "rollouts.n_rollouts=2", "rollouts.max_new_tokens=6",
                 "target.tiny_hidden=32", "target.tiny_layers=1", "sft.microbatch=1", "sft.max_len=12",
                 "sft.lr=0.5", "policy.lr=1e-3", "outer_iterations=2", f"storage.url={store}",
                 f"tracking.uri={tracking}",
                 # the main profile's patch placement, target pretraining and credit, back to the plain defaults
                 "target.options={}", "target.tiny_pretrain_steps=0", "rewards.credit=sequence",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


def test_the_main_profiles_patch_sits_on_the_prompt_corpus_commonest_tokens(tiny_generator_dir, texts_file,
                                                                           tmp_path):
    from dpg.generator import load_generator
    from dpg.targets import commonest_tokens

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"target.options": '{"token_ids": "commonest"}'})
    _, tokenizer = load_generator(tiny_generator_dir)
    _, _, target = dpg.loop.load_target(cfg, tokenizer)
    texts = pd.read_parquet(texts_file)["text"].tolist()
    assert list(target.token_ids) == commonest_tokens("pattern:67", tokenizer, texts, 7)
    assert len(set(target.token_ids)) == 7 and min(target.token_ids) >= 3  # no <pad>, <eos>, <unk>


def stage_digests(cfg, it, name):
    manifest = io.read_manifest(stage_url(cfg, it, name), cfg.storage.storage_options)
    return {k: v["sha256"] for k, v in manifest["files"].items()}, manifest["written_at"]


def test_two_iterations_on_s3_with_mlflow(prefect_harness, s3_server, tiny_generator_dir, texts_file, tmp_path):
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, "s3://dpg-test/e2e", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = load_config(None, [f"storage.storage_options={json.dumps(s3_server)}"], base=cfg.to_dict())
    optimize(cfg)
    options = cfg.storage.storage_options
    assert json.loads(io.read_bytes(io.join(run_url(cfg), "config.json"), options))["name"] == "dpg"
    for it in range(2):
        for name in STAGES:
            assert io.verify_stage(stage_url(cfg, it, name), options), (it, name)
        rollouts = io.read_table(stage_url(cfg, it, "rollouts"), "rollouts.parquet", options)
        records = io.read_table(stage_url(cfg, it, "rewards"), "records.parquet", options)
        assert len(rollouts) == len(records) == 4 and records["example_id"].is_unique
        assert set(records["example_id"]) == set(rollouts["example_id"])  # rewards join rollouts one-to-one
        assert records["tau"].dtype == "float64" and records["advantage"].notna().all()
        runs = io.read_table(stage_url(cfg, it, "rewards"), "sft_runs.parquet", options)
        assert sorted(runs["group_id"]) == [0, 1]

    from mlflow.tracking import MlflowClient

    mc = MlflowClient(tracking_uri=tracking_uri(cfg))
    [run] = mc.search_runs([mc.get_experiment_by_name("dpg").experiment_id], f"tags.`dpg.run_id` = '{cfg.run_id}'")
    assert run.info.status == "FINISHED" and run.data.params["sft.lr"] == "0.5"
    assert run.data.tags["dpg.config_hash"] == cfg.hash and "prefect.flow_run_id" in run.data.tags
    assert [m.step for m in mc.get_metric_history(run.info.run_id, "phi_after")] == [0, 1]
    assert "phi_over_iterations.png" in [a.path for a in mc.list_artifacts(run.info.run_id)]
    assert [a.path for a in mc.list_artifacts(run.info.run_id, "patches")] == \
        ["patches/patch_iter_0000.png", "patches/patch_iter_0001.png"]
    assert 0 <= run.data.metrics["eval_pixel_accuracy"] <= 1
    assert len(run.inputs.dataset_inputs) == 2


def test_resume_after_failure_recomputes_nothing_and_matches_uninterrupted_run(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch):
    from flows.optimize import optimize

    straight = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "a"), f"sqlite:///{tmp_path}/a.db")
    optimize(straight)

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "b"), f"sqlite:///{tmp_path}/b.db")
    real = dpg.loop.group_rewards

    def fail_in_iteration_1(cfg_, rollouts, group, *args, **kwargs):
        if rollouts[0].outer_iteration == 1 and group == 1:
            raise RuntimeError("injected failure inside iteration 2's SFT stage")
        return real(cfg_, rollouts, group, *args, **kwargs)

    monkeypatch.setattr(dpg.loop, "group_rewards", fail_in_iteration_1)
    with pytest.raises(RuntimeError, match="injected failure"):
        optimize(cfg)
    finished = {(it, n): stage_digests(cfg, it, n) for it in range(2) for n in STAGES
                if io.read_manifest(stage_url(cfg, it, n)) is not None}
    assert (1, "sft-g0") in finished and (1, "sft-g1") not in finished and (1, "rewards") not in finished

    calls = []
    monkeypatch.setattr(dpg.loop, "group_rewards", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(dpg.loop, "sample", lambda *a, **k: pytest.fail("finished sampling was recomputed"))
    optimize(cfg)
    assert calls == [1]  # only the failed group ran again
    for key, (digests, written_at) in finished.items():
        assert stage_digests(cfg, *key) == (digests, written_at), key  # untouched
    for it in range(2):
        for name in ("rollouts", "sft-g0", "sft-g1", "rewards", "generator"):
            assert stage_digests(cfg, it, name)[0] == stage_digests(straight, it, name)[0], (it, name)


def test_a_pretrained_target_is_stored_with_the_run_and_a_resume_loads_it_instead_of_pretraining(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch):
    import torch

    import tasks.stages
    from flows.optimize import optimize
    from tasks.stages import stored_target, target_for, target_inputs

    pretrained = {"target.tiny_pretrain_steps": 5}
    straight = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "a"), f"sqlite:///{tmp_path}/a.db",
                           **pretrained)
    optimize(straight)
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "b"), f"sqlite:///{tmp_path}/b.db",
                      **pretrained, outer_iterations=1)
    optimize(cfg)
    manifest = io.verify_stage(stored_target(cfg))
    assert manifest is not None and manifest["meta"]["inputs"] == target_inputs(cfg)
    weights = {k: v.clone() for k, v in target_for(cfg)[0].state_dict().items()}  # pretrained in this process

    tasks.stages._targets.clear()  # as a new process (a resume, a worker, `dpg audit`) would start
    monkeypatch.setattr(dpg.loop, "pretrain", lambda *a, **k: pytest.fail("the stored target was pretrained again"))
    reads, read_bytes = [], io.read_bytes
    monkeypatch.setattr(io, "read_bytes", lambda url, *a, **k: reads.append(url) or read_bytes(url, *a, **k))
    loaded = target_for(cfg)[0].state_dict()
    assert len([u for u in reads if u.startswith(stored_target(cfg)) and not u.endswith("manifest.json")]) == 1
    assert weights.keys() == loaded.keys() and all(torch.equal(weights[k], loaded[k]) for k in weights)
    optimize(dataclasses.replace(cfg, outer_iterations=2))  # resumed to a second iteration
    for name in ("rollouts", "sft-g0", "sft-g1", "rewards", "generator", "eval"):
        assert stage_digests(cfg, 1, name)[0] == stage_digests(straight, 1, name)[0], name


def test_stored_target_weights_that_do_not_fit_are_one_clear_error(tiny_generator_dir, texts_file, tmp_path):
    from dpg.errors import DPGError
    from dpg.generator import load_generator

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"target.tiny_pretrain_steps": 2})
    _, tokenizer = load_generator(tiny_generator_dir)
    state = dpg.loop.tiny_state(dpg.loop.load_target(cfg, tokenizer)[0])
    wider = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, tiny_hidden=64))
    with pytest.raises(DPGError, match="do not fit the tiny target"):
        dpg.loop.load_target(wider, tokenizer, state=state)
    with pytest.raises(DPGError, match="do not fit the tiny target"):
        dpg.loop.load_target(cfg, tokenizer, state={k: v for k, v in list(state.items())[:-1]})


def test_changed_config_refuses_to_resume_naming_the_keys(prefect_harness, tiny_generator_dir, texts_file,
                                                          tmp_path):
    from dpg.errors import DPGError
    from tasks.stages import prepare_run

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db")
    prepare_run.fn(cfg)
    stored = json.loads((tmp_path / cfg.run_id / "config.json").read_text())
    stored["sft"]["lr"] = 0.25
    (tmp_path / cfg.run_id / "config.json").write_text(json.dumps(stored))
    with pytest.raises(DPGError, match=r"different config \(sft.lr\)"):
        prepare_run.fn(cfg)


def records_of(cfg, it):
    return io.read_table(stage_url(cfg, it, "rewards"), "records.parquet", cfg.storage.storage_options)


def metrics_of(cfg, it, stage="rewards"):
    return io.read_manifest(stage_url(cfg, it, stage), cfg.storage.storage_options)["meta"]


@pytest.mark.usefixtures("one_thread")
def test_naive_reward_through_the_flow_with_inverse_groups(prefect_harness, tiny_generator_dir, texts_file, tmp_path):
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"rewards.name": "naive"})
    optimize(cfg)
    for it in range(2):
        records = records_of(cfg, it)
        runs = io.read_table(stage_url(cfg, it, "rewards"), "sft_runs.parquet").set_index("group_id")
        assert len(records) == 4 and (records["reward"] == "naive").all() and sorted(runs.index) == [0, 1]
        for g, group in records[~records["empty"]].groupby("group_id"):  # one scalar per SFT run (inverse group)
            assert group["tau"].tolist() == [runs.loc[g, "phi_after"] - runs.loc[g, "phi_before"]] * len(group)
        assert records["tau"].nunique() == 2 and io.verify_stage(stage_url(cfg, it, "report"))


def test_token_credit_through_the_flow_sums_to_tau_and_feeds_the_update(prefect_harness, tiny_generator_dir,
                                                                        texts_file, tmp_path):
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"rewards.credit": "token"})
    optimize(cfg)
    for it in range(2):
        records = records_of(cfg, it)
        credit = pd.concat([io.read_table(stage_url(cfg, it, f"sft-g{g}"), "tau.parquet") for g in (0, 1)])
        credit = credit.set_index("example_id")
        for _, row in records[~records["empty"]].iterrows():
            assert len(row["token_advantages"]) == len(row["token_ids"])
            if row["n_tokens"] + 1 <= cfg.sft.max_len:  # not cut at sft.max_len: the credit holds all of tau
                assert sum(credit.loc[row["example_id"], "credit"]) == pytest.approx(row["tau"], rel=1e-6, abs=1e-12)
        assert io.verify_stage(stage_url(cfg, it, "generator"))


@pytest.mark.usefixtures("one_thread")
def test_a_kl_anchor_on_a_fully_fine_tuned_generator_is_measured_against_the_initial_generator(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"generator.lora_rank": "null", "policy.kl_coef": 0.1})
    assert cfg.generator.lora_rank is None
    optimize(cfg)  # without a reference model the update raised "policy.kl_coef=0.1 needs the initial generator"
    first, second = (metrics_of(cfg, it, "generator")["stats"] for it in (0, 1))
    assert first["kl"] == 0.0  # iteration 0 samples from the initial generator itself
    assert second["kl"] > 0.0  # iteration 1's generator has moved away from it


@pytest.mark.usefixtures("one_thread")
def test_two_runs_with_lora_write_identical_stages_and_leave_the_global_rng_alone(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):
    import torch

    import tasks.stages
    from flows.optimize import optimize

    runs = []
    for name in ("a", "b"):
        tasks.stages._base_generator.cache_clear()  # load the generator and the target again, as a new process would
        tasks.stages._targets.clear()
        cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / name), f"sqlite:///{tmp_path}/{name}.db",
                          **{"generator.lora_rank": 2})
        state = torch.get_rng_state()
        optimize(cfg)
        assert torch.equal(torch.get_rng_state(), state)  # no stage reads, reseeds or advances the global RNG
        torch.rand(7)  # and whatever it does in between cannot change the next run
        runs.append(cfg)
    a, b = runs
    assert metrics_of(a, 1, "generator")["stats"]["steps"] == 1.0  # the adapters were trained
    for it in range(2):
        for name in STAGES[:-1]:
            assert stage_digests(a, it, name)[0] == stage_digests(b, it, name)[0], (it, name)
        timeless = [{k: v for k, v in metrics_of(cfg, it, "report")["metrics"].items() if not k.startswith("seconds_")}
                    for cfg in runs]  # the report's metrics also hold the stage timings
        assert timeless[0] == timeless[1] and "policy_loss" in timeless[0]


@pytest.mark.usefixtures("one_thread")
def test_an_empty_completion_stays_in_its_sft_slot_through_the_flow(prefect_harness, tiny_generator_dir,
                                                                    texts_file, tmp_path):
    from flows.optimize import optimize

    # one generator token per rollout: with seed=1 the first rollout of prompt 0 is the eos, so SFT group 0
    # holds one empty and one real completion, in one microbatch of 2 (dropping it left 1 example: an error)
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"rollouts.max_new_tokens": 1, "seed": 1, "sft.microbatch": 2})
    optimize(cfg)
    records = records_of(cfg, 0)
    empty = records[records["empty"]]
    assert empty["example_id"].tolist() == ["0-0-0"] and empty["token_ids"].map(list).tolist() == [[1]]
    assert empty["tau"].isna().all() and (empty["advantage"] == 0.0).all() and (empty["target_tokens"] == 0).all()
    real = records[~records["empty"]]
    assert real["tau"].notna().all() and (real["advantage"] != 0).any()
    assert (real["target_tokens"] == 2).all()  # one word and the target's eos
    meta = metrics_of(cfg, 0)["metrics"]
    assert meta["empty_completions"] == 1.0 and meta["flat_batch"] == 0.0
    runs = io.read_table(stage_url(cfg, 0, "rewards"), "sft_runs.parquet")
    assert runs["n_examples"].tolist() == [2, 2]  # the empty completion kept its slot
    assert metrics_of(cfg, 0, "generator")["stats"]["steps"] == 1.0
    assert io.verify_stage(stage_url(cfg, 1, "report"))


@pytest.mark.usefixtures("one_thread")
def test_flat_batches_skip_the_update_until_max_flat_batches_in_a_row_stop_the_run(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch):
    from dpg.errors import DPGError
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"rewards.name": "plugin_reward:constant", "rewards.max_flat_batches": 3,
                         "outer_iterations": 4})
    with pytest.raises(DPGError, match=r"outer iteration 2: 3 flat batches in a row \(rewards.max_flat_batches=3\)"):
        optimize(cfg)
    for it in range(3):
        meta = metrics_of(cfg, it)["metrics"]
        assert (meta["flat_batch"], meta["flat_batches_in_a_row"]) == (1.0, it + 1)
        assert (records_of(cfg, it)["advantage"] == 0.0).all() and (records_of(cfg, it)["tau"] == 0.25).all()
    for it in range(2):  # skipped updates: the state goes on unchanged, the report is logged
        assert metrics_of(cfg, it, "generator")["stats"] == {"skipped": 1.0}
        assert io.verify_stage(stage_url(cfg, it, "report"))
    assert stage_digests(cfg, 1, "generator")[0] == stage_digests(cfg, 0, "generator")[0]
    version = metrics_of(cfg, 0, "generator")["version"]
    assert metrics_of(cfg, 1, "generator")["version"] == version
    assert set(io.read_table(stage_url(cfg, 2, "rollouts"), "rollouts.parquet")["generator_version"]) == {version}
    assert io.read_manifest(stage_url(cfg, 2, "generator")) is None  # the run stopped before the third update

    # the count in a row comes from storage: recomputing iteration 2's rewards in a resumed run stops it again
    (tmp_path / cfg.run_id / "iter-0002" / "rewards" / "manifest.json").unlink()
    monkeypatch.setattr(dpg.loop, "sample", lambda *a, **k: pytest.fail("finished sampling was recomputed"))
    with pytest.raises(DPGError, match="outer iteration 2: 3 flat batches in a row"):
        optimize(cfg)
    assert metrics_of(cfg, 2)["metrics"]["flat_batches_in_a_row"] == 3.0


def test_the_fresh_eval_fine_tunes_on_new_completions_of_the_iterations_generator(prefect_harness, tiny_generator_dir,
                                                                                 texts_file, tmp_path):
    from dpg.records import Rollout
    from flows.optimize import optimize
    from tasks.stages import generator_at, read_records, stage_inputs, target_for

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path), f"sqlite:///{tmp_path}/m.db",
                      **{"outer_iterations": 3, "target.eval_fresh": 5, "target.eval_fresh_every": 2})
    optimize(cfg)
    model, tokenizer, target = target_for(cfg)
    for it in range(3):
        url = stage_url(cfg, it, "eval")
        manifest = io.read_manifest(url)
        metrics = manifest["meta"]["metrics"]
        assert ("fresh.parquet" in manifest["files"]) == (it in (0, 1)) == dpg.loop.fresh_due(cfg, it)
        assert ("iter-0000/generator" in stage_inputs(cfg, it, "eval")) == (it == 1)
        if it == 2:
            assert not any(k.startswith("eval_fresh") for k in metrics)
            continue
        fresh = read_records(cfg, url, "fresh.parquet", Rollout)
        run = io.read_table(stage_url(cfg, it, "rollouts"), "rollouts.parquet")
        assert len(fresh) == 5 and all(r.example_id.startswith(f"fresh-{it}-") for r in fresh)
        assert {r.generator_version for r in fresh} == set(run["generator_version"])  # the iteration's generator
        assert [r.text for r in fresh] != run["text"].tolist()[:5]  # draws of their own, not the run's
        generator, generator_tokenizer, _, version = generator_at(cfg, it)
        again = dpg.loop.sample_fresh(cfg, it, generator, generator_tokenizer, version)
        assert [r.token_ids for r in again] == [r.token_ids for r in fresh]
        report = target.report(dpg.loop.fine_tune(cfg, [r.text for r in fresh], model, tokenizer, it))
        assert metrics["eval_fresh_pixel_accuracy"] == report["pixel_accuracy"]
        assert metrics["eval_fresh_phi"] == report["phi"] != metrics["eval_phi"]
        assert metrics["eval_fresh_examples"] == 5.0 and "text_fresh_mean_words" in metrics
