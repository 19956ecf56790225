"""Sequence log-probs from token log-probs: log pi(y|x) is the SUM over response tokens.

Prompt tokens and padding are excluded by the response mask. Masked positions are selected out with
`torch.where`, not multiplied by 0, so a -inf log-prob under the mask (a padded position) cannot turn the
sum into NaN.
"""

from __future__ import annotations

import torch


def sequence_logprob(token_logp_BT: torch.Tensor, response_mask_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] token log-probs and response mask -> [B] sequence log-probs."""
    if token_logp_BT.shape != response_mask_BT.shape:
        raise ValueError(
            f"token_logp shape {tuple(token_logp_BT.shape)} != response_mask shape {tuple(response_mask_BT.shape)}"
        )
    if token_logp_BT.dim() != 2:
        raise ValueError(f"token_logp must be [B, T], got shape {tuple(token_logp_BT.shape)}")
    mask = response_mask_BT.bool()
    return torch.where(mask, token_logp_BT, torch.zeros_like(token_logp_BT)).sum(-1)


def packed_sequence_logprob(
    token_logp_T: torch.Tensor, response_mask_T: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Packed (THD) layout: [T] token log-probs of sequences concatenated at offsets `cu_seqlens` [S+1]
    (starting at 0, ending at T) -> [S] sequence log-probs."""
    if token_logp_T.dim() != 1 or token_logp_T.shape != response_mask_T.shape:
        raise ValueError(
            f"token_logp and response_mask must both be [T], got {tuple(token_logp_T.shape)} "
            f"and {tuple(response_mask_T.shape)}"
        )
    cu = cu_seqlens.to(torch.long)
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != token_logp_T.numel():
        raise ValueError(f"cu_seqlens must run from 0 to T={token_logp_T.numel()}, got {cu.tolist()}")
    lengths = cu.diff()
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    seq_index_T = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    masked = torch.where(response_mask_T.bool(), token_logp_T, torch.zeros_like(token_logp_T))
    return torch.zeros(lengths.numel(), dtype=masked.dtype, device=masked.device).index_add(0, seq_index_T, masked)
