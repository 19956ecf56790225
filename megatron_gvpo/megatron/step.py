"""Where Megatron meets GVPO: one `forward_step`, the heads that turn logits into a loss, and the passes.

`forward_step(data_iterator, model, head=...)` is the function handed to Megatron's pipeline schedule: it
runs the model chunk on a micro-batch and returns `(output, partial(head, micro_batch))`. On the last
pipeline stage `output` is the vocab-parallel logits [b, s, V/tp] and the head computes token log-probs with
`vocab_parallel_logprobs` (no vocabulary gather), sums them over response tokens and returns
`(loss, metrics)` in Megatron's loss-function contract. The heads:
- `logprob_head` / `token_logprob_head`: no loss, report sequence / token log-probs (reference, old-policy
  and pre-pass forward-only runs);
- `gvpo_head`: the GVPO loss, for one of three exact group strategies (see `megatron_gvpo.data.batch`);
- `policy_gradient_head`: GRPO or Dr. GRPO (`algo.baselines`), the baselines GVPO is compared against.

Normalisation. Megatron divides every micro-batch loss by the number of micro-batches and DDP averages
gradients over the data- and context-parallel ranks. GVPO's normaliser is global (the number of groups of
size >= 2 in the whole batch; for the baselines, the number of responses), so each micro-batch loss is
multiplied by `num_microbatches * dp * cp` before Megatron's divisions: the summed gradient is then exactly
the gradient of the global loss, for every split. (CP ranks hold different tokens of the same sequences, so
their gradients add up.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist

from megatron_gvpo.algo import (
    clipped_policy_gradient,
    group_advantages,
    gvpo_loss,
    gvpo_loss_with_group_stats,
    gvpo_surrogate_loss,
    gvpo_weights,
    make_groups,
    num_valid_groups,
    truncated_importance_weights,
)
from megatron_gvpo.data.batch import BEHAVIOUR_KEY, ROUTES_KEY, split_microbatches
from megatron_gvpo.megatron.model import output_weight
from megatron_gvpo.megatron.parallel import ParallelContext
from megatron_gvpo.megatron.routing_replay import set_routes
from megatron_gvpo.megatron.seq_layout import SequenceLayout, cp_sum, layout_microbatch
from megatron_gvpo.ops import fused_linear_logprobs, vocab_parallel_logprobs

Head = Callable[[dict, "torch.Tensor | None", torch.Tensor], tuple]
"""head(micro_batch, output_weight, model_output) -> (loss, metrics)"""


def forward_step(data_iterator, model, *, head: Head):
    """Megatron's forward-step contract: run this chunk on the next micro-batch (routing its tokens to the
    rollout's experts when the micro-batch carries them), bind the head to it (and, on the last stage, the
    output weight the fused head multiplies the hidden states by)."""
    mb = next(data_iterator)
    set_routes(model, mb.get(ROUTES_KEY))
    output = model(mb["tokens"], mb["position_ids"], None, packed_seq_params=mb.get("packed_seq_params"))
    return output, partial(head, mb, output_weight(model))


@dataclass(frozen=True)
class LogprobSpec:
    """How token log-probs are computed from the last stage's vocab-parallel logits."""

    tp_group: dist.ProcessGroup | None
    vocab_size: int
    """True vocabulary size: Megatron's TP padding columns get no probability mass."""
    cp_group: dist.ProcessGroup | None = None
    """Context-parallel group: each rank holds part of every sequence (`seq_layout`); None without CP."""
    packing: str = "padded"
    """Sequence layout of the model input: 'padded' rows or 'thd' packed (`seq_layout`)."""
    pad_multiple: int = 1
    """Sequences (THD) or rows (padded) are padded to a multiple of this many tokens (FP8 GEMMs: 16 or 32)."""
    chunk_size: int | None = None
    fused: bool = False
    """The model returns hidden states (`model.return_hidden_states`); log-probs come from
    `fused_linear_logprobs` and the output weight, without logits."""
    main_grad_accumulation: bool = False
    """Fused head: the output weight's gradient goes straight into Megatron DDP's `main_grad` buffer (needs
    DDP with overlap_grad_reduce=False; see `fused_linear_logprobs`)."""


def scored_token_logprobs(mb: dict, output: torch.Tensor, weight: torch.Tensor | None,
                          spec: LogprobSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, positions) of the micro-batch's scored tokens, flat in layout order, from vocab-parallel
    logits [b, t, V_padded/tp] or, with `spec.fused`, from hidden states [b, t, h] and the output weight
    [V_padded/tp, h]. Under CP these are this rank's share of the tokens."""
    kwargs = dict(tp_group=spec.tp_group, chunk_size=spec.chunk_size, vocab_size=spec.vocab_size)
    scored = mb["loss_mask"].reshape(-1).nonzero().squeeze(1)
    if spec.fused:
        # Only scored (response) tokens enter the loss, and without logits nothing is wasted by skipping the
        # rest: the output-layer matmuls (forward, recompute, two gradients) run on scored rows only.
        hidden = output.reshape(-1, output.shape[-1]).index_select(0, scored)
        token_logp = fused_linear_logprobs(hidden, weight, mb["targets"].reshape(-1)[scored], **kwargs,
                                           main_grad_accumulation=spec.main_grad_accumulation)
    else:
        token_logp = vocab_parallel_logprobs(output, mb["targets"], **kwargs).reshape(-1)[scored]
    return token_logp, scored


def _row_sums(mb: dict, token_logp: torch.Tensor, scored: torch.Tensor, cp_group) -> torch.Tensor:
    """[rows] sums of scored-token values per row: token positions map to rows through `mb["seq_index"]`
    (padded, packed or CP-split alike, see `seq_layout`); with CP the per-rank partial sums are completed."""
    rows = mb["seq_index"].reshape(-1)[scored]
    partial_sums = token_logp.new_zeros(mb["row_index"].numel()).index_add(0, rows, token_logp)
    return cp_sum(partial_sums, cp_group)


def sequence_logprobs(mb: dict, output: torch.Tensor, weight: torch.Tensor | None, spec: LogprobSpec) -> torch.Tensor:
    """[rows] log pi(response | prompt) of the micro-batch's rows (see `scored_token_logprobs`)."""
    token_logp, scored = scored_token_logprobs(mb, output, weight, spec)
    return _row_sums(mb, token_logp, scored, spec.cp_group)


def logprob_head(mb: dict, weight, logits: torch.Tensor, *, spec: LogprobSpec):
    seq_logp = sequence_logprobs(mb, logits, weight, spec).detach()
    return logits.sum() * 0.0, {"seq_logp": seq_logp, "row_index": mb["row_index"]}


def token_logprob_head(mb: dict, weight, logits: torch.Tensor, *, spec: LogprobSpec, columns: int):
    """Token log-probs [rows, columns] in the batch's own columns (`position_ids` are the columns in every
    layout), 0 where nothing is scored."""
    token_logp, scored = scored_token_logprobs(mb, logits, weight, spec)
    dense = token_logp.new_zeros(mb["row_index"].numel(), columns)
    dense[mb["seq_index"].reshape(-1)[scored], mb["position_ids"].reshape(-1)[scored]] = token_logp.detach()
    if spec.cp_group is not None:  # each token is on one CP rank
        dist.all_reduce(dense, group=spec.cp_group)
    return logits.sum() * 0.0, {"token_logp": dense, "row_index": mb["row_index"]}


@dataclass(frozen=True)
class GVPOLossSpec:
    """Everything the GVPO head needs besides the micro-batch."""

    beta: float
    strategy: Literal["group_atomic", "allgather", "prepass"]
    num_groups: int
    """Groups with >= 2 responses in the global batch (the normaliser)."""
    megatron_scale: float
    """num_microbatches * dp * cp, undoing Megatron's implicit averaging (module docstring)."""
    logprobs: LogprobSpec
    dp_group: dist.ProcessGroup | None
    loss_scale: float = 1.0
    length_normalized: bool = False
    """The variant `algo.gvpo_variant: length_normalized`: the loss sees each row's sequence log-prob divided
    by its response length (`response_lengths`; `ref_seq_logp` comes divided already)."""


def _all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


def _allgather_group_stats(mb: dict, seq_logp: torch.Tensor, spec: GVPOLossSpec):
    """Whole-group statistics for this micro-batch's rows from a detached all-gather across DP ranks, which
    all run micro-batch m at the same time and together hold whole groups."""
    d = (seq_logp - mb["ref_seq_logp"]).detach()
    d_all = _all_gather_rows(d, spec.dp_group)
    r_all = _all_gather_rows(mb["rewards"].to(d.dtype), spec.dp_group)
    g_all = _all_gather_rows(mb["group_ids"], spec.dp_group)
    groups = make_groups(g_all)
    rank = dist.get_rank(spec.dp_group) if spec.dp_group is not None else 0
    local = slice(rank * d.numel(), (rank + 1) * d.numel())
    index = groups.index_N[local]
    reward_centered = (r_all - groups.mean(r_all)[groups.index_N])[local]
    return reward_centered, groups.mean(d_all)[index], groups.sizes_G[index]


def gvpo_head(mb: dict, weight, logits: torch.Tensor, *, spec: GVPOLossSpec):
    seq_logp = sequence_logprobs(mb, logits, weight, spec.logprobs)
    policy = seq_logp / mb["response_lengths"] if spec.length_normalized else seq_logp  # what the loss sees
    scale = spec.loss_scale * spec.megatron_scale
    if spec.strategy == "group_atomic":
        loss = gvpo_loss(
            policy, mb["ref_seq_logp"], mb["rewards"], mb["group_ids"], spec.beta,
            num_groups=spec.num_groups, scale=scale,
        )
    elif spec.strategy == "allgather":
        reward_centered, mean_log_ratio, sizes = _allgather_group_stats(mb, policy, spec)
        loss = gvpo_loss_with_group_stats(
            policy, mb["ref_seq_logp"], reward_centered, mean_log_ratio, sizes, spec.beta,
            num_groups=spec.num_groups, scale=scale,
        )
    elif spec.strategy == "prepass":
        loss = gvpo_surrogate_loss(
            policy, mb["gvpo_weights"], mb["group_sizes"], spec.beta, num_groups=spec.num_groups, scale=scale
        )
    else:
        raise ValueError(f"unknown group strategy {spec.strategy!r}")
    # The surrogate's value is not the GVPO loss: the pre-pass reports that one.
    reported = {} if spec.strategy == "prepass" else {"loss": loss.detach() / spec.megatron_scale}
    return loss, {**reported, "seq_logp": seq_logp.detach(), "row_index": mb["row_index"]}


# --------------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------------


def prepare_microbatches(
    batch: dict[str, torch.Tensor], ctx: ParallelContext, micro_batch_size: int, packing: str = "padded",
    pad_multiple: int = 1,
) -> list[dict]:
    """This DP rank's micro-batches with each row's index in the global batch, laid out for the model
    (`seq_layout`: padded or packed rows, this rank's part of each sequence under CP)."""
    n, s = batch["tokens"].shape
    full = {
        **batch,
        "row_index": torch.arange(n),
        "position_ids": torch.arange(s).unsqueeze(0).expand(n, s),
    }
    layout = SequenceLayout(packing=packing, cp_size=ctx.cp_size, cp_rank=ctx.cp_rank,
                            pad_multiple=pad_multiple)
    micro = split_microbatches(full, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, micro_batch_size=micro_batch_size)
    return [layout_microbatch(mb, layout) for mb in micro]


def run_schedule(
    chunks: list, micro_batches: list[dict], head: Head, *, forward_only: bool, cp_size: int = 1
) -> list[dict]:
    """Megatron's forward-backward schedule over `micro_batches` (every pipeline stage passes the same list);
    returns the heads' metric dicts on the last stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # Megatron sizes pipeline messages as [seq_length / cp, micro_batch_size, hidden]; packed micro-batches
    # differ in length, which the model config's variable_seq_lengths (set for THD) handles.
    seq_length = max(mb["tokens"].shape[1] for mb in micro_batches) * cp_size
    # Each virtual stage consumes the micro-batches in order through its own iterator.
    iterators = [iter(micro_batches) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(forward_step, head=head),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    _drop_forward_state(chunks)
    return outputs


def _drop_forward_state(chunks: list) -> None:
    """Drop the tensors that modules keep from their last forward with its autograd graph (the MoE token
    dispatcher keeps the router's `probs`). That graph reaches the parameters' gradient accumulators, whose
    hooks (DDP's) hold the model: a cycle through autograd's C++ nodes, which Python's garbage collector
    cannot see. A discarded model would then live, with every process group it holds (their gloo threads
    polling), as long as the process."""
    modules = [module for chunk in chunks for module in chunk.modules()]
    dispatchers = [m.token_dispatcher for m in modules if hasattr(m, "token_dispatcher")]  # no modules themselves
    for owner in modules + dispatchers:
        for name, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(owner, name, None)


def gather_rows(outputs: list[dict], key: str, num_rows: int, ctx: ParallelContext) -> torch.Tensor | None:
    """Per-row values ([rows] or [rows, ...]) reported by the heads of every DP rank, in global row order (last
    stage; None elsewhere)."""
    if not ctx.is_last_stage():
        return None
    rows = torch.cat([o["row_index"] for o in outputs])
    values = torch.cat([o[key] for o in outputs])
    rows, values = _all_gather_rows(rows, ctx.dp_group), _all_gather_rows(values, ctx.dp_group)
    out = torch.full((num_rows, *values.shape[1:]), float("nan"), dtype=values.dtype)
    out[rows] = values
    return out


@torch.no_grad()
def compute_sequence_logprobs(
    chunks: list, batch: dict, ctx: ParallelContext, micro_batch_size: int, logprobs: LogprobSpec
) -> torch.Tensor | None:
    """[N] sequence log-probs of the whole batch under the current weights (forward only); last stage only."""
    micro = prepare_microbatches(batch, ctx, micro_batch_size, logprobs.packing, logprobs.pad_multiple)
    return _microbatch_logprobs(chunks, micro, batch["tokens"].shape[0], ctx, logprobs)


@torch.no_grad()
def compute_token_logprobs(
    chunks: list, batch: dict, ctx: ParallelContext, micro_batch_size: int, logprobs: LogprobSpec
) -> torch.Tensor | None:
    """[N, S] token log-probs of the whole batch under the current weights, aligned with `batch["targets"]`
    and 0 where `loss_mask` is False (forward only); last stage only."""
    n, s = batch["tokens"].shape
    micro = prepare_microbatches(batch, ctx, micro_batch_size, logprobs.packing, logprobs.pad_multiple)
    outputs = run_schedule(chunks, micro, partial(token_logprob_head, spec=logprobs, columns=s), forward_only=True,
                           cp_size=ctx.cp_size)
    return gather_rows(outputs, "token_logp", n, ctx)


@torch.no_grad()
def _microbatch_logprobs(chunks: list, micro: list[dict], num_rows: int, ctx: ParallelContext,
                         logprobs: LogprobSpec) -> torch.Tensor | None:
    outputs = run_schedule(chunks, micro, partial(logprob_head, spec=logprobs), forward_only=True,
                           cp_size=ctx.cp_size)
    return gather_rows(outputs, "seq_logp", num_rows, ctx)


def forward_backward_gvpo(
    chunks: list,
    batch: dict,
    ctx: ParallelContext,
    *,
    micro_batch_size: int,
    beta: float,
    strategy: str,
    logprobs: LogprobSpec,
    loss_scale: float = 1.0,
    length_normalized: bool = False,
) -> dict[str, float] | None:
    """Accumulate the GVPO gradient of the whole batch into the chunks' grad buffers; return the loss and the
    [N] sequence log-probs at the current weights (last stage, None elsewhere). `batch` must carry
    `ref_seq_logp`. Gradients are not reduced across DP here: Megatron's `finalize_model_grads` (called by the
    schedule when configured) or the optimizer does that.

    `length_normalized` runs the variant `algo.gvpo_variant: length_normalized` (not the paper's objective):
    the same loss on each response's mean token log-prob, log pi(y|x) / |y|, for the policy and the reference
    alike. The log-probs returned are sums either way."""
    n = batch["tokens"].shape[0]
    num_groups = num_valid_groups(batch["group_ids"])
    if length_normalized:
        lengths = _response_lengths(batch)
        batch = {**batch, "ref_seq_logp": batch["ref_seq_logp"] / lengths, "response_lengths": lengths}
    micro = prepare_microbatches(batch, ctx, micro_batch_size, logprobs.packing, logprobs.pad_multiple)
    prepass_loss = None
    if strategy == "prepass":
        seq_logp = _microbatch_logprobs(chunks, micro, n, ctx, logprobs)  # the same split as the training pass
        if seq_logp is not None:
            policy = seq_logp / batch["response_lengths"] if length_normalized else seq_logp
            weights = gvpo_weights(policy, batch["ref_seq_logp"], batch["rewards"], batch["group_ids"], beta)
            sizes = make_groups(batch["group_ids"]).sample_sizes()
            prepass_loss = gvpo_loss(policy, batch["ref_seq_logp"], batch["rewards"], batch["group_ids"], beta,
                                     scale=loss_scale)
            for mb in micro:
                mb["gvpo_weights"], mb["group_sizes"] = weights[mb["row_index"]], sizes[mb["row_index"]]
    spec = GVPOLossSpec(
        beta=beta, strategy=strategy, num_groups=num_groups, megatron_scale=len(micro) * ctx.dp_size * ctx.cp_size,
        logprobs=logprobs, dp_group=ctx.dp_group, loss_scale=loss_scale, length_normalized=length_normalized,
    )
    outputs = run_schedule(chunks, micro, partial(gvpo_head, spec=spec), forward_only=False, cp_size=ctx.cp_size)
    if prepass_loss is not None:
        return {"loss": float(prepass_loss), "seq_logp": gather_rows(outputs, "seq_logp", n, ctx)}
    return _loss_and_logprobs(outputs, n, ctx)


def _response_lengths(batch: dict) -> torch.Tensor:
    """[N] float32 response tokens per row; an empty response counts 1 (its terms are 0 anyway)."""
    return batch["loss_mask"].sum(1).clamp(min=1).to(torch.float32)


def _loss_and_logprobs(outputs: list[dict], num_rows: int, ctx: ParallelContext) -> dict | None:
    """The batch loss (the heads' reported micro-batch losses summed over micro-batches and DP ranks) and the
    [N] sequence log-probs, on the last stage; None elsewhere."""
    if not ctx.is_last_stage():
        return None
    seq_logp = gather_rows(outputs, "seq_logp", num_rows, ctx)
    local = torch.stack([o["loss"] for o in outputs]).sum()
    if ctx.dp_size > 1:
        dist.all_reduce(local, group=ctx.dp_group)
    return {"loss": float(local), "seq_logp": seq_logp}


# --------------------------------------------------------------------------------------------------------
# The policy-gradient baselines (GRPO, Dr. GRPO), for comparisons through the same schedule
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyGradientSpec:
    """Everything the policy-gradient head needs besides the micro-batch."""

    clip_eps: float
    kl_coef: float
    importance_cap: float | None
    """Truncated importance weights to the rollout's log-probs (`BEHAVIOUR_KEY`) with this cap; None: none."""
    megatron_scale: float
    """num_microbatches * dp * cp, as for GVPO (module docstring)."""
    logprobs: LogprobSpec


def policy_gradient_head(mb: dict, weight, logits: torch.Tensor, *, spec: PolicyGradientSpec):
    """`clipped_policy_gradient` on the scored tokens, each weighted by its row's `token_weights` (the length
    and batch normalisation). Without `old_token_logp` the sampling policy is the current one (ratio 1, the
    first update on a rollout). Under CP every rank sums its own tokens and the gradients add up."""
    token_logp, scored = scored_token_logprobs(mb, logits, weight, spec.logprobs)
    rows = mb["seq_index"].reshape(-1)[scored]

    def at_scored(key: str) -> torch.Tensor:
        return mb[key].reshape(-1)[scored]

    old = at_scored("old_token_logp") if "old_token_logp" in mb else token_logp.detach()
    weights = None
    if spec.importance_cap is not None:
        weights = truncated_importance_weights(old, at_scored(BEHAVIOUR_KEY), spec.importance_cap)
    per_token = clipped_policy_gradient(
        token_logp, old, mb["advantages"][rows], clip_eps=spec.clip_eps,
        ref_token_logp=at_scored("ref_token_logp") if spec.kl_coef else None, kl_coef=spec.kl_coef,
        importance_weights=weights,
    )
    loss = (per_token * mb["token_weights"][rows]).sum()
    reported = loss.detach().clone()
    if spec.logprobs.cp_group is not None:
        dist.all_reduce(reported, group=spec.logprobs.cp_group)
    seq_logp = _row_sums(mb, token_logp.detach(), scored, spec.logprobs.cp_group)
    return loss * spec.megatron_scale, {"loss": reported, "seq_logp": seq_logp, "row_index": mb["row_index"]}


def forward_backward_policy_gradient(
    chunks: list,
    batch: dict,
    ctx: ParallelContext,
    *,
    micro_batch_size: int,
    algorithm: Literal["grpo", "dr_grpo"],
    clip_eps: float,
    kl_coef: float,
    length_constant: int,
    logprobs: LogprobSpec,
    importance_cap: float | None = None,
) -> dict[str, float] | None:
    """`forward_backward_gvpo` for GRPO or Dr. GRPO: the gradient of `baselines.grpo_loss` (GRPO: advantages
    scaled by the group std, each response's token mean; Dr. GRPO: no std, token sums / `length_constant`)
    averaged over the batch's responses. Optional `old_token_logp` / `ref_token_logp` [N, S] come from
    `compute_token_logprobs`. With `importance_cap`, every token's term is weighted by its truncated importance
    ratio pi_old / pi_behaviour (`batch[BEHAVIOUR_KEY]`, the rollout's log-probs). Any micro-batch split is exact:
    advantages, weights and normalisers are per row or token."""
    if importance_cap is not None and BEHAVIOUR_KEY not in batch:
        raise ValueError(f"importance correction needs the rollout's log-probs in the batch ({BEHAVIOUR_KEY!r})")
    if algorithm not in ("grpo", "dr_grpo"):
        raise ValueError(f"unknown policy-gradient algorithm {algorithm!r} (grpo, dr_grpo)")
    n = batch["tokens"].shape[0]
    grpo = algorithm == "grpo"
    lengths = _response_lengths(batch) if grpo else torch.full((n,), float(length_constant))
    batch = {
        **batch,
        "advantages": group_advantages(batch["rewards"], batch["group_ids"], scale_by_std=grpo).float(),
        "token_weights": 1.0 / (lengths * n),
    }
    micro = prepare_microbatches(batch, ctx, micro_batch_size, logprobs.packing, logprobs.pad_multiple)
    spec = PolicyGradientSpec(clip_eps=clip_eps, kl_coef=kl_coef, importance_cap=importance_cap, logprobs=logprobs,
                              megatron_scale=len(micro) * ctx.dp_size * ctx.cp_size)
    outputs = run_schedule(chunks, micro, partial(policy_gradient_head, spec=spec), forward_only=False,
                           cp_size=ctx.cp_size)
    return _loss_and_logprobs(outputs, n, ctx)
