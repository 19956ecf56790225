"""Replay for `rollout.source: mix`: part of every batch is drawn from groups already trained on.

GVPO's objective is valid for any sampling distribution, so old groups are still unbiased training signal; the
trainer recomputes pi_old / pi_ref for replayed groups like for fresh ones.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_gvpo.data.groups import Group


class ReplayBuffer:
    """The newest `capacity` scored groups, drawn uniformly without replacement within a batch (source 'mix').
    Every rank holds the same buffer (the groups come from the broadcast rollout) and the same generator, so
    draws agree without communication; `state_dict()` makes a resumed run draw what the uninterrupted one
    would have."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.groups: list[Group] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, groups: list[Group]) -> None:
        self.groups = (self.groups + list(groups))[-self.capacity:]

    def draw(self, count: int) -> list[Group]:
        if count > len(self.groups):
            raise ValueError(f"replay draw of {count} groups from a buffer of {len(self.groups)}")
        return [self.groups[i] for i in torch.randperm(len(self.groups), generator=self.generator)[:count].tolist()]

    def state_dict(self) -> dict:
        return {"groups": [dataclasses.astuple(g) for g in self.groups], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [Group(*g) for g in state["groups"]]
        self.generator.set_state(state["generator"])
