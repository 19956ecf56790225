"""Contract of the asynchronous rollout's producer (megatron_gvpo/rollout/pipeline.py), without a server.

Pinned: submitted steps are produced one at a time in submission order, each once, while the caller goes on;
a step that failed stays (its error raised again) until `resubmit_all` produces it and every later uncollected
step again, in order, skipping the stale copies still queued; `close` drops queued steps, interrupts the one
running and joins the thread. The online loop with a real server: tests/test_online.py.
"""

import threading

import pytest

from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.pipeline import RolloutPipeline


def test_steps_are_produced_in_order_once_and_failures_wait_for_a_resubmit():
    calls, fail_once, gate = [], {2}, threading.Event()

    def produce(step, prompts):
        gate.wait(10)
        calls.append(step)
        if step in fail_once:
            fail_once.discard(step)
            raise RolloutError(f"server lost during step {step}")
        return step, list(prompts)

    pipeline = RolloutPipeline(produce)
    try:
        for step in (1, 2, 3):
            pipeline.submit(step, [f"prompt {step}"])
        with pytest.raises(ValueError, match="rollout step 2 is already submitted"):
            pipeline.submit(2, [])
        assert pipeline.submitted() == [1, 2, 3] and calls == []  # the caller goes on while steps wait
        gate.set()
        assert pipeline.result(1) == (1, ["prompt 1"]) and pipeline.submitted() == [2, 3]
        for _ in range(2):  # a failed step stays until it is resubmitted
            with pytest.raises(RolloutError, match="server lost during step 2"):
                pipeline.result(2)
        pipeline.resubmit_all()
        assert pipeline.result(2) == (2, ["prompt 2"]) and pipeline.result(3) == (3, ["prompt 3"])
        # Step 3 ran once before the resubmit and once after; step 1 never again.
        assert calls == [1, 2, 3, 2, 3] and pipeline.submitted() == []
    finally:
        pipeline.close(interrupt=lambda: None)


def test_close_drops_queued_steps_and_interrupts_the_running_one():
    running, release, calls = threading.Event(), threading.Event(), []

    def produce(step, prompts):
        calls.append(step)
        running.set()
        release.wait(10)  # a request in flight, until the servers abort it
        return step

    pipeline = RolloutPipeline(produce)
    for step in (1, 2, 3):
        pipeline.submit(step, [])
    assert running.wait(10)
    pipeline.close(interrupt=release.set)
    assert calls == [1] and not pipeline._thread.is_alive()
