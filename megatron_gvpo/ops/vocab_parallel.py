"""Token log-probs and entropy from vocab-parallel logits, in bounded memory.

Tensor parallelism shards the output layer over the vocabulary: rank r holds logits for token ids
[r * V_local, (r+1) * V_local). `vocab_parallel_logprobs` computes log softmax at the target id (and the
entropy of the full distribution) without ever gathering the full vocabulary:

    forward:  m = max over all shards (one all-reduce MAX of [T]);
              per token s = sum exp(x - m), z_t = x_target - m, e = sum exp(x - m) * (x - m)
              (one all-reduce SUM of [T, 3]); log p_t = z_t - log s; H = log s - e / s.
    backward: purely local, no communication: with log p = x - lse,
              d log p_t / dx = onehot(t) - p,   dH / dx = -p * (log p + H).

Memory: the input is never modified or copied whole. Work happens `chunk_size` tokens at a time in two fp32
[chunk, V_local] buffers allocated once per call, in forward and again (recomputed) in backward, where the
gradient is formed in place in its own rows; autograd keeps only a reference to the logits and two [T] fp32
vectors. The only full-size allocation is the gradient itself.
Compare Megatron's `vocab_parallel_cross_entropy`, which overwrites its input (callers that reuse the logits
must clone them) and offers no entropy, and plain `log_softmax` + gather, which keeps [T, V] fp32 alive.

The upstream gradient must be identical on every rank of the TP group (it is when the loss is computed
redundantly on all TP ranks, as in Megatron).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 16 * 2**20
"""Default size of each fp32 work buffer; `chunk_size=None` picks the token count that fills it."""


def _group_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield start, min(start + chunk_size, num_tokens)


def work_buffers(rows: int, cols: int, dtype, device, count: int = 2) -> list[torch.Tensor]:
    """`count` [rows, cols] work buffers, allocated once per call and reused by every chunk through `out=`:
    a fresh tensor per chunk costs an allocation and, on CPU, page faults on first touch of every page."""
    return [torch.empty(rows, cols, dtype=dtype, device=device) for _ in range(count)]


def shard_targets(targets_T: torch.Tensor, rank: int, vocab_local: int, vocab_size: int):
    """(valid columns of this shard, local target ids (0 off-shard), mask of targets in this shard). Columns
    past the true vocabulary (TP padding) are not tokens: they take no probability mass."""
    valid = max(0, min(vocab_local, vocab_size - rank * vocab_local))
    local_target_T = targets_T - rank * vocab_local
    in_shard_T = (local_target_T >= 0) & (local_target_T < valid)
    return valid, torch.where(in_shard_T, local_target_T, torch.zeros_like(local_target_T)), in_shard_T


def finish_stats(max_T, sum_exp_T, target_z_T, sum_exp_z_T, return_entropy: bool):
    """(log p at the target, log-sum-exp, entropy or an empty tensor) from the all-reduced statistics, all
    relative to the global max: sum exp(z), z at the target, sum exp(z) * z with z = x - max."""
    log_sum_T = sum_exp_T.log()
    logp_T = target_z_T - log_sum_T
    entropy_T = log_sum_T - sum_exp_z_T / sum_exp_T if return_entropy else logp_T.new_zeros(0)
    return logp_T, max_T + log_sum_T, entropy_T


def op_outputs(ctx, logp_T, entropy_T, dtype, return_entropy: bool):
    """The autograd outputs in the input's dtype; without entropy its placeholder gets no gradient."""
    logp_out, entropy_out = logp_T.to(dtype), entropy_T.to(dtype)
    if not return_entropy:
        ctx.mark_non_differentiable(entropy_out)
    return logp_out, entropy_out


def upstream_grads(ctx, grad_logp_T, grad_entropy_T):
    """(grad of log p, grad of entropy or None) in the work dtype; the entropy's only when it was returned."""
    g_logp_T = grad_logp_T.to(ctx.work_dtype) if grad_logp_T is not None else None
    use_entropy = ctx.return_entropy and grad_entropy_T is not None
    return g_logp_T, grad_entropy_T.to(ctx.work_dtype) if use_entropy else None


def grad_logits_chunk(logp, p, entropy, g_logp, g_entropy, local_target, in_shard):
    """Gradient of sum(g_logp * log p_target + g_entropy * H) w.r.t. one chunk of local logits, written in
    place over `logp` = logits - lse [C, V_local]; `p` is a [C, V_local] buffer it also overwrites. No
    communication: d log p_t / dx = onehot(t) - p and dH / dx = -p * (log p + H)."""
    torch.exp(logp, out=p)
    if g_entropy is not None:
        grad = logp.add_(entropy[:, None]).mul_(p).mul_(-g_entropy[:, None])
    else:
        grad = logp.zero_()
    if g_logp is not None:
        grad.sub_(p.mul_(g_logp[:, None]))
        onehot_grad = torch.where(in_shard, g_logp, torch.zeros_like(g_logp))
        grad.scatter_add_(1, local_target[:, None], onehot_grad[:, None])
    return grad


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, targets_T, tp_group, chunk_size, return_entropy, vocab_size):
        num_tokens, vocab_local = logits_TV.shape
        full_logits_TV = logits_TV
        # Half-precision logits are processed in fp32; fp64 stays fp64 (gradcheck, references).
        work = torch.promote_types(logits_TV.dtype, torch.float32)
        ctx.work_dtype = work
        rank, _ = _group_rank_size(tp_group)
        valid, local_target_T, in_shard_T = shard_targets(targets_T, rank, vocab_local, vocab_size)
        ctx.valid_columns = valid
        logits_TV = logits_TV[:, :valid]

        max_T = torch.full((num_tokens,), float("-inf"), dtype=work, device=logits_TV.device)
        for s, e in _chunks(num_tokens if valid else 0, chunk_size):
            max_T[s:e] = logits_TV[s:e].max(dim=-1).values
        _all_reduce(max_T, dist.ReduceOp.MAX, tp_group)

        # Columns: sum exp(z), z at the target (0 off-shard), sum exp(z) * z; z = x - max.
        stats_T3 = torch.zeros(num_tokens, 3, dtype=work, device=logits_TV.device)
        if valid:
            z_buf, exp_buf = work_buffers(min(chunk_size, num_tokens), valid, work, logits_TV.device)
        for s, e in _chunks(num_tokens if valid else 0, chunk_size):
            # Out of place into the work buffer: one pass over the chunk, promoted to the work dtype.
            z, exp_z = z_buf[: e - s], exp_buf[: e - s]
            torch.sub(logits_TV[s:e], max_T[s:e, None], out=z)
            target_z = z.gather(1, local_target_T[s:e, None]).squeeze(1)
            stats_T3[s:e, 1] = torch.where(in_shard_T[s:e], target_z, torch.zeros_like(target_z))
            torch.exp(z, out=exp_z)
            stats_T3[s:e, 0] = exp_z.sum(dim=-1)
            if return_entropy:
                # In place into z (no third buffer); sum() reduces pairwise, which keeps the fp32 error
                # of this V-term sum near log(V) ulps, where a bmm dot product accumulates ~sqrt(V) ulps.
                stats_T3[s:e, 2] = z.mul_(exp_z).sum(dim=-1)
        if valid:
            del z_buf, exp_buf
        _all_reduce(stats_T3, dist.ReduceOp.SUM, tp_group)

        logp_T, lse_T, entropy_T = finish_stats(max_T, stats_T3[:, 0], stats_T3[:, 1], stats_T3[:, 2], return_entropy)

        ctx.save_for_backward(full_logits_TV, local_target_T, in_shard_T, lse_T, entropy_T)
        ctx.chunk_size = chunk_size
        ctx.return_entropy = return_entropy
        return op_outputs(ctx, logp_T, entropy_T, logits_TV.dtype, return_entropy)

    @staticmethod
    def backward(ctx, grad_logp_T, grad_entropy_T):
        full_logits_TV, local_target_T, in_shard_T, lse_T, entropy_T = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        valid = ctx.valid_columns
        full_grad_TV = (torch.empty_like if valid == full_logits_TV.shape[1] else torch.zeros_like)(full_logits_TV)
        logits_TV, grad_logits_TV = full_logits_TV[:, :valid], full_grad_TV[:, :valid]
        work = ctx.work_dtype
        g_logp_T, g_ent_T = upstream_grads(ctx, grad_logp_T, grad_entropy_T)

        # The gradient is computed in place in its own rows when it has the work dtype (no copy, one buffer).
        in_place = full_grad_TV.dtype == work
        num_tokens = logits_TV.shape[0]
        if valid:
            p_buf, *rest = work_buffers(min(ctx.chunk_size, num_tokens), valid, work, logits_TV.device,
                                        count=1 if in_place else 2)
        for s, e in _chunks(num_tokens if valid else 0, ctx.chunk_size):
            logp = grad_logits_TV[s:e] if in_place else rest[0][: e - s]
            torch.sub(logits_TV[s:e], lse_T[s:e, None], out=logp)
            grad = grad_logits_chunk(
                logp, p_buf[: e - s], entropy_T[s:e] if g_ent_T is not None else None,
                g_logp_T[s:e] if g_logp_T is not None else None, g_ent_T[s:e] if g_ent_T is not None else None,
                local_target_T[s:e], in_shard_T[s:e],
            )
            if not in_place:
                grad_logits_TV[s:e].copy_(grad)
        return full_grad_TV, None, None, None, None, None


def check_targets(
    targets: torch.Tensor, vocab_local: int, tp_group, vocab_size: int | None, chunk_size: int | None
) -> tuple[torch.Tensor, int, int]:
    """Validate the arguments shared by the log-prob ops; return (flat int64 targets, vocab size, chunk size)."""
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _, tp_size = _group_rank_size(tp_group)
    padded_size = vocab_local * tp_size
    if vocab_size is None:
        vocab_size = padded_size
    elif not 0 < vocab_size <= padded_size:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded_size}] ({vocab_local} per shard x {tp_size})")
    flat_targets = targets.reshape(-1)
    bad = (flat_targets < 0) | (flat_targets >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"targets[{i}] = {int(flat_targets[i])} is outside the vocabulary [0, {vocab_size}) "
            f"({vocab_local} per shard x {tp_size} shards)"
        )
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (4 * max(vocab_local, 1)))
    return flat_targets.to(torch.long), vocab_size, chunk_size


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    vocab_size: int | None = None,
):
    """log softmax(logits)[target] (and the entropy) for vocab-sharded logits, differentiable in `logits`.

    Args:
        logits: [..., V_local] this rank's vocabulary shard (any float dtype; math in fp32). Not modified.
        targets: [...] global target token ids in [0, V_local * tp_size).
        tp_group: the tensor-parallel group the vocabulary is sharded over; None means unsharded (one process,
            no communication), not the default group.
        chunk_size: tokens processed at once; None fills `DEFAULT_CHUNK_BYTES` per fp32 work buffer.
        return_entropy: also return the entropy of the full (all-shard) distribution.
        vocab_size: the true vocabulary size when the sharded logits include padding columns (Megatron pads
            the vocabulary to a multiple of 128 * TP): ids >= vocab_size get no probability mass, exactly as
            in the unpadded model. None: every column is a token.

    Returns:
        logp [...] in `logits.dtype`, or (logp, entropy) when `return_entropy`.
    """
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape {tuple(logits.shape)} without "
            "its last (vocabulary) dimension"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    vocab_local = logits.shape[-1]
    flat_targets, vocab_size, chunk_size = check_targets(targets, vocab_local, tp_group, vocab_size, chunk_size)
    logits_TV = logits.reshape(-1, vocab_local)
    logp_T, entropy_T = _VocabParallelLogprobs.apply(
        logits_TV, flat_targets, tp_group, chunk_size, return_entropy, vocab_size
    )
    logp = logp_T.view(targets.shape)
    if return_entropy:
        return logp, entropy_T.view(targets.shape)
    return logp
