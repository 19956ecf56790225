"""How Megatron-Core splits each full parameter over tensor-parallel ranks, as data.

Matched by name suffix (first match wins); anything unmatched (norm weights) is replicated. Column-parallel
layers split output rows (dim 0), row-parallel layers split input columns (dim 1), the vocabulary is split
in contiguous row blocks. `linear_fc1` of a gated MLP holds cat(gate, up): each rank owns
cat(gate shard, up shard), so both halves are split separately. `linear_qkv` is interleaved per query group
(see hf_maps), so a contiguous split gives each rank whole groups. Experts' MLPs split like the dense MLP,
over the expert-TP ranks (`is_expert`); the router is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    dim: int | None
    """Dimension split over TP ranks; None = replicated."""
    halves: bool = False
    """Split each half of `dim` separately (fused gate/up)."""


TP_SPLITS: list[tuple[str, Split]] = [
    ("word_embeddings.weight", Split(0)),
    ("output_layer.weight", Split(0)),
    ("linear_qkv.weight", Split(0)),
    ("linear_qkv.bias", Split(0)),
    ("linear_proj.weight", Split(1)),
    ("linear_fc1.weight", Split(0, halves=True)),
    ("linear_fc2.weight", Split(1)),
]


def is_expert(name: str) -> bool:
    """Whether `name` is a routed expert's parameter: split over the expert-TP ranks (which may differ from
    the TP ranks) and held by one expert-parallel rank."""
    return ".mlp.experts." in name


def tp_split(name: str) -> Split:
    for suffix, split in TP_SPLITS:
        if name.endswith(suffix):
            return split
    return Split(None)


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of the full tensor `name` (a view where possible)."""
    split = tp_split(name)
    if split.dim is None or tp_size == 1:
        return full
    if full.shape[split.dim] % (2 * tp_size if split.halves else tp_size):
        raise ValueError(f"{name}: dim {split.dim} of shape {tuple(full.shape)} does not split over TP={tp_size}")
    if split.halves:
        return torch.cat([half.chunk(tp_size, split.dim)[tp_rank] for half in full.chunk(2, split.dim)], split.dim)
    return full.chunk(tp_size, split.dim)[tp_rank]


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order (inverse of `shard`)."""
    split = tp_split(name)
    if split.dim is None or len(shards) == 1:
        return shards[0]
    if split.halves:
        halves = [s.chunk(2, split.dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], split.dim), torch.cat([h[1] for h in halves], split.dim)],
                         split.dim)
    return torch.cat(shards, split.dim)
