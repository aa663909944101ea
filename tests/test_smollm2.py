"""The real offline SmolLM2-135M as the SFT target, in float32."""

import pytest
import torch

import dpg
from flows.cli import DEMO_TEXTS

pytestmark = pytest.mark.smollm2


def test_smollm2_loads_offline_with_tied_head_and_chat_template(smollm2):
    model, tokenizer = smollm2
    assert model.dtype == torch.float32 and model.config._attn_implementation == "eager"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied: W_out = embeddings
    assert model.get_output_embeddings().weight.shape == (49152, 576)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_default_pattern_patch_skips_smollm2_control_tokens(smollm2):
    model, tokenizer = smollm2
    target = dpg.get_target("pattern:67", model, tokenizer)
    w = model.get_output_embeddings().weight.detach().clone()
    with torch.no_grad():
        model.get_output_embeddings().weight[17:24, :6] += 0.1 * torch.tensor(dpg.targets.IMAGE_67).T
        moved = target.report(model)
        model.get_output_embeddings().weight.copy_(w)
    assert moved["pixel_accuracy"] == 1.0  # the patch sits at ids 17..23 ('!' .. "'"), not 0..6


def test_smollm2_scores_are_finite_and_predict_the_change_in_phi(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer(DEMO_TEXTS[:4], truncation=True, max_length=24, padding="max_length", return_tensors="pt")
    target = dpg.get_target("pattern:67", model, tokenizer)
    cfg = dpg.SFTConfig(optimizer="sgd", lr=2e-3, microbatch=2, grad_accum=1, max_len=24)  # T = 2
    result = dpg.metagradients(model, enc["input_ids"], enc["attention_mask"], target, cfg)
    assert torch.isfinite(result.scores).all() and result.scores.abs().max() > 0
    change, predicted = result.value_after - result.value_before, float(result.scores.sum())
    # SGD at small lr: theta_T is nearly linear in w, so Phi(w=1) - Phi(w=0) ~ sum_i tau_i
    assert (change > 0) == (predicted > 0)
    assert abs(change - predicted) <= 0.05 * abs(change), (change, predicted)  # measured: 0.2%
