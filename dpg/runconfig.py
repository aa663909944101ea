"""The one config object of a DPG run: what the flow takes, what MLflow logs, what resume compares.

Sections: `target`, `generator`, `prompts`, `rollouts`, `sft`, `rewards`, `policy`, `storage`,
`tracking`, `execution`. Build it with `DPGConfig.from_dict` (unknown keys are errors naming them) or
`load_config(path, overrides)`. `DPGConfig()` holds each section's own defaults; README's main job is the
named profile `main` (PROFILES), what `dpg run` runs without a config file. `identity()` is what a resumed run
must match (outer_iterations, storage credentials, tracking and execution may change between runs of the same
optimization).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpg.config import SFTConfig, _int, _real, _require, build
from dpg.errors import DPGError
from dpg.generator import RolloutConfig
from dpg.policy import PolicyConfig


@dataclass(frozen=True)
class TargetConfig:
    """The target model and its metric Phi (SPEC §4)."""

    spec: str = "pattern:67"
    """Target metric: l2_norm, pattern:67, pattern:qr:<text>, pattern:file:<path>, val_lm:<path>, or a plugin."""
    model: str = "tiny"
    """`tiny` (a small random Llama with the generator's vocabulary, seeded), `smollm2`, or a local model folder."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the target (e.g. vocab_offset, kappa)."""
    tiny_hidden: int = 64
    """Hidden size of the `tiny` target."""
    tiny_layers: int = 2
    """Layers of the `tiny` target."""
    tiny_pretrain_steps: int = 0
    """AdamW steps of plain LM pretraining of the `tiny` target on the prompt corpus before any SFT (0: it stays
    random). A structured target makes the value of a token stable across batches (RESULTS-reproduce.md)."""
    tiny_seed: int | None = None
    """Seed of the `tiny` target's initialisation and pretraining; None: the run's seed. Fix it to compare seeds
    of the generator and the rollouts on one target, as a pretrained target would be (RESULTS-reproduce.md §5)."""
    eval_fresh: int = 0
    """Also evaluate on this many fresh completions of the generator (prompts and draws of their own, not the run's):
    the eval then measures what the generator's distribution is worth, not the order of one batch (0: off;
    RESULTS-reproduce.md §7b). The metrics are `eval_fresh_*` and `text_fresh_*`; the texts are the eval stage's
    fresh.parquet."""
    eval_fresh_every: int = 1
    """The fresh eval runs at iteration 0 and at every iteration it with it + 1 a multiple of this, so a run of a
    multiple of it iterations ends with one."""
    text_metrics: list[str] = field(default_factory=lambda: ["length"])
    """Human metrics of the generated texts, logged with the evaluation (dpg.textmetrics): `length`,
    `langid:<code>` (share in that language), `contains:<string>` (share containing it, edit distance)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.spec, str) and self.spec != "", "spec", self.spec,
                 "use e.g. 'pattern:67' or 'l2_norm'", prefix="target")
        for key in ("tiny_hidden", "tiny_layers"):
            _require(_int(getattr(self, key)) and getattr(self, key) >= 1, key, getattr(self, key),
                     "use an integer >= 1", prefix="target")
        _require(_int(self.tiny_pretrain_steps) and self.tiny_pretrain_steps >= 0, "tiny_pretrain_steps",
                 self.tiny_pretrain_steps, "use an integer >= 0", prefix="target")
        _require(_int(self.eval_fresh) and self.eval_fresh >= 0, "eval_fresh", self.eval_fresh,
                 "use an integer >= 0 (0: no fresh eval)", prefix="target")
        _require(_int(self.eval_fresh_every) and self.eval_fresh_every >= 1, "eval_fresh_every",
                 self.eval_fresh_every, "use an integer >= 1", prefix="target")
        _require(self.tiny_seed is None or (_int(self.tiny_seed) and self.tiny_seed >= 0), "tiny_seed",
                 self.tiny_seed, "use an integer >= 0, or leave it out for the run's seed", prefix="target")
        _require(_text(self.model), "model", self.model, "use 'tiny', 'smollm2' or a local model folder",
                 prefix="target")
        _require(isinstance(self.options, dict), "options", self.options, "use a mapping, e.g. {kappa: 1.0}",
                 prefix="target")
        _require(isinstance(self.text_metrics, (list, tuple)) and all(_text(m) for m in self.text_metrics),
                 "text_metrics", self.text_metrics, "use a list such as [length, 'langid:fr']", prefix="target")


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator LM."""

    source: str = "smollm2"
    """`smollm2` (offline GGUF of SmolLM2-135M-Instruct), a local model folder, or a cached hub id."""
    lora_rank: int | None = None
    """LoRA adapter rank (peft); None fine-tunes every weight."""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 * rank)."""
    toy: dict[str, Any] = field(default_factory=dict)
    """Options of `source: toy` (dpg.toy.toy_lm): corpora (default [wiki-vital]), vocab (512), hidden (64),
    layers (2)."""

    def __post_init__(self) -> None:
        _require(_text(self.source), "source", self.source, "use 'smollm2', 'toy' or a local model folder",
                 prefix="generator")
        known = {"corpora", "vocab", "hidden", "layers"}
        _require(isinstance(self.toy, dict) and set(self.toy) <= known, "toy", self.toy,
                 f"use a mapping with keys from {sorted(known)}", prefix="generator")
        for key in ("vocab", "hidden", "layers"):
            value = self.toy.get(key, 1)
            _require(_int(value) and value >= 1, f"toy.{key}", value, "use an integer >= 1", prefix="generator")
        corpora = self.toy.get("corpora", ["wiki-vital"])
        _require(isinstance(corpora, (list, tuple)) and corpora and all(_text(c) for c in corpora), "toy.corpora",
                 corpora, "use a list of corpus names, e.g. [wiki-vital, wiki-vital-fr]", prefix="generator")
        _require(self.lora_rank is None or (_int(self.lora_rank) and self.lora_rank >= 1), "lora_rank",
                 self.lora_rank, "use an integer >= 1, or null for full fine-tuning", prefix="generator")
        _require(self.lora_alpha is None or (_real(self.lora_alpha) and self.lora_alpha > 0), "lora_alpha",
                 self.lora_alpha, "use a number > 0, or null for 2 * lora_rank", prefix="generator")


@dataclass(frozen=True)
class PromptConfig:
    """Where prompts come from (SPEC §5)."""

    source: str | None = None
    """Parquet/JSONL/CSV file, saved HF dataset folder or fsspec URL; None: the built-in English corpus."""
    text_column: str = "text"
    """Column holding the article text."""
    per_iteration: int = 8
    """Prompts per outer iteration (each gets rollouts.n_rollouts completions)."""
    template: str | None = None
    """Prompt template with `{text}`; None: 'rephrase this article in different terms' (SPEC §5)."""
    max_prompt_tokens: int = 160
    """Article text is cut so that the chat-formatted prompt fits in this many generator tokens."""

    def __post_init__(self) -> None:
        for key in ("per_iteration", "max_prompt_tokens"):
            _require(_int(getattr(self, key)) and getattr(self, key) >= 1, key, getattr(self, key),
                     "use an integer >= 1", prefix="prompts")
        for key in ("source", "text_column", "template"):
            _require(_text(getattr(self, key), optional=key != "text_column"), key, getattr(self, key),
                     "use a string" + ("" if key == "text_column" else " or null"), prefix="prompts")


@dataclass(frozen=True)
class RewardConfig:
    """How rollouts are rewarded (SPEC §3, §6, §7)."""

    name: str = "dpg"
    """dpg (per-example metagradients), naive, levenshtein, embedding, langid, random (the no-information
    control: fresh noise per rollout), or a plugin module:function."""
    goal: str | None = None
    """Goal text (levenshtein, embedding) or language code (langid)."""
    eps_fraction: float = 1e-3
    """Advantage epsilon as a fraction of the batch's reward std (raw dpg rewards are ~1e-9)."""
    max_flat_batches: int = 3
    """A flat batch (every rollout's reward equal: no learning signal) skips the generator update; the
    run stops with an error at the max_flat_batches-th flat batch in a row (1: at the first)."""
    credit: str = "sequence"
    """`sequence`: every token of a rollout gets its advantage. With per-token metagradients (name dpg only,
    dpg.credit): `token`, each generator token is credited with its reward-to-go (its own share of tau plus
    every later token's); `token-own`, with its own share only (the loss terms of the target tokens it wrote);
    `token-context`, as token-own less the batch mean of its token id: only where a token stands is rewarded."""

    def __post_init__(self) -> None:
        _require(_real(self.eps_fraction) and self.eps_fraction > 0, "eps_fraction", self.eps_fraction,
                 "use a positive number, e.g. 1e-3", prefix="rewards")
        _require(_int(self.max_flat_batches) and self.max_flat_batches >= 1, "max_flat_batches",
                 self.max_flat_batches, "use an integer >= 1 (1 stops the run at the first flat batch)",
                 prefix="rewards")
        _require(_text(self.name), "name", self.name, "use e.g. 'dpg', 'levenshtein' or module:function",
                 prefix="rewards")
        _require(_text(self.goal, optional=True), "goal", self.goal, "use a string or null", prefix="rewards")
        _require(self.credit in CREDITS, "credit", self.credit, f"use one of {list(CREDITS)}", prefix="rewards")
        _require(self.credit == "sequence" or self.name == "dpg", "credit", self.credit,
                 f"use 'sequence' with rewards.name={self.name!r}; token credit needs per-token metagradients "
                 "(rewards.name='dpg')", prefix="rewards")


@dataclass(frozen=True)
class StorageConfig:
    """Where records and states go."""

    url: str = "runs"
    """A local folder or s3://bucket/prefix."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options (e.g. {"client_kwargs": {"endpoint_url": ...}}); never part of the run's identity. No
    credentials: they would be written to the run's config.json and to Prefect's flow-run parameters, so
    they come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)."""

    def __post_init__(self) -> None:
        _require(_text(self.url), "url", self.url, "use a local folder or s3://bucket/prefix", prefix="storage")
        _require(isinstance(self.storage_options, dict), "storage_options", self.storage_options,
                 'use a mapping, e.g. {client_kwargs: {endpoint_url: "http://..."}}', prefix="storage")
        if secret := _credential_key(self.storage_options):
            raise DPGError(f"storage.storage_options.{secret} is a credential, and the options are written to the "
                           "run's config.json and to Prefect's flow-run parameters; leave it out and set it in the "
                           "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE)")


CREDENTIAL_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "session_token", "access_key", "secret_key"}


def _credential_key(options: Any, prefix: str = "") -> str | None:
    """The dotted key of the first credential in nested fsspec options, or None."""
    for k, v in (options.items() if isinstance(options, dict) else ()):
        if str(k).lower() in CREDENTIAL_KEYS:
            return prefix + str(k)
        if found := _credential_key(v, f"{prefix}{k}."):
            return found
    return None


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI; None: a sqlite file `mlflow.db` in the local run folder (or ./mlflow.db for S3 stores)."""
    experiment: str = "dpg"
    """MLflow experiment name."""

    def __post_init__(self) -> None:
        _require(_text(self.uri, optional=True), "uri", self.uri,
                 "use e.g. http://127.0.0.1:5000 or sqlite:///path/mlflow.db, or null", prefix="tracking")
        _require(_text(self.experiment), "experiment", self.experiment, "use a non-empty name", prefix="tracking")


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the stages run."""

    mode: str = "inline"
    """`inline`: every stage in this process; `workers`: GPU stages go to a Prefect work pool."""
    gpu_pool: str = "dpg-gpu"
    """Work pool of the SFT/attribution and generator-update stages in `workers` mode."""
    cpu_pool: str = "dpg-cpu"
    """Work pool of the optimization flow itself."""
    device: str = "auto"
    """Where the stages put their models and batches: `auto` (CUDA where the stage's process has it, else the
    CPU), `cpu`, `cuda` or `cuda:k`. Each stage resolves it on the machine it runs on (dpg.models.resolve_device)."""

    attribution_ranks: int = 1
    """Processes per SFT group's metagradient (dpg.parallel: NCCL, one GPU each, where the stage's machine has
    that many; gloo on its CPU otherwise). Each rank takes every step's i-th microbatches (i mod ranks), so more
    ranks than sft.grad_accum leaves some idle."""

    def __post_init__(self) -> None:
        _require(self.mode in ("inline", "workers"), "mode", self.mode, "use 'inline' or 'workers'",
                 prefix="execution")
        _require(_int(self.attribution_ranks) and self.attribution_ranks >= 1, "attribution_ranks",
                 self.attribution_ranks, "use a positive integer (1: one process)", prefix="execution")
        _require(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                 "device", self.device, "use auto, cpu, cuda or cuda:k", prefix="execution")


def _text(x: Any, optional: bool = False) -> bool:
    """A non-empty string (or None when `optional`): YAML turns `5`, `yes` or `[a]` into other types."""
    return (optional and x is None) or (isinstance(x, str) and x != "")


SECTIONS = {"target": TargetConfig, "generator": GeneratorConfig, "prompts": PromptConfig,
            "rollouts": RolloutConfig, "sft": SFTConfig, "rewards": RewardConfig, "policy": PolicyConfig,
            "storage": StorageConfig, "tracking": TrackingConfig, "execution": ExecutionConfig}
CREDITS = ("sequence", "token", "token-own", "token-context")
NOT_IDENTITY = ("outer_iterations", "storage", "tracking", "execution")


@dataclass(frozen=True)
class DPGConfig:
    """A whole DPG optimization. The default is README's main job: SmolLM2 generator, tiny target, "67"."""

    name: str = "dpg"
    """Run name; the run folder is <storage.url>/<name>-<identity hash>."""
    outer_iterations: int = 3
    """Outer iterations to reach (a resumed or scheduled run continues up to this number)."""
    seed: int = 0
    """The run's one seed. Every draw derives its own seed from it: the tiny target's initialisation, the prompt
    order, the LoRA initialisation, each rollout (seed, iteration, prompt, rollout), the policy's minibatch
    shuffle, and each stage's seeded RNG (loop.stage_seed). `rollouts.seed` and `policy.seed` are set from it."""
    target: TargetConfig = field(default_factory=TargetConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        _require(_int(self.outer_iterations) and self.outer_iterations >= 1, "outer_iterations",
                 self.outer_iterations, "use an integer >= 1", prefix="config")
        _require(_int(self.seed) and self.seed >= 0, "seed", self.seed, "use an integer >= 0", prefix="config")
        for section in ("rollouts", "policy"):  # one seed story: the sections' seeds are the run's
            given = getattr(self, section).seed
            if given not in (0, self.seed):
                raise DPGError(f"{section}.seed={given} differs from seed={self.seed}: a run has one seed, and every "
                               f"stage's seed derives from it; set seed (and drop {section}.seed)")
            object.__setattr__(self, section, dataclasses.replace(getattr(self, section), seed=self.seed))
        _require(isinstance(self.name, str) and self.name.replace("-", "").replace("_", "").isalnum(), "name",
                 self.name, "use letters, digits, '-' and '_'", prefix="config")
        group = self.prompts.per_iteration if self.rollouts.grouping == "inverse" else \
            self.prompts.per_iteration * self.rollouts.n_rollouts
        if self.rewards.name == "naive" and (self.rollouts.grouping != "inverse" or self.rollouts.n_rollouts < 2):
            raise DPGError(f"rewards.name='naive' with rollouts.grouping={self.rollouts.grouping!r} and "
                           f"rollouts.n_rollouts={self.rollouts.n_rollouts} gives every rollout of a prompt the same "
                           "reward (one SFT run's Phi); use rollouts.grouping=inverse and rollouts.n_rollouts >= 2")
        if self.rollouts.n_rollouts < 2:
            raise DPGError(f"rollouts.n_rollouts={self.rollouts.n_rollouts} gives every advantage 0 (GRPO normalises "
                           "each reward within its prompt's rollouts), so the generator would never learn; use "
                           "rollouts.n_rollouts >= 2")
        if self.rewards.name == "dpg" and self.sft.dtype in ("float16", "bfloat16"):
            raise DPGError(f"sft.dtype={self.sft.dtype!r} with rewards.name='dpg': per-example metagradients are "
                           "~1e-9 and drown in half-precision rounding; use sft.dtype=float32 (or float64)")
        if self.rewards.name in ("dpg", "naive") and group % self.sft.step_size:
            s = self.sft.step_size
            raise DPGError(f"prompts.per_iteration={self.prompts.per_iteration} gives SFT groups of {group} examples "
                           f"(rollouts.grouping={self.rollouts.grouping!r}), not a multiple of "
                           f"sft.microbatch*sft.grad_accum={s}; change prompts.per_iteration (or rollouts.n_rollouts)"
                           " so that it is")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPGConfig:
        """Nested dict (parsed YAML/JSON) -> config; every error names its dotted key."""
        if not isinstance(data, dict):
            raise DPGError(f"config must be a mapping of keys, not {type(data).__name__}")
        data, defaults = dict(data), DPGConfig()
        sections = {}
        for k in [k for k in data if k in SECTIONS]:
            given = data.pop(k) or {}
            if not isinstance(given, dict):
                raise DPGError(f"{k} must be a mapping of keys, not {type(given).__name__} {given!r}")
            if k == "sft" and given.get("seed") == 0:  # config.json of dpg <= 0.1: a field that never did anything
                given = {key: v for key, v in given.items() if key != "seed"}
            sections[k] = build(SECTIONS[k], dataclasses.asdict(getattr(defaults, k)) | given, k)
        return build(cls, data | sections, "config")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values; `rollouts.seed` and `policy.seed` are left out (they are `seed`)."""
        out = dataclasses.asdict(self)
        for section in ("rollouts", "policy"):
            del out[section]["seed"]
        return out

    def identity(self) -> dict[str, Any]:
        """The part of the config that defines the results (resume must match it exactly)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    @property
    def hash(self) -> str:
        identity = self.identity()
        # hashed as dpg 0.1 wrote the config (with the sections' seeds and the dead sft.seed), so that the run ids
        # of stored runs, and their folders, stay what they were
        identity["rollouts"] = {**identity["rollouts"], "seed": self.seed}
        identity["policy"] = {**identity["policy"], "seed": self.seed}
        identity["sft"] = {**identity["sft"], "seed": 0}
        added = {"target": {"tiny_seed": None, "eval_fresh": 0, "eval_fresh_every": 1},  # after dpg 0.1: absent
                 "sft": {"sweep_microbatch": None}}  # from old hashes at their defaults
        for section, defaults in added.items():
            identity[section] = {k: v for k, v in identity[section].items()
                                 if not (k in defaults and v == defaults[k])}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        return f"{self.name}-{self.hash}"

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


PROFILES: dict[str, dict[str, Any]] = {
    # README's main job, `dpg run` with no config file: the real SmolLM2 generator with LoRA adapters, a tiny
    # target pretrained on the corpus, the "67" patch on the corpus's commonest tokens (which SmolLM2 writes in
    # every rephrasing), token-own credit; 10 iterations fit in about 5 minutes on a 2-core CPU
    # (benchmarks/RESULTS-reproduce.md, "The main job").
    "main": {
        "outer_iterations": 10,
        "target": {"options": {"token_ids": "commonest"}, "tiny_pretrain_steps": 300},
        "generator": {"source": "smollm2", "lora_rank": 16},
        "prompts": {"per_iteration": 4},
        "rollouts": {"n_rollouts": 4, "max_new_tokens": 32, "batch_size": 16},  # 4 prompts, each prefilled once
        "sft": {"optimizer": "sgd", "lr": 0.5, "microbatch": 2, "grad_accum": 1, "max_len": 64},
        "rewards": {"credit": "token-own"},
        "policy": {"lr": 1e-3, "microbatch": 4},  # LoRA adapters take a larger lr than full fine-tuning
    },
}


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb, name = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += differing_keys(va, vb, name + ".")
        elif json.dumps(va, default=str) != json.dumps(vb, default=str):  # tuples and lists compare equal
            keys.append(name)
    return keys


def yaml_load(text: str) -> Any:
    """YAML with YAML 1.2 floats: PyYAML reads `1e-3` (no dot) as a string, which surprises everyone."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.X),
        list("-+0123456789."))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?\d+$"), list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`sft.lr=1e-4` -> (["sft", "lr"], 1e-4); values are parsed as YAML (JSON works too)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise DPGError(f"override {item!r} is not KEY=VALUE; use e.g. --set sft.lr=1e-4")
    return key.split("."), yaml_load(value)


def load_config(path: str | None = None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> DPGConfig:
    """Section defaults < `base`, or the YAML/JSON file at `path`, or a profile (`path` None or a name in PROFILES,
    with no such file; None means `main`) < `overrides` (KEY=VALUE with dotted keys)."""
    import copy

    import yaml

    data: dict[str, Any] = dict(base or {})
    profile = base is None and (path is None or (path in PROFILES and not Path(path).exists()))
    if profile:
        data = copy.deepcopy(PROFILES[path or "main"])
    elif path:
        p = Path(path)
        if not p.is_file():
            raise DPGError(f"config file {path!r} not found; give a YAML or JSON file, or a profile "
                           f"({', '.join(PROFILES)})")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise DPGError(f"config file {path!r} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise DPGError(f"config file {path!r} must hold a mapping of keys, not {type(data).__name__}")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise DPGError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    rewards, said = data.get("rewards", {}), lambda key: any(o.startswith(key) for o in overrides)
    if profile and rewards.get("name", "dpg") != "dpg" and not said("rewards.credit="):
        # a profile's token credit is for its dpg reward: a baseline swapped in by --set scores whole rollouts
        data["rewards"] = {**rewards, "credit": "sequence"}
    if profile and said("target.spec=") and not said("target.options"):
        data["target"] = {**data.get("target", {}), "options": {}}  # the profile's options were for its own target
    return DPGConfig.from_dict(data)
