"""Tests for dpg/targets.py on tiny random float64 models (CPU, no downloads)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

from dpg.errors import DPGError
from dpg.targets import TARGETS, Target, causal_lm_loss, get_target, output_matrix

S67 = np.array([
    [1, 1, 1, 1, -1, -1, -1],
    [-1, -1, -1, 1, 1, 1, -1],
    [-1, 1, 1, 1, 1, 1, -1],
    [-1, -1, -1, 1, 1, 1, -1],
    [-1, 1, -1, 1, 1, 1, -1],
    [-1, -1, -1, 1, 1, 1, 1],
])
TEXTS = ["the cat sat on the mat", "a dog ran far away from home", "then came back", "the dog sat"]


def llama_config(**kw):
    return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                       attn_implementation="eager", **kw)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).double().eval()


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1,
                        eos_token_id=1, attn_implementation="eager")
    return GPT2LMHeadModel(config).double().eval()


class SpecialIdsTokenizer:
    all_special_ids = (*range(17),)  # like SmolLM2: ids 0-16 are special


def add_to_patch(model, image, value, vocab_ids, hidden_offset=0):
    """W_out[vocab_ids[c], hidden_offset + r] += value * image[r, c]."""
    rows = image.shape[0]
    with torch.no_grad():
        W = output_matrix(model)
        step = value * torch.as_tensor(image).T.to(W)  # (cols, rows)
        W[torch.tensor(vocab_ids), hidden_offset:hidden_offset + rows] += step


def grad_of_output_matrix(target, model):
    model.zero_grad()
    target(model).backward()
    return output_matrix(model).grad


# --- pattern ---------------------------------------------------------------------------------------------


def test_image_67_is_the_spec_image(llama):
    target = get_target("pattern:67", llama)
    assert target.report(llama)["pixel_accuracy"] == 0.0  # Δ = 0: sign(0) matches no pixel
    add_to_patch(llama, S67, 1e-3, list(range(7)))
    assert target.report(llama)["pixel_accuracy"] == 1.0
    flip = np.zeros((6, 7))
    flip[0, 0] = S67[0, 0]
    add_to_patch(llama, flip, -2e-3, list(range(7)))  # pixel (0, 0) now points against S
    assert target.report(llama)["pixel_accuracy"] == pytest.approx(41 / 42)


def test_pixel_accuracy_is_one_along_image_and_zero_against_it(llama):
    target = get_target("pattern:67", llama)
    add_to_patch(llama, S67, 1e-4, list(range(7)))
    assert target.report(llama)["pixel_accuracy"] == 1.0
    add_to_patch(llama, S67, -2e-4, list(range(7)))
    assert target.report(llama)["pixel_accuracy"] == 0.0


def test_pattern_phi_increases_along_image_and_starts_at_minus_log2(llama):
    target = get_target("pattern:67", llama, kappa=5.0)
    values = [target(llama).item()]
    assert values[0] == pytest.approx(-np.log(2.0))
    for _ in range(3):
        add_to_patch(llama, S67, 0.1, list(range(7)))
        values.append(target(llama).item())
    assert values == sorted(values) and len(set(values)) == 4
    assert target.report(llama)["phi"] == pytest.approx(values[-1])


def test_pattern_gradient_is_zero_outside_patch_and_matches_finite_difference(llama):
    target = get_target("pattern:67", llama, vocab_offset=5, hidden_offset=3)
    add_to_patch(llama, np.random.default_rng(0).normal(size=(6, 7)), 0.05, list(range(5, 12)), 3)
    llama.zero_grad()
    phi = target(llama)
    assert phi.dtype == torch.float64 and phi.dim() == 0
    phi.backward()
    grads = {name: p.grad for name, p in llama.named_parameters()}
    assert all(g is None or not g.any() for name, g in grads.items() if name != "lm_head.weight")
    G = grads["lm_head.weight"]
    inside = torch.zeros_like(G, dtype=torch.bool)
    inside[5:12, 3:9] = True
    assert G[inside].abs().min() > 0 and not G[~inside].any()
    direction = torch.randn_like(G)
    W = output_matrix(llama)
    with torch.no_grad():
        W += 1e-6 * direction
        up = target(llama).item()
        W -= 2e-6 * direction
        down = target(llama).item()
    assert (up - down) / 2e-6 == pytest.approx((G * direction).sum().item(), rel=1e-6)


def test_pattern_on_tied_gpt2_moves_input_embeddings(gpt2):
    assert output_matrix(gpt2) is gpt2.transformer.wte.weight
    target = get_target("pattern:67", gpt2)
    add_to_patch(gpt2, S67, 0.01, list(range(7)))
    G = grad_of_output_matrix(target, gpt2)
    assert G[:7, :6].abs().min() > 0 and not G[7:].any() and not G[:, 6:].any()


def test_qr_of_short_text_is_21x21_plus_minus_one_and_depends_on_text(llama):
    pytest.importorskip("segno")
    from dpg.targets import _pattern_image

    a = _pattern_image("pattern:qr:hello", "qr:hello")
    b = _pattern_image("pattern:qr:world", "qr:world")
    assert a.shape == b.shape == (21, 21)
    assert set(np.unique(a)) == {-1, 1} and (a != b).any()
    assert a[0, :7].tolist() == [1] * 7  # finder pattern: dark top row, no quiet-zone border
    url = _pattern_image("p", "qr:https://example.com/a:b")  # ':' in the text is part of the text
    assert url.shape == (25, 25) and set(np.unique(url)) == {-1, 1}
    with pytest.raises(DPGError, match=r"21×21 image does not fit .*\(vocab=64, hidden=16\)"):
        get_target("pattern:qr:hello", llama)


def test_pattern_file_reads_char_grid_numeric_grid_and_npy(llama, tmp_path):
    from dpg.targets import _pattern_image

    chars = tmp_path / "s.txt"
    chars.write_text("\n".join("".join("#" if v > 0 else "." for v in row) for row in S67) + "\n\n")
    numbers = tmp_path / "n.csv"
    numbers.write_text("\n".join(",".join(str(v) for v in row) for row in S67))
    binary = tmp_path / "b.txt"
    binary.write_text("\n".join("".join("1" if v > 0 else "0" for v in row) for row in S67))
    spaced = tmp_path / "sp.txt"
    spaced.write_text("X X\n X")  # trailing space stripped by an editor: row padded with light pixels
    npy = tmp_path / "s.npy"
    np.save(npy, S67 * 0.5)
    for path in (chars, numbers, binary, npy):
        np.testing.assert_array_equal(_pattern_image("p", f"file:{path}"), S67)
    np.testing.assert_array_equal(_pattern_image("p", f"file:{spaced}"), [[1, -1, 1], [-1, 1, -1]])
    target = get_target(f"pattern:file:{chars}", llama)
    add_to_patch(llama, S67, 1e-3, list(range(7)))
    assert target.report(llama)["pixel_accuracy"] == 1.0
    bad = tmp_path / "bad.txt"
    bad.write_text("#?#\n...")
    with pytest.raises(DPGError, match=r"\['\?'\]"):
        get_target(f"pattern:file:{bad}", llama)
    with pytest.raises(DPGError, match="not found"):
        get_target(f"pattern:file:{tmp_path / 'missing.txt'}", llama)


def test_default_vocab_offset_skips_special_ids(llama):
    G = grad_of_output_matrix(get_target("pattern:67", llama, tokenizer=SpecialIdsTokenizer()), llama)
    assert G[17:24, :6].abs().min() > 0 and not G[:17].any() and not G[24:].any()
    G = grad_of_output_matrix(get_target("pattern:67", llama), llama)  # no tokenizer: offset 0
    assert G[:7, :6].abs().min() > 0 and not G[7:].any()


def test_token_ids_option_places_patch_at_those_rows(llama):
    ids = [40, 3, 9, 60, 21, 22, 5]
    target = get_target("pattern:67", llama, token_ids=ids)
    G = grad_of_output_matrix(target, llama)
    others = torch.ones(64, dtype=torch.bool)
    others[ids] = False
    assert G[ids, :6].abs().min() > 0 and not G[others].any() and not G[:, 6:].any()
    add_to_patch(llama, S67, 1e-3, ids)  # column c of the image lives in row ids[c]
    assert target.report(llama)["pixel_accuracy"] == 1.0


def test_token_ids_commonest_puts_the_patch_on_the_texts_commonest_tokens(llama):
    tokenizer = make_tokenizer()
    words = "the cat sat on the mat and the dog ran far away from home then came back the cat a dog the mat"
    target = get_target("pattern:67", llama, tokenizer, token_ids="commonest", texts=[words, "the cat and a dog"])
    v = tokenizer.get_vocab()
    # counts: the 6; cat, dog 3; mat, a, and 2 (ties by id); then the first of the words used once
    assert target.token_ids == tuple(v[w] for w in ("the", "cat", "dog", "mat", "a", "and", "sat"))
    with pytest.raises(DPGError, match="token_ids='commonest' needs a tokenizer and texts"):
        get_target("pattern:67", llama, tokenizer, token_ids="commonest")


def test_pattern_rejects_bad_placement_with_sizes(llama):
    with pytest.raises(DPGError, match="vocab_offset=60.*vocab size 64.*<= 57"):
        get_target("pattern:67", llama, vocab_offset=60)
    with pytest.raises(DPGError, match="hidden_offset=12.*hidden size 16"):
        get_target("pattern:67", llama, hidden_offset=12)
    with pytest.raises(DPGError, match="token_ids"):
        get_target("pattern:67", llama, token_ids=[1, 2, 3])
    with pytest.raises(DPGError, match="kappa=-1"):
        get_target("pattern:67", llama, kappa=-1)
    with pytest.raises(DPGError, match="unknown pattern 'sixty'"):
        get_target("pattern:sixty", llama)


# --- l2_norm ---------------------------------------------------------------------------------------------


def test_l2_norm_phi_is_minus_frobenius_norm(llama):
    target = get_target("l2_norm", llama)
    W = llama.lm_head.weight
    assert target(llama).item() == pytest.approx(-torch.sqrt((W**2).sum()).item(), rel=1e-12)
    report = target.report(llama)
    assert report["l2_norm"] == pytest.approx(-report["phi"]) and report["l2_norm"] > 0
    G = grad_of_output_matrix(target, llama)
    torch.testing.assert_close(G, -W.detach() / W.detach().norm())


# --- val_lm ----------------------------------------------------------------------------------------------


def hand_loss(model, tokenizer, texts, max_len=128):
    """Σ_i loss_i·(n_i − 1) / Σ_i (n_i − 1), loss_i from one unpadded text at a time.

    (Not `model(labels=...).loss`: transformers computes that in float32 even for a float64 model.)
    """
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_len]])  # (1, n)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]  # (n-1, V)
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_val_lm_loss_on_txt_matches_hand_computation(model_name, request, tmp_path):
    model = request.getfixturevalue(model_name)
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(TEXTS[:2]) + "\n\n   \n" + "\n".join(TEXTS[2:]) + "\n")
    tokenizer = make_tokenizer()
    target = get_target(f"val_lm:{path}", model, tokenizer=tokenizer)
    phi = target(model)
    assert phi.dtype == torch.float64
    assert -phi.item() == pytest.approx(hand_loss(model, tokenizer, TEXTS), rel=1e-10)
    assert target.report(model)["val_loss"] == pytest.approx(-phi.item())
    short = get_target(f"val_lm:{path}", model, tokenizer=tokenizer, max_len=3, max_texts=2)
    assert -short(model).item() == pytest.approx(hand_loss(model, tokenizer, TEXTS[:2], max_len=3), rel=1e-10)


def test_val_lm_padding_changes_nothing(llama, tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(TEXTS))
    with_pad = get_target(f"val_lm:{path}", llama, tokenizer=make_tokenizer())(llama).item()
    eos_pad = get_target(f"val_lm:{path}", llama, tokenizer=make_tokenizer(pad_token=None))(llama).item()
    assert eos_pad == pytest.approx(with_pad, rel=1e-12)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    base = causal_lm_loss(llama, ids, mask).item()
    wider = torch.cat([ids, torch.full((2, 3), 9)], dim=1)  # extra pad columns with an ordinary token id
    wider[1, 2:4] = 5
    assert causal_lm_loss(llama, wider, torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1)).item() == (
        pytest.approx(base, rel=1e-12))


def test_val_lm_skip_unknown_drops_unknown_labels_only(llama, tmp_path):
    tokenizer = make_tokenizer()
    path = tmp_path / "held_out.txt"
    path.write_text("the zebra sat on the quagga mat\nthe cat sat\n")  # zebra, quagga: <unk>
    ids = [tokenizer(t)["input_ids"] for t in path.read_text().splitlines()]
    assert sum(i == tokenizer.unk_token_id for row in ids for i in row) == 2
    total, count = 0.0, 0
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(llama(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
        keep = x[0, 1:] != tokenizer.unk_token_id
        total, count = total + ce[keep].sum().item(), count + int(keep.sum())
    phi = get_target(f"val_lm:{path}", llama, tokenizer, skip_unknown=True)(llama).item()
    assert -phi == pytest.approx(total / count, rel=1e-10)
    assert get_target(f"val_lm:{path}", llama, tokenizer)(llama).item() != pytest.approx(phi)
    with pytest.raises(DPGError, match="skip_unknown"):
        get_target(f"val_lm:{path}", llama, tokenizer, skip_unknown="yes")


def test_val_lm_reads_tables_and_datasets_folder(llama, tmp_path):
    tokenizer = make_tokenizer()
    expected = hand_loss(llama, tokenizer, TEXTS)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS)))
    phi = get_target(f"val_lm:{jsonl}", llama, tokenizer, text_column="body")(llama)
    assert -phi.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(DPGError, match=r"text_column='text' is not in \['body', 'id'\]"):
        get_target(f"val_lm:{jsonl}", llama, tokenizer)
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder))
    phi = get_target(f"val_lm:{folder}", llama, tokenizer)(llama)
    assert -phi.item() == pytest.approx(expected, rel=1e-10)


def test_val_lm_bad_inputs_raise(llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DPGError, match="needs a tokenizer"):
        get_target(f"val_lm:{empty}", llama)
    with pytest.raises(DPGError, match="no non-empty texts"):
        get_target(f"val_lm:{empty}", llama, make_tokenizer())
    with pytest.raises(DPGError, match="missing.txt"):
        get_target(f"val_lm:{tmp_path / 'missing.txt'}", llama, make_tokenizer())
    with pytest.raises(DPGError, match="max_len=1"):
        get_target(f"val_lm:{empty}", llama, make_tokenizer(), max_len=1)


# --- plugins, errors -------------------------------------------------------------------------------------


@pytest.fixture
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_plugin_target_from_user_module(llama, tests_on_path):
    target = get_target("plugin_target:make", llama, scale=2.0)
    assert isinstance(target, Target) and target.name == "plugin_target:make"
    expected = 2.0 * llama.lm_head.weight[0].sum().item()
    assert target(llama).item() == pytest.approx(expected)
    assert target.report(llama) == {"phi": pytest.approx(expected)}
    G = grad_of_output_matrix(target, llama)
    assert (G[0] == 2.0).all() and not G[1:].any()
    full = get_target("plugin_target:make_target", llama)
    assert full.report(llama)["row_one_sum"] == pytest.approx(llama.lm_head.weight[1].sum().item())


def test_plugin_load_failures_name_the_spec(llama, tests_on_path):
    with pytest.raises(DPGError, match="'no_such_module_xyz:make'.*ModuleNotFoundError"):
        get_target("no_such_module_xyz:make", llama)
    with pytest.raises(DPGError, match="'plugin_target:nope'.*AttributeError"):
        get_target("plugin_target:nope", llama)
    with pytest.raises(DPGError, match="returned a float"):
        get_target("plugin_target:make_number", llama)


def test_unknown_target_lists_valid_names(llama):
    with pytest.raises(DPGError) as info:
        get_target("l3_norm", llama)
    message = str(info.value)
    assert "'l3_norm'" in message and "package.module:factory" in message and "\n" not in message
    assert all(name in message for name in TARGETS)
    with pytest.raises(DPGError, match="unknown target 'val_lm'"):
        get_target("val_lm", llama)


def test_unknown_option_is_an_error(llama):
    with pytest.raises(DPGError, match=r"unknown option\(s\) \['kapa'\].*'kappa'"):
        get_target("pattern:67", llama, kapa=3.0)
    assert get_target("l2_norm", llama, kappa=None).name == "l2_norm"  # None counts as not given


def test_model_without_lm_head_raises():
    model = LlamaModel(llama_config())
    message = ("model has no LM head (get_output_embeddings() is None); "
               "dpg needs a causal LM with an output matrix")
    with pytest.raises(DPGError) as info:
        get_target("l2_norm", model).phi(model)
    assert str(info.value) == message
    with pytest.raises(DPGError, match="no LM head"):
        get_target("pattern:67", model)
