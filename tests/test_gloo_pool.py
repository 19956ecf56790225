"""Contract of the test harness itself: results come back in rank order from one persistent process group,
a failure on one rank raises with that rank's traceback, and a hung task restarts the pool."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.gloo_pool import GlooPool, WorkerError


def rank_pid_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), os.getpid(), t.item()


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise KeyError("boom on rank one")
    return dist.get_rank()


def hang_on_rank_one():
    if dist.get_rank() == 1:
        raise RuntimeError("rank one leaves before the collective")
    dist.barrier()  # rank 0 waits here for a rank that never comes


def test_results_in_rank_order_and_processes_persist(gloo):
    first = gloo.run(2, rank_pid_and_sum)
    second = gloo.run(2, rank_pid_and_sum)
    assert [r for r, _, _ in first] == [0, 1]
    assert all(s == 3.0 for _, _, s in first)
    assert [p for _, p, _ in first] == [p for _, p, _ in second], "workers must persist between tasks"


def test_failure_is_reported_with_traceback_and_pool_survives(gloo):
    with pytest.raises(WorkerError, match=r"(?s)failed on ranks \[1\].*KeyError: 'boom on rank one'"):
        gloo.run(2, fail_on_rank_one)
    assert [r for r, _, _ in gloo.run(2, rank_pid_and_sum)] == [0, 1]


def test_hung_task_restarts_the_pool():
    pool = GlooPool(2, timeout_s=20)
    try:
        pids = [p for _, p, _ in pool.run(rank_pid_and_sum)]
        with pytest.raises(WorkerError, match=r"(?s)did not finish in time; pool restarted.*rank one leaves"):
            pool.run(hang_on_rank_one)
        new_pids = [p for _, p, _ in pool.run(rank_pid_and_sum)]
        assert set(new_pids).isdisjoint(pids)
    finally:
        pool.close()
