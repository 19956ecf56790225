"""Atomic, reshardable checkpoints of the engine: model, optimizer, LR schedule, reference copy, trainer state.

Layout of `<dir>/`:
    step_0000012/            one complete checkpoint (Megatron dist_checkpointing, torch_dist format)
        trainer_state.pt     step, scheduler, skipped steps, caller's state (data cursor, RNG), config
        hf/                  the HF config and tokenizer files (what `tools/convert_hf.py export` needs)
    latest                   text file naming the newest complete checkpoint
A checkpoint is written to `step_0000012.tmp/` and renamed once every rank has finished, and `latest` is
replaced atomically after that, so a crash mid-save leaves the previous checkpoint as the one that loads and
never a directory that looks complete. Model and optimizer tensors are saved as sharded tensors with
global offsets, so a run saved at one TP/PP/DP layout resumes at another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gvpo.megatron.engine import MegatronEngine
from megatron_gvpo.megatron.model import unwrap
from megatron_gvpo.megatron.weights import model_sharded_state_dict
from megatron_gvpo.models.hf_io import HF_ASSETS_DIR, copy_hf_assets
from megatron_gvpo.utils.files import write_text_atomically

_LATEST = "latest"
_STATE = "trainer_state.pt"
_REFERENCE_KEY_PREFIX = "reference."


def _sharded_state_dict(engine: MegatronEngine, is_loading: bool) -> dict:
    model = model_sharded_state_dict(engine.chunks, "model")
    state = dict(model)
    # 'fully_reshardable' stores the distributed optimizer's state per parameter in model space, so it loads
    # at any TP/PP/DP layout (the default format only reshards over DP and fails validation in 0.16.1).
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        model, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    if engine.reference is not None:
        state.update(model_sharded_state_dict(engine.reference, "reference", key_prefix=_REFERENCE_KEY_PREFIX))
    return state


@torch.no_grad()
def _initialise_optimizer_state(optimizer) -> None:
    """Give a freshly built optimizer zero Adam state (moments and step) before loading into it.

    Megatron 0.16.1's DistributedOptimizer.state_dict(), without TE/Apex, asserts that all parameters share
    one Adam 'step' before it initialises state for loading, which fails on an optimizer that has not
    stepped yet. The values are overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.tensor(0.0)
                    )


@contextlib.contextmanager
def _param_state_copy_without_step(optimizer) -> Iterator[None]:
    """Work around a Megatron 0.16.1 bug on the no-TE/Apex path (CPU machines).

    There `DistributedOptimizer.load_state_dict` first writes Adam's common 'step' into every parameter's
    state, then copies the loaded per-parameter tensors over every key of that state, 'step' included, which
    the fully_reshardable format does not store (KeyError: 'step'). For the copy, 'step' is set aside and put
    back. With TE or Apex (production) the state has no per-parameter 'step' and nothing is changed.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
                continue

            def copy_states(model_param, tensors, _opt=opt, _copy=opt._set_main_param_and_optimizer_states):
                group_index, group_order = _opt.model_param_group_index_map[model_param]
                state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
                step = state.pop("step", None)
                try:
                    _copy(model_param, tensors)
                finally:
                    if step is not None:
                        state["step"] = step

            opt._set_main_param_and_optimizer_states = copy_states  # instance attribute, removed below
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    pointer = Path(directory) / _LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / _STATE).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


_results_manager = None
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What torchrun forwards to a rank's whole process group when SLURM pre-empts or stops the job."""


def _results_queue_that_dies_with_us() -> None:
    """Megatron's torch_dist writer passes write results through a multiprocessing Manager that it spawns on
    the first save (`filesystem_async._get_write_results_queue`). Two ways that went wrong, both measured:
    a trainer killed with SIGKILL left the manager running for good, holding the trainer's stdout (whoever
    waited for the trainer's output hung); and torchrun forwards SLURM's pre-emption signal (SIGUSR1/SIGTERM)
    to each rank's whole process group, which killed the manager, so the checkpoint that signal asks for
    failed. Started here instead, the manager ignores those signals and is SIGKILLed when the trainer dies.

    The signals are blocked from before the manager's process exists until its initializer ignores them (it
    inherits the mask through fork and exec): the first save is where a pre-empted trainer often is, and a signal
    while the manager started still killed it (measured on the SLURM test bed, tests/test_slurm.py). The trainer
    receives what came meanwhile once the manager runs."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _results_manager
    if filesystem_async._results_queue is None:
        _results_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            _results_manager.start(initializer=_results_manager_init)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        filesystem_async._results_queue = _results_manager.Queue()


def _results_manager_init() -> None:
    from megatron_gvpo.utils.process import die_with_parent

    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # what came while it started is now ignored
    die_with_parent(signal.SIGKILL)  # SIGTERM is ignored now


def save_checkpoint(engine: MegatronEngine, directory: str | Path, step: int, trainer_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    from megatron.core import dist_checkpointing

    _results_queue_that_dies_with_us()

    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / (checkpoint_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a save that crashed
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(engine, is_loading=False), str(tmp))
    if rank == 0:
        # What an exported model needs besides the weights (tools/convert_hf.py export reads it).
        model = engine.model_cfg
        copy_hf_assets(Path(model.path), tmp / HF_ASSETS_DIR)
        if model.tokenizer:
            copy_hf_assets(Path(model.tokenizer), tmp / HF_ASSETS_DIR)
        torch.save(
            {
                "step": step,
                "scheduler": engine.scheduler.state_dict(),
                "skipped_steps": engine.skipped_steps,
                "trainer": trainer_state,
            },
            tmp / _STATE,
        )
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomically(directory / _LATEST, final.name + "\n")
    dist.barrier()
    return final


def load_checkpoint(engine: MegatronEngine, path: str | Path) -> tuple[int, dict[str, Any]]:
    """Collective: load `path` into the engine (any layout); returns (step, the caller's trainer state)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / _STATE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {_STATE})")
    _initialise_optimizer_state(engine.optimizer)
    loaded = dist_checkpointing.load(_sharded_state_dict(engine, is_loading=True), str(path))
    for i, chunk in enumerate(engine.chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if engine.reference is not None:
        for i, chunk in enumerate(engine.reference):
            # The state-dict keys carry the key prefix too.
            state = {k.removeprefix(_REFERENCE_KEY_PREFIX): v for k, v in loaded[f"reference{i}"].items()}
            chunk.load_state_dict(state)
    with _param_state_copy_without_step(engine.optimizer):
        engine.optimizer.load_state_dict(loaded["optimizer"])
    state = torch.load(path / _STATE, weights_only=False)
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.skipped_steps = state["skipped_steps"]
    return state["step"], state["trainer"]
