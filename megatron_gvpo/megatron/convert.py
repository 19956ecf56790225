"""Hugging Face checkpoints in and out of Megatron `dist_checkpointing` checkpoints, one tensor at a time.

import: HF directory -> a Megatron checkpoint (torch_dist format) of the model weights that the trainer
    loads at any TP/PP/DP layout (`model.load`). The checkpoint's structure (sharded keys, global shapes, the
    layer axis, the gate/up split of linear_fc1) is taken from Megatron itself: a `GPTModel` built on the meta
    device (no memory) provides `sharded_state_dict()`, and the bytes of each shard are produced only when
    PyTorch's checkpoint writer asks for them (`_Materializer`, behind the planner of
    `_streaming_strategy`): the HF tensors of that one parameter are read, converted by the name maps of
    `megatron_gvpo.models.hf_maps`, written and dropped.
export: a Megatron checkpoint (from import or from training) -> HF safetensors shards with an index,
    config.json, generation_config.json and the tokenizer files. Each HF tensor is made from the Megatron
    tensor it needs, loaded alone from the checkpoint (one layer's chunk of a stacked tensor is read, not
    the stack), and streamed into its shard file, whose header was written from a plan made up front.

Both keep about one parameter's tensors in memory, so peak memory is below 1.5x the largest tensor whatever
the model size (measured in benchmarks/convert_memory.py). The HF files the model needs besides its weights
(config, generation config, tokenizer) travel inside the Megatron checkpoint in `hf/`, so an exported model
is complete. Output directories are written as `<out>.tmp` and renamed when complete: an interrupted run never
leaves a directory that looks finished.

Vocabulary padding: Megatron pads the vocabulary to a multiple of 128 * TP. Import pads for the TP given (the
trainer loads it at another TP too: Megatron reads embedding tensors with allow_shape_mismatch); export
removes the padding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import os
import re
import shutil
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
    copy_hf_assets,
    load_hf_config,
    readinto_exactly,
    tensor_bytes,
)
from megatron_gvpo.models.hf_maps import expected_hf_names, hf_to_megatron, megatron_to_hf, rules

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


# ---------------------------------------------------------------------------------------------------------
# Output directories
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield `<out>.tmp` to write into; on success it replaces `out`, on failure it is removed."""
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
def single_process_megatron() -> Iterator[None]:
    """A one-process gloo group and Megatron's parallel state (TP = PP = 1), torn down afterwards; reuses an
    existing process group (a test worker) without destroying it."""
    import torch.distributed as dist

    from megatron_gvpo.config import ParallelConfig
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
    try:
        yield
    finally:
        destroy_parallel()
        if own_group:
            dist.destroy_process_group()


def meta_model(arch: Arch, padded_vocab: int, dtype: torch.dtype):
    """The whole model (TP = PP = 1) with meta parameters: shapes, names and sharded keys, no memory."""
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config

    config = transformer_config(arch, params_dtype=dtype, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        return build_gpt_model(arch, config, padded_vocab_size=padded_vocab,
                               max_sequence_length=arch.max_position_embeddings)


def check_layout(arch: Arch, tp: int, pp: int, vpp: int | None) -> None:
    """The checks the trainer makes for a layout (heads, query groups, FFN and layers divisible)."""
    from megatron_gvpo.megatron.model import transformer_config

    if tp < 1 or pp < 1 or (vpp is not None and (vpp < 1 or pp < 2)):
        raise ValueError(f"invalid layout --tp {tp} --pp {pp} --vpp {vpp} (vpp needs pp >= 2)")
    transformer_config(arch, tp=tp, pp=pp, vpp=vpp)


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


class _Materializer:
    """Real bytes for the shards Megatron's checkpoint writer asks for, one parameter at a time.

    The writer names a shard by its sharded key and global offset; `where` maps those to the parameter and
    to the meta view (of the whole parameter, or of a part of it such as linear_fc1's gate half) whose
    strides say which elements of the parameter the shard holds."""

    def __init__(self, model, arch: Arch, hf, padded_vocab: int, dtype: torch.dtype, progress: Callable[[int], None]):
        self.shape_of = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.where = {(key, offset): (name, view)
                      for name, shards in _shard_table(model).items() for key, offset, view in shards}
        self.arch, self.hf, self.padded_vocab, self.dtype = arch, hf, padded_vocab, dtype
        self.progress = progress
        self.summary = ConvertSummary()
        self._cached: tuple[str, torch.Tensor] | None = None

    def parameter(self, name: str) -> torch.Tensor:
        # Consecutive requests hit the same parameter (linear_fc1's gate and up halves): keep one.
        if self._cached is None or self._cached[0] != name:
            if self._cached is not None:
                # The serial writer has written everything it got from this parameter, but its loop variable
                # still references the last view until the next tensor is resolved: free the bytes now, or
                # two parameters would be resident at every step.
                self._cached[1].untyped_storage().resize_(0)
            self._cached = None
            release_free_memory()
            (_, full), = hf_to_megatron(self.arch, self.hf, self.padded_vocab, only={name})
            if tuple(full.shape) != self.shape_of[name]:
                hf_names = next(r.hf for r in rules(self.arch) if r.megatron == name)
                raise ValueError(
                    f"shape mismatch: {', '.join(hf_names)} give {name} of shape {tuple(full.shape)}, the config "
                    f"({self.arch.model_type}) needs {self.shape_of[name]}"
                )
            self._cached = (name, full.to(self.dtype).contiguous())
            self.summary.tensors += 1
            self.summary.bytes += self._cached[1].nbytes
            self.progress(self._cached[1].nbytes)
        return self._cached[1]

    def release(self) -> None:
        """Drop the last parameter now (the strategy classes that reference this object are cycles)."""
        self._cached = None
        release_free_memory()

    def __call__(self, key: str, offset: tuple[int, ...], meta: torch.Tensor) -> torch.Tensor:
        name, view = self.where[(key, offset)]
        full = self.parameter(name)
        return full.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(meta.shape)


def _nested_values(x) -> Iterator:
    if isinstance(x, dict):
        for v in x.values():
            yield from _nested_values(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _nested_values(v)
    else:
        yield x


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
            writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0)
            try:
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
              dtype: str | None = None, force: bool = False, progress: bool = True) -> ConvertSummary:
    """HF directory -> Megatron checkpoint of the model weights (module docstring)."""
    from megatron.core import dist_checkpointing

    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    arch = arch_from_hf(config)
    check_layout(arch, tp, pp, vpp)
    hf = _checked_hf_tensors(arch, hf_dir)
    torch_dtype = DTYPES[dtype] if dtype else hf.dtype_of(rules(arch)[0].hf[0])
    padded = padded_vocab_size(arch.vocab_size, tp)
    start = time.perf_counter()
    with single_process_megatron(), atomic_output_dir(out, force) as tmp, _progress_bar(progress, "import") as bar:
        model = meta_model(arch, padded, torch_dtype)
        materializer = _Materializer(model, arch, hf, padded, torch_dtype, bar)
        dist_checkpointing.save({"model0": model.sharded_state_dict()}, str(tmp),
                                sharded_strategy=_streaming_strategy(materializer))
        materializer.release()
        copy_hf_assets(hf_dir, tmp / HF_ASSETS_DIR)
        (tmp / "convert_hf.json").write_text(json.dumps(
            {"source": str(hf_dir), "tp": tp, "pp": pp, "vpp": vpp, "dtype": str(torch_dtype),
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


def _shard_table(model) -> dict[str, list[tuple[str, tuple[int, ...], torch.Tensor]]]:
    """parameter name -> [(sharded key, global offset, meta view of the parameter)]: where each parameter of
    the TP = PP = 1 meta `model` lives in a Megatron checkpoint (after Megatron's sharded-state factories,
    which e.g. store linear_fc1 as separate gate and up halves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    table: dict[str, list] = {}
    for name, entry in sharded.items():
        for sh in _nested_values(entry):
            if isinstance(sh, ShardedTensor):
                # The stored chunk has the prepended (layer) axes of size 1 in front of the local shape.
                table.setdefault(name, []).append((sh.key, tuple(sh.global_offset), sh.data))
    return table


def _load_parameter(ckpt: Path, shape: torch.Size, dtype: torch.dtype, shards: list) -> torch.Tensor:
    """One parameter, read alone from a Megatron checkpoint: only its own chunks' bytes are read (one layer of a
    layer-stacked tensor, not the stack)."""
    import torch.distributed.checkpoint as dcp

    out = torch.empty(shape, dtype=dtype)
    regions = {}
    for key, offset, view in shards:
        dest = out.as_strided(view.shape, view.stride(), view.storage_offset())
        sizes = (1,) * (len(offset) - view.dim()) + tuple(view.shape)
        regions[(key, offset)] = dest.view(sizes)
    reader_class, planner_class = _checkpoint_io_classes()
    dcp.load({}, storage_reader=reader_class(str(ckpt)), planner=planner_class(ckpt, regions), no_dist=True)
    return out


@functools.cache
def _checkpoint_io_classes():
    """(reader, planner) classes for `_load_parameter`, made once: classes are reference cycles, and a class
    made per call would keep its call's tensors alive until the cycle collector runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        """Reads the given regions {(sharded key, global offset): destination} and nothing else."""

        def __init__(self, ckpt: Path, regions: dict):
            super().__init__()
            self.ckpt, self.regions = ckpt, regions

        def create_local_plan(self) -> LoadPlan:
            items = []
            for (key, offset), dest in self.regions.items():
                if key not in self.metadata.state_dict_metadata:
                    raise ValueError(f"{self.ckpt}: the checkpoint has no tensor {key!r}")
                chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            dest = self.regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
                dest = dest.narrow(dim, start, length)
            return dest

    class DirectTensorReader(dcp.FileSystemReader):
        """FileSystemReader that reads whole stored tensors straight into their destination
        (`_read_stored_tensor_into`) and leaves everything else to the stock path."""

        def read_data(self, plan, planner):
            rest = []
            for req in plan.items:
                info = self.storage_data[req.storage_index]
                dest = planner.resolve_tensor(req).detach() if req.type == LoadItemType.TENSOR else None
                whole = dest is not None and not any(req.storage_offsets) and not info.transform_descriptors
                if whole and _read_stored_tensor_into(Path(self.path) / info.relative_path, info.offset,
                                                      info.length, dest):
                    planner.commit_tensor(req, dest)
                else:
                    rest.append(req)
            return super().read_data(LoadPlan(rest), planner)

    return DirectTensorReader, RegionPlanner


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


def _read_stored_tensor_into(path: Path, offset: int, length: int, dest: torch.Tensor) -> bool:
    """Read a tensor that PyTorch's checkpoint writer stored (one `torch.save` archive at [offset, +length)
    of the file) straight into `dest`, when it is exactly `dest`'s shape and dtype, contiguous, alone in its
    storage, and stored uncompressed; returns False (nothing read) otherwise. `torch.load` would first build
    the whole tensor (and on the way a copy of its bytes), several times `dest`'s size at peak."""
    with open(path, "rb", buffering=0) as f:
        stored = torch.load(_FileSlice(f, offset, length), map_location="meta", weights_only=True)  # reads no data
        if not (isinstance(stored, torch.Tensor) and stored.dtype == dest.dtype and stored.shape == dest.shape
                and stored.is_contiguous() and stored.storage_offset() == 0
                and stored.untyped_storage().nbytes() == dest.nbytes and dest.is_contiguous()
                and sys.byteorder == "little"):
            return False
        with zipfile.ZipFile(_FileSlice(f, offset, length)) as archive:
            records = [i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename)]
            byteorder = [i for i in archive.infolist() if i.filename.endswith("/byteorder")]
            if (len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED
                    or records[0].file_size != dest.nbytes
                    or (byteorder and archive.read(byteorder[0]).strip() != b"little")):
                return False
            with archive.open(records[0]) as src:
                readinto_exactly(src, tensor_bytes(dest), f"{path}: stored tensor {records[0].filename}")
    return True


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
    with single_process_megatron(), atomic_output_dir(out, force) as tmp, _progress_bar(progress, "export") as bar:
        model = meta_model(arch, padded, stored_dtype)
        table = _shard_table(model)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        # Every output tensor's name and shape, from the transforms run on meta tensors: the shard headers
        # are written up front and each tensor streams to its file as it is made.
        meta = {name: torch.empty(shape, dtype=stored_dtype, device="meta") for name, shape in shapes.items()}
        plan = [(name, tuple(t.shape), torch_dtype) for name, t in megatron_to_hf(arch, meta, padded)]
        writer = SafetensorsStreamWriter(tmp, plan, max_shard_bytes)
        for rule in rules(arch):
            params = {rule.megatron: _load_parameter(ckpt, shapes[rule.megatron], stored_dtype, table[rule.megatron])}
            for name, tensor in megatron_to_hf(arch, params, padded, only={rule.megatron}):
                tensor = tensor.to(torch_dtype)
                writer.write(name, tensor)
                summary.tensors += 1
                summary.bytes += tensor.nbytes
                bar(tensor.nbytes)
            params = tensor = None  # before trimming: the last tensor is still bound to the loop variable
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
