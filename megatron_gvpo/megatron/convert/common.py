"""What import and export share: Megatron's own description of a checkpoint, and the means that keep a
conversion at one parameter in memory and its output invisible until complete.

Both directions plan from the same description: the whole model (TP = PP = 1) built on the meta device in a
one-process Megatron (`single_process_megatron`, `meta_model`) and its `shard_table`, which says where each
parameter lives in a checkpoint of any layout. Taking it from Megatron, not from a table of our own, means a
checkpoint that import writes is the one the trainer loads, and export reads training checkpoints by the same
keys. The rest serves both directions' budget: memory below 1.5x the largest tensor (`ReusedBuffer`,
`release_free_memory`), and no published directory that is not complete (`atomic_output_dir`); `converting`
is the frame either direction runs inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_gvpo.models.arch import Arch
from megatron_gvpo.utils.files import fsync_tree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ConvertSummary:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self, what: str) -> str:
        gb = self.bytes / 1e9
        return (f"{what}: {self.tensors} tensors, {gb:.3f} GB in {self.seconds:.1f} s "
                f"({gb / max(self.seconds, 1e-9):.2f} GB/s)")


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand memory freed by the last parameter back to the OS. glibc keeps freed blocks below its (adaptive)
    mmap threshold in the heap, so a loop over tensors of a few tens of MB grows the resident set well past
    what is alive; trimming after each parameter keeps it at about one parameter. No-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def _collecting_only_new_objects() -> Iterator[None]:
    """Keep the cyclic garbage collector to the objects made from here on (`gc.freeze`). A process that has
    imported torch, transformers and Megatron tracks a million objects; the thousands that building the model
    and its sharded state dict allocate trigger full collections that walk all of them, 0.2 to 0.25 s each
    (measured: one such collection in each 1.6 s import of a 1 GB MoE checkpoint). Garbage made during the conversion
    is still collected; the old objects go back to the collector afterwards. Leaves alone a process that
    froze objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class ReusedBuffer:
    """One allocation that holds each parameter in turn, as large as the largest one. Memory stays at one
    parameter, and its pages, once touched, are not faulted in again: reading into freshly allocated memory
    (which the kernel zeroes page by page) ran at a third of the speed of reading into memory already touched."""

    def __init__(self, nbytes: int):
        self.nbytes, self.storage = nbytes, None

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.storage is None:  # allocated at first use (an export may never need it)
            self.storage = torch.empty(self.nbytes, dtype=torch.uint8)
        return self.storage[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


@contextlib.contextmanager
def _progress_bar(enabled: bool, what: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda nbytes: None
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True) as bar:
        yield bar.update


# ---------------------------------------------------------------------------------------------------------
# Output directories
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield `<out>.tmp` to write into; on success its files reach the disk and it replaces `out`, on failure
    it is removed. The flush comes before the rename that publishes the output, which must not reach the disk
    before its contents (after a power cut, a complete-looking directory of missing bytes); once at the end
    rather than per file as written, so the writes themselves run at page-cache speed."""
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"output directory {out} exists; pass --force to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------------
# The model on the meta device: Megatron's own description of the checkpoint
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_megatron() -> Iterator[Callable[[], None]]:
    """A one-process gloo group and Megatron's parallel state (TP = PP = 1), torn down afterwards; reuses an
    existing process group (a test worker) without destroying it. Calling the `release` it yields tears
    Megatron's state down early, once the model and its sharded state dict are built (PyTorch's checkpoint
    writer needs only the default group): Megatron's twenty groups then stop their threads in the background
    (`destroy_parallel(wait=False)`, 0.15 s) while the conversion goes on."""
    import torch.distributed as dist

    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.utils.distributed import free_port

    apply_cpu_compat()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("the converter runs in one process")
    initialize_parallel(ParallelConfig(), seed=0)
    teardown = []

    def release() -> None:
        if not teardown:
            teardown.append(destroy_parallel(wait=False))

    try:
        yield release
    finally:
        release()
        teardown[0].join()
        if own_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def converting(out: str | Path, force: bool, progress: bool,
               what: str) -> Iterator[tuple[Path, Callable[[], None], Callable[[int], None]]]:
    """What either direction runs inside: the garbage collector kept to new objects, a one-process Megatron,
    the output directory published only when complete, and a progress bar counting bytes. Yields (the
    directory to write into, the `release` of `single_process_megatron`, the bar's update)."""
    with (_collecting_only_new_objects(), single_process_megatron() as release_megatron,
          atomic_output_dir(out, force) as tmp, _progress_bar(progress, what) as bar):
        yield tmp, release_megatron, bar


def meta_model(arch: Arch, padded_vocab: int, dtype: torch.dtype):
    """The whole model (TP = PP = 1) with meta parameters: shapes, names and sharded keys, no memory."""
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config

    config = transformer_config(arch, params_dtype=dtype, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        return build_gpt_model(arch, config, padded_vocab_size=padded_vocab,
                               max_sequence_length=arch.max_position_embeddings)


def check_layout(arch: Arch, tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None) -> None:
    """The checks the trainer makes for a layout (heads, query groups, FFN, layers and experts divisible)."""
    from megatron_gvpo.megatron.model import transformer_config

    if tp < 1 or pp < 1 or ep < 1 or (etp is not None and etp < 1) or (vpp is not None and (vpp < 1 or pp < 2)):
        raise ValueError(f"invalid layout --tp {tp} --pp {pp} --vpp {vpp} --ep {ep} --etp {etp} (vpp needs pp >= 2)")
    # Sequence parallelism does not change a checkpoint's layout; a MoE model at TP > 1 trains only with it.
    transformer_config(arch, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sequence_parallel=tp > 1)


def _nested_values(x) -> Iterator:
    if isinstance(x, dict):
        for v in x.values():
            yield from _nested_values(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _nested_values(v)
    else:
        yield x


def shard_table(sharded: dict) -> dict[str, list[tuple[str, tuple[int, ...], torch.Tensor]]]:
    """parameter name -> [(sharded key, global offset, meta view of the parameter)]: where each parameter of
    the TP = PP = 1 meta model whose `sharded_state_dict()` is `sharded` lives in a Megatron checkpoint. Applies
    Megatron's sharded-state factories (which e.g. store linear_fc1 as separate gate and up halves) in place,
    as saving would."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    table: dict[str, list] = {}
    for name, entry in sharded.items():
        for sh in _nested_values(entry):
            if isinstance(sh, ShardedTensor):
                # The stored chunk has the prepended (layer) axes of size 1 in front of the local shape.
                table.setdefault(name, []).append((sh.key, tuple(sh.global_offset), sh.data))
    return table
