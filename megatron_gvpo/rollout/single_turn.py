"""The rollout of one step with one answer per sample: prompts -> SGLang samples -> rewards -> scored groups.

    producer = SingleTurnRollout(cfg.rollout, cfg.reward, arch, tokenizer, servers, updates, group_size=k, ...)
    groups, dropped, metrics = producer.rollout(step, prompts)      # rank 0; the trainer's groups of k
    scored = producer.generate(prompts, sampling)                   # samples and rewards (evaluation's too)

It is the producer the coordinator (rollout/online.py) and the asynchronous pipeline (rollout/pipeline.py) call;
a producer of multi-turn episodes is another object with the same `rollout(step, prompts)`. Token ids go to the
servers (the client of `RolloutServers`, rebuilt when servers restart) and every sample is checked to come from
the weights synced since it was asked for (`WeightUpdates.version`; in asynchronous mode an update may land
while it is generated).

Which samples train: a group whose sample was aborted (a server dropped it) or whose reward failed under
`reward.on_error: drop_group` is left out (`dropped`; the coordinator turns its rows into groups of one).
Truncated samples ('length': max_new_tokens reached) are counted and, per `rollout.on_truncated`, kept as scored,
given reward 0, or left out with their group. Responses end at the checkpoint's own end-of-turn ids
(generation_config.json, config.json and the tokenizer's EOS: `models.hf_io.eos_token_ids`). With
`rollout.routing_replay` every sample brings the experts the servers routed its tokens to; with the baselines'
importance correction, the servers' log-probs of its tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_gvpo.data.batch import unrouted
from megatron_gvpo.data.groups import Group
from megatron_gvpo.data.prompts import Prompt
from megatron_gvpo.models.arch import Arch
from megatron_gvpo.rewards import RewardConfig, RewardResult, score
from megatron_gvpo.rollout.base import Sample, SamplingParams, require_weight_version
from megatron_gvpo.rollout.config import RolloutConfig
from megatron_gvpo.rollout.servers import RolloutServers
from megatron_gvpo.rollout.updates import WeightUpdates, version_number, versions_between


@dataclass
class Scored:
    """Samples of some prompts under the served policy, with their rewards."""

    groups: list[list[Sample]]
    """Per prompt, its samples in order."""
    samples: list[tuple[Prompt, Sample]]
    """(prompt, sample) of every sample, flat, group after group."""
    rewards: RewardResult
    seconds_generating: float
    first_version: str
    """The weight version synced when the samples were asked for (later ones may have finished them)."""


class SingleTurnRollout:
    """One answer per sample (module docstring). Runs on global rank 0, and on the asynchronous pipeline's thread
    there while the main thread evaluates, which is why decoding takes a lock."""

    def __init__(self, cfg: RolloutConfig, reward: RewardConfig, arch: Arch, tokenizer: Any,
                 servers: RolloutServers, updates: WeightUpdates, *, group_size: int, stop_token_ids: tuple[int, ...],
                 behaviour_logprobs: bool, seed: int):
        """`behaviour_logprobs`: groups carry the servers' log-probs (the baselines' importance correction);
        `seed`: run.seed, which seeds every rollout and evaluation when rollout.seeded."""
        self.cfg, self.reward, self.arch, self.tokenizer = cfg, reward, arch, tokenizer
        self.servers, self.updates = servers, updates
        self.group_size, self.stop_token_ids = group_size, stop_token_ids
        self.behaviour_logprobs, self.run_seed = behaviour_logprobs, seed
        self._decoding = threading.Lock()  # a fast tokenizer refuses concurrent use (pipeline and evaluation)

    def seed(self, step: int, purpose: int) -> int | None:
        """The sampling seed of a step's rollout (purpose 0) or evaluation (1) when rollout.seeded; the client
        adds the sample's index. Hashes of int tuples are the same in every process and run."""
        return hash((self.run_seed, step, purpose)) & (2**62 - 1) if self.cfg.seeded else None

    def generate(self, prompts: list[Prompt], sampling: SamplingParams) -> Scored:
        """The served policy's samples of `prompts`, checked to come from the weights synced since they were asked
        for (in sync mode and for evaluations, the last synced ones: nothing is synced meanwhile), scored."""
        first = self.updates.version
        t0 = time.perf_counter()
        groups = self.servers.client.generate([list(p.ids) for p in prompts], sampling)
        t_generate = time.perf_counter() - t0
        require_weight_version(groups, versions_between(first, self.updates.version))
        samples = [(p, x) for p, g in zip(prompts, groups, strict=True) for x in g]
        result = score([p.text for p, _ in samples], [self._decode(x.token_ids) for _, x in samples],
                       [p.label for p, _ in samples], [i // sampling.n for i in range(len(samples))], self.reward,
                       sources=[p.data_source for p, _ in samples])
        return Scored(groups, samples, result, t_generate, first)

    def rollout(self, step: int, prompts: list[Prompt]) -> tuple[list[Group], set[int], dict]:
        """(groups, indices of the groups to leave out, metrics): rollout step `step`, scored."""
        r = self.cfg
        t0 = time.perf_counter()
        sampling = SamplingParams(n=self.group_size, temperature=r.temperature, top_p=r.top_p,
                                  max_new_tokens=r.max_new_tokens, stop_token_ids=self.stop_token_ids,
                                  seed=self.seed(step, 0), return_routed_experts=r.routing_replay)
        scored = self.generate(prompts, sampling)
        samples, result, k = scored.samples, scored.rewards, sampling.n
        aborted = {i // k for i, (_, x) in enumerate(samples) if x.finish_reason == "abort"}
        truncated = [i for i, (_, x) in enumerate(samples) if x.finish_reason == "length"]
        cut = treat_truncated(result.rewards, truncated, k, r.on_truncated)
        dropped = aborted | cut | {i // k for i, keep in enumerate(result.keep) if not keep}
        groups = [Group(tuple(p.ids), tuple(tuple(x.token_ids) for x in g), tuple(result.rewards[i * k:(i + 1) * k]),
                        p.source, self._routes(len(p.ids), g) if r.routing_replay else None,
                        tuple(tuple(x.logprobs) for x in g) if self.behaviour_logprobs else None)
                  for i, (p, g) in enumerate(zip(prompts, scored.groups, strict=True))]
        rewards = torch.tensor(result.rewards)
        correct = (rewards >= r.correct_reward).float()
        by_group = rewards.view(-1, k)
        metrics = {
            "reward_mean": float(rewards.mean()), "accuracy": float(correct.mean()),
            "response_len_mean": sum(len(x.token_ids) for _, x in samples) / len(samples),
            "truncated_frac": len(truncated) / len(samples), "truncated_samples": len(truncated),
            "truncated_dropped_groups": len(cut),
            "aborted_groups": len(aborted), "dropped_groups": len(dropped),
            "equal_reward_groups": int((by_group.max(1).values == by_group.min(1).values).sum()),
            "rollout_logp_mean": sum(sum(x.logprobs) for _, x in samples) / len(samples),  # NaN if seeded on CPU
            "time_rollout_s": scored.seconds_generating,
            "time_reward_s": time.perf_counter() - t0 - scored.seconds_generating,
            # versions by which the batch lags the weights it trains (step - 1), counted from the first that served it
            "staleness": step - 1 - version_number(scored.first_version),
            "updated_in_flight": sum(x.weight_version != scored.first_version for _, x in samples),
            **result.metrics(),
        }
        if r.routing_replay:  # positions whose experts the trainer will replay
            metrics["routed_positions"] = sum(x.routed_experts.shape[0] for _, x in samples
                                              if x.routed_experts is not None)
        return groups, dropped, metrics

    def _routes(self, prompt_len: int, samples: list[Sample]) -> tuple[torch.Tensor, ...]:
        """Each sample's routed experts at the MoE layers (SGLang has a slot for every layer), as `collate` takes
        them. An aborted sample may come without (its group is dropped anyway): unrouted experts stand in."""
        moe = [i for i, is_moe in enumerate(self.arch.moe_layers) if is_moe]

        def routes(x: Sample) -> torch.Tensor:
            if x.routed_experts is None:
                return unrouted(1, prompt_len + len(x.token_ids) - 1, len(moe), self.arch.moe_top_k)[0]
            return x.routed_experts[:, moe]

        return tuple(routes(x).to(torch.int16) for x in samples)

    def _decode(self, ids: list[int]) -> str:
        with self._decoding:
            return self.tokenizer.decode(ids, skip_special_tokens=False)


def treat_truncated(rewards: list[float], truncated: list[int], k: int, policy: str) -> set[int]:
    """Apply rollout.on_truncated to the samples at indices `truncated` (groups of k in order): 'zero' sets their
    rewards to 0 in place; returns the groups to leave out ('drop_group': theirs; otherwise none)."""
    if policy == "zero":
        for i in truncated:
            rewards[i] = 0.0
    return {i // k for i in truncated} if policy == "drop_group" else set()
