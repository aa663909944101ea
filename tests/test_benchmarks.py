"""The prepared GPU benchmark runs end to end at CPU sizes (`benchmarks/gpu.sh --dry`): both of its tables come
out with finite figures, and its JSON results parse. Speed itself is measured in benchmarks/, never here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_dry_run_writes_both_tables(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "results.md").read_text()
    assert "| T | plain torch loop s | dpg metagrad s" in report and "| sft + metagradients |" in report, report
    sft = json.loads((tmp_path / "sft.json").read_text())
    assert {r["mode"] for r in sft} == {"torch", "metagrad"} and {r["T"] for r in sft} == {1, 2}
    assert all(math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["peak_abs"] > 0 for r in sft)
    iteration = json.loads((tmp_path / "iteration.json").read_text())
    assert set(iteration["stages"]) == {"sample", "sft + metagradients", "advantages", "generator update",
                                        "eval sft"}
    assert iteration["tokens"] > 0 and all(s["seconds"] >= 0 for s in iteration["stages"].values())
