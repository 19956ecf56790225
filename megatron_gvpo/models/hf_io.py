"""Reading Hugging Face model directories without loading the whole model: configs and lazy safetensors.

`SafetensorsCheckpoint` is a read-only mapping from tensor name to tensor that opens the shard holding a
tensor only when that tensor is read, so a converter or a pipeline stage touches just the bytes it needs.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_gvpo.utils.files import WritebackPacer

HF_ASSETS_DIR = "hf"
"""Subdirectory of a Megatron checkpoint holding the HF config, generation config and tokenizer files."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def copy_hf_assets(src: Path, dst: Path) -> list[str]:
    """Every file of an HF model directory except weights (config, generation config, tokenizer, chat
    template, ...); returns their names. A lone config.json file is copied as config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, dst / "config.json")
        return ["config.json"]
    names = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
            names.append(f.name)
    return names


MODEL_PATH = "a Hugging Face model directory or a config.json file (models are never downloaded)"
TOKENIZER_PATH = "a directory with Hugging Face tokenizer files (tokenizers are never downloaded)"


def _missing(field: str, path: str | Path, what: str) -> str:
    """The message for a path that does not exist, with the directory a relative one was looked up in."""
    where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
    return f"{field} {str(path)!r} does not exist{where}; it must be {what}"


def _config_file(path: str | Path) -> Path:
    """The config.json of model.path (a model directory or the file itself); ValueError naming the field."""
    p = Path(path)
    if not p.exists():
        raise ValueError(_missing("model.path", path, MODEL_PATH))
    if p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(f"model.path {str(path)!r} is a directory without config.json; it must be {MODEL_PATH}")
    return p / "config.json" if p.is_dir() else p


def check_model_paths(path: str, tokenizer: str = "", load: str = "") -> None:
    """ValueError naming the field when model.path, model.tokenizer or model.load (where given) does not exist or
    is the wrong kind of path: before anything is loaded, so a missing directory is not mistaken for a model
    name on the Hugging Face hub (transformers' 'Repo id must be in the form ...')."""
    _config_file(path)
    if tokenizer and not Path(tokenizer).exists():
        raise ValueError(_missing("model.tokenizer", tokenizer, TOKENIZER_PATH))
    if tokenizer and not Path(tokenizer).is_dir():
        raise ValueError(f"model.tokenizer {tokenizer!r} is not a directory; it must be {TOKENIZER_PATH}")
    if load and not Path(load).exists():
        raise ValueError(_missing("model.load", load, "a Megatron checkpoint directory (tools/convert_hf.py "
                                  "import's output or a training checkpoint)"))


def load_hf_config(path: str | Path):
    """A transformers config from a model directory or a config.json file (offline; nothing is downloaded)."""
    import transformers

    file = _config_file(path)
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{file} has no model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, for `readinto` and `write` without a copy
    (ctypes rather than `.numpy()`, which would pin the storage's size for good)."""
    if not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if t.nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")


def readinto_exactly(stream, target: memoryview, what: str, chunk_bytes: int = 64 << 20) -> None:
    """Fill `target` from `stream`, `chunk_bytes` per call; a stream that ends early is an error naming `what`."""
    done = 0
    while done < len(target):
        got = stream.readinto(target[done:done + chunk_bytes])
        if not got:
            raise ValueError(f"{what} is truncated: {done} of {len(target)} bytes")
        done += got


def contiguous_blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """`t`'s elements in row-major order as contiguous pieces (`t` itself when it is contiguous), so that a view
    such as one query group's rows of a fused qkv (`hf_maps.VIEWS`) is read or written without a copy."""
    if t.is_contiguous():
        yield t
    else:
        for row in t.unbind(0):  # not contiguous, so at least one dimension
            yield from contiguous_blocks(row)


class SafetensorsCheckpoint(Mapping):
    """Lazy name -> tensor mapping over a directory's safetensors shards (with or without an index file).

    A tensor is read with `readinto` into memory of its own, not through an mmap of the shard: mapped file
    pages would count in the process's resident set for as long as any tensor of that mapping lives."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._headers: dict[Path, tuple[dict, int]] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.directory}: no *.safetensors files and no model.safetensors.index.json")
            self._file_of = {name: f for f in files for name in self._header(f)[0]}

    def _header(self, file: Path) -> tuple[dict, int]:
        """(tensor entries, offset of the data section) of one safetensors file."""
        if file not in self._headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(size))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{file} is not a safetensors file: {e}") from None
            header.pop("__metadata__", None)
            self._headers[file] = (header, 8 + size)
        return self._headers[file]

    def _entry(self, name: str) -> tuple[Path, dict, int, torch.dtype]:
        """(file, header entry, offset of its data section, dtype) of one tensor, from the header alone."""
        if name not in self._file_of:
            raise KeyError(name)
        file = self._file_of[name]
        header, data_start = self._header(file)
        if name not in header:
            raise ValueError(f"{file}: no tensor {name!r} (the index says it is there)")
        entry = header[name]
        dtype = _DTYPE_OF.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        return file, entry, data_start, dtype

    def dtype_of(self, name: str) -> torch.dtype:
        """A tensor's dtype without reading it."""
        return self._entry(name)[3]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        return tuple(self._entry(name)[1]["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape_of(name), dtype=self.dtype_of(name))
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read a tensor into `out`, which holds as many elements in row-major order (it may be a view of another
        tensor, of another shape: `hf_maps.VIEWS`). Bytes go straight from the file into `out` when the dtypes
        agree; otherwise the tensor is read whole and converted."""
        file, entry, data_start, dtype = self._entry(name)
        begin, end = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']} {dtype}")
        if out.numel() != numel:
            raise ValueError(f"{file}: tensor {name!r} has shape {entry['shape']}, expected {out.numel()} elements")
        if out.dtype != dtype:
            stored = torch.empty(entry["shape"], dtype=dtype)
            self.read_into(name, stored)
            out.copy_(stored.view(out.shape))
            return
        with open(file, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            for block in contiguous_blocks(out):
                readinto_exactly(f, tensor_bytes(block), f"{file}: tensor {name!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_OF = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class SafetensorsStreamWriter:
    """Write a planned list of tensors as safetensors shards of at most `max_shard_bytes` each (a larger tensor
    gets a shard of its own), named as transformers expects: one `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`.

    The plan (name, shape, dtype, in writing order) fixes every header up front, so each tensor's bytes go
    straight to its file as it arrives: nothing is buffered, whatever the shard size."""

    def __init__(self, directory: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, single_file: str | None = None, writeback: bool = False):
        """`single_file`: every tensor into that one file and no index (the caller indexes several writers).
        `writeback`: have the disk write the files while they are written (`WritebackPacer`), for output that
        is flushed before it is published; files read soon and deleted (a weight sync's) need not reach it."""
        self.directory = Path(directory)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes and single_file is None:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        if single_file is not None:
            files = [single_file]
        else:
            files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(name, shape, dtype, file) for file, shard in zip(files, shards, strict=True)
                       for name, shape, dtype, _ in shard]
        self._headers = {file: _safetensors_header(shard) for file, shard in zip(files, shards, strict=True)}
        self._last_of = {file: shard[-1][0] for file, shard in zip(files, shards, strict=True)}
        self._next = 0
        self._stream = self._pacer = None
        self._writeback = writeback
        self._kernel_copy = hasattr(os, "copy_file_range")
        if n > 1 and single_file is None:
            index = {"metadata": {"total_size": sum(s[3] for shard in shards for s in shard)},
                     "weight_map": {name: file for name, _, _, file in self._order}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self.files = files

    def _next_file(self, name: str, shape: tuple[int, ...] | None, numel: int, dtype: torch.dtype) -> io.FileIO:
        """The open shard file the planned tensor `name` goes to, after checking it is the next one planned
        (its shape, or only its number of elements where `shape` is None)."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is not in the plan (all {len(self._order)} planned tensors written)")
        want, want_shape, want_dtype, file = self._order[self._next]
        fits = shape == want_shape if shape is not None else numel == math.prod(want_shape)
        if name != want or not fits or dtype != want_dtype:
            got = shape if shape is not None else f"({numel} elements)"
            raise ValueError(f"expected {want} {want_shape} {want_dtype} next, got {name} {got} {dtype}")
        if self._stream is None:
            # Unbuffered: tensors are written in large pieces, and `write_from_files` writes to the descriptor.
            self._stream = open(self.directory / file, "wb", buffering=0)
            self._pacer = WritebackPacer(self._stream.fileno()) if self._writeback else None
            self._write(memoryview(self._headers[file]))
        return self._stream

    def _write(self, data: memoryview) -> None:
        _write_all(self._stream, data)
        self._wrote(len(data))

    def _wrote(self, nbytes: int) -> None:
        if self._pacer is not None:
            self._pacer.wrote(nbytes)

    def _done(self, name: str) -> None:
        self._next += 1
        if name == self._last_of[self._order[self._next - 1][3]]:
            self._stream.close()
            self._stream = self._pacer = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor: `tensor` itself, or a view holding its elements in row-major order
        (`hf_maps.VIEWS`; then only the number of elements is checked against the planned shape)."""
        shape = None if not tensor.is_contiguous() else tuple(tensor.shape)
        self._next_file(name, shape, tensor.numel(), tensor.dtype)
        for block in contiguous_blocks(tensor.detach().cpu()):
            self._write(tensor_bytes(block))
        self._done(name)

    def write_from_files(self, name: str, dtype: torch.dtype, pieces: list[tuple[io.FileIO, int, int]]) -> None:
        """Write the next planned tensor from bytes that are in files already, (file, offset, length) in order:
        copied by the kernel (`os.copy_file_range`), without passing through this process's memory; where the
        kernel cannot copy between the two files (another file system, an old kernel), through a 16 MiB
        buffer."""
        itemsize = dtype.itemsize
        stream = self._next_file(name, None, sum(n for _, _, n in pieces) // itemsize, dtype)
        for src, offset, length in pieces:
            while length > 0:
                copied = self._copy(src, stream, offset, length)
                self._wrote(copied)
                offset, length = offset + copied, length - copied
        self._done(name)

    def _copy(self, src: io.FileIO, dst: io.FileIO, offset: int, length: int) -> int:
        """Copy up to `length` bytes at `offset` of `src` to `dst`'s position; returns how many were copied."""
        if self._kernel_copy:
            try:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), length, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._kernel_copy = False  # refused for these files: read and write from now on
            else:
                if copied == 0:
                    raise ValueError(f"{src.name} ends before byte {offset + length}")
                return copied
        chunk = os.pread(src.fileno(), min(length, 16 << 20), offset)
        if not chunk:
            raise ValueError(f"{src.name} ends before byte {offset + length}")
        _write_all(dst, memoryview(chunk))
        return len(chunk)
    def close(self) -> list[str]:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} planned tensors were written")
        return self.files


def _write_all(stream: io.FileIO, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += stream.write(data[done:])


def _safetensors_header(shard) -> bytes:
    """8-byte little-endian length + JSON header, space-padded so the data starts 8-byte aligned."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, nbytes in shard:
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def hf_weights(path: str | Path, init: str, seed: int) -> Mapping[str, torch.Tensor]:
    """The model's HF-named tensors in the checkpoint layout: the directory's safetensors ('pretrained'), or
    Hugging Face's own random initialisation of the config under `seed` ('random': computed identically on
    every rank and layout)."""
    if init == "pretrained":
        return SafetensorsCheckpoint(path)
    import transformers

    config = load_hf_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    # transformers 5 keeps some tensors in memory in another layout than on disk (a MoE layer's experts fused
    # into one tensor); the name maps speak the checkpoint's layout, which save_pretrained restores this way.
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(model, dict(model.state_dict()))
    return {k: v.detach().float() for k, v in state.items()}


def eos_token_ids(path: str | Path, tokenizer=None) -> tuple[int, ...]:
    """The ids that end a response of the model at `path`: generation_config.json's eos_token_id (an instruct
    model's end-of-turn token, e.g. Qwen2.5's [<|im_end|>, <|endoftext|>]), config.json's, and the tokenizer's
    eos_token_id, in that order without repeats. A lone config.json file has only its own."""
    p = Path(path)
    files = [p / "generation_config.json", p / "config.json"] if p.is_dir() else [p]
    ids: list[int] = []
    for file in files:
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [] if value is None else [value]
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tokenizer_eos, int):
        ids.append(tokenizer_eos)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))
