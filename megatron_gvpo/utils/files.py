"""Files that readers never see half-written."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(directory: str | Path) -> None:
    """Flush every file and folder under `directory`, and `directory` itself, to the disk (deepest first)."""
    directory = Path(directory)
    for path in [*sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a sibling temporary file and a rename: a reader (or a run resumed after
    a kill) finds either the old content or the new, never a prefix of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
