"""Bad input to the pipeline gives one clear DPGError (naming the key, the URL or the tracking URI), leaves
nothing half-written (no stage manifest, no MLflow run), and the same config resumes and completes once the
cause is fixed. Runs the real flow (tiny models, 1 outer iteration) on a temporary Prefect API."""

import json
import socket
import time
from pathlib import Path

import pytest
import test_pipeline
from test_pipeline import STAGES, tiny_config

from dpg.errors import DPGError
from dpg.runconfig import load_config
from flows.cli import main
from tasks import io
from tasks.stages import run_url, stage_url

FAST = 20.0  # seconds: a failing run must end within this (Prefect's 2 task retries included)
texts_file = test_pipeline.texts_file  # the module-scoped fixture: a small Parquet corpus


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    """One sqlite MLflow store for the module (creating its schema takes ~7 s); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"


@pytest.fixture
def no_retry_delay(monkeypatch):
    """The storage tasks keep their 2 retries but skip the 2 s waits between them (the file's time budget);
    the tracking test keeps the real waits, so it shows the whole failure path is fast."""
    from tasks.stages import prepare_run

    monkeypatch.setattr(prepare_run, "retry_delay_seconds", 0)


def mlflow_runs(cfg, uri: str) -> list:
    """The MLflow runs of `cfg`'s optimization in its experiment at `uri` (the tracking store that works)."""
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(tracking_uri=uri)
    experiment = mc.get_experiment_by_name(cfg.tracking.experiment)
    return mc.search_runs([experiment.experiment_id], f"tags.`dpg.run_id` = '{cfg.run_id}'") if experiment else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def run_failing(cfg) -> tuple[DPGError, float]:
    from flows.optimize import optimize

    start = time.perf_counter()
    with pytest.raises(DPGError) as info:
        optimize(cfg)
    return info.value, time.perf_counter() - start


def assert_complete(cfg) -> None:
    """Every stage of iteration 0 has a verified manifest, and the one MLflow run of the config finished."""
    for name in STAGES:
        assert io.verify_stage(stage_url(cfg, 0, name), cfg.storage.storage_options), name
    [run] = mlflow_runs(cfg, cfg.tracking.uri)
    assert run.info.status == "FINISHED"


# --- config: rejected before anything runs ---------------------------------------------------------------


def test_invalid_yaml_and_non_mapping_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: [0.5\nprompts: {per_iteration: 2}\n")
    with pytest.raises(DPGError, match=r"config file '.*bad\.yaml' is not valid YAML/JSON: ") as info:
        load_config(str(bad))
    assert "\n" not in str(info.value)
    for text, kind in (("- sft\n- lr\n", "list"), ("just words\n", "str"), ("42\n", "int")):
        bad.write_text(text)
        with pytest.raises(DPGError, match=rf"config file '.*bad\.yaml' must hold a mapping of keys, not {kind}$"):
            load_config(str(bad))
    with pytest.raises(DPGError, match=r"config file '.*missing\.yaml' not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad.write_text("sft: {lr: 0.25}\n")  # fixed
    assert load_config(str(bad)).sft.lr == 0.25


def test_unknown_keys_are_named_with_their_section(tmp_path):
    with pytest.raises(DPGError, match=r"^unknown key\(s\) sft\.lrr; valid keys: .*\blr\b"):
        load_config(None, ["sft.lrr=1"])
    with pytest.raises(DPGError, match=r"^unknown key\(s\) config\.outer_iteratons; valid keys: .*outer_iterations"):
        load_config(None, ["outer_iteratons=2"])
    with pytest.raises(DPGError, match=r"^unknown key\(s\) config\.sfft\b"):
        load_config(None, ["sfft.lr=1"])  # a misspelt section
    path = tmp_path / "c.yaml"
    path.write_text("prompts:\n  per_iteration: 4\n  per_iteraton: 8\n")
    with pytest.raises(DPGError, match=r"^unknown key\(s\) prompts\.per_iteraton;"):
        load_config(str(path))


@pytest.mark.parametrize(("override", "message"), [
    ("sft.lr=fast", "sft.lr='fast' is invalid; use a positive number"),
    ("outer_iterations=2.5", "config.outer_iterations=2.5 is invalid; use an integer >= 1"),
    ("prompts.per_iteration=[4]", "prompts.per_iteration=[4] is invalid; use an integer >= 1"),
    ("seed=abc", "config.seed='abc' is invalid; use an integer"),
    ("generator.lora_rank=eight", "generator.lora_rank='eight' is invalid; use an integer >= 1"),
    ("storage.url=5", "storage.url=5 is invalid; use a local folder or s3://bucket/prefix"),
    ("storage.storage_options=abc", "storage.storage_options='abc' is invalid; use a mapping"),
    ("tracking.uri=[a]", "tracking.uri=['a'] is invalid; use e.g. http://"),
    ("sft=0.5", "sft must be a mapping of keys, not float 0.5"),
])
def test_wrong_value_type_names_key_value_and_fix(override, message):
    with pytest.raises(DPGError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message), str(info.value)


# --- storage and tracking: fail fast, write nothing, resume once fixed -----------------------------------


def test_unreachable_s3_endpoint_fails_fast_naming_the_url_and_writes_nothing(
        prefect_harness, no_retry_delay, s3_server, tiny_generator_dir, texts_file, tracking_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by accident (./mlflow.db, folders) would show up here
    unreachable = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                   "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
    cfg = tiny_config(tiny_generator_dir, texts_file, f"s3://dpg-test/{tmp_path.name}", tracking_db,
                      outer_iterations=1, **{"storage.storage_options": json.dumps(unreachable),
                                             "tracking.experiment": "unreachable-s3"})
    error, seconds = run_failing(cfg)
    assert seconds < FAST
    assert f"{run_url(cfg)}/lock.json" in str(error) and "http://127.0.0.1:9" in str(error)
    assert "\n" not in str(error)

    import s3fs

    assert s3fs.S3FileSystem(**s3_server).find(f"dpg-test/{tmp_path.name}") == []  # nothing at the real store
    assert files_under(tmp_path) == []  # no manifest, no config, no MLflow database anywhere local
    assert mlflow_runs(cfg, tracking_db) == []  # no MLflow run was started

    fixed = load_config(None, [f"storage.storage_options={json.dumps(s3_server)}"], base=cfg.to_dict())
    assert fixed.run_id == cfg.run_id  # storage options are not part of the run's identity
    from flows.optimize import optimize

    optimize(fixed)
    assert_complete(fixed)


def test_unwritable_local_store_fails_naming_the_url_then_resumes(
        prefect_harness, no_retry_delay, tiny_generator_dir, texts_file, tracking_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "store"  # tests run as root, so chmod would not stop writes: a file where a folder goes
    blocker.write_text("a regular file")
    cfg = tiny_config(tiny_generator_dir, texts_file, str(blocker / "runs"), tracking_db, outer_iterations=1,
                      **{"tracking.experiment": "unwritable"})
    error, seconds = run_failing(cfg)
    assert seconds < FAST
    assert f"{run_url(cfg)}/lock.json" in str(error) and "\n" not in str(error)
    assert files_under(tmp_path) == ["store"]  # only the blocking file: no manifest, nothing else
    assert mlflow_runs(cfg, tracking_db) == []

    blocker.unlink()  # the cause, fixed; the same config resumes
    from flows.optimize import optimize

    optimize(cfg)
    assert_complete(cfg)


def test_missing_s3_bucket_is_an_error_not_created(prefect_harness, no_retry_delay, s3_server, tiny_generator_dir,
                                                   texts_file, tracking_db):
    import s3fs

    cfg = tiny_config(tiny_generator_dir, texts_file, "s3://no-such-bucket/runs", tracking_db, outer_iterations=1,
                      **{"storage.storage_options": json.dumps(s3_server), "tracking.experiment": "no-bucket"})
    error, seconds = run_failing(cfg)
    assert seconds < FAST
    assert f"cannot write {run_url(cfg)}/lock.json" in str(error) and "bucket does not exist" in str(error)
    assert not s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).exists("no-such-bucket")
    assert mlflow_runs(cfg, tracking_db) == []


def test_tracking_server_down_fails_fast_naming_the_uri_then_resumes_with_a_working_uri(
        prefect_harness, tiny_generator_dir, texts_file, tracking_db, tmp_path, monkeypatch):
    # MLflow's defaults (7 HTTP retries with backoff factor 2, 120 s timeout) would take minutes per attempt
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    down = f"http://127.0.0.1:{closed_port()}"
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "runs"), down, outer_iterations=1,
                      **{"tracking.experiment": "tracking-down"})
    error, seconds = run_failing(cfg)
    assert seconds < FAST
    assert str(error).startswith(f"MLflow tracking at {down} is unreachable") and "\n" not in str(error)
    # the run's config is stored (resume compares it); no stage ran, so no manifest exists
    assert files_under(tmp_path / "runs") == [f"{cfg.run_id}/config.json"]

    fixed = load_config(None, [f"tracking.uri={tracking_db}"], base=cfg.to_dict())
    assert fixed.run_id == cfg.run_id
    from flows.optimize import optimize

    optimize(fixed)
    assert_complete(fixed)


# --- the CLI: one line on stderr, exit status 2 ------------------------------------------------------------


def test_cli_run_with_a_bad_config_prints_one_error_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "job.yaml"
    for text, fragment in (("sft: {lr: [0.5}\n", "is not valid YAML/JSON"),
                           ("- a\n- b\n", "must hold a mapping of keys, not list"),
                           ("sft: {lrr: 0.5}\n", "unknown key(s) sft.lrr"),
                           ("sft: {lr: fast}\n", "sft.lr='fast' is invalid")):
        bad.write_text(text)
        assert main(["run", str(bad)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
        assert err.startswith("dpg: error: ") and fragment in err, err
    assert main(["run", "--set", "sft.lrr=1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("dpg: error: unknown key(s) sft.lrr;"), err
    assert files_under(tmp_path) == ["job.yaml"]  # nothing written: no runs/, no .dpg/, no mlflow.db
