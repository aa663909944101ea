"""One set of defaults and one seed: the section classes' defaults, the `main` profile, a run seed."""

import dataclasses

import pytest
import torch
from conftest import PATTERN_67_BEFORE_PK1

from dpg import SFTConfig
from dpg.errors import DPGError
from dpg.generator import RolloutConfig
from dpg.policy import PolicyConfig
from dpg.runconfig import PROFILES, DPGConfig, load_config


def test_the_run_config_defaults_are_the_sections_own():
    cfg = DPGConfig()
    for name in ("target", "generator", "prompts", "rewards", "storage", "tracking", "execution", "sft"):
        section = getattr(cfg, name)
        assert section == type(section)(), name
    assert cfg.rollouts == RolloutConfig() and cfg.policy == PolicyConfig()  # seed 0 on both sides
    assert DPGConfig.from_dict({}) == cfg


def value_or(mapping, key, default):
    return mapping[key] if key in mapping else default


def test_the_main_job_is_a_named_profile_and_only_what_it_names_differs():
    main = load_config(None)
    assert load_config("main") == main
    assert main.to_dict() == load_config(None, [], base=main.to_dict()).to_dict()
    sections = {s: values for s, values in PROFILES["main"].items() if isinstance(values, dict)}
    differing = {f"{s}.{k}" for s, values in sections.items() for k in values}
    plain = DPGConfig().to_dict()
    for section, values in main.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert (value == plain[section][key]) == (f"{section}.{key}" not in differing
                                                          or sections[section][key] == plain[section][key])
        else:  # a top-level key: the profile's where it names one
            assert value_or(PROFILES["main"], section, plain[section]) == values
    with pytest.raises(DPGError, match="profile"):
        load_config("no-such-profile")


def test_one_seed_drives_every_stage_and_no_section_has_its_own():
    cfg = load_config(None, ["seed=7"])
    assert cfg.rollouts.seed == cfg.policy.seed == 7
    flat = cfg.flat()
    # target.tiny_seed names which tiny target (like a model folder would), it draws nothing during the run
    assert [k for k in flat if k.endswith("seed")] == ["seed", "target.tiny_seed"]
    assert load_config(None, ["seed=7", "rollouts.seed=7"]) == cfg  # old grids spelled it out: still the same run
    with pytest.raises(DPGError, match=r"rollouts.seed=3 differs from seed=7: a run has one seed"):
        load_config(None, ["seed=7", "rollouts.seed=3"])
    with pytest.raises(DPGError, match=r"policy.seed=1 differs from seed=0"):
        DPGConfig(policy=PolicyConfig(seed=1))
    with pytest.raises(DPGError, match="unknown key.*sft.seed"):
        load_config(None, ["sft.seed=3"])
    assert "seed" not in {f.name for f in dataclasses.fields(SFTConfig)}
    assert load_config(None, ["seed=1"]).hash != load_config(None, ["seed=2"]).hash


def test_run_ids_stay_those_that_stored_runs_have():
    # computed by dpg before one-seed (commit 389f6fe): the main job as it was then, and a grid cell that set
    # every seed to 3
    before = ["target.options={}", "target.tiny_pretrain_steps=0", "rewards.credit=sequence", "policy.lr=2e-4",
              "rollouts.batch_size=8"]
    assert load_config(None, before).run_id == "dpg-73cafac66214"
    old_67 = load_config("experiments/pattern-67.yaml", [*PATTERN_67_BEFORE_PK1, "seed=3"])
    assert old_67.run_id == "pattern-67-c408d24c3a0d"


def test_a_fixed_tiny_target_seed_keeps_the_target_when_the_run_seed_changes():
    from dpg.loop import load_target
    from dpg.toy import toy_tokenizer, toy_vocabulary

    tokenizer = toy_tokenizer(toy_vocabulary(("wiki-vital",), 64))
    base = ["target.tiny_hidden=8", "target.tiny_layers=1", "prompts.per_iteration=4"]

    def weights(*overrides):
        model, _, _ = load_target(load_config("experiments/pattern-67.yaml", base + list(overrides)), tokenizer)
        return model.lm_head.weight

    fixed = weights("seed=1", "target.tiny_seed=5", "target.tiny_pretrain_steps=0")
    assert torch.equal(fixed, weights("seed=2", "target.tiny_seed=5", "target.tiny_pretrain_steps=0"))
    assert torch.equal(fixed, weights("seed=5", "target.tiny_pretrain_steps=0"))
    assert not torch.equal(fixed, weights("seed=1", "target.tiny_pretrain_steps=0"))
    with pytest.raises(DPGError, match="target.tiny_seed"):
        load_config(None, ["target.tiny_seed=-1"])
    assert load_config(None, ["target.tiny_seed=3"]).hash != load_config(None).hash
    # the fresh eval: in the hash when it is on, absent from it at its defaults (old runs keep their ids)
    assert load_config(None, ["target.eval_fresh=64"]).hash != load_config(None).hash
    assert load_config(None, ["target.eval_fresh=0", "target.eval_fresh_every=1"]).hash == load_config(None).hash
    assert load_config(None, ["sft.sweep_microbatch=1"]).hash != load_config(None).hash


def test_the_device_resolves_where_the_stage_runs_and_a_missing_one_is_one_clear_error():
    from dpg.models import resolve_device
    from tasks.stages import stage_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert stage_device(DPGConfig()) == str(resolve_device("auto"))  # `auto` is the default
    assert load_config(None, ["execution.device=cuda:3"]).execution.device == "cuda:3"  # checked where it runs
    with pytest.raises(DPGError, match="execution.device='gpu'"):
        load_config(None, ["execution.device=gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(DPGError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(DPGError, match=r"cuda:99"):
        resolve_device("cuda:99")
    assert load_config(None, ["execution.device=cpu"]).run_id == load_config(None).run_id  # a run moves devices


def test_a_baseline_or_target_swapped_into_the_main_profile_drops_what_was_for_dpg_and_67():
    assert load_config(None).rewards.credit == "token-own"  # the profile's dpg reward, per token
    assert load_config(None, ["rewards.name=random"]).rewards.credit == "sequence"  # the control, as users run it
    assert load_config(None, ["rewards.name=naive"]).rewards.credit == "sequence"
    with pytest.raises(DPGError, match="rewards.credit='token' is invalid"):  # said explicitly: still an error
        load_config(None, ["rewards.name=naive", "rewards.credit=token"])
    # another target set on the profile drops the profile's options for "67" (val_lm takes no token_ids)
    assert load_config(None).target.options == {"token_ids": "commonest"}
    assert load_config(None, ["target.spec=l2_norm"]).target.options == {}
    assert load_config(None, ["target.spec=pattern:qr:x", "target.options.kappa=5"]).target.options == {
        "token_ids": "commonest", "kappa": 5}
