"""Export: a Megatron checkpoint (from import or from training) -> an HF directory (more in the package docstring).

Every output tensor's name and shape is known before a byte is read (the name maps run on meta tensors), so
the safetensors headers are written up front and each tensor streams to its file as it is made: nothing is
buffered beyond one parameter. A tensor stored plainly is copied file to file by the kernel from where
`stored.CheckpointReader.byte_ranges` says its bytes are (`_file_pieces`); anything else goes through the
reused buffer.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import time
from pathlib import Path

import torch

from megatron_gvpo.megatron.convert.common import (
    DTYPES,
    ConvertSummary,
    ReusedBuffer,
    converting,
    meta_model,
    release_free_memory,
    shard_table,
)
from megatron_gvpo.megatron.convert.stored import CheckpointReader, stored_embedding
from megatron_gvpo.models.arch import arch_from_hf
from megatron_gvpo.models.hf_io import (
    HF_ASSETS_DIR,
    SafetensorsStreamWriter,
    contiguous_blocks,
    copy_hf_assets,
    load_hf_config,
)
from megatron_gvpo.models.hf_maps import hf_views, megatron_to_hf, rules


def export_hf(megatron_dir: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False,
              max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> ConvertSummary:
    """Megatron checkpoint -> HF directory (package docstring); `max_shard_bytes` bounds each safetensors file,
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
    with converting(out, force, progress, "export") as (tmp, release_megatron, bar):
        model = meta_model(arch, padded, stored_dtype)
        table = shard_table(model.sharded_state_dict())
        release_megatron()
        shapes = {name: p.shape for name, p in model.named_parameters()}
        # Every output tensor's name and shape, from the transforms run on meta tensors: the shard headers
        # are written up front and each tensor streams to its file as it is made.
        meta = {name: torch.empty(shape, dtype=stored_dtype, device="meta") for name, shape in shapes.items()}
        plan = [(name, tuple(t.shape), torch_dtype) for name, t in megatron_to_hf(arch, meta, padded)]
        writer = SafetensorsStreamWriter(tmp, plan, max_shard_bytes, writeback=True)
        buffer = ReusedBuffer(max(math.prod(s) for s in shapes.values()) * stored_dtype.itemsize)
        reader = CheckpointReader(ckpt)
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


def _file_pieces(view: torch.Tensor, ranges: list[tuple[int, io.FileIO, int, int]]) -> list[tuple[io.FileIO, int, int]]:
    """The (file, offset, length) pieces that hold `view`'s elements in row-major order, given where its
    parameter's bytes are (`stored.CheckpointReader.byte_ranges`); `view` is a view of the parameter on the meta
    device."""
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


def _finish_hf_config(out: Path, config, dtype: torch.dtype) -> None:
    """config.json with the exported dtype; generation_config.json made from the config when absent."""
    import transformers

    data = json.loads((out / "config.json").read_text())
    data["torch_dtype"] = data["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").is_file():
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
