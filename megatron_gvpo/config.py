"""Typed configuration: dataclasses are the schema (defaults and a docstring per field), YAML holds the values.

    cfg = load_config(Config, "configs/tiny_cpu.yaml", overrides=["parallel.tp=2", "algo.beta=0.05"])

- Unknown keys are rejected with their full path (`unknown config key 'algo.bta'; valid keys: ...`).
- Values are type-checked against the annotations (int, float, bool, str, Literal, Optional, list, dict with
  string keys, Any, nested dataclasses); an int is accepted for a float field, and so is a numeric string,
  because YAML 1.1 reads `1e-6` (no dot) as a string. Nothing else is coerced.
- Overrides `a.b=c` parse `c` as YAML (`true`, `1e-3`, `[1, 2]`, `null`) and go through the same checks.
- After construction each dataclass's `validate()` (if any) runs, parents after children, for cross-field
  rules; they raise ValueError naming the fields involved.

`Config` (the trainer's schema) is assembled here from sections that live beside the code that reads them, each
in a module that imports nothing of the training loop: `megatron/config.py` (model, parallel, moe, algo, train),
`rollout/config.py`, `data/offline.py` (data), `data/prompts.py` (prompts) and `rewards/scoring.py` (reward);
`run` and `cluster` are the entry points' own. Experiments define their own top-level dataclasses and load
them with the same `load_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import yaml

from megatron_gvpo.data.offline import OfflineDataConfig
from megatron_gvpo.data.prompts import PromptDataConfig
from megatron_gvpo.megatron.config import AlgoConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from megatron_gvpo.rewards.scoring import RewardConfig
from megatron_gvpo.rollout.config import RolloutConfig

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Generic loader
# ---------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses. Raises ValueError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{path} must be a mapping with string keys, got {value!r}")
        return {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; accept numeric strings for float fields only.
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{path} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r} in the config schema")


def _from_dict(cls: type[T], data: dict, path: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ValueError(f"unknown config key '{where}'; valid keys here: {sorted(fields)}")
    kwargs = {name: _convert(v, hints[name], f"{path}.{name}" if path else name) for name, v in data.items()}
    return cls(**kwargs)


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child)
    if hasattr(obj, "validate"):
        obj.validate()


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} must look like section.field=value")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(cls: type[T], data: dict, overrides: typing.Iterable[str] = ()) -> T:
    """Build and validate `cls` from a raw mapping plus `a.b=c` overrides."""
    data = copy.deepcopy(data)
    for override in overrides:
        apply_override(data, override)
    cfg = _from_dict(cls, data)
    _validate(cfg)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    try:
        return config_from_dict(cls, data, overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for run directories: the resolved config is saved next to the metrics)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------
# The trainer's schema
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, plots and checkpoints are written here."""
    seed: int = 1234
    """Seed for parameter init, data order and sampling; the same seed gives the same run at every layout."""
    log_interval: int = 1
    """Write a metrics record every this many rollout steps."""
    save_interval: int = 0
    """Checkpoint every this many rollout steps (and at the end); 0 saves only at the end."""
    resume: bool = True
    """Continue from the newest complete checkpoint in <dir>/checkpoints when there is one."""
    tensorboard: bool = False
    """Also log to TensorBoard (<dir>/tensorboard) when it is installed."""
    wandb_project: str = ""
    """Also log to this wandb project when wandb is installed."""

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"run.log_interval must be >= 1, got {self.log_interval}")
        if self.save_interval < 0:
            raise ValueError(f"run.save_interval must be >= 0, got {self.save_interval}")


@dataclass
class ClusterConfig:
    """Where a run is placed: read by the planner (`python -m megatron_gvpo.plan`) and the launch scripts
    (launch/), never by the trainer, which sees only its own processes."""

    nodes: int = 1
    """Nodes of the allocation (SLURM's --nodes)."""
    gpus_per_node: int = 8
    rollout_nodes: int = 0
    """Nodes that run only SGLang servers (rollout.server_tp GPUs each); the other nodes train. 0: colocated,
    the servers share the trainer's GPUs (SGLang releases its memory while the trainer steps)."""
    gpu: str = "H100-SXM-80GB"
    """Accelerator model; the planner's table in megatron_gvpo/plan.py gives its memory, FLOP/s and links."""

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster.nodes and cluster.gpus_per_node must be >= 1, got {self.nodes}, "
                             f"{self.gpus_per_node}")
        if not 0 <= self.rollout_nodes < self.nodes:
            raise ValueError(f"cluster.rollout_nodes={self.rollout_nodes} must leave at least one of the "
                             f"{self.nodes} nodes to the trainer")

    @property
    def trainer_gpus(self) -> int:
        return (self.nodes - self.rollout_nodes) * self.gpus_per_node


@dataclass
class Config:
    """The trainer's configuration; YAML sections map to these fields."""

    run: RunConfig = field(default_factory=RunConfig)
    """Where outputs go and the seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Router losses and token dispatch of mixture-of-experts models."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """GVPO hyper-parameters and the group strategy."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, optimizer and schedule."""
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    """Offline group data (prompts with scored responses); schema in megatron_gvpo/data/offline.py."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Where groups come from (offline data or SGLang), sampling, weight sync and evaluation."""
    prompts: PromptDataConfig = field(default_factory=PromptDataConfig)
    """Prompts for online rollouts (schema in megatron_gvpo/data/prompts.py)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How online samples are scored (megatron_gvpo/rewards/scoring.py)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Nodes and roles for the planner and launch scripts."""

    def validate(self) -> None:
        k, gbs, mbs = self.algo.group_size, self.train.global_batch_size, self.train.micro_batch_size
        if gbs % k:
            raise ValueError(f"train.global_batch_size={gbs} must be a multiple of algo.group_size={k}")
        if self.algo.name == "gvpo" and self.algo.group_strategy == "group_atomic" and mbs % k:
            raise ValueError(
                f"algo.group_strategy='group_atomic' packs whole groups: train.micro_batch_size={mbs} must be "
                f"a multiple of algo.group_size={k} (or use group_strategy 'allgather' or 'prepass')"
            )
        if self.parallel.world_size is not None:
            self.check_world_size(self.parallel.world_size)
        if self.model.fp8_param_gather and not self.train.distributed_optimizer:
            raise ValueError("model.fp8_param_gather keeps FP8 parameters that Megatron's distributed optimizer "
                             "all-gathers: set train.distributed_optimizer=true")
        if self.rollout.eval_offline and not (self.rollout.source == "offline" and self.prompts.eval_path):
            raise ValueError("rollout.eval_offline evaluates an offline run: it needs rollout.source='offline' and "
                             f"prompts.eval_path (got source={self.rollout.source!r}, "
                             f"eval_path={self.prompts.eval_path!r})")
        if self.algo.importance_correction != "none" and self.rollout.source == "offline":
            raise ValueError("algo.importance_correction weights tokens by the rollout engine's log-probs: it needs "
                             "rollout.source 'online' or 'mix' (offline data carry none)")
        if self.algo.importance_correction != "none" and self.rollout.seeded and not torch.cuda.is_available():
            raise ValueError("algo.importance_correction needs the rollout's log-probs, which rollout.seeded sampling "
                             "does not give without a GPU (rollout/seeded.py): set rollout.seeded=false")
        if self.rollout.source != "offline":
            if not self.prompts.path:
                raise ValueError(f"rollout.source={self.rollout.source!r} needs prompts.path (a file, directory or "
                                 "glob of prompts: JSONL, parquet, ...)")
            longest = self.prompts.max_prompt_tokens + self.rollout.max_new_tokens
            if longest > self.model.seq_length:
                raise ValueError(
                    f"prompts.max_prompt_tokens + rollout.max_new_tokens = {longest} exceeds "
                    f"model.seq_length={self.model.seq_length}"
                )

    @property
    def groups_per_rollout(self) -> int:
        """Prompts (groups of algo.group_size) consumed by one rollout step, all its mini-batches together."""
        return self.train.global_batch_size * self.train.optimizer_steps_per_rollout // self.algo.group_size

    def check_world_size(self, world_size: int) -> int:
        """Validate the batch split for `world_size` processes; return DP."""
        dp = self.parallel.data_parallel_size(world_size)
        gbs, mbs = self.train.global_batch_size, self.train.micro_batch_size
        if gbs % (mbs * dp):
            raise ValueError(
                f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size * DP = {mbs} * {dp}"
            )
        return dp


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def add_config_arguments(parser, default_config: str | None = None) -> None:
    """`--config PATH` and `--set a.b=c [d.e=f ...]`, shared by every entry point."""
    parser.add_argument("--config", default=default_config, help="YAML file with the values (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.steps=10 parallel.tp=2",
    )
