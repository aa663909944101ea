"""A CPU-scale generator: a small random Llama over a word vocabulary taken from offline corpora.

`generator.source: toy` builds it in code, seeded by the run (nothing is downloaded or stored):

- vocabulary: `<pad>` (0), `<eos>` (1), `<unk>` (2), then the most frequent lowercase words and punctuation
  marks of the given corpora (dpg.prompts corpora, e.g. `wiki-vital` and `wiki-vital-fr`), an equal share
  from each corpus, in order of frequency (ties alphabetical), so ids 3, 4, ... are the commonest tokens;
- tokenizer: `tokenizers` WordLevel on lowercased text split at whitespace and punctuation (unknown words
  become `<unk>`), no chat template, eos `<eos>`;
- model: `LlamaForCausalLM` with tied embeddings, initialised at random from `seed`.

It writes word salad at first: what it learns to write comes from the rewards alone. A target built with
`target.model: tiny` then shares this vocabulary, so an LM-head pattern at the default position sits on the
commonest tokens (`the , . of ...`), which every example uses as labels.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from torch import nn

from dpg.errors import DPGError
from dpg.models import seeded

SPECIALS = ["<pad>", "<eos>", "<unk>"]
TOKEN = re.compile(r"\w+|[^\w\s]+")  # the split of tokenizers' Whitespace pre-tokenizer


@functools.lru_cache(maxsize=4)
def toy_vocabulary(corpora: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The `size` tokens of the toy tokenizer (specials first), from the corpora's lowercased texts."""
    from dpg.prompts import load_texts

    if not corpora:
        raise DPGError("generator.toy.corpora is empty; give at least one corpus, e.g. ['wiki-vital']")
    if size < len(SPECIALS) + len(corpora):
        raise DPGError(f"generator.toy.vocab={size} is too small; use at least {len(SPECIALS) + len(corpora)}")
    counts = [Counter(t for _, text in load_texts(c) for t in TOKEN.findall(text.lower())) for c in corpora]
    ranked = [sorted(c, key=lambda w, c=c: (-c[w], w)) for c in counts]
    words: list[str] = []
    taken: set[str] = set()
    depth = 0
    while len(words) < size - len(SPECIALS) and any(depth < len(r) for r in ranked):
        for r in ranked:  # round robin: each corpus contributes its next most frequent new word
            if depth < len(r) and r[depth] not in taken and len(words) < size - len(SPECIALS):
                words.append(r[depth])
                taken.add(r[depth])
        depth += 1
    return tuple(SPECIALS + words)


def toy_tokenizer(vocabulary: tuple[str, ...]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")


def toy_lm(corpora: tuple[str, ...] = ("wiki-vital",), vocab: int = 512, hidden: int = 64, layers: int = 2,
           seed: int = 0, attention: str = "sdpa") -> tuple[nn.Module, object]:
    """(random Llama, word tokenizer) of the module docstring, in eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = toy_tokenizer(toy_vocabulary(tuple(corpora), vocab))
    heads = max(1, hidden // 32)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         tie_word_embeddings=True, attn_implementation=attention)
    with seeded(seed):
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
