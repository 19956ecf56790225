"""Contract of `MetricsSink` (megatron_gvpo/utils/logging.py): one JSON line per record, non-finite values kept
visible; a run resumed from the checkpoint of step N keeps the lines up to N and drops later ones (logged by a
run killed before its next checkpoint) and a torn last line; TensorBoard / wandb asked for but not installed
give a warning naming the install step and the jsonl still records everything; with TensorBoard installed
(requirements/test.txt) the numeric values reach its event files, read back with TensorBoard's own reader, and
a resumed run hides the dropped steps there; with wandb installed (requirements/test.txt, offline mode) the
values reach W&B's run file, read back record by record, and a resumed run continues the same W&B run with the
steps W&B does not have yet; a disabled sink (ranks > 0) writes nothing."""

import importlib.util
import json
import logging
import struct
import time

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


def test_tensorboard_hides_the_steps_a_resumed_run_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = MetricsSink(tmp_path, tensorboard=True)
    for step in range(1, 6):
        sink.log(step, {"loss": float(step)})
    sink.close()
    resumed = MetricsSink(tmp_path, tensorboard=True, resume_step=3)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def wandb_records(run_dir, runs_expected, timeout_s=60.0):
    """(run id, config, [(step, {key: value})]) of each W&B run file under run_dir, oldest first, once each of
    the `runs_expected` files ends with its exit record: W&B's service process may still be writing a file
    after `finish()` has returned (seen on a loaded CI machine: a resumed run's file read too early had no run
    record yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = _wandb_run_files(run_dir)
        if (len(runs) == runs_expected and all(finished for *_, finished in runs)) or time.monotonic() > deadline:
            return [run[:3] for run in runs]
        time.sleep(0.1)


def _wandb_run_files(run_dir):
    """(run id, config, history, finished) of each run file. The file is W&B's record log: a 7-byte header,
    then 32 KiB blocks of records (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last fragment), each a
    serialized `wandb_internal_pb2.Record`; `finish()` writes the exit record last."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        run_id, config, history, finished = None, {}, [], False
        pos, fragments = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):  # still being written
                break
            fragments += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            fragments = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.append((record.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
            elif record.WhichOneof("record_type") == "exit":
                finished = True
        runs.append((run_id, config, history, finished))
    return runs


def test_wandb_receives_the_numeric_values_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(tmp_path, wandb_project="gvpo", config={"algo": {"beta": 0.1}})
    for step in range(1, 6):
        sink.log(step, {"loss": float(step), "eval_weight_version": "step-1"})
    sink.close()
    resumed = MetricsSink(tmp_path, wandb_project="gvpo", config={"algo": {"beta": 0.1}}, resume_step=3)
    for step in range(4, 8):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()

    (first_id, config, first), (second_id, _, second) = wandb_records(tmp_path, 2)
    assert first_id == second_id == (tmp_path / "wandb_run_id").read_text()
    assert config["algo"] == {"beta": 0.1}
    assert first == [(step, {"loss": float(step)}) for step in range(1, 6)]  # strings stay in the jsonl only
    assert second == [(6, {"loss": 60.0}), (7, {"loss": 70.0})]  # W&B has steps 4 and 5 from the first run
    assert [(r["step"], r["loss"]) for r in lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                                 (5, 50.0), (6, 60.0), (7, 70.0)]
