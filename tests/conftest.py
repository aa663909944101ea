"""Shared test helpers: tiny models and data built in code, a word-level tokenizer, the float64 patch."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpg.exact import float64_llama

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "from", "home", "and", "then",
         "came", "back"]


def make_tokenizer(pad_token="<pad>"):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token=pad_token)


def make_data(n: int, length: int, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded random sequences of 3..length real tokens: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        real = 3 + (i * 5) % (length - 2)
        mask[i, real:] = 0
        ids[i, real:] = 1  # pad id == eos id: the mask, never the label, decides
    return ids, mask


@pytest.fixture(autouse=True)
def _float64_clean():
    """Llama's norm and softmax stay in the input dtype, so float64 checks are exact."""
    with float64_llama():
        yield
