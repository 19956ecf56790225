"""The policy on Megatron-Core: DDP-wrapped model chunks, optimizer and LR schedule, and the operations the
GVPO loop needs: log-probs of a batch (forward only: what the objective compares the policy with) and a
training step on a batch, with GVPO or one of the baselines it is compared against (`algo.name`).

Every rank of every layout calls the same methods with the same global batch; each keeps its own share
(pipeline stage, tensor shard, data-parallel rows). Results that only the last pipeline stage computes
(log-probs, loss, metrics) are broadcast over the pipeline group, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gvpo.algo import gvpo_metrics
from megatron_gvpo.data.batch import num_microbatches
from megatron_gvpo.megatron.config import AlgoConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from megatron_gvpo.megatron.fp8 import check_fp8_support, fp8_pad_multiple, fp8_transformer_kwargs
from megatron_gvpo.megatron.model import (
    build_gpt_model,
    check_attention_support,
    return_hidden_states,
    te_available,
    token_multiple,
    transformer_config,
)
from megatron_gvpo.megatron.parallel import ParallelContext
from megatron_gvpo.megatron.routing_replay import check_routing_replay_support
from megatron_gvpo.megatron.step import (
    LogprobSpec,
    compute_sequence_logprobs,
    compute_token_logprobs,
    forward_backward_gvpo,
    forward_backward_policy_gradient,
)
from megatron_gvpo.megatron.weights import load_hf_weights, load_model_weights
from megatron_gvpo.models.arch import Arch, padded_vocab_size

# Megatron's tracker names for the router losses, by moe.load_balancing.
ROUTER_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                     "global_aux_loss": "global_load_balancing_loss"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def router_loss_metrics(arch: Arch, moe: MoEConfig, ctx: ParallelContext, num_microbatches: int) -> dict[str, float]:
    """The router losses of the last forward-backward pass (those with a non-zero coefficient: Megatron computes
    only those), without their coefficients, each averaged over MoE layers and micro-batches as Megatron logs
    them, on every rank; Megatron's tracker is then cleared for the next pass."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe import moe_utils

    names = [ROUTER_LOSS_NAMES[moe.load_balancing]] if moe.aux_loss_coeff else []
    names += ["z_loss"] if moe.z_loss_coeff else []
    if not names:
        return {}
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in names:  # a stage without MoE layers computed none, and still joins the reduction
        tracker.setdefault(name, {"values": torch.zeros(arch.num_layers)})
    groups = SimpleNamespace(pp=ctx.pp_group, dp=ctx.dp_group)
    moe_utils.reduce_aux_losses_tracker_across_ranks(names, pg_collection=groups)
    for name in names:
        if tracker[name].get("reduce_group") is None:
            # Megatron logs the z-loss of each rank's own tokens; every rank reports the mean over the ranks
            # that split the tokens (equal shares), as for the load-balancing loss.
            for group in (ctx.tp_group, ctx.dp_cp_group):
                dist.all_reduce(tracker[name]["values"], op=dist.ReduceOp.AVG, group=group)
    count = sum(arch.moe_layers) * num_microbatches
    metrics = {f"moe_{name}": float(tracker[name]["values"].sum()) / count for name in names}
    moe_utils.clear_aux_losses_tracker()
    return metrics


def use_transformer_engine(impl: str) -> bool:
    if impl == "auto":
        return te_available()
    return impl == "transformer_engine"


def build_chunks(arch: Arch, ctx: ParallelContext, hf_state: Mapping[str, torch.Tensor] | None, *,
                 model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, moe: MoEConfig,
                 routing_replay: bool = False):
    """This rank's model chunks (one per virtual stage) with HF weights loaded (None: Megatron's initialisation,
    to be overwritten from a checkpoint); returns (chunks, TransformerConfig). `routing_replay`: the MoE routers
    replay recorded routes (rollout.routing_replay)."""
    use_te = use_transformer_engine(model.transformer_impl)
    p = parallel
    check_attention_support(use_te=use_te, cp=p.cp, packing=train.packing)
    if routing_replay:
        check_routing_replay_support(packing=train.packing, cp=p.cp, pp=p.pp, recompute=train.recompute)
    check_fp8_support(model, use_te=use_te,
                      capability=torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    config = transformer_config(
        arch, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=p.etp, sequence_parallel=p.sequence_parallel,
        params_dtype=DTYPES[model.dtype], use_te=use_te, moe=moe, routing_replay=routing_replay,
        # Packed micro-batches differ in length: pipeline stages exchange shapes before each message.
        variable_seq_lengths=train.packing == "thd" and p.pp > 1,
        **fp8_transformer_kwargs(model),
        **({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
           if train.recompute == "full" else {}),
    )
    padded = padded_vocab_size(arch.vocab_size, p.tp)
    chunks = [
        build_gpt_model(
            arch, config, padded_vocab_size=padded, max_sequence_length=model.seq_length,
            pre_process=ctx.is_first_stage(v), post_process=ctx.is_last_stage(v),
            vp_stage=v if p.vpp else None, use_te=use_te,
        )
        for v in range(ctx.num_model_chunks)
    ]
    if hf_state is not None:
        load_hf_weights(chunks, arch, hf_state, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, padded_vocab_size=padded,
                        etp_rank=ctx.etp_rank, etp_size=ctx.etp_size)
    if train.fused_logprobs:
        for chunk in chunks:
            return_hidden_states(chunk)
    return chunks, config


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    """True when the gradient was not finite and the update was not applied."""
    metrics: dict[str, float]


class MegatronEngine:
    """Policy (trained) and, for `algo.reference` 'frozen' / 'refresh', a separate reference copy."""

    def __init__(self, arch: Arch, ctx: ParallelContext, hf_state: Mapping[str, torch.Tensor] | None, *,
                 model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, algo: AlgoConfig,
                 moe: MoEConfig, routing_replay: bool = False, max_new_tokens: int | None = None):
        """`hf_state`: HF-named initial weights; None when `model.load` names a Megatron checkpoint.
        `routing_replay`: the routers replay the rollout's routes (rollout.routing_replay). `max_new_tokens`:
        Dr. GRPO's length constant (rollout.max_new_tokens), which only algo.name 'dr_grpo' reads."""
        if (hf_state is None) != bool(model.load):
            raise ValueError("give the initial weights either as hf_state or as model.load, exactly one")
        if algo.name == "dr_grpo" and max_new_tokens is None:
            raise ValueError("algo.name='dr_grpo' divides token sums by rollout.max_new_tokens: pass max_new_tokens")
        self.arch, self.ctx = arch, ctx
        self.model_cfg, self.train_cfg, self.algo, self.moe = model, train, algo, moe
        self.max_new_tokens = max_new_tokens
        build = dict(model=model, parallel=parallel, train=train, moe=moe, routing_replay=routing_replay)
        chunks, self.config = build_chunks(arch, ctx, hf_state, **build)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=train.distributed_optimizer,
        )
        # Only the first chunk gets buckets: Megatron's rule for virtual pipeline stages.
        self.chunks = [
            DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        t = train
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.grad_clip,
                bf16=model.dtype == "bfloat16", fp16=model.dtype == "float16",
                params_dtype=DTYPES[model.dtype], use_distributed_optimizer=t.distributed_optimizer,
            ),
            self.chunks,
        )
        total = t.total_optimizer_steps
        self.scheduler = OptimizerParamScheduler(
            # Warm-up starts at lr / (warmup + 1) so that the first step already updates (Megatron's default
            # init_lr = 0 spends step 1 at lr 0).
            self.optimizer, init_lr=t.lr / (t.lr_warmup_steps + 1), max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_steps, lr_decay_steps=max(total, t.lr_warmup_steps + 1),
            lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
            wd_incr_steps=max(total, 1), wd_incr_style="constant",
        )
        self.logprobs = LogprobSpec(
            tp_group=ctx.tp_group, vocab_size=arch.vocab_size, cp_group=ctx.cp_group if ctx.cp_size > 1 else None,
            packing=t.packing, pad_multiple=math.lcm(fp8_pad_multiple(model), token_multiple(self.config)),
            chunk_size=t.logprob_chunk_size,
            fused=t.fused_logprobs,
            # DDP above runs with overlap_grad_reduce=False, which this needs.
            main_grad_accumulation=t.fused_logprobs,
        )
        self.reference = None
        if algo.reference != "old_policy":
            self.reference, _ = build_chunks(arch, ctx, hf_state, **build)
            for c in self.reference:
                c.requires_grad_(False)
        if model.load:
            load_model_weights(self.chunks, model.load)
            if self.reference is not None:
                load_model_weights(self.reference, model.load)
        self.skipped_steps = 0

    # ---------------------------------------------------------------------------------------------------

    def _broadcast_from_last_stage(self, t: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        if self.ctx.pp_size == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype)
        dist.broadcast(t, src=dist.get_global_rank(self.ctx.pp_group, self.ctx.pp_size - 1), group=self.ctx.pp_group)
        return t

    @torch.no_grad()
    def sequence_logprobs(self, batch: dict, *, reference: bool = False) -> torch.Tensor:
        """[N] log pi(response | prompt) of every row under the policy (or the reference copy), on every rank."""
        seq_logp = self._forward_only(compute_sequence_logprobs, batch, reference)
        return self._broadcast_from_last_stage(seq_logp, (batch["tokens"].shape[0],), torch.float32)

    @torch.no_grad()
    def token_logprobs(self, batch: dict, *, reference: bool = False) -> torch.Tensor:
        """[N, S] token log-probs aligned with `batch["targets"]` (0 where nothing is scored), on every rank."""
        token_logp = self._forward_only(compute_token_logprobs, batch, reference)
        return self._broadcast_from_last_stage(token_logp, tuple(batch["tokens"].shape), torch.float32)

    def _forward_only(self, compute, batch: dict, reference: bool):
        chunks = self.reference if (reference and self.reference is not None) else self.chunks
        for c in chunks:
            c.eval()
        out = compute(chunks, batch, self.ctx, self.train_cfg.micro_batch_size, self.logprobs)
        for c in chunks:
            c.train()
        return out

    @torch.no_grad()
    def reference_logprobs(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the objective compares the policy with, computed before a rollout's first update and added to the
        batch: `ref_seq_logp` (GVPO's pi_ref; for the baselines a diagnostic), and for the baselines
        `old_token_logp` (the sampling policy, for the PPO ratio over several updates) and, with a KL penalty,
        `ref_token_logp`."""
        a = self.algo
        reference = a.reference != "old_policy"
        if a.name == "gvpo":
            return {"ref_seq_logp": self.sequence_logprobs(batch, reference=reference)}
        old = self.token_logprobs(batch)
        ref = self.token_logprobs(batch, reference=True) if reference else old
        return {"old_token_logp": old, "ref_seq_logp": ref.sum(1),
                **({"ref_token_logp": ref} if a.kl_coef else {})}

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """Copy the policy's current weights into the reference copy (same layout, parameter by parameter)."""
        if self.reference is None:
            raise ValueError("refresh_reference needs algo.reference 'frozen' or 'refresh'")
        for policy, ref in zip(self.chunks, self.reference, strict=True):
            for p_ref, p in zip(ref.parameters(), policy.module.parameters(), strict=True):
                p_ref.copy_(p)

    def train_step(self, batch: dict) -> StepResult:
        """One optimizer step on `batch` (whole groups, with `reference_logprobs`). A non-finite gradient norm
        skips the update (counted in `skipped_steps`); parameters and optimizer state stay as they were."""
        a = self.algo
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self.train_cfg.micro_batch_size
        if a.name == "gvpo":
            out = forward_backward_gvpo(self.chunks, batch, self.ctx, micro_batch_size=mbs, beta=a.beta,
                                        strategy=a.group_strategy, logprobs=self.logprobs, loss_scale=a.loss_scale,
                                        length_normalized=a.gvpo_variant == "length_normalized")
        else:
            out = forward_backward_policy_gradient(
                self.chunks, batch, self.ctx, micro_batch_size=mbs, algorithm=a.name, clip_eps=a.clip_eps,
                kl_coef=a.kl_coef, length_constant=self.max_new_tokens, logprobs=self.logprobs,
                importance_cap=a.importance_cap if a.importance_correction == "truncated" else None,
            )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        skipped = bool(found_inf) or not math.isfinite(grad_norm)
        if skipped:
            self.skipped_steps += 1
            self.optimizer.zero_grad()
        else:
            self.optimizer.step()
            self.scheduler.step(increment=1)

        names = ("loss", "cov_reward_logp", "cov_logp_ref", "var_logp", "weight_abs_mean", "log_ratio_mean",
                 "zero_variance_group_frac")
        values = None
        if out is not None:
            m = gvpo_metrics(out["seq_logp"], batch["ref_seq_logp"], batch["rewards"], batch["group_ids"], a.beta)
            m["loss"] = torch.tensor(out["loss"])
            values = torch.tensor([float(m[k]) for k in names], dtype=torch.float64)
        values = self._broadcast_from_last_stage(values, (len(names),), torch.float64)
        metrics = dict(zip(names, values.tolist(), strict=True))
        if self.arch.is_moe:
            micro = num_microbatches(batch["tokens"].shape[0], self.ctx.dp_size, self.train_cfg.micro_batch_size)
            metrics.update(router_loss_metrics(self.arch, self.moe, self.ctx, micro))
        return StepResult(
            loss=metrics.pop("loss"), grad_norm=grad_norm, lr=lr,
            skipped=skipped, metrics=metrics,
        )
