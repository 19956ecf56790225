"""Input validation for the algorithm functions: user errors become ValueErrors that name the argument and sample."""

from __future__ import annotations

import math

import torch


def check_vectors(**tensors: torch.Tensor) -> int:
    """Require every tensor to be 1-D with the same length; return that length."""
    n = None
    first = None
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
        if n is None:
            n, first = t.numel(), name
        elif t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries but {first} has {n}")
    return n or 0


def check_finite(**tensors: torch.Tensor) -> None:
    """Require every entry to be finite; the error names the tensor, the first bad index and its value."""
    for name, t in tensors.items():
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise ValueError(f"{name}[{i}] is {t.detach().flatten()[i].item()} (must be finite)")


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
