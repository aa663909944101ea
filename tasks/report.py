"""`dpg report`: one self-contained HTML file of a stored run (pictures inlined as PNG data URIs, no script, no
external resource): Phi and human-metric curves, the LM-head patch per iteration where the target has one,
reward histograms, the top examples with their text, and the generator's lineage. Written to the run folder
(`report.html`, also on S3) and logged to the run's MLflow run."""

from __future__ import annotations

import base64
import html
import io as stdio
import math

import numpy as np

from dpg.runconfig import DPGConfig
from tasks import io
from tasks.audit import audit, stored_verify
from tasks.stages import done, run_url, stage_url
from tasks.tracking import _pyplot

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em}td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}.patches img{width:260px}
.muted{color:#777}"""


def png(fig) -> str:
    buffer = stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves(summaries: list[dict]) -> str:
    plt = _pyplot()
    keys = [k for k in summaries[0] if k.startswith("eval_") or k == "tau_std"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        shown = [s for s in summaries if key in s]  # the fresh eval's keys are only where it ran
        ax.plot([s["iteration"] for s in shown], [s[key] for s in shown], marker="o", markersize=3)
        ax.set_xlabel("outer iteration")
        ax.set_title(key)
    fig.tight_layout()
    return png(fig)


def reward_histograms(cfg: DPGConfig, its: list[int]) -> str:
    plt = _pyplot()
    shown = sorted({its[0], its[len(its) // 2], its[-1]})
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3), squeeze=False)
    for ax, it in zip(axes[0], shown):
        tau = io.read_table(stage_url(cfg, it, "rewards"), "records.parquet", cfg.storage.storage_options)["tau"]
        ax.hist(tau.dropna().to_numpy(), bins=20, color="#4a7ab5")
        ax.set_title(f"tau, iteration {it}")
    fig.tight_layout()
    return png(fig)


def patch_images(cfg: DPGConfig, its: list[int], most: int = 12) -> list[tuple[int, str]]:
    """The sign of the patch change after SFT on each shown iteration's data beside the goal (where stored)."""
    plt = _pyplot()
    step = max(1, math.ceil(len(its) / most))
    out = []
    for it in its[::step] + ([its[-1]] if (len(its) - 1) % step else []):
        url = stage_url(cfg, it, "eval")
        manifest = done(cfg, url)
        if manifest is None or "delta.npy" not in manifest["files"]:
            continue
        load = lambda name: np.load(stdio.BytesIO(io.read_file(url, name, cfg.storage.storage_options, manifest)))
        delta, goal = load("delta.npy"), load("goal.npy")
        fig, axes = plt.subplots(1, 2, figsize=(4, 2))
        for ax, data, title in ((axes[0], goal, "goal"), (axes[1], np.sign(delta), "sign of the change")):
            ax.imshow(data, cmap="coolwarm", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"iteration {it}: pixel accuracy {float((np.sign(delta) == goal).mean()):.2f}", fontsize=9)
        out.append((it, png(fig)))
    return out


def table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f'<td class="num">{v:.4g}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(cell(r.get(k, "")) for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def verify_table(results: list[dict]) -> str:
    if not results:
        return '<p class="muted">no verify results are stored for this run (dpg audit RUN --verify)</p>'
    rows = [{"iteration": r["iteration"], **{f"{n} {k}": r["summary"][n][k] for n in ("proponents", "opponents",
            "random") for k in ("actual", "predicted")}, "LDS": r["summary"]["lds_mean"]} for r in results]
    return ("<p>Phi change when examples are left out and the target retrained: actual vs tau's first-order "
            "prediction.</p>" + table(rows, list(rows[0])))


def build_report(cfg: DPGConfig, top: int = 5) -> str:
    result = audit(cfg, None, top)
    summaries = result["iterations"]
    its = [s["iteration"] for s in summaries]
    lineage = []
    for it in its:
        manifest = done(cfg, stage_url(cfg, it, "generator"))
        if manifest:
            lineage.append({"iteration": it, "generator version": manifest["meta"]["version"],
                            "policy steps": manifest["meta"]["stats"].get("steps", math.nan)})
    example_keys = ["example_id", "sft_group", "tau", "tau_normalised", "advantage", "generator_version", "text"]
    patches = patch_images(cfg, its)
    a = result["agreement"]
    parts = [
        f"<h1>DPG run {html.escape(cfg.run_id)}</h1>",
        f'<p class="muted">store {html.escape(run_url(cfg))} · target {html.escape(cfg.target.spec)} on '
        f"{html.escape(cfg.target.model)} · generator {html.escape(cfg.generator.source)} · rewards "
        f"{html.escape(cfg.rewards.name)} ({html.escape(cfg.rewards.credit)}) · {len(its)} iterations</p>",
        '<h2 id="curves">Phi and the human metric over iterations</h2>',
        f'<img id="curves-img" alt="curves" src="{curves(summaries)}">',
        f"<details><summary>per-iteration table ({len(summaries)} rows)</summary>"
        f"{table(summaries, list(summaries[0]))}</details>",
        '<h2 id="patches">The LM-head patch</h2>',
        ('<div class="patches">' + "".join(f'<img alt="patch {it}" src="{src}">' for it, src in patches) + "</div>")
        if patches else '<p class="muted">this target has no patch picture</p>',
        '<h2 id="rewards">Rewards</h2>',
        f'<img alt="reward histograms" src="{reward_histograms(cfg, its)}">',
        f"<p>Over {a['sft_runs']} SFT runs, the sum of tau has the sign of the measured Phi change in "
        f"{a['same_sign_share']:.0%} (Pearson {a['pearson']:.2f}, median ratio {a['median_ratio']:.2f}).</p>"
        if a["sft_runs"] else "",
        '<h2 id="examples">Top examples</h2>',
        f"<h3>{top} proponents by tau (pushed Phi up)</h3>", table(result["by_tau"]["proponents"], example_keys),
        f"<h3>{top} opponents by tau (pushed Phi down)</h3>", table(result["by_tau"]["opponents"], example_keys),
        '<h2 id="verify">Counterfactual verification</h2>',
        verify_table(stored_verify(cfg)),
        '<h2 id="lineage">Generator lineage</h2>',
        f"<p>base model {html.escape(cfg.generator.source)}, then one update per iteration:</p>",
        table(lineage, ["iteration", "generator version", "policy steps"]),
    ]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>DPG run {html.escape(cfg.run_id)}'
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(cfg: DPGConfig, track: bool = True, mlflow_run_id: str | None = None) -> str:
    """The report, written to `<run>/report.html`; logged to the run's MLflow run where there is one (`mlflow_run_id`
    when the caller has looked it up)."""
    import os
    import tempfile

    text = build_report(cfg)
    url = io.join(run_url(cfg), "report.html")
    io.write_bytes(url, text.encode(), cfg.storage.storage_options)
    if track:
        from tasks.tracking import client, find_run

        mlflow_run_id = mlflow_run_id or find_run(cfg)
        if mlflow_run_id:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "report.html")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                client(cfg).log_artifact(mlflow_run_id, path)
    return url
