"""The pipeline against a real MLflow tracking server over HTTP (`mlflow server` on 127.0.0.1, sqlite backend,
artifacts proxied by the server): the run, its params, step metrics, dataset inputs and the Phi plot arrive."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import test_pipeline
from test_pipeline import tiny_config

from tasks import io
from tasks.stages import stage_url
from tasks.tracking import tracking_uri

texts_file = test_pipeline.texts_file  # the module-scoped fixture: a small Parquet corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (uvicorn runs as a child), SIGKILL if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port in its own process group; yields (uri, artifacts folder)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                        "MPLCONFIGDIR": str(folder / "mpl")}
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed in teardown)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/m.db", "--serve-artifacts",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the first start creates the sqlite schema: ~10 s on 2 busy cores
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n"
                            f"{(folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, folder / "artifacts"
    finally:
        stop(process)
        log.close()


def test_pipeline_logs_run_params_metrics_datasets_and_plot_to_a_remote_server(
        prefect_harness, mlflow_server, tiny_generator_dir, texts_file, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.optimize import optimize

    uri, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server fails in seconds, not minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "runs"), uri, outer_iterations=2)
    assert tracking_uri(cfg) == uri
    optimize(cfg)

    mc = MlflowClient(tracking_uri=uri)
    experiment = mc.get_experiment_by_name("dpg")
    [run] = mc.search_runs([experiment.experiment_id], f"tags.`dpg.run_id` = '{cfg.run_id}'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_id
    assert run.data.tags["dpg.config_hash"] == cfg.hash and "prefect.flow_run_id" in run.data.tags

    # params: the flattened config, once (storage credentials never leave the machine)
    expected = {k: str(v) for k, v in cfg.flat().items() if not k.startswith("storage.storage_options")}
    assert run.data.params == expected
    assert run.data.params["sft.lr"] == "0.5" and run.data.params["tracking.uri"] == uri

    # step metrics: one value per outer iteration, equal to what the report stage recorded
    reports = [io.read_manifest(stage_url(cfg, it, "report"))["meta"]["metrics"] for it in range(2)]
    assert {"phi_after", "reward_mean", "policy_loss"} <= set(reports[0]) and set(run.data.metrics) == set(reports[0])
    for key in reports[0]:
        history = mc.get_metric_history(run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in reports], nan_ok=True), key

    # dataset inputs: each iteration's audit table, named and digested as its manifest says
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == [f"{cfg.run_id}-iter-0000", f"{cfg.run_id}-iter-0001"]
    for it in range(2):
        manifest = io.read_manifest(stage_url(cfg, it, "rewards"))
        dataset = inputs[f"{cfg.run_id}-iter-{it:04d}"]
        assert dataset.dataset.digest == manifest["files"]["records.parquet"]["sha256"][:16]
        assert json.loads(dataset.dataset.source)["uri"].endswith(manifest["files"]["records.parquet"]["file"])
        assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
        schema = json.loads(dataset.dataset.schema)["mlflow_colspec"]
        assert {"example_id", "tau", "advantage"} <= {c["name"] for c in schema}

    # the Phi plot went through the server's artifact proxy into its artifacts folder, and downloads as a PNG
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "phi_over_iterations.png" in [a.path for a in mc.list_artifacts(run_id)]
    png = mc.download_artifacts(run_id, "phi_over_iterations.png", str(tmp_path))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in artifacts.rglob("phi_over_iterations.png")] == ["phi_over_iterations.png"]
