"""How a micro-batch's sequences reach the model: padded rows or packed (THD), split over context-parallel ranks.

The batch arrives as right-padded rows [b, s] (`megatron_gvpo.data.batch`). `layout_microbatch` turns a
micro-batch into the model's input and adds `seq_index` [.., t]: which of the micro-batch's rows each token
position belongs to. The heads sum token log-probs into sequences by `seq_index` (`sequence_logprobs` in
`megatron.step`), so they need not know the layout:

- 'padded' (BSHD): rows as they are; `seq_index[i, t] = i`.
- 'thd': the rows packed into one row [1, T] without their padding, for Transformer Engine's fused attention
  with `PackedSeqParams(qkv_format='thd')`. A row keeps positions [0, last scored position + 1): later tokens
  are padding or the final target, and under causal attention they cannot change any scored log-prob. Each
  sequence is padded to a multiple of `pad_multiple` (2 * CP for context parallelism; FP8 GEMMs want 16).
- context parallelism (cp > 1): each CP rank keeps 2 of the 2 * cp equal chunks of every sequence, chunks
  r and 2cp - 1 - r (the causal load balance of Megatron's `get_batch_on_this_cp_rank` and Transformer
  Engine's `thd_get_partitioned_indices`). Every rank then holds part of every sequence: sequence log-probs
  are partial sums, completed by `cp_sum` (an all-reduce whose backward is the identity, because every CP
  rank computes the same loss from the completed sums).

Padded layout without CP is the CPU path. THD and CP need Transformer Engine's attention; this module's
index arithmetic and the heads' reductions are pure torch and are tested on CPU against the unsplit batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megatron_gvpo.data.batch import BEHAVIOUR_KEY, ROUTES_KEY, pad_routes

PER_TOKEN_KEYS = ("tokens", "position_ids", "targets", "loss_mask", "seq_index")
TOKEN_VALUE_KEYS = ("old_token_logp", "ref_token_logp", BEHAVIOUR_KEY)
"""Optional per-token values [b, s] aligned with `targets` (the policy-gradient baselines' log-probs): laid
out like `targets` when a micro-batch carries them."""


@dataclass(frozen=True)
class SequenceLayout:
    packing: Literal["padded", "thd"] = "padded"
    cp_size: int = 1
    cp_rank: int = 0
    pad_multiple: int = 1
    """THD: each sequence's length is padded to a multiple of this (times 2 * cp_size with CP)."""

    def __post_init__(self):
        if self.packing not in ("padded", "thd"):
            raise ValueError(f"train.packing must be 'padded' or 'thd', got {self.packing!r}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank {self.cp_rank} is outside [0, {self.cp_size})")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")


def scored_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] positions each row needs: up to and including its last scored position."""
    b, s = loss_mask.shape
    positions = torch.arange(1, s + 1).expand(b, s)
    lengths = torch.where(loss_mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"micro-batch row {row} has no scored token (empty response?); it cannot be packed")
    return lengths


def _round_up(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return (x + multiple - 1) // multiple * multiple


def pack_rows(mb: dict, pad_multiple: int = 1) -> dict:
    """Rows [b, s] -> one packed row [1, T] with `cu_seqlens` (true lengths) and `cu_seqlens_padded` [b+1]."""
    b, s = mb["tokens"].shape
    lengths = scored_lengths(mb["loss_mask"])
    padded = _round_up(lengths, pad_multiple)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    cu_padded = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    total = int(cu_padded[-1])
    seq_index = torch.repeat_interleave(torch.arange(b), padded)
    offset = torch.arange(total) - cu_padded[:-1][seq_index]  # position within its (padded) sequence
    real = offset < lengths[seq_index]
    src = seq_index * s + offset.clamp(max=s - 1)  # padding reads any in-row position, then is masked
    out = {k: v for k, v in mb.items() if k not in PER_TOKEN_KEYS + TOKEN_VALUE_KEYS}

    def gather(x: torch.Tensor, fill) -> torch.Tensor:
        flat = x.reshape(-1)[src]
        return torch.where(real, flat, torch.full_like(flat, fill)).unsqueeze(0)

    out.update(
        tokens=gather(mb["tokens"], 0),
        targets=gather(mb["targets"], 0),
        loss_mask=gather(mb["loss_mask"], False),
        position_ids=offset.unsqueeze(0),
        seq_index=seq_index.unsqueeze(0),
        cu_seqlens=cu,
        cu_seqlens_padded=cu_padded,
    )
    out.update({k: gather(mb[k], 0.0) for k in TOKEN_VALUE_KEYS if k in mb})
    return out


def pad_columns(mb: dict, multiple: int) -> dict:
    """Right-pad the per-token fields of rows [b, s] to a multiple of `multiple` columns (padding unscored)."""
    s = mb["tokens"].shape[1]
    extra = -s % multiple
    if not extra:
        return dict(mb)
    out = dict(mb)
    for k in ("tokens", "targets", "loss_mask", *(k for k in TOKEN_VALUE_KEYS if k in mb)):
        out[k] = torch.nn.functional.pad(mb[k], (0, extra), value=0)
    if ROUTES_KEY in mb:
        out[ROUTES_KEY] = pad_routes(mb[ROUTES_KEY], s + extra)
    if "position_ids" in mb:
        b = mb["tokens"].shape[0]
        out["position_ids"] = torch.arange(s + extra).unsqueeze(0).expand(b, s + extra)
    return out


def cp_token_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token positions CP rank `cp_rank` keeps: chunks r and 2cp-1-r of each of the sequences that
    `cu_seqlens_padded` delimits (every length a multiple of 2 * cp_size)."""
    lengths = cu_seqlens_padded.diff()
    if (lengths % (2 * cp_size)).any():
        bad = int((lengths % (2 * cp_size) != 0).nonzero()[0])
        raise ValueError(
            f"sequence {bad} has length {int(lengths[bad])}, not a multiple of 2 * cp = {2 * cp_size}; pad it "
            "(the trainer pads sequences to the multiple the layout needs)"
        )
    pieces = []
    for start, length in zip(cu_seqlens_padded[:-1].tolist(), lengths.tolist(), strict=True):
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def layout_microbatch(mb: dict, layout: SequenceLayout) -> dict:
    """The model input for one micro-batch under `layout` (module docstring), with `seq_index` added;
    THD micro-batches also carry `packed_seq_params`."""
    multiple = layout.pad_multiple * (2 * layout.cp_size if layout.cp_size > 1 else 1)
    if ROUTES_KEY in mb and (layout.packing == "thd" or layout.cp_size > 1):
        raise ValueError("routed experts (rollout.routing_replay) are laid out for padded rows without CP only")
    if layout.packing == "thd":
        out = pack_rows(mb, multiple)
        bounds = out["cu_seqlens_padded"]
    else:
        out = pad_columns(mb, multiple)
        b, s = out["tokens"].shape
        out["seq_index"] = torch.arange(b)[:, None].expand(b, s)
        bounds = torch.tensor([0, s])
    if layout.cp_size > 1:
        index = cp_token_index(bounds, layout.cp_size, layout.cp_rank)
        out.update({k: out[k].index_select(1, index) for k in PER_TOKEN_KEYS + TOKEN_VALUE_KEYS if k in out})
    if layout.packing == "thd":
        out["packed_seq_params"] = packed_seq_params(out["cu_seqlens"], out["cu_seqlens_padded"])
    return out


def packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor):
    """Megatron's description of a THD micro-batch (int32 offsets, as Transformer Engine's kernels take)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cu, cu_padded = cu_seqlens.to(device, torch.int32), cu_seqlens_padded.to(device, torch.int32)
    max_len = int(cu_seqlens_padded.diff().max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )


class _CPSum(torch.autograd.Function):
    """All-reduce SUM over the CP group; identity backward (each rank's loss is the same function of the
    sum, so d loss / d partial = d loss / d sum on every rank)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cp_sum(partial: torch.Tensor, cp_group: dist.ProcessGroup | None) -> torch.Tensor:
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return partial
    return _CPSum.apply(partial, cp_group)
