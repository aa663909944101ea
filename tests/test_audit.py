"""`dpg audit` and `dpg export` on a real tiny run (Prefect flow, MLflow sqlite, LoRA generator)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_pipeline import texts_file, tiny_config  # noqa: F401 (texts_file: a fixture)

from flows.cli import main
from tasks import io
from tasks.stages import stage_url


@pytest.fixture(scope="module")
def run(prefect_harness, tiny_generator_dir, texts_file, tmp_path_factory):  # noqa: F811
    from flows.optimize import optimize

    root = tmp_path_factory.mktemp("audited")
    cfg = tiny_config(tiny_generator_dir, texts_file, str(root / "store"), f"sqlite:///{root}/m.db",
                      **{"rollouts.n_rollouts": 4, "sft.microbatch": 2})
    optimize(cfg)
    return cfg, str(root / "store" / cfg.run_id)


def records(cfg, it):
    return io.read_table(stage_url(cfg, it, "rewards"), "records.parquet")


def test_audit_ranks_by_tau_and_checks_the_sft_runs_first_order(run, capsys):
    cfg, path = run
    assert main(["audit", path, "--iteration", "1", "--top", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    table = records(cfg, 1).dropna(subset=["tau"]).sort_values("tau")
    assert [r["example_id"] for r in result["by_tau"]["proponents"]] == table["example_id"].tolist()[::-1][:2]
    assert [r["example_id"] for r in result["by_tau"]["opponents"]] == table["example_id"].tolist()[:2]
    best = result["by_tau"]["proponents"][0]
    row = table.set_index("example_id").loc[best["example_id"]]
    assert best["tau"] == row["tau"] and best["tau_normalised"] == pytest.approx(row["tau"] / row["tau_scale"])
    assert best["generator_version"] == row["generator_version"] and best["text"] in " ".join(row["text"].split())
    runs = io.read_table(stage_url(cfg, 1, "rewards"), "sft_runs.parquet")
    assert [(r["iteration"], r["sft_group"]) for r in result["sft_runs"]] == [(1, g) for g in runs["group_id"]]
    for r, (_, expected) in zip(result["sft_runs"], runs.iterrows()):
        assert r["phi_change"] == pytest.approx(expected["phi_after"] - expected["phi_before"])
        mine = table[table["group_id"] == expected["group_id"]]["tau"]
        assert r["sum_tau"] == pytest.approx(mine.sum()) and 0 < r["top_10pct_share"] <= 1
    assert [i["iteration"] for i in result["iterations"]] == [0, 1]
    assert "eval_pixel_accuracy" in result["iterations"][1]

    assert main(["audit", path]) == 0  # the whole run, as a table
    out = capsys.readouterr().out
    assert "top 5 proponents by tau" in out and "SFT runs" in out and "per iteration" in out
    assert main(["audit", path, "--iteration", "7"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("dpg: error: iteration 7 of run")


def test_export_writes_parquet_a_datasets_folder_a_card_and_a_loadable_registered_generator(run, tmp_path, capsys):
    import datasets
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from tasks.stages import generator_at
    from tasks.tracking import tracking_uri

    cfg, path = run
    out = tmp_path / "export"
    assert main(["export", path, "--iteration", "last", "--out", str(out), "--generator"]) == 0
    printed = capsys.readouterr().out
    assert "dataset of iteration 1" in printed and "registered in MLflow as dpg-dpg version 1" in printed
    frame = pd.read_parquet(out / "data.parquet")
    expected = records(cfg, 1)
    assert frame["example_id"].tolist() == expected["example_id"].tolist()
    assert frame["text"].tolist() == expected["text"].tolist()
    assert np.array_equal(frame["tau"].to_numpy(), expected["tau"].to_numpy(), equal_nan=True)
    loaded = datasets.load_from_disk(str(out / "dataset"))
    assert loaded["text"] == frame["text"].tolist() and loaded["example_id"] == frame["example_id"].tolist()
    card = (out / "README.md").read_text()
    assert cfg.run_id in card and "license: other" in card and "outer iteration 1" in card

    model, tokenizer, _, version = generator_at(cfg, 2)  # the generator after iteration 1's update (LoRA)
    assert hasattr(model, "merge_and_unload")
    exported = AutoModelForCausalLM.from_pretrained(str(out / "generator"), attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer("the river rose quickly")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, model(ids).logits, atol=1e-5)
    lineage = json.loads((out / "generator" / "dpg_lineage.json").read_text())
    assert [u["iteration"] for u in lineage["updates"]] == [0, 1] and lineage["updates"][-1]["version"] == version

    mc = MlflowClient(tracking_uri=tracking_uri(cfg))
    [mv] = mc.search_model_versions("name = 'dpg-dpg'")
    assert mv.tags["dpg.run_id"] == cfg.run_id and mv.tags["dpg.generator_version"] == version
    assert mv.tags["dpg.lineage"].endswith(f"<- {cfg.generator.source}")

    assert main(["export", path, "--iteration", "9", "--out", str(tmp_path / "x")]) == 2
    assert "is not a finished iteration" in capsys.readouterr().err


def test_finetune_of_an_export_gives_the_iterations_eval_and_best_is_by_the_human_metric(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dpg.generator import target_rows
    from tasks.export import report_metrics
    from tasks.stages import target_for

    cfg, path = run
    accuracy = {it: report_metrics(cfg, it)["eval_pixel_accuracy"] for it in (0, 1)}
    best = max(accuracy, key=lambda it: (accuracy[it], -it))
    assert main(["export", path, "--out", str(tmp_path / "data")]) == 0  # --iteration best is the default
    assert f"dataset of iteration {best} " in capsys.readouterr().out
    assert main(["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "tuned"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stored = report_metrics(cfg, best)
    assert result["after"] == {"phi": stored["eval_phi"], "pixel_accuracy": stored["eval_pixel_accuracy"]}
    assert result["examples"] == stored["eval_examples"]
    _, _, target = target_for(cfg)
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tuned"), attn_implementation="eager")
    assert target.report(tuned) == result["after"]
    # your own target: a Hugging Face folder (here the model just tuned), its own patch start
    assert main(["finetune", str(tmp_path / "data"), "--model", str(tmp_path / "tuned"), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["target_model"] == str(tmp_path / "tuned") and own["before"]["pixel_accuracy"] == 0.0
    assert own["after"]["phi"] != own["before"]["phi"]  # the SFT moved its patch
    assert main(["finetune", str(tmp_path)]) == 2
    assert "holds no dpg_config.json" in capsys.readouterr().err

    # the audit's text statistics include how often the completions write the patch's tokens
    texts = records(cfg, best)["text"].tolist()
    labels = [t for row in target_rows(texts, target_for(cfg)[1], cfg.sft.max_len) for t in row[1:]]
    share = sum(t in set(target.token_ids) for t in labels) / len(labels)
    assert stored["text_patch_token_share"] == pytest.approx(share) and len(target.token_ids) > 0
    assert main(["audit", path, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["iterations"][best]
    assert summary["text_patch_token_share"] == stored["text_patch_token_share"]


def test_the_html_report_renders_in_a_real_headless_browser(run, tmp_path):
    import shutil
    import subprocess

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tasks.tracking import tracking_uri

    cfg, path = run
    assert main(["report", path]) == 0
    report = f"{path}/report.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser, "no Chromium: .ci/run installs the Debian package 'chromium'"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path}/c"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", f"file://{report}"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # not blank: text, plots and patch images
    assert (pixels < 100).mean() > 0.005  # dark ink somewhere (text, lines)
    dom = subprocess.run([browser, *flags, "--dump-dom", f"file://{report}"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    for anchor in ('id="curves"', 'id="patches"', 'id="rewards"', 'id="examples"', 'id="verify"', 'id="lineage"'):
        assert anchor in dom, anchor
    assert dom.count('src="data:image/png;base64,') >= 4 and cfg.run_id in dom  # curves, 2 patches, histograms
    assert "http://" not in dom.split("<body")[1] and "https://" not in dom.split("<body")[1]  # self-contained
    mc = MlflowClient(tracking_uri=tracking_uri(cfg))
    [mlflow_run] = mc.search_runs([mc.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                  f"tags.`dpg.run_id` = '{cfg.run_id}'")
    assert "report.html" in [a.path for a in mc.list_artifacts(mlflow_run.info.run_id)]


def test_verify_retrains_without_the_top_examples_and_agrees_with_tau_at_a_small_lr(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, capsys):  # noqa: F811
    from flows.optimize import optimize
    from tasks.audit import stored_verify

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                      **{"prompts.per_iteration": 6, "sft.microbatch": 2, "sft.lr": 0.01, "outer_iterations": 1})
    optimize(cfg)
    path = str(tmp_path / "store" / cfg.run_id)
    assert main(["audit", path, "--verify", "--subsets", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for group in result["groups"]:
        for name in ("proponents", "opponents", "random"):
            r = group[name]  # at a small lr Phi is nearly linear in the weights: prediction and retrain agree
            assert r["actual"] == pytest.approx(r["predicted"], rel=0.05, abs=1e-7), (group["sft_group"], name)
        p, r, o = (group[n]["actual"] for n in ("proponents", "random", "opponents"))
        assert p <= r <= o  # the random pick may coincide with either
        assert group["subsets"]["lds"] > 0.9, group
    assert stored_verify(cfg)[0]["summary"] == result["summary"]

    version = io.read_manifest(stage_url(cfg, 0, "generator"))["meta"]["version"]
    assert main(["audit", path, "--generator", version[:8]]) == 0
    out = capsys.readouterr().out
    assert f"generator {version}" in out and "iteration    0" in out and "base:" in out
    assert main(["audit", path, "--generator", "nope"]) == 2
