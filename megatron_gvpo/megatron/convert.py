"""Hugging Face checkpoints in and out of Megatron `dist_checkpointing` checkpoints, one tensor at a time.

import: HF directory -> a Megatron checkpoint (torch_dist format) of the model weights that the trainer
    loads at any TP/PP/DP layout (`model.load`). The checkpoint's structure (sharded keys, global shapes, the
    layer axis, the gate/up split of linear_fc1) is taken from Megatron itself: a `GPTModel` built on the meta
    device (no memory) provides `sharded_state_dict()`, and the bytes of each shard are produced only when
    PyTorch's checkpoint writer asks for them (`_Materializer`, behind the planner of
    `_streaming_strategy`): the HF tensors of that one parameter are read straight into their places in it
    (the layouts of `megatron_gvpo.models.hf_maps.VIEWS`: no concatenation, no copy), written and overwritten
    by the next parameter. The archives are written without CRC-32s and without an fsync per file
    (`_without_crc32`, `_streaming_strategy`), which made up more than half of the time; the whole output is
    flushed once before it is published (`atomic_output_dir`). Megatron's sharded state dict is built once
    (for the shard table and the save), and its process groups are released as soon as it is built.
export: a Megatron checkpoint (from import or from training) -> HF safetensors shards with an index,
    config.json, generation_config.json and the tokenizer files, streamed into shard files whose headers were
    written from a plan made up front. The metadata is read once (`_CheckpointReader`); an HF tensor stored
    plainly (a whole chunk, or a contiguous part such as linear_fc1's gate half or a query group's rows of
    linear_qkv) is copied file to file by the kernel (`os.copy_file_range`), anything else (a chunk written
    at another TP layout, a dtype conversion) is read alone into memory (one layer's chunk of a stacked
    tensor, not the stack) and written from its views. Whether a stored chunk is plain is read from its
    archive's index and pickle (`_stored_tensor_data`), not by `torch.load`.

Both directions have the disk write their output while they write it (`utils.files.WritebackPacer`), so the
one flush before publishing finds little left to wait for; and they keep the garbage collector off the
objects that existed before (`_collecting_only_new_objects`). Per-tensor costs matter for mixture-of-experts
checkpoints, thousands of 2 MB expert matrices.

Both keep at most one parameter in memory, in one buffer reused for every parameter, so peak memory is below
1.5x the largest tensor whatever the model size; throughput is close to that of a plain safetensors read and
write of the same bytes (both measured in benchmarks/convert_memory.py). The HF files the model needs besides
its weights (config, generation config, tokenizer) travel inside the Megatron checkpoint in `hf/`, so an
exported model is complete. Output directories are written as `<out>.tmp` and renamed when complete: an
interrupted run never leaves a directory that looks finished.

Vocabulary padding: Megatron pads the vocabulary to a multiple of 128 * TP. Import pads for the TP given (the
trainer loads it at another TP too: Megatron reads embedding tensors with allow_shape_mismatch); export
removes the padding.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import gc
import io
import json
import math
import os
import pickle
import shutil
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_gvpo.models.arch import Arch, arch_from_hf, padded_vocab_size
from megatron_gvpo.models.hf_io import (
    HF_ASSETS_DIR,
    SafetensorsCheckpoint,
    SafetensorsStreamWriter,
    contiguous_blocks,
    copy_hf_assets,
    load_hf_config,
    readinto_exactly,
    tensor_bytes,
)
from megatron_gvpo.models.hf_maps import TRANSFORMS, expected_hf_names, hf_views, megatron_to_hf, rules
from megatron_gvpo.utils.files import WritebackPacer, fsync_tree

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


# ---------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------


def _checked_hf_tensors(arch: Arch, hf_dir: Path) -> SafetensorsCheckpoint:
    hf = SafetensorsCheckpoint(hf_dir)
    expected = expected_hf_names(arch)
    missing = sorted(expected - set(hf))
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor {missing[0]!r} ({len(missing)} missing) for {arch.model_type}")
    # Tied models may still ship lm_head.weight (a copy of the embedding); anything else is unexpected.
    extra = sorted(set(hf) - expected - ({"lm_head.weight"} if arch.tie_word_embeddings else set()))
    if extra:
        raise ValueError(f"{hf_dir}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected) for {arch.model_type}")
    return hf


class _ReusedBuffer:
    """One allocation that holds each parameter in turn, as large as the largest one. Memory stays at one
    parameter, and its pages, once touched, are not faulted in again: reading into freshly allocated memory
    (which the kernel zeroes page by page) ran at a third of the speed of reading into memory already touched."""

    def __init__(self, nbytes: int):
        self.nbytes, self.storage = nbytes, None

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.storage is None:  # allocated at first use (an export may never need it)
            self.storage = torch.empty(self.nbytes, dtype=torch.uint8)
        return self.storage[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """The same memory as the contiguous `t`, as a tensor whose storage is exactly `t`'s bytes: PyTorch's
    checkpoint writer copies a tensor whose storage is larger than the tensor (a view of the reused buffer)
    before saving it, and keeps every tensor it saved referenced until the end (see `_Materializer`)."""
    assert t.is_contiguous(), "a checkpoint shard of the TP = PP = 1 model is contiguous"
    if t.nbytes == 0:
        return t.clone()
    return torch.frombuffer(tensor_bytes(t), dtype=t.dtype).view(t.shape)


class _Materializer:
    """Real bytes for the shards Megatron's checkpoint writer asks for, one parameter at a time.

    The writer names a shard by its sharded key and global offset; `where` maps those to the parameter and
    to the meta view (of the whole parameter, or of a part of it such as linear_fc1's gate half) whose
    strides say which elements of the parameter the shard holds. The parameter is assembled in a buffer
    reused for every parameter, its HF tensors read straight into their places (`hf_maps.VIEWS`); the
    shards handed to the writer are views of that buffer, so PyTorch's writer, which keeps a reference to every
    tensor it has written until it is done, holds no memory of its own."""

    def __init__(self, model, table: dict, arch: Arch, hf: SafetensorsCheckpoint, padded_vocab: int,
                 dtype: torch.dtype, progress: Callable[[int], None]):
        self.shape_of = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.where = {(key, offset): (name, view) for name, shards in table.items() for key, offset, view in shards}
        self.rule_of = {r.megatron: r for r in rules(arch)}
        self.arch, self.hf, self.padded_vocab, self.dtype = arch, hf, padded_vocab, dtype
        self.progress = progress
        self.summary = ConvertSummary()
        self.buffer = _ReusedBuffer(max(math.prod(s) for s in self.shape_of.values()) * dtype.itemsize)
        self._current: tuple[str, torch.Tensor] | None = None

    def _check_shapes(self, name: str) -> None:
        """ValueError naming the HF tensors when they do not make the parameter's shape (checked on the meta
        device: the transform applied to their shapes alone)."""
        rule = self.rule_of[name]
        hf_meta = [torch.empty(self.hf.shape_of(n), device="meta") for n in rule.hf]
        made = tuple(TRANSFORMS[rule.transform][0](self.arch, self.padded_vocab, *hf_meta).shape)
        views = hf_views(self.arch, self.padded_vocab, rule.transform, torch.empty(self.shape_of[name], device="meta"))
        if made != self.shape_of[name] or any(v.numel() != t.numel() for v, t in zip(views, hf_meta, strict=True)):
            raise ValueError(
                f"shape mismatch: {', '.join(rule.hf)} give {name} of shape {made}, the config "
                f"({self.arch.model_type}) needs {self.shape_of[name]}"
            )

    def parameter(self, name: str) -> torch.Tensor:
        # Consecutive requests hit the same parameter (linear_fc1's gate and up halves): keep one.
        if self._current is None or self._current[0] != name:
            self._check_shapes(name)
            rule = self.rule_of[name]
            full = self.buffer.tensor(self.shape_of[name], self.dtype)
            views = hf_views(self.arch, self.padded_vocab, rule.transform, full)
            if sum(v.numel() for v in views) != full.numel():
                full.zero_()  # vocabulary padding
            for hf_name, view in zip(rule.hf, views, strict=True):
                self.hf.read_into(hf_name, view)
            if any(self.hf.dtype_of(n) != self.dtype for n in rule.hf):
                release_free_memory()  # the tensors read whole to be converted
            self._current = (name, full)
            self.summary.tensors += 1
            self.summary.bytes += full.nbytes
            self.progress(full.nbytes)
        return self._current[1]

    def release(self) -> None:
        """Drop the buffer now (the strategy classes that reference this object are cycles)."""
        self._current = self.buffer = None
        release_free_memory()

    def __call__(self, key: str, offset: tuple[int, ...], meta: torch.Tensor) -> torch.Tensor:
        name, view = self.where[(key, offset)]
        full = self.parameter(name)
        return _exact_storage(full.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(meta.shape))


def _nested_values(x) -> Iterator:
    if isinstance(x, dict):
        for v in x.values():
            yield from _nested_values(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _nested_values(v)
    else:
        yield x


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """`torch.save` without the CRC-32 of each record: computing it took half the time of writing a tensor,
    and nothing reads it back (`torch.load`, with it PyTorch's checkpoint reader and so Megatron's, does not
    check it; PyTorch documents that it loads such files; `unzip -t` would complain)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _WritebackStream:
    """A buffered file being written, whose pages the disk writes as they are written (`WritebackPacer`): the
    calls PyTorch's checkpoint writer makes of a stream."""

    def __init__(self, f):
        self.f, self.pacer = f, WritebackPacer(f.fileno(), flush=f.flush)

    def write(self, data) -> int:
        n = self.f.write(data)
        self.pacer.wrote(n)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()


def _writeback_file_system():
    """PyTorch's file system for its checkpoint writer, with the files it writes wrapped in `_WritebackStream`:
    the disk writes the checkpoint while the next tensors are made, and the flush before the output is
    published (`atomic_output_dir`) finds little left to wait for."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class WritebackFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
            with super().create_stream(path, mode) as stream:
                yield _WritebackStream(stream) if "w" in mode else stream

    return WritebackFileSystem()


def _streaming_strategy(materializer: _Materializer):
    """Megatron's torch_dist save strategy writing through PyTorch's serial file writer, which resolves (and
    here materialises) one tensor at a time instead of staging every tensor in memory first."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class MaterializingPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                data = materializer(write_item.index.fqn, tuple(write_item.index.offset), data)
            return data

    class StreamingTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            # No fsync per file (sync_files): atomic_output_dir flushes the whole output once, before the
            # rename that publishes it; per file, the writer waited for the disk after every file.
            writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0,
                                          sync_files=False)
            writer.fs = _writeback_file_system()
            try:
                with _without_crc32():
                    dcp.save(pyt_state_dict, storage_writer=writer,
                             planner=MaterializingPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
            except dcp.api.CheckpointException as e:
                # Our own errors (a bad HF tensor) come back wrapped per rank: raise the original.
                for exc, _traceback in e.failures.values():
                    if isinstance(exc, ValueError):
                        raise exc from None
                raise

    return StreamingTorchDistSave("torch_dist", 1)


def import_hf(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
              ep: int = 1, etp: int | None = None, dtype: str | None = None, force: bool = False,
              progress: bool = True) -> ConvertSummary:
    """HF directory -> Megatron checkpoint of the model weights (module docstring)."""
    from megatron.core import dist_checkpointing

    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    arch = arch_from_hf(config)
    check_layout(arch, tp, pp, vpp, ep, etp)
    hf = _checked_hf_tensors(arch, hf_dir)
    torch_dtype = DTYPES[dtype] if dtype else hf.dtype_of(rules(arch)[0].hf[0])
    padded = padded_vocab_size(arch.vocab_size, tp)
    start = time.perf_counter()
    with (_collecting_only_new_objects(), single_process_megatron() as release_megatron,
          atomic_output_dir(out, force) as tmp, _progress_bar(progress, "import") as bar):
        model = meta_model(arch, padded, torch_dtype)
        sharded = model.sharded_state_dict()  # built once: the table and the save share it
        table = _shard_table(sharded)
        release_megatron()
        materializer = _Materializer(model, table, arch, hf, padded, torch_dtype, bar)
        dist_checkpointing.save({"model0": sharded}, str(tmp), sharded_strategy=_streaming_strategy(materializer))
        materializer.release()
        copy_hf_assets(hf_dir, tmp / HF_ASSETS_DIR)
        (tmp / "convert_hf.json").write_text(json.dumps(
            {"source": str(hf_dir), "tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp, "dtype": str(torch_dtype),
             "padded_vocab_size": padded}, indent=2) + "\n")
    materializer.summary.seconds = time.perf_counter() - start
    return materializer.summary


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def stored_embedding(ckpt: Path) -> tuple[int, torch.dtype]:
    """(padded vocabulary size, parameter dtype) of a Megatron checkpoint, from its embedding's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    key = "embedding.word_embeddings.weight"
    if key not in metadata.state_dict_metadata:
        raise ValueError(f"{ckpt}: no {key} in the checkpoint; is it a Megatron GPT checkpoint?")
    stored = metadata.state_dict_metadata[key]
    return int(stored.size[0]), stored.properties.dtype


def _shard_table(sharded: dict) -> dict[str, list[tuple[str, tuple[int, ...], torch.Tensor]]]:
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


class _CheckpointReader:
    """Regions of tensors of a torch_dist checkpoint, read alone (one layer of a layer-stacked tensor, not the
    stack). The metadata is read once and the data files stay open: a `dcp.load` per parameter re-read and
    re-planned the whole metadata each time, which grows with the number of tensors (tens of thousands in a
    large MoE). PyTorch's own helpers say which stored chunks (of whatever TP/PP layout wrote them) cover a
    region."""

    def __init__(self, ckpt: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.ckpt = ckpt
        self.metadata = FileSystemReader(str(ckpt)).read_metadata()
        self._files: dict[str, io.FileIO] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, relative_path: str) -> io.FileIO:
        if relative_path not in self._files:
            self._files[relative_path] = open(self.ckpt / relative_path, "rb", buffering=0)
        return self._files[relative_path]

    def _chunks(self, key: str, offset: tuple[int, ...], dest: torch.Tensor) -> Iterator[tuple]:
        """(part of `dest`, file, storage info, read item, offset in the file of the part's bytes or None) for
        each stored chunk that holds part of the region of stored tensor `key` at global `offset` of `dest`'s
        shape; the offset is None unless the chunk is that part exactly, stored plainly (see
        `_stored_tensor_data`). `dest` may be on the meta device."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        stored = self.metadata.state_dict_metadata.get(key)
        if stored is None:
            raise ValueError(f"{self.ckpt}: the checkpoint has no tensor {key!r}")
        chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)
        for item in create_read_items_for_chunk_list(key, stored, [chunk]):
            info = self.metadata.storage_data[item.storage_index]
            if info.transform_descriptors:
                raise ValueError(f"{self.ckpt}: tensor {key!r} is stored with transforms "
                                 f"{info.transform_descriptors}, which the converter does not read")
            part = dest
            for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths, strict=True)):
                part = part.narrow(dim, start, length)
            f = self._file(info.relative_path)
            data = None if any(item.storage_offsets) else _stored_tensor_data(f, info.offset, info.length, part)
            yield part, f, info, item, data

    def read_into(self, key: str, offset: tuple[int, ...], dest: torch.Tensor) -> None:
        """Fill `dest` with the region of stored tensor `key` that starts at global `offset` (dest's shape)."""
        for part, f, info, item, data in self._chunks(key, offset, dest):
            if data is not None and part.is_contiguous():
                f.seek(data)
                readinto_exactly(f, tensor_bytes(part), f"{f.name}: tensor {key!r} at {data}")
                continue
            # Part of a stored chunk, or a strided part of the destination (chunks written at another TP
            # layout): load the chunk, copy the part.
            whole = torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                whole = whole.narrow(dim, start, length)
            part.copy_(whole)
            del whole
            release_free_memory()

    def byte_ranges(self, shards: list, param: torch.Tensor) -> list[tuple[int, io.FileIO, int, int]] | None:
        """Where the bytes of a parameter (`param` on the meta device, `shards` its `_shard_table` entry) are in
        the checkpoint's files: (offset in the parameter, file, offset in the file, length), in order; None
        unless every stored chunk holding it is a contiguous part of it, stored plainly."""
        ranges = []
        for key, offset, view in shards:
            sizes = (1,) * (len(offset) - view.dim()) + tuple(view.shape)
            dest = param.as_strided(view.shape, view.stride(), view.storage_offset()).view(sizes)
            for part, f, _, _, data in self._chunks(key, offset, dest):
                if data is None or not part.is_contiguous():
                    return None
                ranges.append((part.storage_offset() * part.itemsize, f, data, part.nbytes))
        ranges.sort(key=lambda r: r[0])
        covered = 0
        for start, _, _, length in ranges:
            if start != covered:
                return None
            covered += length
        return ranges if covered == param.nbytes else None


def _file_pieces(view: torch.Tensor, ranges: list[tuple[int, io.FileIO, int, int]]) -> list[tuple[io.FileIO, int, int]]:
    """The (file, offset, length) pieces that hold `view`'s elements in row-major order, given where its
    parameter's bytes are (`_CheckpointReader.byte_ranges`); `view` is a view of the parameter on the meta device."""
    starts = [r[0] for r in ranges]
    pieces = []
    for block in contiguous_blocks(view):
        begin = block.storage_offset() * block.itemsize
        end = begin + block.nbytes
        k = bisect.bisect_right(starts, begin) - 1
        while begin < end:
            start, f, data, length = ranges[k]
            n = min(end, start + length) - begin
            pieces.append((f, data + begin - start, n))
            begin += n
            k += 1
    return pieces


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip file's local header (zipfile's structFileHeader)


def _stored_tensor_data(f: io.FileIO, offset: int, length: int, dest: torch.Tensor) -> int | None:
    """Where in the file the bytes of a tensor that PyTorch's checkpoint writer stored (one `torch.save`
    archive at [offset, +length) of the file) begin, when it is exactly `dest`'s shape and dtype (dest may be on
    the meta device), contiguous, alone in its storage, and stored uncompressed; None otherwise. Reading those
    bytes straight into place (or copying them file to file) avoids `torch.load`, which would first build the
    whole tensor (and on the way a copy of its bytes), and `zipfile`, which copies them twice more. The
    archive's index and pickle are read here without `torch.load` too (`_StoredTensorLayout`): its
    weights-only unpickler, in Python, took 0.16 ms per tensor, more than the rest of an export of 2 MB
    experts together."""
    with zipfile.ZipFile(_FileSlice(f, offset, length)) as archive:
        records = {i.filename.partition("/")[2]: i for i in archive.infolist()}
        if "data.pkl" not in records or records["data.pkl"].compress_type != zipfile.ZIP_STORED:
            return None
        pickled = os.pread(f.fileno(), records["data.pkl"].file_size, _record_data(f, offset, records["data.pkl"]))
    try:
        (dtype, key, numel), storage_offset, size, stride = _StoredTensorLayout(io.BytesIO(pickled)).load()
    except (pickle.UnpicklingError, TypeError, ValueError, EOFError):  # not one plain tensor
        return None
    plain = (dtype == dest.dtype and tuple(size) == tuple(dest.shape) and storage_offset == 0
             and numel * dtype.itemsize == dest.nbytes and tuple(stride) == _contiguous_strides(size))
    if not plain or sys.byteorder != "little":
        return None
    record, byteorder = records.get(f"data/{key}"), records.get("byteorder")
    if record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != dest.nbytes:
        return None
    if byteorder is not None and os.pread(f.fileno(), byteorder.file_size,
                                          _record_data(f, offset, byteorder)).strip() != b"little":
        return None
    return _record_data(f, offset, record)


def _contiguous_strides(size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of shape `size` (as PyTorch makes them: a length-0 axis counts as 1)."""
    strides, step = [], 1
    for n in reversed(tuple(size)):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# The typed storage classes a pickled tensor names (other dtypes take `torch.load`'s way: `_CheckpointReader`).
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64}


class _StoredTensorLayout(pickle.Unpickler):
    """The pickle of a `torch.save`d tensor (its archive's data.pkl) read as ((dtype, storage key, storage
    numel), storage offset, size, stride) rather than as a tensor: only PyTorch's tensor-rebuilding function,
    its typed storage classes and OrderedDict (the hooks argument) resolve, anything else is an
    UnpicklingError, so this runs no code from the file (as `torch.load(weights_only=True)`), in C."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, storage_offset, size, stride, *_: (storage, storage_offset, size, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        # ("storage", dtype (the storage class as resolved above), key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"persistent id {pid!r}")
        return pid[1], pid[2], pid[4]


def _record_data(f: io.FileIO, archive_offset: int, record: zipfile.ZipInfo) -> int:
    """Where the bytes of an uncompressed record of the zip archive at `archive_offset` of the file begin: after
    its local header, whose name and extra fields have lengths of their own. (zipfile reads them only through
    `open`, which copies and checks the CRC, which PyTorch may have left out: `_without_crc32`.)"""
    header_at = archive_offset + record.header_offset
    header = _ZIP_LOCAL_HEADER.unpack(os.pread(f.fileno(), _ZIP_LOCAL_HEADER.size, header_at))
    if header[0] != zipfile.stringFileHeader:
        raise ValueError(f"{f.name}: record {record.filename} has no zip local header where expected")
    return header_at + _ZIP_LOCAL_HEADER.size + header[-2] + header[-1]


def export_hf(megatron_dir: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False,
              max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> ConvertSummary:
    """Megatron checkpoint -> HF directory (module docstring); `max_shard_bytes` bounds each safetensors file,
    not memory (nothing is buffered)."""
    ckpt = Path(megatron_dir)
    assets = ckpt / HF_ASSETS_DIR
    if not (assets / "config.json").is_file():
        raise ValueError(f"{ckpt}: no {HF_ASSETS_DIR}/config.json (checkpoints written by the trainer or by "
                         "`convert_hf.py import` carry it)")
    config = load_hf_config(assets)
    arch = arch_from_hf(config)
    padded, stored_dtype = stored_embedding(ckpt)
    torch_dtype = DTYPES[dtype] if dtype else stored_dtype
    summary = ConvertSummary()
    start = time.perf_counter()
    with (_collecting_only_new_objects(), single_process_megatron() as release_megatron,
          atomic_output_dir(out, force) as tmp, _progress_bar(progress, "export") as bar):
        model = meta_model(arch, padded, stored_dtype)
        table = _shard_table(model.sharded_state_dict())
        release_megatron()
        shapes = {name: p.shape for name, p in model.named_parameters()}
        # Every output tensor's name and shape, from the transforms run on meta tensors: the shard headers
        # are written up front and each tensor streams to its file as it is made.
        meta = {name: torch.empty(shape, dtype=stored_dtype, device="meta") for name, shape in shapes.items()}
        plan = [(name, tuple(t.shape), torch_dtype) for name, t in megatron_to_hf(arch, meta, padded)]
        writer = SafetensorsStreamWriter(tmp, plan, max_shard_bytes, writeback=True)
        buffer = _ReusedBuffer(max(math.prod(s) for s in shapes.values()) * stored_dtype.itemsize)
        reader = _CheckpointReader(ckpt)
        try:
            for rule in rules(arch):
                # Bytes stored plainly are copied file to file by the kernel; the rest (a chunk of another TP
                # layout, a dtype conversion) goes through the buffer. Either way each HF tensor is written from
                # its view of the parameter (`hf_maps.VIEWS`), with no intermediate copy.
                param = meta[rule.megatron]
                ranges = reader.byte_ranges(table[rule.megatron], param) if torch_dtype == stored_dtype else None
                if ranges is None:
                    param = buffer.tensor(tuple(shapes[rule.megatron]), stored_dtype)
                    for key, offset, view in table[rule.megatron]:
                        # The stored chunk has the prepended (layer) axes of size 1 in front of the local shape.
                        sizes = (1,) * (len(offset) - view.dim()) + tuple(view.shape)
                        reader.read_into(key, offset, param.as_strided(view.shape, view.stride(),
                                                                       view.storage_offset()).view(sizes))
                for name, view in zip(rule.hf, hf_views(arch, padded, rule.transform, param), strict=True):
                    if ranges is not None:
                        writer.write_from_files(name, stored_dtype, _file_pieces(view, ranges))
                    elif torch_dtype == stored_dtype:
                        writer.write(name, view)
                    else:
                        writer.write(name, view.to(torch_dtype).reshape(-1, *param.shape[1:]))
                        release_free_memory()  # the converted copy
                    nbytes = view.numel() * torch_dtype.itemsize
                    summary.tensors += 1
                    summary.bytes += nbytes
                    bar(nbytes)
        finally:
            reader.close()
        buffer = param = view = None
        release_free_memory()
        writer.close()
        copy_hf_assets(assets, tmp)
        _finish_hf_config(tmp, config, torch_dtype)
    summary.seconds = time.perf_counter() - start
    return summary


def _finish_hf_config(out: Path, config, dtype: torch.dtype) -> None:
    """config.json with the exported dtype; generation_config.json made from the config when absent."""
    import transformers

    data = json.loads((out / "config.json").read_text())
    data["torch_dtype"] = data["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").is_file():
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out)


@contextlib.contextmanager
def _progress_bar(enabled: bool, what: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda nbytes: None
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True) as bar:
        yield bar.update
