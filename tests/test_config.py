"""Contract of the config loader: YAML values into typed dataclasses, unknown keys rejected with their path,
`--set` overrides type-checked, cross-field rules raise ValueError naming the fields."""

import argparse

import pytest

from megatron_gvpo.config import Config, add_config_arguments, config_from_dict, load_config
from megatron_gvpo.experiments.tabular import TabularConfig


def test_yaml_values_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  beta: 0.05\n  group_size: 8\ntrain:\n  global_batch_size: 64\n  micro_batch_size: 8\n")
    cfg = load_config(Config, path, ["parallel.tp=2", "train.lr=3e-6", "parallel.vpp=null", "run.dir=/tmp/x"])
    assert (cfg.algo.beta, cfg.algo.group_size, cfg.parallel.tp, cfg.train.lr) == (0.05, 8, 2, 3e-6)
    assert cfg.parallel.vpp is None and cfg.run.dir == "/tmp/x"
    assert isinstance(cfg.train.lr, float)


def test_defaults_without_file():
    cfg = load_config(Config)
    assert cfg.algo.reference == "old_policy" and cfg.parallel.tp == 1


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"algo": {"bta": 0.1}}, [], r"unknown config key 'algo\.bta'; valid keys here: \['beta'"),
        ({"optim": {}}, [], r"unknown config key 'optim'"),
        ({}, ["train.stpes=3"], r"unknown config key 'train\.stpes'"),
        ({}, ["train.steps=3.5"], r"train\.steps must be an integer, got 3\.5"),
        ({}, ["train.steps=true"], r"train\.steps must be an integer, got True"),
        ({}, ["algo.beta=abc"], r"algo\.beta must be a number, got 'abc'"),
        ({}, ["algo.group_strategy=magic"], r"algo\.group_strategy must be one of \['group_atomic'"),
        ({"train": 3}, [], r"train must be a mapping of TrainConfig fields"),
        ({}, ["algo.beta=0"], r"algo\.beta must be > 0"),
        ({}, ["algo.group_size=1"], r"algo\.group_size must be >= 2"),
        ({}, ["parallel.vpp=2"], r"parallel\.vpp=2 needs parallel\.pp >= 2"),
        ({}, ["algo.reference=refresh"], r"algo\.ref_refresh_interval must be > 0 exactly when"),
        ({}, ["rollout.eval_offline=true"], r"rollout\.eval_offline evaluates an offline run: it needs"),
        ({}, ["algo.name=ppo"], r"algo\.name must be one of \['gvpo', 'grpo', 'dr_grpo'\]"),
        ({}, ["algo.name=grpo", "algo.clip_eps=0"], r"algo\.clip_eps must be > 0"),
        ({}, ["algo.kl_coef=0.1"], r"algo\.kl_coef is GRPO's KL penalty; algo\.name='gvpo' has none"),
        ({}, ["algo.name=grpo", "algo.kl_coef=0.1"], r"algo\.kl_coef > 0 penalises KL to a reference model"),
        ({}, ["algo.name=grpo", "algo.gvpo_variant=length_normalized"], r"algo\.gvpo_variant is a variant of GVPO"),
        ({}, ["rollout.mode=async"],
         r"rollout\.mode='async' overlaps generation with training: it needs rollout\.source"),
        ({}, ["rollout.max_staleness=-1"], r"rollout\.max_staleness must be >= 0"),
        ({}, ["rollout.urls_supervised=true"], r"rollout\.urls_supervised=true but rollout\.urls is empty"),
        ({}, ["algo.importance_correction=truncated"], r"algo\.importance_correction is for the policy-gradient"),
        ({}, ["algo.name=grpo", "algo.importance_cap=0.5"], r"algo\.importance_cap must be >= 1"),
        ({}, ["algo.name=grpo", "algo.importance_correction=truncated"],
         r"algo\.importance_correction weights tokens by the rollout engine's log-probs: it needs rollout\.source"),
        ({}, ["algo.name=grpo", "algo.importance_correction=truncated", "rollout.source=online", "prompts.path=p",
              "rollout.seeded=true"], r"rollout\.seeded sampling does not give without a GPU"),
        ({}, ["train.global_batch_size=30"], r"train\.global_batch_size=30 must be a multiple of algo\.group_size=4"),
        ({}, ["train.micro_batch_size=6"], r"train\.micro_batch_size=6 must be a multiple of algo\.group_size=4"),
        ({}, ["parallel.tp=2", "parallel.pp=2", "parallel.world_size=6"],
         r"world size 6 is not a multiple of parallel\.tp \* parallel\.pp \* parallel\.cp = 2 \* 2 \* 1 = 4"),
        ({}, ["parallel.world_size=8"],
         r"train\.global_batch_size=32 must be a multiple of train\.micro_batch_size \* DP = 8 \* 8"),
        ({}, ["train"], r"override 'train' must look like section\.field=value"),
        ({"train": {"steps": 3}}, ["train.steps.x=1"], r"'train\.steps' is not a section"),
        ({}, ["train.steps.x=1"], r"train\.steps must be an integer, got \{'x': 1\}"),
    ],
)
def test_errors_name_the_field(data, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(Config, data, overrides)


def test_group_strategy_relaxes_micro_batch_rule():
    cfg = config_from_dict(Config, {}, ["train.micro_batch_size=6", "train.global_batch_size=24",
                                        "algo.group_strategy=allgather"])
    assert cfg.check_world_size(2) == 2
    # The policy-gradient baselines have per-row advantages: any micro-batch split is exact.
    assert config_from_dict(Config, {}, ["train.micro_batch_size=6", "train.global_batch_size=24",
                                         "algo.name=dr_grpo"]).check_world_size(2) == 2


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(Config, bad)
    bad.write_text("algo:\n  beta: -1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: algo\.beta must be > 0"):
        load_config(Config, bad)
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config(Config, tmp_path / "missing.yaml")


def test_list_and_literal_fields_and_cli():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "seeds=[4, 5]", "samplers=[uniform]", "--set", "steps=7"])
    cfg = load_config(TabularConfig, args.config, args.overrides)
    assert (cfg.seeds, cfg.samplers, cfg.steps) == ([4, 5], ["uniform"], 7)
    with pytest.raises(ValueError, match=r"samplers\[1\] must be one of"):
        load_config(TabularConfig, None, ["samplers=[uniform, everywhere]"])
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an integer"):
        load_config(TabularConfig, None, ["seeds=[x]"])
