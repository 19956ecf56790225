"""A training batch of grouped responses and how it is cut into data-parallel micro-batches.

A batch is a dict of tensors with one row per response, rows of a group contiguous:
    tokens     [N, S] int64  prompt + response, right-padded
    loss_mask  [N, S] bool   position t is scored: it predicts tokens[t+1], a response token
    targets    [N, S] int64  tokens shifted left by one (the last column is a dummy 0 with loss_mask False)
    rewards    [N]   float
    group_ids  [N]   int64   same id = same prompt
plus per-sample fields added along the way (ref_seq_logp, old_seq_logp, gvpo weights...).

Split: micro-batch m of data-parallel rank d takes rows [(m*dp + d) * mbs, (m*dp + d + 1) * mbs), so
micro-batch m of all DP ranks together is one contiguous block of dp * mbs rows. Group strategies need:
- 'group_atomic': every (m, d) slice holds whole groups (the group mean is local);
- 'allgather': every micro-batch index m holds whole groups across DP ranks (gathered inside the loss);
- 'prepass': nothing (weights are computed before the training pass).
"""

from __future__ import annotations

import torch

PER_SAMPLE_FIELDS = ("rewards", "group_ids")


def make_targets(tokens: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, loss_mask) for next-token prediction from tokens [N, S] and a response-token mask [N, S]."""
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = torch.zeros_like(response_mask, dtype=torch.bool)
    loss_mask[:, :-1] = response_mask[:, 1:].bool()
    return targets, loss_mask


def num_microbatches(num_rows: int, dp_size: int, micro_batch_size: int) -> int:
    if num_rows % (dp_size * micro_batch_size):
        raise ValueError(
            f"batch of {num_rows} responses does not split into micro-batches of {micro_batch_size} on "
            f"{dp_size} data-parallel ranks (train.global_batch_size must be a multiple of micro_batch_size * DP)"
        )
    return num_rows // (dp_size * micro_batch_size)


def _slice_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


def check_group_layout(group_ids: torch.Tensor, dp_size: int, micro_batch_size: int, strategy: str) -> None:
    """Raise ValueError unless the rows' groups are contiguous and fit the strategy's split (module doc)."""
    ids = group_ids.tolist()
    seen, prev = set(), None
    for row, g in enumerate(ids):
        if g != prev and g in seen:
            raise ValueError(f"group {g} is not contiguous in the batch (appears again at row {row})")
        seen.add(g)
        prev = g
    if strategy == "prepass":
        return
    block = micro_batch_size if strategy == "group_atomic" else micro_batch_size * dp_size
    for start in range(block, len(ids), block):
        if ids[start] == ids[start - 1]:
            what = "micro-batch" if strategy == "group_atomic" else "micro-batch index across DP ranks"
            raise ValueError(
                f"group {ids[start]} straddles a {what} boundary at row {start} (group_strategy={strategy!r}, "
                f"micro_batch_size={micro_batch_size}, DP={dp_size}); choose sizes that hold whole groups or "
                "group_strategy 'prepass'"
            )


def split_microbatches(
    batch: dict[str, torch.Tensor], *, dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches, in schedule order (see the module docstring for the layout)."""
    n = next(iter(batch.values())).shape[0]
    count = num_microbatches(n, dp_size, micro_batch_size)
    return [
        _slice_rows(batch, (m * dp_size + dp_rank) * micro_batch_size, (m * dp_size + dp_rank + 1) * micro_batch_size)
        for m in range(count)
    ]


ROUTES_KEY = "routed_experts"
"""Optional batch key: the rollout's experts per token, [rows, tokens, MoE layers, top_k] (routing replay,
`megatron_gvpo.megatron.routing_replay`)."""

BEHAVIOUR_KEY = "behaviour_token_logp"
"""Optional batch key: the rollout engine's log-probs of the sampled tokens, [rows, tokens] aligned with `targets`
(the baselines' importance correction, `algo.importance_correction`)."""


def unrouted(rows: int, tokens: int, layers: int, top_k: int) -> torch.Tensor:
    """Routes for positions the rollout did not route (a sequence's last token, padding): experts 0..k-1.
    Those positions come after every scored one in their row, so with causal attention they change no
    scored log-prob; distinct experts keep Megatron's routing map well formed."""
    return torch.arange(top_k).expand(rows, tokens, layers, top_k).clone()


def pad_routes(routes: torch.Tensor, tokens: int) -> torch.Tensor:
    """`routes` [rows, s, layers, k] extended to `tokens` positions with `unrouted` ones."""
    rows, s, layers, k = routes.shape
    if tokens == s:
        return routes
    return torch.cat([routes, unrouted(rows, tokens - s, layers, k).to(routes.dtype)], dim=1)
