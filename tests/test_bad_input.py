"""Bad input, as a user gives it to `dpg run`: every case ends with one `dpg: error:` line, the last line printed,
exit status 2, no traceback, and no stage or config written. Most are caught before any flow starts
(tasks.stages.preflight); the last ones fail inside a running flow and end the same way."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pipeline import texts_file, tiny_config  # noqa: F401 (texts_file: a fixture)

from flows.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    pd.DataFrame({"text": []}, dtype=str).to_parquet(root / "empty.parquet")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (root / "empty.jsonl").write_text("")
    (root / "blocker").write_text("a file where the store's folder would go")
    return root


def cases(files: Path) -> list[tuple[list[str], str]]:
    """(--set overrides, a fragment of the error line)."""
    f = str(files)
    return [
        (["prompts.source=/no/such/prompts.parquet"], "/no/such/prompts.parquet"),
        (["prompts.text_column=body"], "body"),
        ([f"prompts.source={f}/empty.parquet"], "empty.parquet"),
        (["prompts.template=no slot here"], "{article}"),
        (["prompts.max_prompt_tokens=2"], "max_prompt_tokens"),
        (["prompts.per_iteration=0"], "prompts.per_iteration=0"),
        (["generator.source=/no/such/generator"], "/no/such/generator"),
        (["generator.lora_rank=0"], "generator.lora_rank=0"),
        (["target.spec=nope"], "nope"),
        (["target.spec=pattern:file:/no/such/image.npy"], "/no/such/image.npy"),
        ([f"target.spec=pattern:file:{f}/objects.npy"], "objects.npy"),
        (["target.spec=val_lm:/no/such/texts.jsonl"], "/no/such/texts.jsonl"),
        ([f"target.spec=val_lm:{f}/empty.jsonl"], "empty.jsonl"),
        (["target.spec=no_such_module:make"], "no_such_module"),
        (["target.model=/no/such/target"], "/no/such/target"),
        (["target.text_metrics=[bogus]"], "bogus"),
        (["target.text_metrics=[langid:xx]"], "langid:xx"),
        (["rewards.name=nope"], "nope"),
        (["rewards.name=no_such_module:reward"], "no_such_module"),
        (["rewards.name=levenshtein"], "rewards.goal"),
        (["rewards.name=langid", "rewards.goal=xx"], "xx"),
        (["rewards.name=naive", "rewards.credit=token"], "rewards.credit"),
        (["rollouts.n_rollouts=1"], "n_rollouts"),
        (["rollouts.max_new_tokens=40"], "sft.max_len"),
        (["sft.dtype=bfloat16"], "sft.dtype"),
        (["sft.lr=-1"], "sft.lr"),
        (["sft.lrr=1"], "sft.lrr"),
        ([f"storage.url={f}/blocker/runs"], "blocker"),
        (['storage.storage_options={"key": "AKIA", "secret": "s"}'], "credential"),
        (["tracking.uri=notascheme://x"], "notascheme://x"),
        (["tracking.uri=http://127.0.0.1:9"], "http://127.0.0.1:9"),
        (["outer_iterations=0"], "outer_iterations"),
        (["execution.device=tpu"], "execution.device"),
        (["execution.device=cuda:99"], "execution.device='cuda:99', but this "),  # no CUDA, or not 100 devices
    ]


def test_every_bad_input_is_one_last_line_exit_2_and_nothing_written(
        prefect_harness, tiny_generator_dir, texts_file, files, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.chdir(tmp_path)
    base = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                       outer_iterations=1)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(base.to_dict()))
    table = cases(files)
    assert len(table) >= 30
    for overrides, fragment in table:
        code = main(["run", str(config), *[a for o in overrides for a in ("--set", o)]])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2, (overrides, err)
        assert lines[-1].startswith("dpg: error: ") and fragment in lines[-1], (overrides, err)
        assert "Traceback" not in err and len(lines) <= 2, (overrides, err)  # the run's one-line header, the error
        assert list(tmp_path.rglob("manifest.json")) == [] and list(tmp_path.rglob("config.json")) == [], overrides
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("dpg: error: config file")


def test_a_stage_failing_inside_the_flow_ends_with_one_line_and_the_log_has_the_traceback(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    import dpg.loop

    monkeypatch.chdir(tmp_path)
    base = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                       outer_iterations=1)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(base.to_dict()))

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the SFT stage crashed\nsecond line of the message")

    monkeypatch.setattr(dpg.loop, "group_rewards", broken)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dpg: error: RuntimeError: injected: the SFT stage crashed (traceback in "), err
    assert "Traceback" not in err and "second line" not in err and "Stopping temporary server" not in err, err
    log = Path(lines[-1].split("traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text() and "injected" in log.read_text()

    monkeypatch.setattr(dpg.loop, "group_rewards", lambda *a, **k: (_ for _ in ()).throw(ValueError("again")))
    with pytest.raises(ValueError, match="again"):  # --debug: the traceback, as Python prints it
        main(["--debug", "run", str(config)])


def test_a_command_leaves_the_callers_logging_as_it_found_it(
        prefect_harness, tiny_generator_dir, texts_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    import logging

    monkeypatch.chdir(tmp_path)
    base = tiny_config(tiny_generator_dir, texts_file, str(tmp_path / "store"), f"sqlite:///{tmp_path}/m.db",
                       outer_iterations=1)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(base.to_dict()))
    root, hub = logging.getLogger(), logging.getLogger("transformers")
    before = (list(root.handlers), root.level, hub.level)
    with pytest.raises(Exception, match="nope"):  # --debug routes everything to the console, then re-raises
        main(["--debug", "run", str(config), "--set", "rewards.name=nope"])
    assert (list(root.handlers), root.level, hub.level) == before
    assert main(["run", str(config), "--set", "rewards.name=nope"]) == 2
    assert (list(root.handlers), root.level, hub.level) == before
    capsys.readouterr()
    logging.getLogger("transformers.x").info("a library's INFO line after the command")
    assert "INFO" not in capsys.readouterr().err
