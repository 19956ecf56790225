"""The rollout interface the trainer sees: grouped sampling of token ids, with log-probs and honest endings.

A rollout engine takes prompts as token ids and returns, per prompt, a group of `n` samples in order. A sample
that did not end on its own is marked, never passed off as complete:
    finish_reason 'stop'    the model ended it (EOS or a stop sequence/token);
                  'length'  it hit max_new_tokens (truncated: its reward may not mean what a full answer's does);
                  'abort'   the engine dropped it (abort, server loss); callers must not train on it.
Every sample carries the weight version of the policy that produced it, so the trainer can check that a batch
was sampled from the weights it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Samples per prompt (the group size k)."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1: no top-k cut."""
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    """Per-request sampling seed: the same seed, prompt and weights give the same samples."""

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]
    """Generated tokens only (not the prompt), including a final EOS when the model produced one."""
    logprobs: list[float]
    """log pi(token | prefix) under the sampling engine, one per generated token."""
    finish_reason: FinishReason
    weight_version: str | None = None
    text: str | None = None
    info: dict = field(default_factory=dict)
    """Engine-specific extras (latency, cached tokens, the raw finish reason)."""

    @property
    def complete(self) -> bool:
        return self.finish_reason == "stop"


class RolloutError(RuntimeError):
    """A rollout request failed (server unreachable after retries, timeout, malformed answer)."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Sample]]:
        """For each prompt (token ids), its group of `sampling.n` samples, in prompt order."""
        ...

    def health(self) -> bool:
        ...

    def shutdown(self) -> None:
        ...
