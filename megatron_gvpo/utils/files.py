"""Files that readers never see half-written."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a sibling temporary file and a rename: a reader (or a run resumed after
    a kill) finds either the old content or the new, never a prefix of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
