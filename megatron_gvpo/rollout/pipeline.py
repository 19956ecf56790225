"""Asynchronous rollout (`rollout.mode: async`): the next batches are generated while the trainer trains.

Weight versions count optimizer rounds: the servers hold version v once the trainer's weights after rollout step
v are synced (`step-<v>`), and step t trains on version t - 1. A batch generated from version v and trained at
step t is t - 1 - v versions stale. The trainer asks for rollout step t's prompts when step t - S begins
(`rollout.max_staleness` S): the servers then hold version t - S - 1 or newer, so no batch is ever more than S
versions stale, however fast or slow either side is. S = 0 is the synchronous loop; S = 1 generates step
t + 1's samples while step t trains (one step off-policy, as verl and slime overlap); larger S lets generation
run further ahead, at the price of staler samples. GVPO needs nothing else for stale samples: its objective has
the same optimum for any sampling distribution, and pi_old / pi_ref are the trainer's own log-probs, recomputed
as in the synchronous loop. The policy-gradient baselines can weight every token by the truncated importance
ratio to the behaviour policy (`algo.importance_correction`), whose log-probs the servers return.

Weight updates in flight. A sync after step t reaches the servers while step t + 1's samples (and maybe later
ones) are being generated. `WeightUpdates` (rollout/updates.py) pauses generation in SGLang's 'retract' mode
around the update (`/pause_generation` -> update -> `/continue_generation`): unfinished requests go back to
SGLang's queue with the tokens they have, the KV cache of the old weights is flushed, and after the update they
continue from their prefix, re-prefilled under the new weights. Why this and not the alternatives:
- 'in_place' pausing keeps the old weights' KV cache, so later tokens would be computed from stale keys and
  values, and SGLang refuses the cache flush that the update needs while requests hold it;
- abort-and-resume would resubmit every partial sample from the client with its remaining token budget, its
  seed and its log-probs spliced, work that SGLang's retract already does inside the server, losing nothing.
A sample can therefore span versions: it starts from the version that served it first (what its staleness is
counted by, the conservative end) and ends under the newest; its per-token log-probs are those of the weights
that actually sampled each token.

The price of pausing is recomputation: the flushed cache held every group's shared prompt prefix once, and the
retracted requests re-prefill prompt and prefix each on its own. On the main job (CPU, one server, 256
short samples a step, nearly all of them reached by an update) that made rollouts ~10-30% slower than letting
the update wait for the requests in flight (`rollout.in_flight_updates: drain`, SGLang's default: the update
takes its model lock once they finish; no sample spans versions, caches survive, and the trainer waits in the
sync rather than for its next batch, which it would have waited for anyway while generation is the slower
side). With S >= 2, draining holds the sync until the step generated furthest ahead is done. With S = 1 and
`drain`, the weights that generate each step are fixed (step t + 1's, version t - 1), so a `rollout.seeded` run
reproduces (two 40-step runs of the main job gave identical metrics); with `pause`, where an update lands in a
sample depends on timing.

`RolloutPipeline` is the producer on global rank 0: one thread generates and scores the submitted rollout
steps in order, while the main thread trains and syncs. The other ranks draw the same prompts (the sampler
advances identically everywhere) and receive each batch when the trainer reaches its step. What a checkpoint
holds: the trainer's state after step t, and the prompts already drawn for the steps after t. Samples in flight
are not saved: a resumed run (after a pre-emption, or SIGKILL and a restart from the last checkpoint) submits
those prompts again, generated from the checkpoint's weights, so it trains on the same prompts in the same
order as the uninterrupted run, no step repeated or skipped, and never on samples staler than S.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Job:
    step: int
    prompts: list
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False


class RolloutPipeline:
    """Runs `produce(step, prompts)` for submitted rollout steps, one after another in submission order, on a
    background thread; `result(step)` waits for a step's outcome (and re-raises its exception).

    The thread only waits on HTTP answers and scores rewards, so it leaves the trainer's core to the trainer."""

    def __init__(self, produce: Callable[[int, list], Any]):
        self._produce = produce
        self._jobs: dict[int, _Job] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rollout-pipeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                continue
            try:
                job.result = self._produce(job.step, job.prompts)
            except BaseException as e:  # noqa: BLE001 - handed to the trainer, which decides
                job.error = e
            job.done.set()

    def submit(self, step: int, prompts: list) -> None:
        if step in self._jobs:
            raise ValueError(f"rollout step {step} is already submitted")
        self._jobs[step] = job = _Job(step, prompts)
        self._queue.put(job)

    def submitted(self) -> list[int]:
        """Steps submitted and not yet collected, in order."""
        return sorted(self._jobs)

    def result(self, step: int):
        """Step `step`'s rollout once it is done; it then leaves the pipeline. A failed one stays (its exception
        raised here) until `resubmit_all` generates it again."""
        job = self._jobs[step]
        job.done.wait()
        if job.error is not None:
            raise job.error
        del self._jobs[step]
        return job.result

    def resubmit_all(self) -> None:
        """Generate every uncollected step again, in order, after the ones queued now (after a server restart
        their requests may have failed or run on weights the restarted server no longer has)."""
        for job in self._cancel_all():
            self.submit(job.step, job.prompts)

    def _cancel_all(self) -> list[_Job]:
        jobs = [self._jobs.pop(step) for step in self.submitted()]
        for job in jobs:
            job.cancelled = True
        return jobs

    def close(self, interrupt: Callable[[], None]) -> None:
        """Stop: queued steps are dropped, and `interrupt()` (aborting the servers' requests) ends the one running."""
        self._cancel_all()
        self._queue.put(None)
        interrupt()
        self._thread.join()
