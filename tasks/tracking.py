"""MLflow tracking: one parent run per optimization, params = the flattened config (logged once), metrics with
step = outer iteration, the iteration's records as a dataset input, plots as artifacts.

Uses `MlflowClient` with explicit run ids (no global active run), so tasks can run in any process.
"""

from __future__ import annotations

import io as stdio
import json
import os
import subprocess
import tempfile
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from dpg.errors import DPGError
from dpg.runconfig import DPGConfig
from tasks import io
from tasks.stages import done, lineage, run_url, stage_names, stage_url


def tracking_uri(cfg: DPGConfig) -> str:
    """cfg.tracking.uri, else a sqlite file in the local run folder (./mlflow.db for remote stores)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if "://" in cfg.storage.url and not cfg.storage.url.startswith("file://"):
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    folder = os.path.abspath(run_url(cfg).removeprefix("file://"))
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


def client(cfg: DPGConfig):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def find_run(cfg: DPGConfig) -> str | None:
    """The id of the MLflow run that tracks this optimization (its `dpg.run_id` tag), or None."""
    mc = client(cfg)
    experiment = mc.get_experiment_by_name(cfg.tracking.experiment)
    found = mc.search_runs([experiment.experiment_id], f"tags.`dpg.run_id` = '{cfg.run_id}'", max_results=1) \
        if experiment else []
    return found[0].info.run_id if found else None


def plot_artifacts(cfg: DPGConfig, mlflow_run_id: str) -> list[str]:
    """The run's plots in MLflow: the Phi curve and the last LM-head patch image, where logged."""
    mc = client(cfg)
    top = [a.path for a in mc.list_artifacts(mlflow_run_id)]
    patches = sorted(a.path for a in mc.list_artifacts(mlflow_run_id, "patches")) if "patches" in top else []
    return [p for p in top if p.endswith(".png")] + patches[-1:]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def start_tracking(cfg: DPGConfig, flow_run_id: str = "") -> str:
    """The MLflow run of this optimization: found by its `dpg.run_id` tag, else created (params logged once)."""
    mc = client(cfg)
    try:
        experiment = mc.get_experiment_by_name(cfg.tracking.experiment)
        # the default sqlite store lives in the run folder: keep its artifacts there too (not ./mlruns)
        db = tracking_uri(cfg).removeprefix("sqlite:///")
        local = None if cfg.tracking.uri else os.path.join(os.path.dirname(db), "mlartifacts")
        experiment_id = experiment.experiment_id if experiment else \
            mc.create_experiment(cfg.tracking.experiment, artifact_location=local)
        found = mc.search_runs([experiment_id], f"tags.`dpg.run_id` = '{cfg.run_id}'", max_results=1)
    except Exception as e:  # connection refused, bad URI, ...: one line, resumable once fixed
        raise DPGError(f"MLflow tracking at {tracking_uri(cfg)} is unreachable ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); start it or set tracking.uri, then resume") from None
    if found:
        run_id = found[0].info.run_id
    else:
        run = mc.create_run(experiment_id, run_name=cfg.run_id, tags={
            "dpg.run_id": cfg.run_id, "dpg.config_hash": cfg.hash, "dpg.store": run_url(cfg), "git.sha": git_sha()})
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(cfg.flat().items())
                  if not k.startswith("storage.storage_options")]
        for a in range(0, len(params), 100):
            mc.log_batch(run_id, params=params[a:a + 100])
    if flow_run_id:
        mc.set_tag(run_id, f"prefect.flow_run.{flow_run_id}", "1")
        mc.set_tag(run_id, "prefect.flow_run_id", flow_run_id)
    mc.set_terminated(run_id, "RUNNING")
    return run_id


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def log_iteration(cfg: DPGConfig, it: int, mlflow_run_id: str, rewards_url: str, generator_url: str,
                  eval_url: str) -> dict:
    """Step metrics of iteration `it`, its records as an MLflow dataset input, a patch heatmap for patterns."""
    import mlflow
    from mlflow.entities import Metric

    options = cfg.storage.storage_options
    report = stage_url(cfg, it, "report")
    if logged := done(cfg, report):  # logged before this run was interrupted
        return logged["meta"]["metrics"]
    manifest = io.read_manifest(rewards_url, options)
    metrics = dict(manifest["meta"]["metrics"])
    gen = io.read_manifest(generator_url, options)["meta"]
    metrics |= {f"policy_{k}": v for k, v in gen["stats"].items()}
    evaluation = io.read_manifest(eval_url, options)
    metrics |= evaluation["meta"]["metrics"]
    for stage in stage_names(cfg)[:-1]:
        m = io.read_manifest(stage_url(cfg, it, stage), options)
        if m is not None and "seconds" in m["meta"]:
            metrics[f"seconds_{stage.split('-')[0]}"] = metrics.get(f"seconds_{stage.split('-')[0]}", 0.0) + \
                m["meta"]["seconds"]
    mc = client(cfg)
    now = int(time.time() * 1000)
    mc.log_batch(mlflow_run_id, metrics=[Metric(k, float(v), now, it) for k, v in sorted(metrics.items())])
    mc.set_tag(mlflow_run_id, f"dpg.generator.iter-{it:04d}", generator_url)
    mc.set_tag(mlflow_run_id, "dpg.generator_version", gen["version"])
    from tasks.audit import lineage_of

    mc.log_dict(mlflow_run_id, lineage_of(cfg, it), "lineage.json")  # the chain back to the base model
    records = io.read_table(rewards_url, "records.parquet", options)
    lists = ["prompt_token_ids", "token_ids", "logprobs", "token_ends", "token_advantages"]  # MLflow cannot type them
    dataset = mlflow.data.from_pandas(records.drop(columns=[c for c in lists if c in records]),
                                      source=io.join(rewards_url, manifest["files"]["records.parquet"]["file"]),
                                      name=f"{cfg.run_id}-iter-{it:04d}",
                                      digest=manifest["files"]["records.parquet"]["sha256"][:16])
    mc.log_inputs(mlflow_run_id, datasets=[_dataset_input(dataset)])
    _log_phi_plot(cfg, mc, mlflow_run_id)
    if "delta.npy" in evaluation["files"]:
        _log_patch_heatmap(cfg, it, mc, mlflow_run_id, eval_url, evaluation)
    io.write_stage(report, {"metrics.json": json.dumps(metrics).encode()}, {**lineage(cfg, it, "report"),
                                                                           "metrics": metrics}, options)
    return metrics


def _dataset_input(dataset):
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def _pyplot():
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_figure(mc, run_id: str, fig, name: str, artifact_path: str | None = None) -> None:
    buffer = stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        mc.log_artifact(run_id, path, artifact_path)


def _log_patch_heatmap(cfg: DPGConfig, it: int, mc, run_id: str, eval_url: str, manifest: dict) -> None:
    """The LM-head patch change after SFT on the iteration's data, beside the goal image (PNG)."""
    import numpy as np

    options = cfg.storage.storage_options
    delta = np.load(stdio.BytesIO(io.read_file(eval_url, "delta.npy", options, manifest)))
    goal = np.load(stdio.BytesIO(io.read_file(eval_url, "goal.npy", options, manifest)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    limit = float(np.abs(delta).max()) or 1.0
    for ax, data, title, kw in ((axes[0], goal, "goal S", {"vmin": -1, "vmax": 1}),
                                (axes[1], delta, "Δ = P − P_initial", {"vmin": -limit, "vmax": limit}),
                                (axes[2], np.sign(delta) * goal, "sign(Δ)·S (+1 = right)", {"vmin": -1, "vmax": 1})):
        ax.imshow(data, cmap="coolwarm", **kw)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    accuracy = float((np.sign(delta) == goal).mean())
    fig.suptitle(f"{cfg.target.spec}, iteration {it}: pixel accuracy {accuracy:.2f}")
    fig.tight_layout()
    _log_figure(mc, run_id, fig, f"patch_iter_{it:04d}.png", "patches")


def _log_phi_plot(cfg: DPGConfig, mc, run_id: str) -> None:
    """Phi after SFT (and the human metric) over outer iterations, as a PNG artifact."""
    plt = _pyplot()
    history = {k: mc.get_metric_history(run_id, k) for k in ("eval_phi", "eval_pixel_accuracy", "eval_val_loss",
                                                             "eval_l2_norm", "reward_mean")}
    history = {k: sorted((m.step, m.value) for m in v) for k, v in history.items() if v}
    if not history:
        return
    fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], history.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_xlabel("outer iteration")
        ax.set_title(key)
    fig.suptitle(f"{cfg.run_id}: {cfg.target.spec}")
    fig.tight_layout()
    _log_figure(mc, run_id, fig, "phi_over_iterations.png")


@task(cache_policy=NO_CACHE)
def finish_tracking(cfg: DPGConfig, mlflow_run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(mlflow_run_id, status)
