"""What a person at a terminal sees: `dpg run` in a real pseudo-terminal shows rich's live progress line."""

import json
import os
import re
import select
import subprocess
import sys

from test_pipeline import texts_file, tiny_config  # noqa: F401 (texts_file: a fixture)


def test_on_a_terminal_the_run_shows_a_live_line_then_the_final_table(tiny_generator_dir, texts_file, tmp_path):  # noqa: F811
    import pty

    cfg = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db")
    config = tmp_path / "job.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1", COLUMNS="200",
               TERM="xterm-256color")
    for key in ("PREFECT_API_URL", "NO_COLOR", "CI", "GITHUB_ACTIONS", "TERM_PROGRAM"):
        env.pop(key, None)
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=tmp_path, env=env,
                               stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 600)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, screen[-3000:]
    raw = screen.decode("utf-8", "replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "\x1b[?25l" in raw  # rich's Live hides the cursor while it redraws the line: a live view, not a log
    assert re.search(rf"{cfg.run_id} iteration [12]/2 \| stage \S+ \| elapsed \d+ s", text), text[-3000:]
    assert "2/2 iterations done" in text and "pixel_accuracy" in text, text[-3000:]
    report = re.search(r"report: (\S+report\.html)", text)
    assert report and os.path.getsize(report[1]) > 10_000, text[-3000:]  # the Phi curve and patches, inline
    artifacts = re.search(r"MLflow run \w+, artifacts in (\S+): (.+)", text)
    assert artifacts, text[-3000:]
    for name in ("phi_over_iterations.png", "patches/patch_iter_0001.png", "report.html"):
        assert name in artifacts[2] and os.path.exists(os.path.join(artifacts[1].removeprefix("file://"), name))
    assert "Traceback" not in text and "INFO" not in text, text[-3000:]
