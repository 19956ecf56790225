"""The trainer's config sections that Megatron-Core reads: the model, the parallel layout, mixture-of-experts
routing, the objective and the optimizer schedule.

`MegatronEngine` and the model builder (megatron/engine.py, megatron/model.py) take these sections, not the whole
`Config` (megatron_gvpo/config.py assembles them with the data, rollout and reward sections). This module imports
nothing but the standard library, so the schema can be read without Megatron or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (shards attention heads, MLP and the vocabulary)."""
    pp: int = 1
    """Pipeline-parallel size (splits the layers into stages)."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None disables interleaving."""
    cp: int = 1
    """Context-parallel size (splits each sequence; needs Transformer Engine)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: with tp > 1, the activations outside the tensor-parallel matmuls (norms,
    residuals) are split over the TP ranks instead of replicated, for the same communication volume; rows are
    then padded to a multiple of tp tokens. No effect at tp = 1."""
    ep: int = 1
    """Expert-parallel size (mixture-of-experts models): each MoE layer's experts are split over ep ranks, which
    Megatron carves out of the data-parallel (x context-parallel x tensor-parallel) ranks; tokens reach their
    experts by all-to-all. Must divide the number of experts."""
    etp: int | None = None
    """Expert tensor-parallel size: how each expert's MLP is split; None = tp (Megatron's default). etp * ep must
    divide tp * cp * dp."""
    world_size: int | None = None
    """Expected number of processes; None takes it from the launcher. DP = world_size / (tp * pp * cp)."""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def validate(self) -> None:
        for name, size in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep), ("etp", self.expert_tp)):
            if size < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {size}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got {self.pp}) and vpp >= 1")
        if self.world_size is not None:
            self.data_parallel_size(self.world_size)

    def data_parallel_size(self, world_size: int) -> int:
        """DP for a given world size; raises when world_size is not a multiple of tp * pp * cp."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size < 1 or world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not a multiple of parallel.tp * parallel.pp * parallel.cp = "
                f"{self.tp} * {self.pp} * {self.cp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        # Megatron lays the experts' (etp, ep, expert-dp) grid over the same tp * cp * dp ranks of a stage.
        if (self.tp * self.cp * dp) % (self.expert_tp * self.ep):
            raise ValueError(
                f"parallel.etp * parallel.ep = {self.expert_tp} * {self.ep} must divide the {self.tp * self.cp * dp} "
                f"ranks of a pipeline stage (tp * cp * dp = {self.tp} * {self.cp} * {dp} at world size {world_size})"
            )
        return dp


@dataclass
class MoEConfig:
    """The router's auxiliary losses and token dispatch of mixture-of-experts models (unused for dense ones).

    The losses are Megatron's, added to the GVPO loss the way Megatron adds them to the language-model loss
    (their gradient averaged over micro-batches and data-parallel ranks) and logged separately. Off by default,
    as in slime's MoE RL recipes: the objective is then GVPO's alone."""

    aux_loss_coeff: float = 0.0
    """Load-balancing loss coefficient (the checkpoints ship their pretraining value, e.g. 1e-3); 0 disables it."""
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss"] = "aux_loss"
    """Megatron's load-balancing loss: per micro-batch ('aux_loss', GShard / Switch), per sequence
    ('seq_aux_loss') or over the global batch ('global_aux_loss')."""
    z_loss_coeff: float = 0.0
    """Router z-loss coefficient (ST-MoE: keeps the router logits small); 0 disables it."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach the experts of other EP ranks: Megatron's dropless all-to-all, or an all-gather."""

    def validate(self) -> None:
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


GroupStrategy = Literal["group_atomic", "allgather", "prepass"]
ReferenceMode = Literal["old_policy", "frozen", "refresh"]
Algorithm = Literal["gvpo", "grpo", "dr_grpo"]


@dataclass
class AlgoConfig:
    name: Algorithm = "gvpo"
    """The objective. 'gvpo', or a baseline for comparisons (benchmarks/): 'grpo' (advantages scaled by the
    group's std, PPO ratio clipping, each response's token mean, optional k3 KL penalty `kl_coef` to the
    reference) or 'dr_grpo' (no std scaling, no KL, token sums divided by rollout.max_new_tokens). beta and
    group_strategy are GVPO's; the baselines take any micro-batch split."""
    beta: float = 0.1
    """KL strength: the optimum is pi_ref * exp(R / beta) / Z. The authors use 0.1 for 7B math."""
    group_size: int = 4
    """k, responses sampled per prompt. Groups need k >= 2 to carry signal."""
    reference: ReferenceMode = "old_policy"
    """pi_ref: 'old_policy' (the policy that sampled the batch; the paper's Algorithm 1), 'frozen' (the
    initial model, classic KL-regularised RLHF) or 'refresh' (frozen, re-synced every ref_refresh_interval)."""
    ref_refresh_interval: int = 0
    """Rollout steps between reference refreshes; only with reference='refresh'."""
    group_strategy: GroupStrategy = "group_atomic"
    """How the group mean of log-ratios is obtained at the current parameters under Megatron:
    'group_atomic' (whole groups per micro-batch), 'allgather' (detached all-gather across DP ranks) or
    'prepass' (forward-only pass computes weights, then any packing)."""
    loss_scale: float = 1.0
    """Constant loss factor; micro_batch_size / (2 * group_size) reproduces the authors' verl code."""
    gvpo_variant: Literal["paper", "length_normalized"] = "paper"
    """'paper': the paper's loss on sequence log-probs. 'length_normalized': a variant for comparisons, NOT the
    paper's objective (its optimum is no longer pi_ref * exp(R / beta) / Z): the same loss on each response's
    mean token log-prob, log pi(y|x) / |y|, so that a long response's log-ratio does not outweigh a short
    one's (benchmarks/ test whether GVPO's unnormalised sequence-level weights are why it collapses at lower
    learning rates than GRPO)."""
    clip_eps: float = 0.2
    """GRPO / Dr. GRPO: PPO clip range of the ratio pi_theta / pi_old."""
    kl_coef: float = 0.0
    """GRPO: weight of the k3 KL penalty to the reference (needs reference 'frozen' or 'refresh'); 0: none."""
    importance_correction: Literal["none", "truncated"] = "none"
    """GRPO / Dr. GRPO on samples from other weights than the trained ones (rollout.mode 'async', 'mix' replay,
    or simply the rollout engine's numerics): 'truncated' weights every token's loss by
    min(pi_old / pi_behaviour, importance_cap), pi_behaviour being the rollout engine's log-prob of the token
    (truncated importance sampling, as slime's --use-tis and verl's rollout correction). GVPO takes none: its
    objective has the same optimum for any sampling distribution."""
    importance_cap: float = 2.0
    """The truncation of 'truncated' importance weights."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"algo.beta must be > 0, got {self.beta}")
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (a group of 1 carries no signal), got {self.group_size}")
        if (self.reference == "refresh") != (self.ref_refresh_interval > 0):
            raise ValueError(
                "algo.ref_refresh_interval must be > 0 exactly when algo.reference='refresh' "
                f"(got reference={self.reference!r}, ref_refresh_interval={self.ref_refresh_interval})"
            )
        if not self.loss_scale > 0:
            raise ValueError(f"algo.loss_scale must be > 0, got {self.loss_scale}")
        if not self.clip_eps > 0:
            raise ValueError(f"algo.clip_eps must be > 0, got {self.clip_eps}")
        if self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_coef and self.name != "grpo":
            raise ValueError(f"algo.kl_coef is GRPO's KL penalty; algo.name={self.name!r} has none (set it to 0)")
        if self.gvpo_variant != "paper" and self.name != "gvpo":
            raise ValueError(f"algo.gvpo_variant is a variant of GVPO's loss; algo.name={self.name!r} has none")
        if self.importance_correction != "none" and self.name == "gvpo":
            raise ValueError("algo.importance_correction is for the policy-gradient baselines (grpo, dr_grpo): GVPO's "
                             "objective needs no importance weights for samples of another policy")
        if not self.importance_cap >= 1:
            raise ValueError(
                f"algo.importance_cap must be >= 1 (it truncates large weights), got {self.importance_cap}")
        if self.kl_coef and self.reference == "old_policy":
            raise ValueError("algo.kl_coef > 0 penalises KL to a reference model: set algo.reference to 'frozen' "
                             "or 'refresh' (with 'old_policy' the reference is the sampling policy itself)")


DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    path: str = "configs/models/tiny_llama.json"
    """Hugging Face model directory (config.json, safetensors weights, tokenizer files) or a config.json file.
    The default is the embedded tiny CPU model."""
    init: Literal["auto", "pretrained", "random"] = "auto"
    """'pretrained' loads the directory's safetensors weights; 'random' initialises from the config alone with
    run.seed (Hugging Face's initialisation, identical at every parallel layout); 'auto' is 'pretrained' for a
    directory and 'random' for a config.json file, so pointing at a real model never trains from noise."""
    tokenizer: str = ""
    """Tokenizer directory; empty means `path` (when it is a directory)."""
    load: str = ""
    """Megatron checkpoint whose model weights initialise the policy (and the reference): the output of
    `tools/convert_hf.py import` or a training checkpoint, at any layout. `path` still gives the architecture
    and tokenizer; `init` is then unused. Empty: weights come from `path` as `init` says."""
    dtype: DType = "float32"
    """Parameter and compute dtype (bfloat16 on GPUs; CPUs run float32)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: Transformer Engine when importable ('auto') or required, else Megatron's local spec."""
    seq_length: int = 512
    """Padded sequence length (prompt + response) of every training micro-batch."""
    fp8: Literal["", "e4m3", "hybrid"] = ""
    """FP8 GEMMs through Transformer Engine (megatron_gvpo/megatron/fp8.py): 'e4m3', or 'hybrid' (E4M3
    forward, E5M2 gradients); '' computes in `dtype`. Needs dtype bfloat16, Transformer Engine and a GPU with
    FP8 tensor cores, checked before the model is built."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """Scaling: 'delayed' (amax history), 'tensorwise' (current per-tensor scaling), 'blockwise' (128-element
    blocks, Hopper+), 'mxfp8' (32-element blocks, Blackwell)."""
    fp8_param_gather: bool = False
    """Keep parameters in FP8 (Megatron's fp8_param): the distributed optimizer's all-gather moves half the
    bytes of bf16."""

    def validate(self) -> None:
        if self.fp8 and (self.dtype != "bfloat16" or self.transformer_impl == "local"):
            raise ValueError(f"model.fp8={self.fp8!r} needs model.dtype='bfloat16' (got {self.dtype!r}) and "
                             f"Transformer Engine layers (model.transformer_impl is {self.transformer_impl!r})")
        if self.fp8_param_gather and not self.fp8:
            raise ValueError("model.fp8_param_gather needs model.fp8 ('e4m3' or 'hybrid')")
        if not self.path:
            raise ValueError("model.path must name a Hugging Face model directory or config.json")
        if self.init == "pretrained" and self.path.endswith(".json"):
            raise ValueError(f"model.init='pretrained' needs a model directory with weights, model.path={self.path!r}")
        if self.seq_length < 2:
            raise ValueError(f"model.seq_length must be >= 2, got {self.seq_length}")

    @property
    def resolved_init(self) -> str:
        if self.init != "auto":
            return self.init
        return "random" if self.path.endswith(".json") else "pretrained"


@dataclass
class TrainConfig:
    steps: int = 100
    """Rollout steps (each: sample, score, then optimizer_steps_per_rollout optimizer steps)."""
    global_batch_size: int = 32
    """Samples (responses, not prompts) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one data-parallel rank."""
    optimizer_steps_per_rollout: int = 1
    """Mini-batches per rollout batch; the authors use 4 (the first is on-policy, later ones trust-region)."""
    lr: float = 1e-6
    """Peak learning rate (Adam)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over all remaining optimizer steps."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    logprob_chunk_size: int | None = None
    """Tokens per chunk in the vocab-parallel log-prob kernel; None sizes chunks to 16 MiB buffers."""
    recompute: Literal["none", "full"] = "none"
    """Activation recomputation: 'full' keeps only each layer's input and recomputes the layer in backward
    (Megatron's uniform method, one layer per checkpoint): activation memory / ~20 for one more forward."""
    packing: Literal["padded", "thd"] = "padded"
    """Model input layout: 'padded' rows, or 'thd' (each micro-batch's sequences packed into one row without
    padding; Transformer Engine attention only)."""
    fused_logprobs: bool = True
    """Compute log-probs from the last hidden states and the output weight chunk by chunk, on response
    tokens only (`fused_linear_logprobs`): the [tokens, vocab] logits never exist. Same values and gradients
    as the unfused path (false: the model returns logits and `vocab_parallel_logprobs` reads them)."""

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "optimizer_steps_per_rollout"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"train.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")

    @property
    def total_optimizer_steps(self) -> int:
        return self.steps * self.optimizer_steps_per_rollout
