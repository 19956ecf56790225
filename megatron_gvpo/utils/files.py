"""Files that readers never see half-written."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

WRITEBACK_EVERY = 16 << 20
"""Bytes written to a file between two `start_writeback`s (`WritebackPacer`): measured on 1 GB written in 2 MB
pieces, 16 MiB and 64 MiB hid all but 0.02 and 0.05 s of a 0.45 s flush."""


def fsync_tree(directory: str | Path) -> None:
    """Flush every file and folder under `directory`, and `directory` itself, to the disk (deepest first)."""
    directory = Path(directory)
    for path in [*sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _sync_file_range():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int = 0) -> None:
    """Have the kernel start writing the dirty pages of the open file `fd` from `offset` to its end to the disk,
    without waiting for them (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; a no-op elsewhere, or where the
    file system refuses). Not a flush: neither the file's metadata nor the disk's cache is covered, which is
    what `fsync_tree` is for; it only makes the disk write while the process goes on, instead of all at once
    in that fsync."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, 0, _SYNC_FILE_RANGE_WRITE)  # best effort: a failure leaves the pages to the fsync


class WritebackPacer:
    """Calls `start_writeback` on a file written front to back every `every` bytes, so that the disk writes the
    output while it is being made and the flush before publishing it (`fsync_tree`) finds little left to
    wait for; without, the whole flush came after the last byte (0.45 s of a 1.6 s conversion of a 1 GB
    checkpoint). `flush`: what pushes bytes the writer buffers to the kernel first (a buffered stream's)."""

    def __init__(self, fd: int, every: int | None = None, flush=None):
        self.fd, self.every, self.flush = fd, every or WRITEBACK_EVERY, flush
        self.written = self.started = 0

    def wrote(self, nbytes: int) -> None:
        self.written += nbytes
        if self.written - self.started >= self.every:
            if self.flush is not None:
                self.flush()
            start_writeback(self.fd, self.started)
            self.started = self.written


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a sibling temporary file and a rename: a reader (or a run resumed after
    a kill) finds either the old content or the new, never a prefix of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
