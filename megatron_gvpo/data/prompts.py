"""Prompt datasets for online training: the prompts SGLang samples groups for, with the labels rewards check.

JSONL schema (one JSON object per line; blank lines ignored; line numbers count every physical line from 1):

    {"prompt": str, "label": any?, "id": scalar?}        text prompt, tokenized with the model's tokenizer
    {"prompt_ids": [int, ...], "label": any?, "id": scalar?}

"label" is what the reward compares against (a GSM8K solution, a boxed answer, a number); it is optional for
rewards that need none (the addition task's reward reads the prompt). No other keys are allowed. A prompt must
be non-empty and at most `max_prompt_tokens` long (never truncated: a cut prompt asks another question).
A bad row raises ValueError("<path>:<line> (id=...): <field>: <what is wrong>") with on_bad_row="error", or is
counted and skipped with "skip" (`PromptStats`).

The order of prompts over training comes from `offline.GroupSampler` (deterministic in (seed, epoch),
resumable), the same sampler the offline groups use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_gvpo.data.offline import OfflineDataConfig, _adapt_tokenizer


@dataclass
class PromptDataConfig:
    path: str = ""
    """JSONL file of training prompts (schema in data/prompts.py). Required for online training."""
    eval_path: str = ""
    """JSONL file of held-out prompts for evaluation (same schema); empty: no evaluation."""
    eval_size: int = 0
    """Evaluate on the first this-many held-out prompts; 0: all of them."""
    max_prompt_tokens: int = 64
    """Longest prompt in tokens; longer rows are bad rows."""
    on_bad_row: Literal["error", "skip"] = "error"
    """'error' raises on the first bad row (path:line and field); 'skip' drops it and counts it."""
    prompt_add_special_tokens: bool = True
    """Tokenize text prompts with the tokenizer's special tokens (e.g. a leading BOS)."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (seeded with run.seed + epoch); False keeps file order."""

    def validate(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"prompts.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.eval_size < 0:
            raise ValueError(f"prompts.eval_size must be >= 0, got {self.eval_size}")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    text: str
    """The prompt as given, or decoded from its ids (what the reward function sees)."""
    label: Any
    source: str
    """Where the row came from, "path:line"."""


@dataclass
class PromptStats:
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    first_error: str = ""

    def summary(self) -> str:
        text = f"{self.kept} prompts kept of {self.rows} rows"
        return text + (f", {self.skipped} skipped (first: {self.first_error})" if self.skipped else "")


def _parse(obj: Any, encode, decode, cfg: PromptDataConfig, vocab_size: int | None) -> tuple[tuple[int, ...], str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"row: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"prompt", "prompt_ids", "label", "id"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: prompt | prompt_ids, label, id)")
    if ("prompt" in obj) == ("prompt_ids" in obj):
        raise ValueError("prompt: a row needs exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"prompt: expected a string, got {type(text).__name__}")
        ids = tuple(encode(text))
    else:
        raw = obj["prompt_ids"]
        if not isinstance(raw, list) or not all(type(t) is int and t >= 0 for t in raw):
            raise ValueError("prompt_ids: expected a list of non-negative integers")
        ids = tuple(raw)
        text = decode(ids)
    if not ids:
        raise ValueError("prompt: empty (the first response token is predicted from the last prompt token)")
    if len(ids) > cfg.max_prompt_tokens:
        raise ValueError(f"prompt: {len(ids)} tokens > prompts.max_prompt_tokens={cfg.max_prompt_tokens}")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(f"prompt_ids: token id {max(ids)} >= the model's vocab_size {vocab_size}")
    return ids, text, obj.get("label")


def load_prompts(path: str | Path, cfg: PromptDataConfig, tokenizer: Any,
                 vocab_size: int | None = None) -> tuple[list[Prompt], PromptStats]:
    """The file's prompts (module docstring), tokenized; bad rows raise or are skipped per cfg.on_bad_row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    tok = _adapt_tokenizer(tokenizer, OfflineDataConfig(append_eos=False), vocab_size)

    def encode(text: str) -> list[int]:
        return tok.encode(text, cfg.prompt_add_special_tokens)

    def decode(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    prompts, stats = [], PromptStats()
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        stats.rows += 1
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
            where += f" (id={obj['id']!r})" if isinstance(obj, dict) and "id" in obj else ""
            ids, text, label = _parse(obj, encode, decode, cfg, vocab_size)
        except (json.JSONDecodeError, ValueError) as e:
            message = f"{where}: {e}" if not isinstance(e, json.JSONDecodeError) else f"{where}: not JSON ({e})"
            if cfg.on_bad_row == "error":
                raise ValueError(message) from None
            stats.skipped += 1
            stats.first_error = stats.first_error or message
            continue
        prompts.append(Prompt(ids=ids, text=text, label=label, source=where))
    stats.kept = len(prompts)
    if not prompts:
        raise ValueError(f"{path}: no usable prompt ({stats.summary()})")
    return prompts, stats
