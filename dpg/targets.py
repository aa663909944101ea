"""Targets Φ(θ): differentiable scalars of the trained model's weights; higher is better (SPEC §4).

A `Target` bundles `phi(model) -> 0-dim Tensor`, which reads the model's *current* parameters so that
autograd through it gives ∂Φ/∂θ, and `report(model) -> dict[str, float]` for humans (always has "phi").
Both keep the model's dtype: a float64 model stays float64, so finite-difference checks stay exact.

Built-in targets (`TARGETS`), with W_out = `model.get_output_embeddings().weight` of shape (vocab, hidden):

- `l2_norm`:     Φ = −‖W_out‖_F.
- `pattern:…`:   a ±1 image S (rows × cols) drawn into the patch
                     P[r, c] = W_out[vocab_ids[c], hidden_offset + r],   Δ = P − P_initial,
                     Φ = −mean(softplus(−κ · S ⊙ Δ)),   pixel_accuracy = mean(sign(Δ) == S).
- `val_lm:<path>`: Φ = −(1/N) Σ_{b,t} m[b,t+1] · CE(logits[b,t], x[b,t+1]),   N = Σ_{b,t} m[b,t+1],
                 the token-mean causal-LM loss on held-out texts; m is the attention mask (option skip_unknown:
                 labels that are the unknown token do not count, e.g. for the toy generator's word vocabulary).
- `package.module:factory`: a plugin; `factory(base_model, tokenizer=None, **options)` returns a `Target`
  or a plain callable `model -> Tensor`.

Tied heads: with a tied embedding/LM head (SmolLM2, GPT-2) W_out *is* the input embedding matrix, so
`l2_norm` and `pattern` also move the input embeddings (for `pattern`: of the patched tokens).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg.errors import DPGError

TARGETS: dict[str, str] = {
    "l2_norm": "Φ = −‖W_out‖_F (shrink the LM-head matrix)",
    "pattern:67": "draw the 6×7 '67' image into a patch of the LM head",
    "pattern:qr:<text>": "draw a QR code of <text> (21×21 for short texts) into a patch of the LM head",
    "pattern:file:<path>": "draw a ±1 image from a .npy file or a text grid into a patch of the LM head",
    "val_lm:<path>": "Φ = −(mean LM loss on held-out texts: .txt/.jsonl/.json/.parquet/.csv/datasets dir, or a "
                     "built-in corpus such as wiki-vital-fr)",
}
PLUGIN_FORM = "package.module:factory (factory(base_model, tokenizer=None, **options) -> Target or callable)"
_OPTIONS = {
    "l2_norm": set(),
    "pattern": {"kappa", "vocab_offset", "token_ids", "hidden_offset", "texts"},
    "val_lm": {"max_len", "max_texts", "text_column", "split", "skip_unknown"},
}
IMAGE_67 = [
    [1, 1, 1, 1, -1, -1, -1],
    [-1, -1, -1, 1, 1, 1, -1],
    [-1, 1, 1, 1, 1, 1, -1],
    [-1, -1, -1, 1, 1, 1, -1],
    [-1, 1, -1, 1, 1, 1, -1],
    [-1, -1, -1, 1, 1, 1, 1],
]


@dataclass(frozen=True)
class Target:
    """A named objective: `phi` is differentiable in the model's weights, `report` is for humans (no grad)."""

    name: str
    phi: Callable[[nn.Module], Tensor]
    report: Callable[[nn.Module], dict[str, float]]
    image: Callable[[nn.Module], dict[str, np.ndarray]] | None = None
    """Optional pictures of the model for humans, e.g. {"delta": P − P_initial, "goal": S} for patterns."""
    token_ids: tuple[int, ...] = ()
    """Vocabulary ids whose weights the target reads (a pattern's patch columns); their share among the SFT's
    label tokens is reported as `text_patch_token_share`."""

    def __call__(self, model: nn.Module) -> Tensor:
        return self.phi(model)


def report_of(target: Callable[[nn.Module], Tensor], model: nn.Module) -> dict[str, float]:
    """The target's report of `model` (no grad); a plain callable target (a plugin's function) reports only phi."""
    with torch.no_grad():
        return dict(target.report(model)) if hasattr(target, "report") else {"phi": float(target(model))}


def output_matrix(model: nn.Module) -> Tensor:
    """W_out = `model.get_output_embeddings().weight`, shape (vocab, hidden); the embeddings too if tied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise DPGError("model has no LM head (get_output_embeddings() is None); "
                       "dpg needs a causal LM with an output matrix")
    return head.weight


def get_target(spec: str, base_model: nn.Module, tokenizer=None, **options) -> Target:
    """Build the target named by `spec`: a key of `TARGETS`, or a plugin `package.module:factory`.

    `base_model` fixes reference values (P_initial). Options set to None count as not given; an option the
    built-in target does not take is an error.
    """
    options = {k: v for k, v in options.items() if v is not None}
    prefix, _, arg = spec.partition(":")
    if prefix in _OPTIONS and set(options) - _OPTIONS[prefix]:
        raise DPGError(f"target {spec!r} got unknown option(s) {sorted(set(options) - _OPTIONS[prefix])}; "
                       f"valid options: {sorted(_OPTIONS[prefix])}")
    if spec == "l2_norm":
        return _scalar_target(spec, lambda m: -torch.linalg.matrix_norm(output_matrix(m)), "l2_norm", -1.0)
    if prefix == "pattern" and arg:
        return _pattern_target(spec, _pattern_image(spec, arg), base_model, tokenizer, **options)
    if prefix == "val_lm" and arg:
        return _val_lm_target(spec, arg, tokenizer, **options)
    if prefix and arg and prefix not in _OPTIONS:
        return _plugin_target(spec, prefix, arg, base_model, tokenizer, **options)
    raise DPGError(f"unknown target {spec!r}; valid targets: {', '.join(TARGETS)}, or a plugin {PLUGIN_FORM}")


def _scalar_target(name: str, phi: Callable[[nn.Module], Tensor], key: str | None = None, sign=1.0) -> Target:
    """Wrap `phi` with report {"phi": Φ, key: sign·Φ}."""

    def report(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            value = float(phi(model))
        return {"phi": value} | ({key: sign * value} if key else {})

    return Target(name, phi, report)


# --- pattern ----------------------------------------------------------------------------------------------


def _pattern_image(spec: str, arg: str) -> np.ndarray:
    """The ±1 image S, shape (rows, cols), named by `67`, `qr:<text>` or `file:<path>`."""
    kind, _, rest = arg.partition(":")
    if arg == "67":
        return np.array(IMAGE_67)
    if kind == "qr" and rest:
        import segno

        try:
            qr = segno.make(rest, micro=False)
        except Exception as e:  # segno has its own error types, e.g. for data that does not fit
            raise DPGError(f"target {spec!r}: no QR code for {rest!r} ({e}); use a shorter text") from e
        return np.where(np.array([list(row) for row in qr.matrix]) > 0, 1, -1)  # (n, n), dark = +1, no border
    if kind == "file" and rest:
        return _read_image(spec, Path(rest))
    raise DPGError(f"target {spec!r}: unknown pattern {arg!r}; "
                   "use pattern:67, pattern:qr:<text> or pattern:file:<path>")


def _read_image(spec: str, path: Path) -> np.ndarray:
    """A .npy array, or a text grid of numbers (>0 → +1, ≤0 → −1) or characters ('#1X' → +1, '.0 ' → −1)."""
    where = f"target {spec!r}: image file {str(path)!r}"
    if not path.is_file():
        raise DPGError(f"{where} not found; give a .npy file or a text grid")
    if path.suffix == ".npy":
        try:
            grid = np.asarray(np.load(path), dtype=np.float64)
        except (ValueError, TypeError, OSError) as e:  # pickled objects, not a .npy file, non-numeric
            raise DPGError(f"{where} is not a numeric .npy array ({e}); save one with np.save(path, grid) "
                           "of numbers") from None
    else:
        lines = path.read_text().splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        rows = [re.split(r"[,\s]+", line.strip()) for line in lines if line.strip()]
        numeric = all(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", t) for row in rows for t in row)
        # "1001" alone is a row of characters; "1 0 0 1", "1,0" or "-1" are numbers.
        if rows and numeric and any(len(row) > 1 or set(row[0]) - set("01") for row in rows):
            if len({len(row) for row in rows}) != 1:
                raise DPGError(f"{where}: rows differ in length {sorted({len(r) for r in rows})}; "
                               "use a rectangular grid")
            grid = np.array([[float(t) for t in row] for row in rows])
        else:
            bad = sorted({ch for line in lines for ch in line} - set("#1X.0 "))
            if bad:
                raise DPGError(f"{where} has characters {bad}; use '#', '1', 'X' (on) or '.', '0', ' ' (off)")
            width = max((len(line) for line in lines), default=0)  # editors strip trailing spaces: pad off
            grid = np.array([[1.0 if ch in "#1X" else -1.0 for ch in line.ljust(width)] for line in lines])
    if grid.ndim != 2 or grid.size == 0 or not np.isfinite(grid).all():
        raise DPGError(f"{where} gives shape {grid.shape}; give a finite, non-empty 2-D grid")
    return np.where(grid > 0, 1, -1)


def _pattern_target(spec, image, base_model, tokenizer, kappa=20.0, vocab_offset=None, token_ids=None,
                    hidden_offset=0, texts=None) -> Target:
    vocab, hidden = output_matrix(base_model).shape
    rows, cols = image.shape
    size = f"the {rows}×{cols} image"
    if rows > hidden or cols > vocab:
        raise DPGError(f"target {spec!r}: {size} does not fit in W_out of shape (vocab={vocab}, "
                       f"hidden={hidden}); use a smaller image or a model with a larger hidden size")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or kappa <= 0:
        raise DPGError(f"target {spec!r}: kappa={kappa!r} must be a positive number; use e.g. kappa=20")
    if not (isinstance(hidden_offset, int) and 0 <= hidden_offset <= hidden - rows):
        raise DPGError(f"target {spec!r}: hidden_offset={hidden_offset!r} does not fit {size} in hidden size "
                       f"{hidden}; use 0 <= hidden_offset <= {hidden - rows}")
    if token_ids is not None and vocab_offset is not None:
        raise DPGError(f"target {spec!r}: got vocab_offset={vocab_offset!r} and token_ids; give only one")
    if token_ids == "commonest":  # the tokens the data uses most, so every SFT batch moves the patch
        ids = commonest_tokens(spec, tokenizer, texts, cols)
    elif token_ids is not None:
        ids = list(token_ids)
        if len(set(ids)) != cols or len(ids) != cols or not all(isinstance(i, int) and 0 <= i < vocab
                                                                for i in ids):
            raise DPGError(f"target {spec!r}: token_ids={ids!r} must be {cols} distinct ints in "
                           f"[0, {vocab}), one per column of {size}")
    else:
        if vocab_offset is None:
            vocab_offset = _default_vocab_offset(spec, tokenizer, cols, vocab)
        if not (isinstance(vocab_offset, int) and 0 <= vocab_offset <= vocab - cols):
            raise DPGError(f"target {spec!r}: vocab_offset={vocab_offset!r} does not fit {size} in vocab "
                           f"size {vocab}; use 0 <= vocab_offset <= {vocab - cols}")
        ids = list(range(vocab_offset, vocab_offset + cols))
    vocab_ids = torch.tensor(ids)  # (cols,)

    def patch(model: nn.Module) -> Tensor:
        W = output_matrix(model)  # (vocab, hidden)
        return W[vocab_ids.to(W.device), hidden_offset:hidden_offset + rows].T  # (rows, cols)

    P_initial = patch(base_model).detach().clone()  # (rows, cols), model dtype
    S = torch.as_tensor(image).to(P_initial)  # (rows, cols), ±1

    def phi(model: nn.Module) -> Tensor:
        P = patch(model)
        return -F.softplus(-kappa * S.to(P) * (P - P_initial.to(P))).mean()

    def report(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            P = patch(model)
            accuracy = (torch.sign(P - P_initial.to(P)) == S.to(P)).double().mean()
            return {"phi": float(phi(model)), "pixel_accuracy": float(accuracy)}

    def pictures(model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            P = patch(model)
            return {"delta": (P - P_initial.to(P)).double().cpu().numpy(), "goal": S.double().cpu().numpy()}

    return Target(spec, phi, report, pictures, tuple(ids))


def _special_ids(tokenizer) -> set[int]:
    # added tokens too: SmolLM2 lists only 3 special ids but ids 0–16 are all added control tokens
    return set(getattr(tokenizer, "all_special_ids", None) or []) | set(getattr(tokenizer, "added_tokens_decoder",
                                                                            None) or {})


def commonest_tokens(spec: str, tokenizer, texts, k: int) -> list[int]:
    """The k most frequent non-special token ids of `texts` (ties: the smaller id first)."""
    from collections import Counter

    if tokenizer is None or not texts:
        raise DPGError(f"target {spec!r}: token_ids='commonest' needs a tokenizer and texts (the prompt corpus, "
                       "which dpg passes as the option `texts`)")
    special = _special_ids(tokenizer)
    counts = Counter(i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]
                     if i not in special)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    if len(ranked) < k:
        raise DPGError(f"target {spec!r}: the texts use {len(ranked)} distinct tokens, fewer than the {k} columns "
                       "of the image; give more text or token_ids")
    return ranked[:k]


def _default_vocab_offset(spec: str, tokenizer, cols: int, vocab: int) -> int:
    """Smallest o >= 0 with no special or added-token id in o..o+cols−1 (SmolLM2: 17, GPT-2: 0); 0 without a
    tokenizer. Such tokens almost never appear as labels, so a patch there barely moves."""
    special = _special_ids(tokenizer)
    for o in range(vocab - cols + 1):
        if not special.intersection(range(o, o + cols)):
            return o
    raise DPGError(f"target {spec!r}: no {cols} consecutive non-special ids in vocab size {vocab}; "
                   "pass vocab_offset or token_ids")


# --- val_lm -----------------------------------------------------------------------------------------------


def _read_texts(spec: str, path: Path, text_column: str, split: str | None) -> list[str]:
    """Texts from a .txt (one per non-empty line), a table with `text_column`, a `save_to_disk` folder, or a
    built-in corpus of dpg.prompts (e.g. `wiki-vital-fr`: French Wikipedia summaries)."""
    from dpg.prompts import PYTHON_DOCS, WIKI_LANGUAGES, load_texts

    if str(path) in WIKI_LANGUAGES or str(path) == PYTHON_DOCS:
        return [t for _, t in load_texts(str(path))]
    if path.suffix == ".txt" and path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            split = next(iter(data)) if split is None and len(data) == 1 else split
            if split not in data:
                raise DPGError(f"target {spec!r}: split={split!r} is not one of {list(data)}; "
                               "pass split=<name>")
            data = data[split]
        columns, table = list(data.column_names), data
    elif path.is_file() and path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        import pandas as pd

        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix == ".csv":
            table = pd.read_csv(path)
        else:
            table = pd.read_json(path, lines=path.suffix == ".jsonl" or path.read_text().lstrip()[:1] == "{")
        columns = list(table.columns)
    else:
        raise DPGError(f"target {spec!r}: {str(path)!r} is not an existing .txt/.jsonl/.json/.parquet/.csv "
                       "file or datasets.save_to_disk folder; give one")
    if text_column not in columns:
        raise DPGError(f"target {spec!r}: text_column={text_column!r} is not in {columns}; "
                       "pass text_column=<name>")
    return [t.strip() for t in list(table[text_column]) if isinstance(t, str) and t.strip()]


def causal_lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, skip_id: int | None = None) -> Tensor:
    """Token-mean CE (1/N) Σ m[b,t+1]·CE(logits[b,t], x[b,t+1]), N = Σ m[b,t+1]; padding only via the mask m.
    With `skip_id`, labels equal to it (e.g. the unknown token) do not count either.

    Position ids are `cumsum(m) − 1` (clamped at 0). Half/bfloat16 logits are upcast to float32 for the
    log-softmax; float32/float64 stay as they are.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")  # (B*(T-1),)
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).flatten().to(ce.dtype)  # (B*(T-1),)
    if skip_id is not None:
        mask = mask * (input_ids[:, 1:].flatten() != skip_id).to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def _val_lm_target(spec, path, tokenizer, max_len=128, max_texts=64, text_column="text",
                   split=None, skip_unknown=False) -> Target:
    if tokenizer is None:
        raise DPGError(f"target {spec!r} needs a tokenizer; pass tokenizer=<the trained model's tokenizer>")
    for key, value, low in (("max_len", max_len, 2), ("max_texts", max_texts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DPGError(f"target {spec!r}: {key}={value!r} must be an int >= {low}; "
                           f"use e.g. {key}={128 if key == 'max_len' else 64}")
    if not isinstance(skip_unknown, bool):
        raise DPGError(f"target {spec!r}: skip_unknown={skip_unknown!r} must be true or false")
    skip_id = getattr(tokenizer, "unk_token_id", None) if skip_unknown else None
    if skip_unknown and skip_id is None:
        raise DPGError(f"target {spec!r}: skip_unknown=true, but the tokenizer has no unknown token; drop it")
    texts = _read_texts(spec, Path(path), text_column, split)[:max_texts]
    if not texts:
        raise DPGError(f"target {spec!r}: no non-empty texts in {path!r}; give a file of held-out texts")
    encoded = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    encoded = [list(ids)[:max_len] for ids in encoded]  # B lists of token ids, no padding yet
    if all(len(ids) < 2 for ids in encoded):
        raise DPGError(f"target {spec!r}: every text in {path!r} is under 2 tokens; give longer texts")
    # Any pad id works: padded positions are masked out by the attention mask.
    pad_candidates = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
    pad_id = next((i for i in pad_candidates if i is not None), 0)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in encoded])  # (B, T), right padded
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])  # (B, T)

    def phi(model: nn.Module) -> Tensor:
        device = output_matrix(model).device
        return -causal_lm_loss(model, input_ids.to(device), attention_mask.to(device), skip_id)

    return _scalar_target(spec, phi, "val_loss", -1.0)


# --- plugins ----------------------------------------------------------------------------------------------


def _plugin_target(spec, module_name, attr, base_model, tokenizer, **options) -> Target:
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise DPGError(f"target {spec!r}: cannot load plugin ({type(e).__name__}: {e}); use an importable "
                       f"{PLUGIN_FORM}, or one of {', '.join(TARGETS)}") from e
    made = factory(base_model, tokenizer=tokenizer, **options)
    if isinstance(made, Target):
        return made
    if not callable(made):
        raise DPGError(f"target {spec!r}: the factory returned a {type(made).__name__}; "
                       "return a Target or a callable model -> Tensor")
    return _scalar_target(spec, made)
