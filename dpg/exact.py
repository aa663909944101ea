"""Tiny float64-clean models for exactness checks, and the patch that makes Llama float64-clean.

transformers' Llama computes RMSNorm and the eager softmax in float32 even in a float64 model, so
finite differences then disagree at ~1e-2 with a correct engine. `float64_llama()` keeps both in the
input's dtype while it is active (checks only; never needed for training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama


def _rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (b, heads, L, L)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)  # in the input's dtype
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@contextlib.contextmanager
def float64_llama() -> Iterator[None]:
    saved = modeling_llama.LlamaRMSNorm.forward, modeling_llama.eager_attention_forward
    modeling_llama.LlamaRMSNorm.forward, modeling_llama.eager_attention_forward = _rms_norm, _eager_attention
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward, modeling_llama.eager_attention_forward = saved


def tiny_model(arch: str = "llama", vocab: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float64, tied: bool | None = None) -> nn.Module:
    """A small random causal LM built in code (eager attention, no dropout), for tests and `dpg verify`."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=bool(tied), attn_implementation="eager",
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=256,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
                         tie_word_embeddings=True if tied is None else tied,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"arch={arch!r}; use 'llama' or 'gpt2'")
    # Random init puts tiny values on norms/biases; perturb everything so no gradient is trivially 0.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype).eval()


def finite_difference(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target,
                      config, h: float = 1e-4) -> torch.Tensor:
    """Four-point central difference of Phi(train(w)) along each e_i at w = 1 (float64, (n,))."""
    from dpg.sft import train

    def phi(i: int, d: float) -> float:
        w = torch.ones(input_ids.shape[0], dtype=torch.float64)
        w[i] += d
        with torch.no_grad():
            return float(target(train(model, input_ids, attention_mask, config, weights=w)))

    return torch.tensor([(-phi(i, 2 * h) + 8 * phi(i, h) - 8 * phi(i, -h) + phi(i, -2 * h)) / (12 * h)
                         for i in range(input_ids.shape[0])], dtype=torch.float64)


def random_data(n: int, length: int, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded random sequences of 3..length real tokens; padding id 1 (= eos)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        real = 3 + (i * 5) % (length - 2)
        mask[i, real:] = 0
        ids[i, real:] = 1
    return ids, mask
