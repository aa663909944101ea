"""Exactness of the metagradient engine (float64, tiny random models on conftest.DEVICE: the CPU, or a GPU).

Relative error is normwise: max_i |tau_i - fd_i| / max_i |fd_i|, fd the four-point central difference
(h = 1e-4) of Phi(train(w + h e_i)); see PITFALLS for why AdamW uses eps_root = 1e-6 here.
"""

import pytest
import torch
from conftest import DEVICE, make_tokenizer

import dpg
from dpg.exact import finite_difference, random_data
from dpg.exact import tiny_model as tiny_cpu_model
from dpg.metagrad import Adjoint, Checkpoint, optimizer_vjp
from dpg.optim import adamw, state_tensors

N, LENGTH = 12, 10  # 12 examples, microbatch 2 x grad_accum 2 -> T = 3


def tiny_model(*args, **kwargs):
    return tiny_cpu_model(*args, **kwargs).to(DEVICE)


def config(optimizer: str, **kw) -> dpg.SFTConfig:
    base = dict(lr=0.3) if optimizer == "sgd" else dict(lr=1e-2, eps_root=1e-6)
    return dpg.SFTConfig(optimizer=optimizer, **(dict(microbatch=2, grad_accum=2, max_len=LENGTH, dtype="float64")
                                                  | base | kw))


def relative_error(scores, fd) -> float:
    return ((scores - fd).abs().max() / fd.abs().max()).item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("spec", ["l2_norm", "pattern:67"])
def test_tau_matches_central_finite_difference(arch, optimizer, spec):
    model = tiny_model(arch)
    ids, mask = random_data(N, LENGTH)
    target = dpg.get_target(spec, model)
    cfg = config(optimizer)
    result = dpg.metagradients(model, ids, mask, target, cfg)
    assert result.scores.dtype == torch.float64 and result.inner_steps == 3
    assert relative_error(result.scores, finite_difference(model, ids, mask, target, cfg)) <= 1e-6


def test_tau_matches_finite_difference_for_val_lm_qr_and_plugin_targets(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_targets.py").write_text(
        "def mean_logit(base_model, tokenizer=None, probe=None):\n"
        "    return lambda model: model(input_ids=probe).logits.mean()\n")
    (tmp_path / "heldout.txt").write_text("the cat sat on the mat\na dog ran far away from home\n")
    tokenizer = make_tokenizer()
    model = tiny_model("llama", vocab=32, hidden=24)  # QR needs 21 x 21
    ids, mask = random_data(N, LENGTH, vocab=len(tokenizer))
    targets = [dpg.get_target(f"val_lm:{tmp_path / 'heldout.txt'}", model, tokenizer),
               dpg.get_target("pattern:qr:dpg", model),
               dpg.get_target("my_targets:mean_logit", model, probe=ids[:2].to(DEVICE))]
    for optimizer in ("sgd", "adamw"):
        cfg = config(optimizer)
        for target in targets:
            scores = dpg.metagradients(model, ids, mask, target, cfg).scores
            err = relative_error(scores, finite_difference(model, ids, mask, target, cfg))
            assert err <= 1e-6, (optimizer, target, err)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_checkpoint_modes_give_identical_scores(optimizer, tmp_path):
    model = tiny_model("llama")
    ids, mask = random_data(16, LENGTH)  # T = 4
    target = dpg.get_target("pattern:67", model)
    disk = dpg.metagradients(model, ids, mask, target, config(optimizer, checkpoint_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # checkpoints are removed afterwards
    others = [config(optimizer, checkpoint="recompute", checkpoint_every=k) for k in (1, 2, 3, None)]
    for other in [*others, config(optimizer, checkpoint="host")]:
        again = dpg.metagradients(model, ids, mask, target, other)
        torch.testing.assert_close(again.scores, disk.scores, rtol=1e-12, atol=0)
        assert again.value_after == disk.value_after


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reverse_modes_agree(arch):
    model = tiny_model(arch)
    ids, mask = random_data(8, LENGTH)
    target = dpg.get_target("pattern:67", model)
    modes = ["forward_over_reverse", "double_backward"] + (["reverse_over_forward"] if arch == "llama" else [])
    scores = [dpg.metagradients(model, ids, mask, target, config("adamw", reverse=m)).scores for m in modes]
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("reverse", ["forward_over_reverse", "double_backward"])
@pytest.mark.parametrize("per_token", [False, True])
def test_sweep_microbatch_splits_the_sweep_without_changing_scores(reverse, per_token):
    """The reverse pass's sweep in chunks of 1 row (and of 3, which does not divide the microbatch of 4) gives
    the scores of whole microbatches, per example and per token."""
    model = tiny_model("llama")
    ids, mask = random_data(8, LENGTH)
    target = dpg.get_target("pattern:67", model)
    weights = torch.ones(8, LENGTH, dtype=torch.float64) if per_token else None
    scores = [dpg.metagradients(model, ids, mask, target, config("adamw", microbatch=4, reverse=reverse,
                                                                  sweep_microbatch=s), weights=weights).scores
              for s in (None, 1, 3)]
    assert scores[0].shape == ((8, LENGTH) if per_token else (8,))
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-12, atol=1e-18)


def test_reverse_over_forward_refuses_layernorm_models():
    model = tiny_model("gpt2")
    ids, mask = random_data(4, LENGTH)
    with pytest.raises(dpg.DPGError, match="pytorch/pytorch#196700"):
        dpg.metagradients(model, ids, mask, dpg.get_target("l2_norm", model),
                          config("sgd", reverse="reverse_over_forward"))


@pytest.mark.parametrize("normalization", ["max_len", "tokens"])
def test_padding_never_counts_when_pad_equals_eos(normalization):
    model = tiny_model("llama")
    ids, mask = random_data(8, LENGTH)
    target = dpg.get_target("pattern:67", model)
    cfg = config("adamw", loss_normalization=normalization, max_len=LENGTH + 6)
    base = dpg.metagradients(model, ids, mask, target, cfg)
    # six more padding columns, and padding ids changed from eos (1) to random tokens
    wide_ids = torch.cat([ids, torch.ones(8, 6, dtype=torch.long)], 1)
    wide_ids = torch.where(torch.cat([mask, torch.zeros(8, 6, dtype=torch.long)], 1) == 1, wide_ids,
                           torch.randint(0, 64, wide_ids.shape))
    wide_mask = torch.cat([mask, torch.zeros(8, 6, dtype=torch.long)], 1)
    padded = dpg.metagradients(model, wide_ids, wide_mask, target, cfg)
    torch.testing.assert_close(padded.scores, base.scores, rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("normalization", ["max_len", "tokens"])
def test_a_one_token_row_has_tau_exactly_zero_and_counts_as_weight_zero(optimizer, normalization):
    """An empty completion's SFT row (dpg.generator.to_target_examples): one token, no predicted token."""
    model = tiny_model("llama")
    ids, mask = random_data(N, LENGTH)
    ids[5], mask[5] = 1, 0
    mask[5, 0] = 1  # the eos alone
    target = dpg.get_target("pattern:67", model)
    cfg = config(optimizer, loss_normalization=normalization)
    kept = dpg.metagradients(model, ids, mask, target, cfg)
    weights = torch.ones(N, dtype=torch.float64)
    weights[5] = 0.0
    zero = dpg.metagradients(model, ids, mask, target, cfg, weights=weights)
    assert kept.scores[5].item() == 0.0 and zero.scores[5].item() == 0.0  # exactly, not ~1e-17
    others = [i for i in range(N) if i != 5]
    assert torch.equal(kept.scores[others], zero.scores[others])  # bit for bit: the row adds exact zeros
    assert (kept.scores[others] != 0).all() and kept.value_after == zero.value_after


def test_train_matches_torch_optim_sgd_step_for_step():
    model = tiny_model("gpt2")
    ids, mask = (x.to(DEVICE) for x in random_data(12, LENGTH))
    cfg = config("sgd")
    reference = tiny_model("gpt2")
    opt = torch.optim.SGD(reference.parameters(), lr=cfg.lr)
    for t in range(3):
        opt.zero_grad()
        for mb in range(2):
            rows = slice(4 * t + 2 * mb, 4 * t + 2 * mb + 2)
            logits = reference(input_ids=ids[rows], attention_mask=mask[rows]).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[rows, 1:], reduction="none")
            per_example = (nll * mask[rows, 1:]).sum(1) / cfg.max_len
            per_example.mean().backward()  # mean within a microbatch, summed over accumulation
        opt.step()
        trained = dpg.train(model, ids[: 4 * (t + 1)], mask[: 4 * (t + 1)], cfg)  # the first t+1 steps
        for (name, p), q in zip(trained.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_adamw_matches_torch_optim_for_ten_steps():
    torch.manual_seed(0)
    theta = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    params = [torch.nn.Parameter(v.clone()) for v in theta.values()]
    reference = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = adamw(1e-2, (0.9, 0.95), eps=1e-8, eps_root=0.0, weight_decay=0.1)
    state = opt.init(theta)
    for _ in range(10):
        g = {k: torch.randn_like(v) for k, v in theta.items()}
        for p, k in zip(params, theta):
            p.grad = g[k].clone()
        reference.step()
        theta, state = opt.update(theta, state, g)
    for p, k in zip(params, theta):
        torch.testing.assert_close(theta[k], p.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("first_step", [True, False])
def test_optimizer_vjp_matches_autograd_through_adamw(closed_form, first_step):
    torch.manual_seed(1)
    opt = adamw(1e-2, eps_root=1e-9, weight_decay=0.1)
    opt = opt if closed_form else opt._replace(vjp=None)  # the closed form, and torch.func's VJP of `update`
    theta = {"a": torch.randn(6, dtype=torch.float64)}
    state = opt.init(theta) if first_step else \
        opt.update(theta, opt.init(theta), {"a": torch.randn(6, dtype=torch.float64)})[1]
    g = {"a": torch.randn(6, dtype=torch.float64)}
    adj = Adjoint({"a": torch.randn(6, dtype=torch.float64)}, tuple({"a": torch.randn(6, dtype=torch.float64)}
                                                                   for _ in range(2)))
    def copied(d):
        return {k: v.clone() for k, v in d.items()}

    # the closed form overwrites its inputs (the moments, g, the adjoints) with its results: pass copies
    consumed = Checkpoint(dict(theta), type(state)(state.count, copied(state.m), copied(state.v)), copied(g))
    got, u = optimizer_vjp(opt, consumed, Adjoint(copied(adj.theta), tuple(copied(m) for m in adj.moments)))
    assert not consumed.g and not consumed.state.m and consumed.theta  # inputs released, theta kept
    leaves = [theta["a"].clone().requires_grad_(), *(m["a"].clone().requires_grad_() for m in state_tensors(state)),
              g["a"].clone().requires_grad_()]
    new, new_state = opt.update({"a": leaves[0]}, type(state)(state.count, {"a": leaves[1]}, {"a": leaves[2]}),
                                {"a": leaves[3]})
    dot = (new["a"] * adj.theta["a"]).sum() + sum((m["a"] * a["a"]).sum()
                                                   for m, a in zip(state_tensors(new_state), adj.moments))
    expected = torch.autograd.grad(dot, leaves)
    for mine, ref in zip([got.theta["a"], *(m["a"] for m in got.moments), u["a"]], expected):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-14)


def test_input_model_is_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = random_data(4, LENGTH)
    dpg.metagradients(model, ids, mask, dpg.get_target("l2_norm", model), config("adamw", microbatch=4, grad_accum=1))
    trained = dpg.train(model, ids, mask, config("adamw", microbatch=4, grad_accum=1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(trained.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("normalization", ["max_len", "tokens"])
def test_per_token_scores_match_finite_differences_and_sum_to_tau(optimizer, normalization):
    """Per-token weights (n, L): tau_it = dPhi/dw_it exactly, each row sums to the example's tau, and columns
    that predict nothing (0 and padding) score exactly 0."""
    from dpg.sft import train

    model = tiny_model("llama")
    ids, mask = random_data(N, LENGTH)
    target = dpg.get_target("pattern:67", model)
    cfg = config(optimizer, loss_normalization=normalization)
    per_token = dpg.metagradients(model, ids, mask, target, cfg, weights=torch.ones(N, LENGTH)).scores
    per_example = dpg.metagradients(model, ids, mask, target, cfg).scores
    assert per_token.shape == (N, LENGTH)
    assert torch.allclose(per_token.sum(1), per_example, rtol=1e-10, atol=1e-14)
    predicts = torch.nn.functional.pad(mask[:, 1:] * mask[:, :-1], (1, 0)).bool()
    assert (per_token[~predicts] == 0).all() and (per_token[predicts] != 0).all()

    def phi(i: int, t: int, d: float) -> float:
        w = torch.ones(N, LENGTH, dtype=torch.float64)
        w[i, t] += d
        with torch.no_grad():
            return float(target(train(model, ids, mask, cfg, weights=w)))

    h = 1e-4
    cells = [(0, 1), (0, 2), (5, 4), (11, 3)]
    fd = torch.tensor([(-phi(i, t, 2 * h) + 8 * phi(i, t, h) - 8 * phi(i, t, -h) + phi(i, t, -2 * h)) / (12 * h)
                       for i, t in cells], dtype=torch.float64)
    assert relative_error(torch.stack([per_token[i, t] for i, t in cells]), fd) <= 1e-6
