"""benchmarks/reproduce.py: the cell command, the registry, the method table and its verdicts (pure parts), and a
real two-cell grid run side by side, then resumed."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from dpg.runconfig import load_config

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", PATH)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def grid(values: dict[str, list[float]], first: float = 0.5) -> pd.DataFrame:
    """A demo's results: iteration 0 at `first` for every seed, iteration 1 at the given per-seed values."""
    rows = [{"demo": "67", "method": m, "seed": s, "iteration": it, "metric": first if it == 0 else v}
            for m, vs in values.items() for s, v in enumerate(vs) for it in (0, 1)]
    return pd.DataFrame(rows)


def by_method(rows):
    return {r["method"]: r for r in rows}


def test_cell_overrides_carry_the_seed_everywhere_then_the_method_then_extras(tmp_path):
    overrides = reproduce.cell_overrides("language", "embedding", 7, 40, tmp_path, ["generator.source=/x"])
    assert overrides[:2] == ["seed=7", "outer_iterations=40"]
    assert f"storage.url={tmp_path / 'runs'}" in overrides and overrides[-1] == "generator.source=/x"
    assert 'rewards.name="embedding"' in overrides
    command = reproduce.cell_command("exp.yaml", overrides)
    assert command[:5] == [sys.executable, "-m", "flows.cli", "run", "exp.yaml"]
    assert command[5::2] == ["--set"] * len(overrides) and command[6::2] == overrides
    cfg = load_config(None, overrides)  # the values survive dpg's YAML parsing of --set, spaces and accents included
    assert (cfg.seed, cfg.rollouts.seed, cfg.policy.seed, cfg.outer_iterations) == (7, 7, 7, 40)
    assert (cfg.rewards.name, cfg.rewards.goal) == ("embedding", reproduce.FRENCH_GOAL)
    assert cfg.storage.url == str(tmp_path / "runs") and cfg.generator.source == "/x"


def test_registry_has_the_controls_in_every_demo_and_a_direction_for_every_metric():
    for demo, entry in reproduce.DEMOS.items():
        assert {"dpg", "naive", "random"} <= set(entry["methods"]), demo
        assert entry["metrics"] and all(isinstance(h, bool) for h in entry["metrics"].values()), demo
        assert set(entry["chance"]) <= set(entry["metrics"]), demo
    assert reproduce.DEMOS["uuid"]["methods"]["levenshtein"]["rewards.goal"] == reproduce.UUID_GOAL
    assert reproduce.DEMOS["language"]["methods"]["langid"]["rewards.goal"] == "fr"
    assert reproduce.DEMOS["l2"]["metrics"] == {"eval_l2_norm": False, "eval_fresh_l2_norm": False}


def test_every_cell_of_the_grid_is_a_valid_config(tmp_path):
    # e.g. a demo whose dpg uses token credit: its per-rollout controls must switch back to sequence credit
    for demo, entry in reproduce.DEMOS.items():
        for method, sets in entry["methods"].items():
            cfg = load_config(str(reproduce.ROOT / entry["config"]),
                              reproduce.cell_overrides(demo, method, 1, 2, tmp_path))
            assert cfg.rewards.name == sets["rewards.name"] and cfg.seed == 1, (demo, method)


def test_verdict_separates_only_beyond_twice_the_larger_spread():
    frame = grid({"dpg": [0.80, 0.82, 0.84], "naive": [0.50, 0.52, 0.54], "random": [0.70, 0.80, 0.90]})
    rows = by_method(reproduce.method_table(frame, "metric", True, reproduce.final_iteration(frame)))
    assert rows["dpg"]["n"] == 3 and rows["dpg"]["final"] == "0.82 ± 0.02" and rows["dpg"]["first"] == "0.5 ± 0"
    assert rows["dpg"]["per seed"] == "s0: 0.8, s1: 0.82, s2: 0.84" and rows["dpg"]["verdict"] == ""
    assert rows["naive"]["DPG − method"] == "+0.3" and rows["naive"]["verdict"] == "DPG ahead by > 2x spread"
    # difference 0.02, spread = random's std 0.1: not separated
    assert rows["random"]["verdict"] == "not separated"


def test_verdict_respects_lower_is_better():
    frame = grid({"dpg": [1.0, 1.1, 1.2], "naive": [2.0, 2.1, 2.2], "random": [0.1, 0.2, 0.3]})
    rows = by_method(reproduce.method_table(frame, "metric", False, 1))
    assert rows["naive"]["DPG − method"] == "-1" and rows["naive"]["verdict"] == "DPG ahead by > 2x spread"
    assert rows["random"]["verdict"] == "method ahead by > 2x spread"
    assert reproduce.verdict([1.0, 1.1], [2.0, 2.1], True)[1] == "method ahead by > 2x spread"
    assert reproduce.verdict([1.0], [2.0], False) == (-1.0, "not separated (fewer than 2 seeds)")


def test_paired_verdict_uses_the_spread_of_the_per_seed_differences():
    # unpaired, 0.6/0.7/0.8 against 0.5/0.6/0.7 is not separated (spread 0.1); paired, every seed is +0.1 ± ~0
    assert reproduce.verdict([0.6, 0.7, 0.8], [0.5, 0.6, 0.7], True)[1] == "not separated"
    assert reproduce.paired_verdict([0.1, 0.11, 0.09], True) == "DPG ahead by > 2x spread"
    assert reproduce.paired_verdict([0.1, 0.11, 0.09], False) == "method ahead by > 2x spread"
    assert reproduce.paired_verdict([0.1, -0.1, 0.05], True) == "not separated"
    assert reproduce.paired_verdict([0.1], True) == "not separated (fewer than 2 seeds)"


def test_final_iteration_is_the_last_one_every_cell_reached():
    frame = grid({"dpg": [0.6, 0.7], "naive": [0.5, 0.5]})
    assert reproduce.final_iteration(frame) == 1
    assert reproduce.final_iteration(frame[~((frame["method"] == "naive") & (frame["iteration"] == 1))]) == 0
    table = reproduce.markdown(reproduce.method_table(frame, "metric", True, 1))
    assert table.splitlines()[0].startswith("| method | n | first | final | per seed | DPG − method | verdict |")


def test_script_help_runs():
    result = subprocess.run([sys.executable, str(PATH), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--report-only" in result.stdout
    assert "uuid: dpg, dpg-sequence, dpg-token, naive, random, levenshtein" in result.stdout


def test_commands_of_reads_old_and_new_ledgers():
    assert reproduce.commands_of({}) == []
    assert reproduce.commands_of({"command": "a"}) == ["a"]
    assert reproduce.commands_of({"commands": ["a", "b"], "command": "c"}) == ["a", "b"]


def test_a_grid_runs_cells_side_by_side_and_a_second_run_skips_them(tmp_path):
    tiny = ["generator.toy={corpora: [wiki-vital], vocab: 64, hidden: 32, layers: 1}", "target.tiny_hidden=32",
            "target.tiny_layers=1", "target.tiny_pretrain_steps=0", "prompts.per_iteration=2",
            "rollouts.n_rollouts=2", "rollouts.max_new_tokens=6", "sft.max_len=10", "target.eval_fresh=0",
            "policy.epochs=1", "policy.kl_coef=0.0"]
    command = [sys.executable, str(PATH), "--demo", "67", "--methods", "dpg", "random", "--seeds", "0",
               "--iterations", "1", "--jobs", "2", "--out", str(tmp_path), *[a for t in tiny for a in ("--set", t)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(line.split(":")[0].split()[-1] for line in first.stdout.splitlines() if " ran " in line) == [
        "67-dpg-s0", "67-random-s0"]
    rows = pd.read_csv(tmp_path / "results.csv")
    assert sorted(zip(rows["method"], rows["iteration"])) == [("dpg", 0), ("random", 0)]
    assert (tmp_path / "67.png").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stdout.count("complete (skipped)") == 2, again.stdout + again.stderr
