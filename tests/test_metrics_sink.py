"""Contract of `MetricsSink` (megatron_gvpo/utils/logging.py): one JSON line per record, non-finite values kept
visible; a run resumed from the checkpoint of step N keeps the lines up to N and drops later ones (logged by a
run killed before its next checkpoint) and a torn last line; TensorBoard / wandb asked for but not installed
give a warning naming the install step and the jsonl still records everything; with TensorBoard installed
(requirements/test.txt) the numeric values reach its event files, read back with TensorBoard's own reader; a
disabled sink (ranks > 0) writes nothing."""

import importlib.util
import json
import logging

import pytest

from megatron_gvpo.utils.logging import MetricsSink


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    sink = MetricsSink(tmp_path)
    for step in range(1, 6):
        sink.log(step, {"loss": 1.0 / step, "bad": float("nan")})
    sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a write cut off by SIGKILL
    resumed = MetricsSink(tmp_path, resume_step=3)
    resumed.log(4, {"loss": 0.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in lines(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.0)]
    assert lines(tmp_path)[0]["bad"] == "nan"
    fresh = MetricsSink(tmp_path)  # a run from step 0 starts the file again
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("backend, kwargs", [("tensorboard", {"tensorboard": True}),
                                             ("wandb", {"wandb_project": "gvpo"})])
def test_missing_backends_warn_and_jsonl_still_records(tmp_path, caplog, monkeypatch, backend, kwargs):
    from megatron_gvpo.utils import logging as metrics_logging

    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    monkeypatch.setattr(metrics_logging, "_warned", set())  # warn_once remembers warnings of earlier tests
    logger = logging.getLogger("megatron_gvpo")
    logger.addHandler(caplog.handler)
    try:
        sink = MetricsSink(tmp_path, **kwargs)
        sink.log(1, {"loss": 0.5})
        sink.close()
    finally:
        logger.removeHandler(caplog.handler)
    assert f"{backend} requested but not installed (pip install {backend})" in caplog.text
    assert lines(tmp_path) == [{"step": 1, "loss": 0.5}]


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(tmp_path / "run", enabled=False)
    sink.log(1, {"loss": 0.5})
    sink.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_receives_the_numeric_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = MetricsSink(tmp_path, tensorboard=True)
    sink.log(1, {"loss": 0.5, "eval_weight_version": "step-1"})
    sink.log(2, {"loss": 0.25, "reward_mean": 0.75})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "reward_mean"]  # strings stay in the jsonl only
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
