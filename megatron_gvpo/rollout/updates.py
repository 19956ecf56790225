"""Weight updates of the rollout servers: the trainer's weights into every server, each update a new version.

    updates = WeightUpdates(cfg.rollout, engine.chunks, engine.ctx, arch, run_dir, version(start_step))
    updates.connect(urls)            # collective: the distributed sync's process groups with the servers
    updates.sync(version(step))      # collective: pause generation (async), update, continue; the new version
    updates.reconnect(urls)          # collective, after servers were restarted: fresh groups

Versions count optimizer rounds: `step-<N>` is the trainer's weights after rollout step N (`version`), and every
sample carries the version that generated it, which the rollouts check (`versions_between`, rollout/base.py's
`require_weight_version`). How the bytes move is rollout/weight_sync.py's (`rollout.weight_sync`: a process
group per pipeline stage with every server rank, shared memory, or safetensors on a shared disk). In
asynchronous mode with `rollout.in_flight_updates: pause` an update reaches the servers while requests are in
flight: generation is paused in SGLang's 'retract' mode around it and continues under the new weights
(rollout/pipeline.py says why).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_gvpo.megatron.parallel import ParallelContext
from megatron_gvpo.models.arch import Arch, padded_vocab_size
from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.config import RolloutConfig
from megatron_gvpo.rollout.sglang import continue_generation, pause_generation
from megatron_gvpo.rollout.weight_sync import DistributedWeightSync, sync_weights_from_disk, sync_weights_from_tensor
from megatron_gvpo.utils.distributed import on_rank0
from megatron_gvpo.utils.logging import get_logger


def version(step: int) -> str:
    return f"step-{step}"


def version_number(name: str) -> int:
    """The step of a weight version `version(step)`."""
    prefix, _, number = name.partition("-")
    if prefix != "step" or not number.isdigit():
        raise ValueError(f"weight version {name!r} is not one this trainer set (step-<N>)")
    return int(number)


def versions_between(first: str, last: str) -> set[str]:
    """The weight versions synced from `first` to `last`, both included."""
    return {version(n) for n in range(version_number(first), version_number(last) + 1)}


class WeightUpdates:
    """The trainer's side of weight updates, on every rank (module docstring). `version` is the version the
    servers hold (or are about to: a failed sync is retried with the same one), `synced` whether this run has
    loaded its weights into them yet (attached servers start with someone else's)."""

    def __init__(self, cfg: RolloutConfig, chunks: list, ctx: ParallelContext, arch: Arch, run_dir: Path,
                 start_version: str):
        self.cfg, self.chunks, self.ctx, self.arch, self.run_dir = cfg, chunks, ctx, arch, run_dir
        self.padded_vocab = padded_vocab_size(arch.vocab_size, ctx.tp_size)
        self.rank0 = dist.get_rank() == 0
        self.version = start_version
        self.synced = False
        self.urls: list[str] = []
        self.reconnects = 0  # names the process groups: a restarted server must not mistake one for the group it lost
        self.distributed: DistributedWeightSync | None = None

    def connect(self, urls: list[str]) -> None:
        """Collective: the servers to update from now on; the distributed sync's process groups with them."""
        self.urls = list(urls)
        if self.cfg.weight_sync == "distributed":
            self.distributed = DistributedWeightSync(
                self.arch, self.ctx, self.padded_vocab, self.urls, bucket_bytes=self.cfg.bucket_mb << 20,
                timeout_s=self.cfg.request_timeout_s, group_prefix=f"megatron_gvpo_r{self.reconnects}")
            self.distributed.connect()

    def reconnect(self, urls: list[str]) -> None:
        """Collective, after servers were started again: leave the old groups, join fresh ones."""
        self.reconnects += 1
        self._leave()
        self.connect(urls)

    def sync(self, new: str) -> None:
        """Collective: the trainer's current weights into every server as version `new`."""
        # Requests in flight wait in the servers' queues while the update runs (rollout/pipeline.py); without the
        # pause, SGLang's update waits for them to finish.
        pause = self.cfg.mode == "async" and self.cfg.in_flight_updates == "pause"
        if pause:
            on_rank0(pause_generation, self.urls, self.cfg.request_timeout_s, recoverable=RolloutError)
        try:
            self._update(new)
        finally:
            if pause and self.rank0:
                self._continue_generation()
        self.version, self.synced = new, True

    def _update(self, new: str) -> None:
        r = self.cfg
        if self.distributed is not None:
            self.distributed.sync(self.chunks, new)
        elif r.weight_sync == "tensor":
            sync_weights_from_tensor(self.chunks, self.arch, self.ctx, self.padded_vocab, self.urls, new,
                                     bucket_bytes=r.bucket_mb << 20, timeout_s=r.request_timeout_s)
        else:
            sync_weights_from_disk(self.chunks, self.arch, self.ctx, self.padded_vocab, self.urls,
                                   self.run_dir / "rollout_weights", self.run_dir / "rollout_init", new,
                                   timeout_s=r.request_timeout_s)

    def _continue_generation(self) -> None:
        """Rank 0, after an update (or a failed one): a server left paused would hold its requests forever."""
        try:
            continue_generation(self.urls, self.cfg.request_timeout_s)
        except RolloutError as e:  # a dead server is restarted unpaused; a live one that refuses is reported
            get_logger().warning(str(e))

    def _leave(self) -> None:
        if self.distributed is None:
            return
        try:
            self.distributed.close()  # the surviving servers leave the old groups; a lost peer's side is gone
        except RolloutError:
            pass
        self.distributed = None

    def close(self) -> None:
        """Collective."""
        self._leave()
