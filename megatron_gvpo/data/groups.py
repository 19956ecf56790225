"""Groups of scored responses, the unit GVPO trains on, whatever produced them (offline data, SGLang rollouts,
replay): `Group`, a deterministic resumable order over a dataset of them (`GroupSampler`), and the trainer's
batch of whole groups (`collate`, the format of megatron_gvpo/data/batch.py)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_gvpo.data.batch import BEHAVIOUR_KEY, ROUTES_KEY, make_targets, unrouted


@dataclass(frozen=True)
class Group:
    """One prompt with its scored responses (k = len(response_ids) >= 2)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...]
    source: str
    """Where the row came from, "path:line"."""
    routes: tuple[torch.Tensor, ...] | None = None
    """Per response, the experts the rollout engine routed its tokens to (routing replay): int16
    [prompt + response - 1 tokens, MoE layers, top_k]; None without routing replay."""
    behaviour_logprobs: tuple[tuple[float, ...], ...] | None = None
    """Per response, log pi_behaviour(token | prefix) of each of its tokens under the weights that sampled it
    (the rollout engine's), for the baselines' importance correction; None when not asked for."""




class GroupSampler:
    """Endless, deterministic iteration over groups in epochs, resumable from `state_dict()`.

    Epoch e visits every group once, in file order or (shuffle) in a permutation seeded with seed + e, so the
    order depends only on (seed, epoch) and a resumed run sees exactly the data an uninterrupted run would.
    Every batch has exactly groups_per_step groups: a batch that reaches the end of an epoch is completed from
    the start of the next one (no data is dropped, and with shuffle=False no tail is ever skipped).
    """

    def __init__(self, groups: Sequence[Group], groups_per_step: int, seed: int, shuffle: bool = True):
        if not groups:
            raise ValueError("GroupSampler needs at least one group")
        if groups_per_step < 1 or groups_per_step > len(groups):
            raise ValueError(
                f"groups_per_step={groups_per_step} must be between 1 and the number of groups ({len(groups)})"
            )
        self.groups = groups
        self.groups_per_step = groups_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            # random.Random's shuffle is stable across Python versions and platforms for a given integer seed.
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, count: int | None = None) -> list[Group]:
        """The next `count` (default groups_per_step) groups."""
        count = self.groups_per_step if count is None else count
        batch = []
        while len(batch) < count:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(batch), len(self._order) - self.position)
            batch.extend(self.groups[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_groups": len(self.groups),
        }

    def load_state_dict(self, state: dict) -> None:
        # The order is a function of (seed, epoch, number of groups): a different dataset size would resume
        # into a different permutation without any error, so refuse it.
        if state["num_groups"] != len(self.groups):
            raise ValueError(
                f"sampler state is for {state['num_groups']} groups but the dataset has {len(self.groups)}; "
                "the data file changed since the checkpoint"
            )
        if not 0 <= state["position"] <= len(self.groups):
            raise ValueError(f"sampler state position {state['position']} is outside [0, {len(self.groups)}]")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


def collate(groups: Sequence[Group], seq_len: int | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The trainer's batch (megatron_gvpo/data/batch.py) for these groups, one row per response.

    Row = prompt + response, right-padded with pad_id to seq_len (None: the longest row). Rows of group g are
    contiguous and group_ids[row] = g, the group's index in `groups` (so a group repeated in the list gets two
    ids). Padding is never scored: loss_mask is True only where the next token is a response token.
    """
    if not groups:
        raise ValueError("collate needs at least one group")
    rows = [(g.prompt_ids, r) for g in groups for r in g.response_ids]
    longest = max(len(p) + len(r) for p, r in rows)
    if seq_len is None:
        seq_len = longest
    elif longest > seq_len:
        where = next(g.source for g in groups for r in g.response_ids if len(g.prompt_ids) + len(r) == longest)
        raise ValueError(
            f"a row of {longest} tokens ({where}) does not fit seq_len={seq_len}; raise seq_len to at least "
            "max_prompt_tokens + max_response_tokens"
        )
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    response_mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for n, (prompt, response) in enumerate(rows):
        p, r = len(prompt), len(response)
        tokens[n, :p] = torch.tensor(prompt, dtype=torch.int64)
        tokens[n, p : p + r] = torch.tensor(response, dtype=torch.int64)
        response_mask[n, p : p + r] = True
    targets, loss_mask = make_targets(tokens, response_mask)
    rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)
    group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.response_ids], dtype=torch.int64)
    batch = {"tokens": tokens, "loss_mask": loss_mask, "targets": targets, "rewards": rewards, "group_ids": group_ids}
    if any(g.routes is not None for g in groups):
        batch[ROUTES_KEY] = _collate_routes(groups, seq_len)
    if any(g.behaviour_logprobs is not None for g in groups):
        batch[BEHAVIOUR_KEY] = _collate_behaviour_logprobs(groups, seq_len)
    return batch


def _collate_behaviour_logprobs(groups: Sequence[Group], seq_len: int) -> torch.Tensor:
    """[rows, seq_len] float32 behaviour log-probs aligned with `targets` (0 where nothing is scored)."""
    if any(g.behaviour_logprobs is None for g in groups):
        raise ValueError("importance correction: some groups carry the rollout's log-probs and some do not (a "
                         "replayed group from a run without algo.importance_correction?)")
    out = torch.zeros(sum(len(g.response_ids) for g in groups), seq_len)
    n = 0
    for g in groups:
        p = len(g.prompt_ids)
        for response, logprobs in zip(g.response_ids, g.behaviour_logprobs, strict=True):
            if len(logprobs) != len(response):
                raise ValueError(f"importance correction: {len(logprobs)} rollout log-probs for a response of "
                                 f"{len(response)} tokens ({g.source})")
            out[n, p - 1: p - 1 + len(response)] = torch.tensor(logprobs)  # target t is token t + 1
            n += 1
    return out


def _collate_routes(groups: Sequence[Group], seq_len: int) -> torch.Tensor:
    """[rows, seq_len, MoE layers, top_k] int16 routes aligned with the rows' tokens (`routing_replay`); the
    positions the rollout did not route get `unrouted` experts. int16: a batch of long rows of a large MoE is
    big (rows x tokens x layers x k), and expert indices fit."""
    if any(g.routes is None for g in groups):
        raise ValueError("routing replay: some groups carry routed experts and some do not (a replayed group from "
                         "a run without rollout.routing_replay?)")
    first = groups[0].routes[0]
    out = unrouted(sum(len(g.response_ids) for g in groups), seq_len, first.shape[1], first.shape[2]).to(torch.int16)
    n = 0
    for g in groups:
        for response, routes in zip(g.response_ids, g.routes, strict=True):
            if routes.shape[0] != len(g.prompt_ids) + len(response) - 1:
                raise ValueError(f"routing replay: {routes.shape[0]} routed positions for a row of "
                                 f"{len(g.prompt_ids) + len(response)} tokens ({g.source})")
            out[n, : routes.shape[0]] = routes
            n += 1
    return out
