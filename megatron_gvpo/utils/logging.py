"""One logger setup and one metrics sink for every entry point.

- `get_logger()`: a `logging` logger whose lines carry the rank (`[rank 3]`), `warn_once` for advice that
  would otherwise repeat every step.
- `MetricsSink`: `metrics.jsonl` in the run directory always (one JSON object per record, flushed each
  time so a killed run keeps everything logged so far); TensorBoard and wandb when installed and asked for.
  Only rank 0 writes; other ranks get a sink that does nothing. A run resumed from the checkpoint of step N
  keeps the records up to step N and drops later ones (logged by a run killed before its next checkpoint,
  and about to be logged again), so the file reads like one uninterrupted run. TensorBoard hides the dropped
  steps (its `purge_step`). wandb continues the same run (its id is kept in `wandb_run_id`); since W&B keeps a
  step's first value and rejects steps that go back, the resumed run sends it only steps after those it has,
  and for the steps in between metrics.jsonl is the record of the resumed run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from megatron_gvpo.utils.files import write_text_atomically

_warned: set[str] = set()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str = "megatron_gvpo") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {_rank()}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        get_logger().warning(message)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible rather than dropping the record
    return v


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (killed mid-write) sorts after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _wandb_run_id(run_dir: Path, resuming: bool) -> tuple[str, bool]:
    """The W&B run of this run directory and whether it exists already: kept across resumes, new for a run
    started from step 0 (or resumed by a run that did not log to wandb)."""
    path = run_dir / "wandb_run_id"
    if resuming and path.is_file():
        return path.read_text().strip(), True
    run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
    write_text_atomically(path, run_id)
    return run_id, False


class MetricsSink:
    """Append-only metrics: jsonl always, TensorBoard / wandb optionally (rank 0 only)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str = "", config: dict | None = None, resume_step: int = 0):
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        self._wandb_after = 0  # wandb has every step up to this one already
        if resume_step > 0 and path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step(line) <= resume_step]
            self._wandb_after = max((s for s in map(_step, lines) if math.isfinite(s)), default=0)
            write_text_atomically(path, "".join(kept))
        self._file = open(path, "a" if resume_step > 0 else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn_once("tensorboard requested but not installed (pip install tensorboard); logging to jsonl only")
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                warn_once("wandb requested but not installed (pip install wandb); logging to jsonl only")
            else:
                run_id, continued = _wandb_run_id(run_dir, resume_step > 0)
                if not continued:
                    self._wandb_after = 0
                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir), name=run_dir.name,
                                         id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and step > self._wandb_after:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
