"""One logger setup, one list of silenced notices and one metrics sink for every entry point.

- `KNOWN_NOTICES`: the warnings that libraries print at import or once per process and that say nothing a
  user of this package can act on (Transformer Engine / Apex absent, CPU-only platform notices of SGLang,
  deprecations inside Megatron's and FastAPI's own calls). Every process of ours prints them again (each
  trainer rank, each of an SGLang server's processes, at each server restart), so they buried the lines that
  matter: the main job's terminal, and the log tail that a failed server start-up is reported with. They are
  silenced at their source, each by its message and the module that warns, nothing broader:
  `silence_known_notices()` in every process that imports `megatron_gvpo` (its `__init__` calls it; the
  CPU-only ones from `megatron.cpu_compat.apply_cpu_compat`), and `known_notices_env()` (PYTHONWARNINGS) for the
  SGLang servers we start (`rollout.sglang.SGLangServer.environment`). Every other warning still shows.
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
import re
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_gvpo.utils.files import write_text_atomically

_warned: set[str] = set()


@dataclass(frozen=True)
class Notice:
    """A harmless warning: the start of its message (plain text without ',' or ':', so that PYTHONWARNINGS can
    carry it), its category (subclasses included) and the modules whose `warnings.warn` emits it (() = any)."""

    message: str
    category: type[Warning] = UserWarning
    modules: tuple[str, ...] = ()
    cpu_only: bool = False
    """Harmless only without CUDA (on a GPU it is advice to follow, or never emitted)."""


_MEGATRON_OPTIMIZER = ("megatron.core.optimizer", "megatron.core.optimizer.optimizer",
                       "megatron.core.optimizer.clip_grads",
                       "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision")
_MEGATRON_NORM = ("megatron.core.models.backends", "megatron.core.models.gpt.gpt_layer_specs",
                  "megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs")
_TP_LAYERS = ("megatron.core.tensor_parallel.layers",)

KNOWN_NOTICES: tuple[Notice, ...] = (
    # Megatron-Core, once per module and process, for each fused kernel it falls back from without Transformer
    # Engine and Apex (trainer ranks, and SGLang, which imports Megatron-FSDP); model.transformer_impl decides and
    # reports the layer implementation (megatron/model.py).
    Notice("Transformer Engine and Apex are not installed", modules=_MEGATRON_OPTIMIZER),
    Notice("Apex is not installed", modules=_MEGATRON_NORM),
    Notice("full scope is deprecated", modules=("megatron.core.transformer.transformer_config",)),
    # Megatron's checkpoint loader calls torch APIs that torch deprecates (every resume).
    Notice("`load_state_dict` is deprecated", FutureWarning, ("megatron.core.dist_checkpointing.strategies.torch",)),
    Notice("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # CUDA stream advice from TP > 1 layers; there are no CUDA streams on CPU.
    Notice("When using async grad allreduce it is recommended to set the environment variable "
           "CUDA_DEVICE_MAX_CONNECTIONS", modules=_TP_LAYERS, cpu_only=True),
    Notice("When using sequence parallelism it is recommended to set the environment variable "
           "CUDA_DEVICE_MAX_CONNECTIONS", modules=_TP_LAYERS, cpu_only=True),
    # SGLang server processes (launcher, tokenizer manager, scheduler, detokenizer: each imports them).
    Notice("'python -m sglang.launch_server' is still supported", modules=("__main__",)),  # run with -m
    Notice("Only CUDA", modules=("sglang.srt.layers.quantization.awq.awq", "sglang.srt.layers.quantization.gguf"),
           cpu_only=True),
    Notice("Triton is not supported on current platform", modules=("sglang.kernels.ops.attention.fla.utils",),
           cpu_only=True),
    Notice("ORJSONResponse is deprecated", modules=("fastapi.routing",)),  # FastAPIDeprecationWarning
)


def silence_known_notices(cpu: bool = False) -> None:
    """Ignore `KNOWN_NOTICES` in this process (with `cpu`: only the CPU-only ones). Idempotent."""
    for n in KNOWN_NOTICES:
        if n.cpu_only == cpu:
            module = "|".join(map(re.escape, n.modules))
            warnings.filterwarnings("ignore", message=re.escape(n.message), category=n.category,
                                    module=rf"(?:{module})\Z" if module else "")


def known_notices_env(environ: dict[str, str], cpu: bool) -> str:
    """PYTHONWARNINGS for a child process that does not import this package (an SGLang server): `KNOWN_NOTICES`
    (the CPU-only ones too with `cpu`), then what `environ` already asks for, which takes precedence."""
    options = [f"ignore:{n.message}:{n.category.__name__}:{module}"
               for n in KNOWN_NOTICES if cpu or not n.cpu_only for module in (n.modules or ("",))]
    return ",".join(options + [o for o in (environ.get("PYTHONWARNINGS"),) if o])


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
