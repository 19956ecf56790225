"""Online batches for the trainer: the rollout parts composed into the source that megatron_gvpo/train.py's loop
talks to when `rollout.source` is 'online' or 'mix':

    source = OnlineSource(cfg, engine, arch, tokenizer, step)   # starts (or attaches to) SGLang servers
    batch, metrics = source.next_batch()                        # one batch of whole groups, on every rank
    source.sync_weights(step)                                   # the trainer's weights -> every server
    metrics = source.evaluate()                                 # held-out accuracy, greedy and pass@k

The parts, each with one job:
- `RolloutServers` (rollout/servers.py): the servers, started or attached, their client and their supervision;
- `SingleTurnRollout` (rollout/single_turn.py): the rollout of one step, prompts -> samples -> scores -> groups;
- `WeightUpdates` (rollout/updates.py): the trainer's weights into the servers, versions, in-flight pauses;
- `Evaluator` (rollout/evaluation.py): held-out accuracy of the served weights;
- `RolloutPipeline` (rollout/pipeline.py, `rollout.mode: async`): the producer on a thread, ahead of the trainer;
- `ReplayBuffer` (rollout/replay.py, `rollout.source: mix`).
This module decides which prompts each step samples, assembles the trainer's batch, and recovers from a dead
server.

Global rank 0 talks to SGLang and scores the rewards; every rank gets the same batch (broadcast) and takes part
in the weight sync (a collective). The servers start from the trainer's own weights, written as an HF directory
under <run.dir>/rollout_init (whatever `model.init`/`model.load`/a resumed checkpoint made them), with weight
version `step-<N>` of the step the run starts at (servers it attaches to, `rollout.urls`, get those weights by a
sync before the first request); every later sync sets `step-<step>`.

A group whose sample was aborted or whose reward failed under `reward.on_error: drop_group` is left out of
training without leaving the batch (Megatron's micro-batch layout is fixed): its rows become groups of one, which
carry no GVPO signal and do not count in the loss normaliser (`_ungroup`).

A dead server is recovered from where it is noticed: a rollout, weight sync or evaluation that fails with a
`RolloutError` has the servers restart the dead ones (or wait for their launcher to, `rollout.urls_supervised`),
the weight updates reconnect and reload the trainer's current weights, the pipeline resubmits what was in flight,
and the failed work runs again (`rollout.max_server_restarts`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gvpo.data.groups import Group, GroupSampler, collate
from megatron_gvpo.data.prompts import Prompt, load_prompts
from megatron_gvpo.models.hf_io import copy_hf_assets, eos_token_ids
from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.evaluation import Evaluator
from megatron_gvpo.rollout.pipeline import RolloutPipeline
from megatron_gvpo.rollout.replay import ReplayBuffer
from megatron_gvpo.rollout.servers import RolloutLoad, RolloutServers
from megatron_gvpo.rollout.single_turn import SingleTurnRollout
from megatron_gvpo.rollout.updates import WeightUpdates, version
from megatron_gvpo.rollout.weight_sync import write_hf_checkpoint
from megatron_gvpo.utils.distributed import broadcast_object, on_rank0
from megatron_gvpo.utils.logging import get_logger


class OnlineSource:
    """Rollout, rewards, weight updates and evaluation for the training loop (module docstring)."""

    def __init__(self, cfg, engine, arch, tokenizer, start_step: int):
        r = self.r = cfg.rollout
        self.cfg = cfg
        self.rank0 = dist.get_rank() == 0
        run_dir = Path(cfg.run.dir)
        self.sampler = None  # source 'offline' (rollout.eval_offline): evaluation only, the data come from elsewhere
        if r.source != "offline":
            prompts, self.stats = load_prompts(cfg.prompts.path, cfg.prompts, tokenizer, arch.vocab_size,
                                               needs_label=cfg.reward.needs_label)
            self.sampler = GroupSampler(prompts, cfg.groups_per_rollout, seed=cfg.run.seed,
                                        shuffle=cfg.prompts.shuffle)
        self.replay = ReplayBuffer(r.replay_capacity, seed=cfg.run.seed) if r.source == "mix" else None
        eval_prompts = _eval_prompts(cfg, tokenizer, arch.vocab_size)
        self.step = start_step  # the rollout step being trained; seeds the samples when rollout.seeded
        self.drawn: dict[int, list[Prompt]] = {}  # every rank: prompts of the steps submitted, not yet trained

        self.updates = WeightUpdates(r, engine.chunks, engine.ctx, arch, run_dir, version(start_step))
        load = RolloutLoad(groups=cfg.groups_per_rollout if r.source != "offline" else 0,
                           group_size=cfg.algo.group_size, eval_prompts=len(eval_prompts),
                           max_prompt_tokens=cfg.prompts.max_prompt_tokens)
        self.servers = RolloutServers(r, arch, load, seed=cfg.run.seed, log_dir=run_dir / "logs")
        # An instruct model ends its turn with its own token (generation_config.json), not only config.json's EOS.
        self.producer = SingleTurnRollout(
            r, cfg.reward, arch, tokenizer, self.servers, self.updates, group_size=cfg.algo.group_size,
            stop_token_ids=eos_token_ids(cfg.model.path, tokenizer),
            behaviour_logprobs=cfg.algo.importance_correction != "none", seed=cfg.run.seed)
        self.evaluator = Evaluator(r, eval_prompts, self.producer) if eval_prompts else None
        self.pipeline: RolloutPipeline | None = None  # rank 0, rollout.mode 'async'

        # Servers start from the trainer's weights, so they agree with it whatever initialised or resumed it.
        hf_dir = run_dir / "rollout_init"
        assets = Path(cfg.model.tokenizer or cfg.model.path)
        write_hf_checkpoint(engine.chunks, arch, engine.ctx, self.updates.padded_vocab, hf_dir, assets)
        if self.rank0 and cfg.model.tokenizer:
            copy_hf_assets(Path(cfg.model.path), hf_dir)  # the config, when the tokenizer lives elsewhere
        urls = on_rank0(self.servers.start, hf_dir, self.updates.version, recoverable=RolloutError)
        self.updates.connect(urls)
        if r.urls:  # attached servers hold whatever they were started with (the launcher: random weights)
            self._resilient(lambda: self.updates.sync(self.updates.version), reload_weights=False)
        if self.rank0 and r.mode == "async":
            self.pipeline = RolloutPipeline(self.producer.rollout)

    def next_batch(self) -> tuple[dict, dict]:
        """Collective: the next batch of whole groups (sampled by the servers, and replayed ones for 'mix'),
        on every rank. In async mode it also submits the prompts of the steps up to `max_staleness` ahead."""
        self.step += 1
        ahead = self.r.max_staleness if self.r.mode == "async" else 0
        for step in range(self.step, self.step + ahead + 1):
            if step not in self.drawn:  # every rank draws: the sampler and the replay buffer agree everywhere
                fresh_count = self.cfg.groups_per_rollout - (self._replay_count() if self.replay is not None else 0)
                self.drawn[step] = self.sampler.next_batch(fresh_count)
            if self.pipeline is not None and step not in self.pipeline.submitted():
                self.pipeline.submit(step, self.drawn[step])
        prompts = self.drawn.pop(self.step)
        rollout = self._collect if self.r.mode == "async" else functools.partial(self.producer.rollout, prompts=prompts)
        fresh, dropped, metrics = self._resilient(lambda: on_rank0(rollout, self.step, recoverable=RolloutError))
        replayed = []
        if self.replay is not None:
            replayed = self.replay.draw(self.cfg.groups_per_rollout - len(prompts))
            self.replay.add([g for i, g in enumerate(fresh) if i not in dropped])
            metrics.update(replay_groups=len(replayed), replay_buffer_groups=len(self.replay))
        batch = collate(fresh + replayed, seq_len=self.cfg.model.seq_length)  # fresh first: `dropped` indexes it
        batch["group_ids"] = _ungroup(batch["group_ids"], dropped)
        # Which prompts this step sampled, comparable across runs (a resumed asynchronous run's with the
        # uninterrupted one's, whose samples differ).
        metrics["prompts_crc32"] = zlib.crc32(repr([p.ids for p in prompts]).encode())
        return batch, {**metrics, "server_restarts": self.servers.restarts}

    def _collect(self, step: int) -> tuple[list[Group], set[int], dict]:
        """Rank 0, async: step `step`'s rollout from the pipeline, checked to be at most max_staleness versions
        older than the weights it trains (version step - 1)."""
        fresh, dropped, metrics = self.pipeline.result(step)
        if metrics["staleness"] > self.r.max_staleness:  # the pipeline's schedule rules it out (rollout/pipeline.py)
            raise RuntimeError(f"rollout step {step} was sampled from weights {metrics['staleness']} versions old, "
                               f"more than rollout.max_staleness={self.r.max_staleness}")
        return fresh, dropped, metrics

    def _replay_count(self) -> int:
        want = round(self.r.replay_fraction * self.cfg.groups_per_rollout)
        return want if len(self.replay) >= want else 0  # all fresh until the buffer holds a batch's share

    def sync_weights(self, step: int) -> float:
        """Collective: the trainer's current weights into every server as version `step-<step>`; seconds."""
        t0 = time.perf_counter()
        self._resilient(lambda: self.updates.sync(version(step)), reload_weights=False)
        return time.perf_counter() - t0

    def evaluate(self) -> dict:
        """Collective: held-out accuracy under the served weights, greedy and pass@k at eval_temperature, on
        every rank ({} without eval prompts)."""
        if self.evaluator is None:
            return {}
        return self._resilient(lambda: on_rank0(self.evaluator.evaluate, self.step, recoverable=RolloutError))

    # ------------------------------------------------------------------------------------------------
    def _resilient(self, work, *, reload_weights: bool = True):
        """Collective: work() (collective); when it fails with a RolloutError, recover (`_recover`, which reloads
        the trainer's weights into restarted servers unless the work is itself a weight sync about to be
        retried) and do it again."""
        while True:
            try:
                return work()
            except RolloutError as error:
                self._recover(error, reload_weights)

    def _recover(self, error: RolloutError, reload_weights: bool = True) -> None:
        """Collective: restart the dead servers, reconnect the weight updates and (with `reload_weights`) load the
        trainer's current weights into them; re-raise `error` when nothing died or the restart budget is spent."""
        outcome = self.servers.restart_dead(error, self.updates.synced) if self.rank0 else None
        urls, failure = broadcast_object(outcome)
        if failure is not None:
            raise RolloutError(failure) from error
        get_logger().warning(f"{error}: restarted the dead SGLang server(s); reloading weights {self.updates.version}")
        self.updates.reconnect(urls)
        if reload_weights:
            self.updates.sync(self.updates.version)
        if self.pipeline is not None:  # requests in flight may have failed with the server, or outlived it
            self.pipeline.resubmit_all()

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The prompt sampler, the replay buffer, and the prompts drawn for steps not yet trained (async mode):
        a resumed run generates those again, from its checkpoint's weights (rollout/pipeline.py)."""
        state = {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}
        if self.drawn:
            state["drawn"] = {step: [dataclasses.astuple(p) for p in prompts] for step, prompts in self.drawn.items()}
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.drawn = {step: [Prompt(*p) for p in prompts] for step, prompts in state.get("drawn", {}).items()}
        if self.replay is not None and "replay" in state:  # a run switched to 'mix' starts with an empty buffer
            self.replay.load_state_dict(state["replay"])

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close(interrupt=self.servers.abort_requests)
        self.updates.close()
        self.servers.stop()


def _eval_prompts(cfg, tokenizer, vocab_size: int) -> list[Prompt]:
    """The held-out prompts (the first prompts.eval_size of prompts.eval_path), or none."""
    if not cfg.prompts.eval_path:
        return []
    prompts, _ = load_prompts(cfg.prompts.eval_path, cfg.prompts, tokenizer, vocab_size,
                              needs_label=cfg.reward.needs_label, field_name="prompts.eval_path")
    return prompts[: cfg.prompts.eval_size] if cfg.prompts.eval_size else prompts


def _ungroup(group_ids: torch.Tensor, dropped: set[int]) -> torch.Tensor:
    """Group ids with every row of a dropped group in a group of its own (no GVPO signal, not counted)."""
    if not dropped:
        return group_ids
    out = group_ids.clone()
    fresh = int(group_ids.max()) + 1
    for row in range(len(out)):
        if int(group_ids[row]) in dropped:
            out[row] = fresh
            fresh += 1
    return out
