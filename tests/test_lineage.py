"""Long-run safety of the store: half-written manifests, lineage between stages, the CLI on a run path from any
folder, credentials kept out of the store. Real Prefect flow runs and MLflow (sqlite) on tiny models."""

import json
import logging

import pytest
from test_pipeline import STAGES, stage_digests, texts_file, tiny_config  # noqa: F401 (texts_file: a fixture)

from dpg.errors import DPGError
from dpg.runconfig import load_config
from flows.cli import main, open_run, run_status
from tasks import io
from tasks.stages import stage_state, stage_url


@pytest.fixture
def one_iteration(prefect_harness, tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                      outer_iterations=1)
    optimize(cfg)
    return cfg


def test_a_manifest_cut_in_half_counts_as_not_done_and_only_that_stage_is_recomputed(one_iteration, caplog):
    from flows.optimize import optimize

    cfg = one_iteration
    before = {n: stage_digests(cfg, 0, n) for n in STAGES}
    path = f"{stage_url(cfg, 0, 'sft-g1')}/{io.MANIFEST}"
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:  # what a kill or a full disk leaves behind a non-atomic writer
        f.write(data[: len(data) // 2])
    assert stage_state(cfg, 0, "sft-g1") == (None, "unreadable manifest")
    assert run_status(cfg)["iterations"][0]["stages"]["sft-g1"] == "unreadable manifest"
    with caplog.at_level(logging.WARNING, logger="dpg.store"):
        optimize(cfg)
    assert "manifest.json is unreadable" in caplog.text
    after = {n: stage_digests(cfg, 0, n) for n in STAGES}
    assert after["sft-g1"][0] == before["sft-g1"][0] and after["sft-g1"][1] > before["sft-g1"][1]  # rerun, same bytes
    assert {n: after[n] for n in STAGES if n != "sft-g1"} == {n: before[n] for n in STAGES if n != "sft-g1"}
    assert all(why == "done" for why in run_status(cfg)["iterations"][0]["stages"].values())


def test_local_writes_leave_no_temporary_files(one_iteration):
    import pathlib

    root = pathlib.Path(one_iteration.storage.url)
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_stage_recomputed_with_new_content_is_followed_by_every_stage_computed_from_it(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    from flows.optimize import optimize

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db")
    optimize(cfg)
    before = {(it, n): stage_digests(cfg, it, n) for it in range(2) for n in STAGES}
    url = stage_url(cfg, 0, "rollouts")  # iteration 0's rollouts, rewritten with other content
    frame, manifest = io.read_table(url, "rollouts.parquet"), io.read_manifest(url)
    frame.loc[0, "text"] = frame.loc[0, "text"] + " the cat sat"
    io.write_stage(url, {"rollouts.parquet": frame}, manifest["meta"])
    rollouts = stage_digests(cfg, 0, "rollouts")

    stages = run_status(cfg)["iterations"][0]["stages"]
    assert stages["rollouts"] == "done" and stages["sft-g0"] == "inputs changed: iter-0000/rollouts"
    assert stages["report"] == "done"  # its own inputs (rewards, generator, eval) are unchanged so far
    optimize(cfg)
    after = {(it, n): stage_digests(cfg, it, n) for it in range(2) for n in STAGES}
    assert after[(0, "rollouts")] == rollouts
    for key in before:
        if key != (0, "rollouts"):
            assert after[key][1] > before[key][1], key  # recomputed
    for key in ((0, "sft-g0"), (1, "rollouts")):  # new data, not the same bytes written again
        assert after[key][0] != before[key][0], key
    assert all(why == "done" for row in run_status(cfg)["iterations"] for why in row["stages"].values())
    meta = io.read_manifest(stage_url(cfg, 1, "generator"))["meta"]
    assert set(meta["inputs"]) == {"config", "iter-0001/rollouts", "iter-0001/rewards", "iter-0000/generator"}
    assert meta["code"].startswith("dpg ")


def test_resume_and_status_take_the_run_path_as_given_from_any_folder(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    from flows.optimize import optimize

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = tiny_config(tiny_generator_dir, texts_file, "runs", f"sqlite:///{tmp_path}/m.db", outer_iterations=1)
    optimize(cfg)  # a relative store: runs/ inside a/
    path = str(tmp_path / "a" / "runs" / cfg.run_id)
    monkeypatch.chdir(tmp_path / "b")
    # a schedule's advance: config.json keeps outer_iterations=1, the store gets iteration 1
    assert main(["resume", path, "--set", "outer_iterations=2"]) == 0
    assert list((tmp_path / "b").glob("runs")) == [] and (tmp_path / "a" / "runs" / cfg.run_id / "iter-0001").is_dir()
    assert json.loads((tmp_path / "a" / "runs" / cfg.run_id / "config.json").read_text())["outer_iterations"] == 1
    capsys.readouterr()
    assert main(["status", path, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [row["iteration"] for row in status["iterations"]] == [0, 1]
    assert all(why == "done" for row in status["iterations"] for why in row["stages"].values())
    assert status["iterations"][1]["metrics"]["eval_phi"] == pytest.approx(
        io.read_manifest(stage_url(open_run(path), 1, "report"))["meta"]["metrics"]["eval_phi"])
    assert main(["status", str(tmp_path / "b")]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_credentials_in_storage_options_are_refused_naming_the_key():
    for options, key in (({"key": "AKIA", "secret": "s"}, "key"),
                         ({"client_kwargs": {"aws_secret_access_key": "s"}}, "client_kwargs.aws_secret_access_key")):
        with pytest.raises(DPGError, match=rf"storage.storage_options.{key} is a credential.*AWS_ACCESS_KEY_ID"):
            load_config(None, [f"storage.storage_options={json.dumps(options)}"])
    load_config(None, ['storage.storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'])


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    return f"s3://dpg-test/{tmp_path.name}", request.getfixturevalue("s3_server")


def test_exclusive_create_lets_exactly_one_writer_in(store):
    url, options = store
    assert io.create_exclusive(io.join(url, "run", "lock.json"), b"first", options)
    assert not io.create_exclusive(io.join(url, "run", "lock.json"), b"second", options)
    assert io.read_bytes(io.join(url, "run", "lock.json"), options) == b"first"
    io.remove(io.join(url, "run", "lock.json"), options)
    assert io.create_exclusive(io.join(url, "run", "lock.json"), b"third", options)


def test_one_writer_per_run_and_a_dead_writers_lock_is_taken_over_with_force(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    import subprocess
    import sys

    from flows.optimize import optimize
    from tasks.lock import read_lock
    from tasks.stages import run_url

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                      outer_iterations=1)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tasks.lock import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
                               run_url(cfg)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DPGError, match=rf"is being written by pid {holder.pid} on .*one writer per run"):
            optimize(cfg, force=True)  # force never takes a live writer's lock
    finally:
        holder.kill()
        holder.wait()
    assert read_lock(run_url(cfg))["pid"] == holder.pid  # killed with -9: its lock stays
    with pytest.raises(DPGError, match=r"no longer running \(killed\?\); rerun with --force"):
        optimize(cfg)
    assert not (tmp_path / "store" / cfg.run_id / "iter-0000").exists()  # refused before writing anything
    optimize(cfg, force=True)
    assert read_lock(run_url(cfg)) is None  # released at the end
    assert all(why == "done" for why in run_status(cfg)["iterations"][0]["stages"].values())


def test_kill_9_at_random_moments_then_resume_gives_the_records_of_an_uninterrupted_run(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    """`dpg run` in its own process, killed with SIGKILL at seeded random moments (after a random number of finished
    stages plus a random delay, so kills land inside stages too), each time rerun with --force (the dead writer's
    lock stays): the finished run's stages are byte-identical to a run never interrupted."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import tasks.stages
    from flows.optimize import optimize
    from tasks.lock import read_lock
    from tasks.stages import run_url

    reference = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "ref"), f"sqlite:///{tmp_path}/ref.db")
    tasks.stages._base_generator.cache_clear()
    tasks.stages._targets.clear()
    optimize(reference)
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "killed"), f"sqlite:///{tmp_path}/killed.db")
    config = tmp_path / "job.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "run", str(config), "--force"]
    store = tmp_path / "killed" / cfg.run_id
    rng = random.Random(0)
    total = 2 * len(STAGES)
    kills = []
    for after in sorted(rng.sample(range(1, total - 1), 3)):  # stages finished before the kill
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and len(list(store.rglob("manifest.json"))) < after:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:  # the whole group: its ephemeral Prefect server would outlive it as an orphan
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills.append((len(list(store.rglob("manifest.json"))), read_lock(run_url(cfg)) is not None))
        process.wait()
    print(f"\nkilled -9 with (stages finished, lock left) = {kills} of {total} stages")
    mid_run = [held for finished, held in kills if finished < total]
    assert len(mid_run) >= 2 and all(mid_run), kills  # killed inside the run, each leaving its lock behind
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_lock(run_url(cfg)) is None
    for it in range(2):
        for name in STAGES[:-1]:
            assert stage_digests(cfg, it, name)[0] == stage_digests(reference, it, name)[0], (kills, it, name)

    from tasks.audit import find_generator, lineage_of

    # lineage across the resumed run: each update learned from the version the one before it wrote, as uninterrupted
    chain, expected = lineage_of(cfg, 1)["updates"], lineage_of(reference, 1)["updates"]
    assert [u["from_version"] for u in chain] == ["base", chain[0]["version"]]
    drop = ("records", "code")
    assert [{k: v for k, v in u.items() if k not in drop} for u in chain] == \
        [{k: v for k, v in u.items() if k not in drop} for u in expected]
    assert find_generator(cfg, chain[1]["version"][:12]) == 1
