"""Group bookkeeping shared by every group-relative objective.

A batch holds N samples; `group_ids[i]` names the prompt (group) sample i answers. Groups may have different
sizes and their samples may sit anywhere in the batch, so every per-group statistic is a segment reduction
over `torch.unique(group_ids, return_inverse=True)` rather than a reshape to `[G, k]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Groups:
    """Segment structure of a batch: sample i belongs to group `index_N[i]` in `0..num_groups-1`."""

    index_N: torch.Tensor
    """[N] int64, dense group index of every sample (order of first appearance is not preserved)."""
    sizes_G: torch.Tensor
    """[G] int64, number of samples in each group."""

    @property
    def num_groups(self) -> int:
        return self.sizes_G.numel()

    def sum(self, x_N: torch.Tensor) -> torch.Tensor:
        """[N] -> [G] per-group sum; differentiable in `x_N`."""
        out = torch.zeros(self.num_groups, dtype=x_N.dtype, device=x_N.device)
        return out.index_add(0, self.index_N, x_N)

    def mean(self, x_N: torch.Tensor) -> torch.Tensor:
        """[N] -> [G] per-group mean; differentiable in `x_N`."""
        return self.sum(x_N) / self.sizes_G.to(x_N.dtype)

    def center(self, x_N: torch.Tensor) -> torch.Tensor:
        """[N] -> [N] each sample minus its group's mean."""
        return x_N - self.mean(x_N)[self.index_N]

    def sample_sizes(self) -> torch.Tensor:
        """[N] int64, the size of the group each sample belongs to."""
        return self.sizes_G[self.index_N]


def make_groups(group_ids: torch.Tensor) -> Groups:
    """Build the segment structure of a batch from per-sample group ids (any integer labels, any order)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    _, index_N, sizes_G = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return Groups(index_N=index_N, sizes_G=sizes_G)
