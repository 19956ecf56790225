"""Token log-probs (and entropy) straight from the last hidden states and the vocab-parallel output weight.

`fused_linear_logprobs(hidden [T, h], weight [V_local, h], targets [T])` equals
`vocab_parallel_logprobs(hidden @ weight.T, targets)` without the [T, V_local] logits ever existing: logits
are formed `chunk_size` tokens at a time, reduced to four per-token statistics and dropped, and formed again
chunk by chunk in backward. The forward is one pass: each chunk keeps its LOCAL max, and the statistics are
rescaled to the global max after one all-reduce MAX (online softmax), then summed with one all-reduce SUM.

Memory beyond the inputs: two fp32 [chunk, V_local] buffers allocated once per call and reused by every
chunk, the [T, h] hidden gradient and the [V_local, h] weight gradient (both needed by any output layer;
with `main_grad_accumulation` the weight gradient goes straight into Megatron DDP's buffer instead). This
removes the anchors' most reported OOM: a 8192-token sequence with a 128k vocabulary has 4 GiB of fp32 logits
per TP rank before any softmax.

Tensor parallelism: `hidden` is replicated over the TP group (the input of Megatron's column-parallel output
layer), so its gradient is all-reduced over `tp_group` in backward, as Megatron's
`copy_to_tensor_model_parallel_region` would. Under sequence parallelism the model gathers the sequence before
this head (`megatron.model.return_hidden_states`), so `hidden` is replicated here too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gvpo.ops.vocab_parallel import (
    _all_reduce,
    _chunks,
    _group_rank_size,
    check_targets,
    finish_stats,
    grad_logits_chunk,
    op_outputs,
    shard_targets,
    upstream_grads,
    work_buffers,
)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T into the work buffer `out` (the matmul in the inputs' dtype, then promoted)."""
    if hidden.dtype == out.dtype:
        return torch.matmul(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_Th, weight_Vh, targets_T, tp_group, chunk_size, return_entropy, vocab_size,
                main_grad_accumulation):
        num_tokens = hidden_Th.shape[0]
        vocab_local = weight_Vh.shape[0]
        work = torch.promote_types(hidden_Th.dtype, torch.float32)
        rank, _ = _group_rank_size(tp_group)
        valid, local_target_T, in_shard_T = shard_targets(targets_T, rank, vocab_local, vocab_size)
        w = weight_Vh[:valid]

        # Per token, relative to the LOCAL max m: sum exp(x - m), sum exp(x - m) (x - m), and x at the target.
        local_max_T = torch.full((num_tokens,), float("-inf"), dtype=work, device=hidden_Th.device)
        sums_T3 = torch.zeros(num_tokens, 3, dtype=work, device=hidden_Th.device)
        if valid:
            z_buf, exp_buf = work_buffers(min(chunk_size, num_tokens), valid, work, hidden_Th.device)
        for s, e in _chunks(num_tokens if valid else 0, chunk_size):
            z, exp_z = z_buf[: e - s], exp_buf[: e - s]
            _chunk_logits(hidden_Th[s:e], w, out=z)
            target_x = z.gather(1, local_target_T[s:e, None]).squeeze(1)
            sums_T3[s:e, 2] = torch.where(in_shard_T[s:e], target_x, torch.zeros_like(target_x))
            local_max_T[s:e] = z.max(dim=-1).values
            z.sub_(local_max_T[s:e, None])
            torch.exp(z, out=exp_z)
            sums_T3[s:e, 0] = exp_z.sum(dim=-1)
            if return_entropy:
                sums_T3[s:e, 1] = z.mul_(exp_z).sum(dim=-1)
        if valid:
            del z_buf, exp_buf

        max_T = local_max_T.clone()
        _all_reduce(max_T, dist.ReduceOp.MAX, tp_group)
        # Rescale to the global max; a shard with no valid column (local max -inf) contributes nothing.
        has = sums_T3[:, 0] > 0
        shift = torch.where(has, local_max_T - max_T, torch.zeros_like(max_T))
        scale = torch.where(has, torch.exp(shift), torch.zeros_like(max_T))
        stats_T3 = torch.stack(
            [
                sums_T3[:, 0] * scale,
                scale * (sums_T3[:, 1] + shift * sums_T3[:, 0]),
                torch.where(in_shard_T, sums_T3[:, 2] - max_T, torch.zeros_like(max_T)),
            ],
            dim=1,
        )
        _all_reduce(stats_T3, dist.ReduceOp.SUM, tp_group)
        logp_T, lse_T, entropy_T = finish_stats(max_T, stats_T3[:, 0], stats_T3[:, 2], stats_T3[:, 1], return_entropy)

        ctx.save_for_backward(hidden_Th, weight_Vh, local_target_T, in_shard_T, lse_T, entropy_T)
        ctx.tp_group, ctx.chunk_size, ctx.return_entropy = tp_group, chunk_size, return_entropy
        ctx.valid_columns, ctx.work_dtype = valid, work
        ctx.main_grad_accumulation = main_grad_accumulation
        return op_outputs(ctx, logp_T, entropy_T, hidden_Th.dtype, return_entropy)

    @staticmethod
    def backward(ctx, grad_logp_T, grad_entropy_T):
        hidden_Th, weight_Vh, local_target_T, in_shard_T, lse_T, entropy_T = ctx.saved_tensors
        valid, work = ctx.valid_columns, ctx.work_dtype
        w = weight_Vh[:valid]
        g_logp_T, g_ent_T = upstream_grads(ctx, grad_logp_T, grad_entropy_T)
        num_tokens = hidden_Th.shape[0]
        grad_hidden = torch.zeros(hidden_Th.shape, dtype=work, device=hidden_Th.device)
        if ctx.main_grad_accumulation:
            # Straight into Megatron DDP's fp32 gradient buffer: no [V_local, h] gradient is ever allocated.
            grad_weight = None
            weight_acc = weight_Vh.main_grad[:valid]
        else:
            grad_weight = torch.zeros(weight_Vh.shape, dtype=work, device=weight_Vh.device)
            weight_acc = grad_weight[:valid]
        if valid:
            logp_buf, p_buf = work_buffers(min(ctx.chunk_size, num_tokens), valid, work, hidden_Th.device)
        for s, e in _chunks(num_tokens if valid else 0, ctx.chunk_size):
            h, logp = hidden_Th[s:e], logp_buf[: e - s]
            _chunk_logits(h, w, out=logp).sub_(lse_T[s:e, None])
            grad = grad_logits_chunk(
                logp, p_buf[: e - s], entropy_T[s:e] if g_ent_T is not None else None,
                g_logp_T[s:e] if g_logp_T is not None else None, g_ent_T[s:e] if g_ent_T is not None else None,
                local_target_T[s:e], in_shard_T[s:e],
            )
            # Matmuls in the parameters' dtype (as Megatron's output layer runs them), accumulation in fp32.
            if w.dtype == work:
                torch.matmul(grad, w, out=grad_hidden[s:e])
            else:
                grad_hidden[s:e] = grad.to(w.dtype) @ w
            weight_acc.addmm_(grad.T.to(weight_acc.dtype), h.to(weight_acc.dtype))
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group)
        grad_weight = grad_weight.to(weight_Vh.dtype) if grad_weight is not None else None
        return grad_hidden.to(hidden_Th.dtype), grad_weight, None, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    main_grad_accumulation: bool = False,
):
    """log softmax(hidden @ weight.T)[target] (and entropy) without materialising the logits.

    Args:
        hidden: [..., h] last hidden states, replicated over the TP group.
        weight: [V_local, h] this rank's rows of the output layer (Megatron's `output_layer.weight`).
        targets: [...] global token ids; tp_group / chunk_size / return_entropy / vocab_size as in
            `vocab_parallel_logprobs`.
        main_grad_accumulation: add the weight's gradient straight into `weight.main_grad` (Megatron DDP's
            fp32 buffer) and give autograd none, as Megatron's gradient-accumulation fusion does, so that no
            [V_local, h] gradient is allocated. Needs DDP with overlap_grad_reduce=False: the overlapped
            reduce waits for a gradient hook of every parameter, and this weight's hook does not fire (a tied
            embedding's still does, for its lookup gradient, which DDP adds to the same buffer).
    """
    needs_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    if main_grad_accumulation and needs_weight_grad and getattr(weight, "main_grad", None) is None:
        raise ValueError(
            "main_grad_accumulation needs a weight with a main_grad buffer (wrap the model in Megatron DDP)"
        )
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"shapes do not fit: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} (want [V_local, "
            f"{hidden.shape[-1]}]), targets {tuple(targets.shape)} (want {tuple(hidden.shape[:-1])})"
        )
    flat_targets, vocab_size, chunk_size = check_targets(targets, weight.shape[0], tp_group, vocab_size, chunk_size)
    logp, entropy = _FusedLinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, tp_group, chunk_size,
        return_entropy, vocab_size, main_grad_accumulation,
    )
    if return_entropy:
        return logp.view(targets.shape), entropy.view(targets.shape)
    return logp.view(targets.shape)
