"""Bad input gives one clear error naming the key, the value and the fix; nothing is left half-written."""

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import dpg
from dpg.exact import random_data, tiny_model
from flows.cli import main


def cfg(**kw) -> dpg.SFTConfig:
    return dpg.SFTConfig(**({"optimizer": "sgd", "lr": 0.1, "microbatch": 2, "grad_accum": 2, "max_len": 10} | kw))


def test_examples_not_a_multiple_of_a_step_name_the_numbers_that_work():
    model = tiny_model("llama")
    ids, mask = random_data(10, 10, 64)
    with pytest.raises(dpg.DPGError, match=r"n=10 is not a multiple of sft.microbatch\*sft.grad_accum=2\*2=4; "
                                           r"use 8 or 12"):
        dpg.train(model, ids, mask, cfg())


def test_sequence_longer_than_max_len_names_the_example():
    model = tiny_model("llama")
    ids, mask = random_data(4, 12, 64)
    mask[2] = 1
    with pytest.raises(dpg.DPGError, match="example 2 has 12 tokens > sft.max_len=10"):
        dpg.metagradients(model, ids, mask, dpg.get_target("l2_norm", model), cfg())


def test_model_without_lm_head_is_refused():
    model = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2))
    ids, mask = random_data(4, 10, 64)
    with pytest.raises(dpg.DPGError, match="has no LM head"):
        dpg.train(model, ids, mask, cfg())


def test_non_finite_gradient_names_the_inner_step(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask = random_data(8, 10, 64)
    bad = cfg(lr=1e38, checkpoint_dir=str(tmp_path))
    with pytest.raises(dpg.DPGError, match=r"non-finite gradient at inner step 1 in parameter"):
        dpg.metagradients(model, ids, mask, dpg.get_target("l2_norm", model), bad)
    assert list(tmp_path.iterdir()) == []  # the checkpoints of the failed run are gone


def test_non_finite_target_metric_is_an_error_not_a_zero():
    model = tiny_model("llama")
    ids, mask = random_data(4, 10, 64)
    nan_target = lambda m: m.get_output_embeddings().weight.sum() * float("nan")
    with pytest.raises(dpg.DPGError, match="target metric after the SFT is nan"):
        dpg.metagradients(model, ids, mask, nan_target, cfg())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": -1.0}, "sft.lr=-1.0 is invalid; use a positive number"),
    ({"optimizer": "adam"}, "sft.optimizer='adam' is invalid; use one of ['sgd', 'adamw']"),
    ({"betas": (0.9, 1.5)}, "sft.betas=(0.9, 1.5) is invalid; use two numbers in [0, 1)"),
    ({"optimizer": "sgd", "weight_decay": 0.1}, "SGD has no weight decay"),
    ({"microbatch": 0}, "sft.microbatch=0 is invalid; use an integer >= 1"),
])
def test_bad_config_values_name_key_value_and_fix(kwargs, message):
    with pytest.raises(dpg.DPGError, match=re.escape(message)):
        dpg.SFTConfig(**kwargs)


def test_unknown_config_keys_are_named():
    with pytest.raises(dpg.DPGError, match="unknown key.*sft.learning_rate"):
        dpg.SFTConfig.from_dict({"learning_rate": 1e-3})


def test_cli_prints_one_line_and_exits_2_on_bad_input(capsys):
    assert main(["verify", "--arch", "llama", "--optimizer", "sgd", "--target", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpg: error: unknown target 'nope'; valid targets: l2_norm")


def test_cli_verify_passes_on_a_correct_engine(capsys):
    assert main(["verify", "--arch", "llama", "--optimizer", "adamw", "--target", "pattern:67"]) == 0
    out = capsys.readouterr().out
    assert "llama  adamw" in out and "worst relative error" in out
