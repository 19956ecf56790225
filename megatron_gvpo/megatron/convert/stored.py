"""The tensors of a torch_dist checkpoint as stored: its embedding's metadata, and regions of its tensors read
alone (one layer of a layer-stacked tensor, not the stack), whatever TP/PP layout wrote them.

A module of its own, though export is its one user, because what it knows is PyTorch's storage format rather
than models: the checkpoint's metadata, and the zip archive and pickle of each `torch.save`d chunk, parsed here
without `torch.load` (`_stored_tensor_data`) to find where a plainly stored chunk's bytes lie in its file, so
that export reads them straight into place or has the kernel copy them file to file.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_gvpo.megatron.convert.common import release_free_memory
from megatron_gvpo.models.hf_io import readinto_exactly, tensor_bytes


def stored_embedding(ckpt: Path) -> tuple[int, torch.dtype]:
    """(padded vocabulary size, parameter dtype) of a Megatron checkpoint, from its embedding's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    key = "embedding.word_embeddings.weight"
    if key not in metadata.state_dict_metadata:
        raise ValueError(f"{ckpt}: no {key} in the checkpoint; is it a Megatron GPT checkpoint?")
    stored = metadata.state_dict_metadata[key]
    return int(stored.size[0]), stored.properties.dtype


class CheckpointReader:
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
        """Where the bytes of a parameter (`param` on the meta device, `shards` its `common.shard_table` entry) are in
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


# The typed storage classes a pickled tensor names (other dtypes take `torch.load`'s way: `CheckpointReader`).
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
    `open`, which copies and checks the CRC, which PyTorch may have left out: `to_megatron._without_crc32`.)"""
    header_at = archive_offset + record.header_offset
    header = _ZIP_LOCAL_HEADER.unpack(os.pread(f.fileno(), _ZIP_LOCAL_HEADER.size, header_at))
    if header[0] != zipfile.stringFileHeader:
        raise ValueError(f"{f.name}: record {record.filename} has no zip local header where expected")
    return header_at + _ZIP_LOCAL_HEADER.size + header[-2] + header[-1]
