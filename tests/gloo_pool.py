"""A persistent pool of gloo worker processes for multi-process tests.

Starting a process that imports torch and Megatron costs seconds; a collective on tiny tensors costs
microseconds. So each world size gets one pool for the whole test session: `world_size` spawned workers
joined in one gloo process group, waiting for tasks. `pool.run(fn, *args)` runs `fn(*args)` on every rank
and returns the per-rank results in rank order.

`fn` must be a module-level function (it is pickled by reference), and it talks to the other ranks through
`torch.distributed` (the default group is the pool's world). A task that raises on any rank raises
`WorkerError` here with every failing rank's traceback. If a rank does not answer in time (say, the others
wait in a collective the failed rank never reached), the pool is torn down and a fresh one starts with the
next task, so one broken test cannot poison the rest.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from megatron_gvpo.utils.distributed import free_port

IDLE_COLLECT_S = 1.0
"""A worker left without a task this long runs a full garbage collection. A task's models and optimizers are
garbage once it returns, but in reference cycles that only a full collection frees, and they hold the process
groups the task destroyed: each keeps a gloo transport thread that wakes 100 times a second
(`megatron_gvpo.megatron.parallel.destroy_parallel`), so idle workers burned 5-13% of a core each by the end of a
test session. A collection costs 0.3-1 s in a worker that has imported Megatron, hence only once idle, never
between the back-to-back tasks of a test."""


class WorkerError(RuntimeError):
    """A task failed on one or more ranks; the message holds their tracebacks."""


def _worker_main(rank: int, world_size: int, port: int, tasks, results, timeout_s: float) -> None:
    import signal

    import torch
    import torch.distributed as dist

    from megatron_gvpo.utils.process import die_with_parent

    die_with_parent(signal.SIGKILL)  # a pytest killed without clean-up leaves no workers behind
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    while True:
        try:
            task = tasks.get(timeout=IDLE_COLLECT_S)
        except queue.Empty:
            # Idle: free the last task's garbage, then wait as long as it takes (see IDLE_COLLECT_S).
            gc.collect()
            task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            results.put((task_id, rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything, the parent decides
            results.put((task_id, rank, False, traceback.format_exc()))
        del task, fn, args, kwargs  # garbage from here on
    dist.destroy_process_group()


class GlooPool:
    """`world_size` spawned processes in one gloo group; see the module docstring."""

    def __init__(self, world_size: int, timeout_s: float = 120.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list = []
        self._next_task = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        # Workers read the environment at spawn; one thread each, or 2 cores thrash.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, self._tasks[rank], self._results, self.timeout_s),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the results indexed by rank."""
        if not self._procs:
            self._start()
        task_id = self._next_task
        self._next_task += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(results) + len(failures) < self.world_size:
            if failures:
                # Ranks that did not fail may be blocked in a collective the failed rank never reached.
                deadline = min(deadline, time.monotonic() + 5.0)
            try:
                tid, rank, ok, value = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
                raise WorkerError(
                    f"{getattr(fn, '__name__', fn)}: ranks {missing} did not finish in time; pool restarted{detail}"
                ) from None
            if tid != task_id:
                continue  # a late answer from a task that already failed
            (results if ok else failures)[rank] = value
        if failures:
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise WorkerError(f"{getattr(fn, '__name__', fn)} failed on ranks {sorted(failures)}:{detail}")
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        self.request_stop()
        self.join()

    def request_stop(self) -> None:
        """Ask every worker to leave (returns at once; `join` waits). Stopping all pools first, then joining,
        lets their shutdowns overlap."""
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass

    def join(self) -> None:
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []


@contextlib.contextmanager
def checkpoint_helpers_allowed() -> Iterator[None]:
    """Let the torch_dist saver start its helper processes from a pool worker, and stop them afterwards.

    The saver starts a spawn-context `Manager` (a results queue it keeps in a module global) and forks one
    writer per file. Pool workers are daemon processes, and multiprocessing refuses children to daemons.
    The flag only decides whether the worker's children are terminated rather than joined when it exits;
    the saver joins its writers itself, and the Manager is shut down here, so nothing outlives the task.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    me = mp.current_process()
    was_daemon = me.daemon
    me.daemon = False
    try:
        yield
    finally:
        results_queue = filesystem_async._results_queue
        if results_queue is not None:
            results_queue._manager.shutdown()
            filesystem_async._results_queue = None
        me.daemon = was_daemon
