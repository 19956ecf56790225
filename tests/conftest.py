"""Shared fixtures: a persistent gloo pool per world size for the whole session (see gloo_pool.py)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.gloo_pool import GlooPool  # noqa: E402

torch.set_num_threads(1)


class _Pools:
    def __init__(self):
        self._pools: dict[int, GlooPool] = {}

    def run(self, world_size: int, fn, *args, **kwargs):
        """Run `fn` on every rank of a `world_size`-process gloo group; per-rank results in rank order."""
        if world_size not in self._pools:
            self._pools[world_size] = GlooPool(world_size)
        return self._pools[world_size].run(fn, *args, **kwargs)

    def close(self):
        for pool in self._pools.values():
            pool.request_stop()
        for pool in self._pools.values():
            pool.join()


@pytest.fixture(scope="session")
def gloo():
    pools = _Pools()
    yield pools
    pools.close()
