"""Held-out evaluation through the rollout servers: accuracy of the served weights on `prompts.eval_path`, greedy
and pass@k (`rollout.eval_k` samples at `rollout.eval_temperature`), scored by the run's own reward.

A prompt counts as solved when one of its samples earns at least `rollout.correct_reward`. pass@k samples are
seeded from (run.seed, step) when `rollout.seeded`, so a resumed run evaluates what the uninterrupted one did.
"""

from __future__ import annotations

import time

import torch

from megatron_gvpo.data.prompts import Prompt
from megatron_gvpo.rollout.base import SamplingParams
from megatron_gvpo.rollout.config import RolloutConfig
from megatron_gvpo.rollout.single_turn import SingleTurnRollout


class Evaluator:
    """Held-out accuracy of the weights the servers hold (module docstring); runs on global rank 0."""

    def __init__(self, cfg: RolloutConfig, prompts: list[Prompt], producer: SingleTurnRollout):
        self.cfg, self.prompts, self.producer = cfg, prompts, producer

    def evaluate(self, step: int) -> dict:
        """eval_greedy, eval_pass@k, the weight version evaluated and the seconds it took, at rollout step `step`."""
        t0 = time.perf_counter()
        r, stop = self.cfg, self.producer.stop_token_ids
        runs = [("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=r.max_new_tokens, stop_token_ids=stop))]
        if r.eval_k > 1:
            runs.append((f"pass@{r.eval_k}", SamplingParams(n=r.eval_k, temperature=r.eval_temperature,
                                                          max_new_tokens=r.max_new_tokens, stop_token_ids=stop,
                                                          seed=self.producer.seed(step, 1))))
        metrics = {}
        for name, sampling in runs:
            scored = self.producer.generate(self.prompts, sampling)
            correct = torch.tensor(scored.rewards.rewards).view(-1, sampling.n) >= r.correct_reward
            metrics[f"eval_{name}"] = float(correct.any(1).float().mean())
        metrics["eval_weight_version"] = self.producer.updates.version
        metrics["time_eval_s"] = time.perf_counter() - t0
        return metrics
