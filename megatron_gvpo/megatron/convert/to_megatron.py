"""Import: an HF directory -> a Megatron torch_dist checkpoint of the model weights (more in the package docstring).

Megatron's own save writes the checkpoint, so its structure is the one the trainer loads; what changes is when
the bytes exist. The sharded state dict holds meta tensors, and a parameter is made only when PyTorch's
checkpoint writer resolves one of its shards (`_Materializer`, behind the planner of `_streaming_strategy`):
its HF tensors are read straight into their places in a buffer reused for every parameter, so memory stays at
one parameter whatever the model size. The archives are written without CRC-32s and without an fsync per file
(`_without_crc32`, `_streaming_strategy`), which made up more than half of the time, and the disk writes them
while the next parameters are made (`_writeback_file_system`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_gvpo.megatron.convert.common import (
    DTYPES,
    ConvertSummary,
    ReusedBuffer,
    check_layout,
    converting,
    meta_model,
    release_free_memory,
    shard_table,
)
from megatron_gvpo.models.arch import Arch, arch_from_hf, padded_vocab_size
from megatron_gvpo.models.hf_io import (
    HF_ASSETS_DIR,
    SafetensorsCheckpoint,
    copy_hf_assets,
    load_hf_config,
    tensor_bytes,
)
from megatron_gvpo.models.hf_maps import TRANSFORMS, expected_hf_names, hf_views, rules
from megatron_gvpo.utils.files import WritebackPacer


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
        self.buffer = ReusedBuffer(max(math.prod(s) for s in self.shape_of.values()) * dtype.itemsize)
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
    """HF directory -> Megatron checkpoint of the model weights (package docstring)."""
    from megatron.core import dist_checkpointing

    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    arch = arch_from_hf(config)
    check_layout(arch, tp, pp, vpp, ep, etp)
    hf = _checked_hf_tensors(arch, hf_dir)
    torch_dtype = DTYPES[dtype] if dtype else hf.dtype_of(rules(arch)[0].hf[0])
    padded = padded_vocab_size(arch.vocab_size, tp)
    start = time.perf_counter()
    with converting(out, force, progress, "import") as (tmp, release_megatron, bar):
        model = meta_model(arch, padded, torch_dtype)
        sharded = model.sharded_state_dict()  # built once: the table and the save share it
        table = shard_table(sharded)
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
