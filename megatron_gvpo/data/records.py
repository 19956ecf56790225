"""Rows from the files users bring, with a name for each row that error messages can quote.

    for where, row in read_records(["data/train-*.parquet", "extra.jsonl"], field="prompts.path"):
        ...   # where: "data/train-00000.parquet[17]" or "extra.jsonl:4"; row: a dict (or a `BadRecord`)

One reader for the prompt files of online training (data/prompts.py) and the offline group data
(data/offline.py). A path is a file, a directory or a glob pattern; a list of them is read in order, each
pattern's matches sorted. By what the path is:

    *.jsonl, other text files   JSON Lines, read here: `where` is path:line (every physical line counts from 1;
                                blank lines are skipped; a line that is not JSON yields a `BadRecord`)
    *.json                      a JSON array of objects (or JSON Lines, as `datasets` accepts both)
    *.parquet, *.arrow, *.csv   through Hugging Face `datasets`: `where` is path[row index]
    a directory                 a `Dataset.save_to_disk` directory (one split), or a directory of parquet
                                files (a downloaded verl / HF dataset split), read file by file

Arrow-backed sources give every row every column: a null there means the key is absent in that row
(`drop_nulls`), so an optional key reads the same from JSONL and parquet.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class RowError(ValueError):
    """A problem with one row ("<field>: <what is wrong>"); the caller adds where the row is and applies its
    bad-row policy (raise, or count and skip). Any other error stops the load: no row can fix it."""


@dataclass(frozen=True)
class BadRecord:
    """A row that could not even be decoded (a JSONL line that is not JSON); callers apply their bad-row policy."""

    message: str


def expand_paths(spec: str | Path | list[str | Path], field: str) -> list[Path]:
    """The files and directories a path setting names, in order: globs expanded (sorted), each must exist."""
    entries = [str(e) for e in ([spec] if isinstance(spec, (str, Path)) else spec)]
    if not entries or not all(entries):
        raise ValueError(f"{field} must name a file, a directory or a glob pattern, got {spec!r}")
    paths: list[Path] = []
    for entry in entries:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise ValueError(f"{field}: the pattern {entry!r} matches no file")
            paths += [Path(m) for m in matches]
        elif Path(entry).exists():
            paths.append(Path(entry))
        else:
            raise ValueError(f"{field}: {entry!r} does not exist")
    return paths


def read_records(spec: str | Path | list[str | Path], field: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of every source `spec` names (module docstring)."""
    for path in expand_paths(spec, field):
        if path.is_dir():
            yield from _directory_records(path, field)
        elif path.suffix in _DATASETS_SUFFIXES:
            yield from _datasets_records(path, field)
        elif path.suffix == ".json":
            yield from _json_records(path, field)
        else:
            yield from _jsonl_records(path, field)


def drop_nulls(value: Any) -> Any:
    """Arrow tables have a column for every key any row has; a null there means the key is absent."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _read_text(path: Path, field: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {field} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{field} {path} is not UTF-8 text: {e}") from e


def _jsonl_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(_read_text(path, field).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            row = BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")
        yield f"{path}:{lineno}", row


def _json_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path, field)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        yield from _jsonl_records(path, field)  # JSON Lines under a .json name, as `datasets` reads it
        return
    if not isinstance(rows, list):
        raise ValueError(f"{field} {path}: a .json file must hold an array of rows (or JSON Lines), "
                         f"got a {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ValueError("reading parquet, arrow, csv and datasets directories needs the `datasets` package; "
                         "install the pinned requirements (requirements/cpu.txt) or convert the file to JSONL") from e
    datasets.disable_progress_bars()  # one bar per file read is noise in a training log
    return datasets


def _datasets_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    datasets = _datasets()
    try:
        if path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.load_dataset(_DATASETS_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - arrow/parquet readers raise many types; name the file either way
        raise ValueError(f"cannot read {field} {path}: {type(e).__name__}: {e}") from e
    yield from _table_rows(path, ds)


def _table_rows(path: Path, ds) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(ds):
        yield f"{path}[{index}]", drop_nulls(row)


def _directory_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        datasets = _datasets()
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{field} {path} holds splits {list(ds)}; point it at one split's directory "
                             f"(e.g. {path / next(iter(ds))})")
        yield from _table_rows(path, ds)
        return
    files = sorted(p for p in path.iterdir() if p.suffix == ".parquet")
    if not files:
        raise ValueError(f"{field} {path} is a directory with neither a `datasets` save_to_disk layout "
                         "(state.json) nor .parquet files")
    for file in files:
        yield from _datasets_records(file, field)
