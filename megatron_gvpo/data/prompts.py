"""Prompt datasets for online training: the prompts SGLang samples groups for, with the labels rewards check.

`prompts.path` names JSONL, JSON, parquet, arrow or csv files, `datasets` directories, globs or a list of them
(data/records.py). Three row formats are read with no configuration, the first key found deciding:

    {"prompt_ids": [int, ...], "label": any?}            token ids, taken as they are
    {"prompt": str | [message, ...], "label": any?}      this project's JSONL, or verl's RL parquet:
        {"data_source": str, "prompt": [{"role": "user", "content": str}, ...], "ability": str,
         "reward_model": {"style": "rule", "ground_truth": str}, "extra_info": {...}}
    {"messages": [message, ...]}                         the chat format (NeMo-RL, OpenAI fine-tuning files)

A message is {"role": str, "content": str}. A prompt given as messages is rendered with the tokenizer's chat
template and a generation prompt; a text prompt is rendered as one user message when `prompts.chat_template`
is on, and tokenized as it is otherwise (data/chat.py). A conversation that ends with an assistant message
(chat data with reference answers) is prompted up to that message, and the message's content is the label
unless the row has one.

Other layouts take a field mapping: `prompts.prompt_key`, `label_key` and `data_source_key` name a row's keys,
with dots reaching into nested objects (`reward_model.ground_truth`, the default label key after `label`).
Keys nobody asked for (verl's `ability`, `extra_info`) are ignored. The data source (verl's `data_source`,
default key) chooses the reward per row (`reward.by_source`, rewards/scoring.py); rows without one get ''.

A prompt must be non-empty and at most `max_prompt_tokens` long (never truncated: a cut prompt asks another
question), and rows whose reward needs a label must have one. A bad row raises
ValueError("<path>:<line> (id=...): <field>: <what is wrong>") (path[index] for datasets sources) with
on_bad_row="error", or is counted and skipped with "skip" (`PromptStats`).

The order of prompts over training comes from `offline.GroupSampler` (deterministic in (seed, epoch),
resumable), the same sampler the offline groups use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_gvpo.data.chat import PromptEncoder
from megatron_gvpo.data.records import BadRecord, RowError, read_records

_MISSING = object()
LABEL_KEYS = ("label", "reward_model.ground_truth")
"""Where a label is looked for when prompts.label_key is empty: this project's JSONL, then verl's parquet."""


@dataclass
class PromptDataConfig:
    path: str | list[str] = ""
    """Training prompts (formats in data/prompts.py): a file, a `datasets` directory, a glob, or a list of them.
    Required for online training."""
    eval_path: str | list[str] = ""
    """Held-out prompts for evaluation, same formats; empty: no evaluation."""
    eval_size: int = 0
    """Evaluate on the first this-many held-out prompts; 0: all of them."""
    max_prompt_tokens: int = 64
    """Longest prompt in tokens (chat template included); longer rows are bad rows."""
    on_bad_row: Literal["error", "skip"] = "error"
    """'error' raises on the first bad row (path:line and field); 'skip' drops it and counts it."""
    prompt_key: str = ""
    """The key holding a row's prompt (text or messages; dots reach into nested objects); empty: the first of
    'prompt_ids', 'prompt', 'messages' the row has."""
    label_key: str = ""
    """The key holding what the reward checks (dots allowed, e.g. 'reward_model.ground_truth'); empty: 'label',
    else 'reward_model.ground_truth', else a final assistant message."""
    data_source_key: str = "data_source"
    """The key naming a row's data source, which can choose its reward (reward.by_source); absent: ''."""
    chat_template: bool = False
    """Render text prompts as a user message with the chat template. Prompts given as messages always are."""
    system_prompt: str = ""
    """A system message put before every conversation that has none; empty: none (the template may add its
    own default, as SmolLM2's and Qwen2.5's do)."""
    chat_template_path: str = ""
    """A jinja file used instead of the tokenizer's chat template; empty: the tokenizer's own."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables passed to the chat template, e.g. {enable_thinking: false} for Qwen3."""
    prompt_add_special_tokens: bool = True
    """Tokenize text prompts that are not chat-rendered with the tokenizer's special tokens (e.g. a leading BOS)."""
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
    """The prompt as the model sees it (chat template applied), or decoded from its ids: what rewards see."""
    label: Any
    source: str
    """Where the row came from, "path:line" or "path[index]"."""
    data_source: str = ""
    """The row's data source (prompts.data_source_key), '' when it has none."""


@dataclass
class PromptStats:
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    first_error: str = ""

    def summary(self) -> str:
        text = f"{self.kept} prompts kept of {self.rows} rows"
        return text + (f", {self.skipped} skipped (first: {self.first_error})" if self.skipped else "")


def lookup(row: dict, key: str, default: Any = _MISSING) -> Any:
    """row[key], with dots reaching into nested objects ('reward_model.ground_truth')."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _prompt_field(row: dict, cfg: PromptDataConfig) -> str:
    if cfg.prompt_key:
        if lookup(row, cfg.prompt_key) is _MISSING:
            raise RowError(f"{cfg.prompt_key}: missing (prompts.prompt_key); the row has keys {sorted(row)}")
        return cfg.prompt_key
    present = [k for k in ("prompt_ids", "prompt", "messages") if k in row]
    if not present:
        raise RowError(f"prompt: missing; a row needs 'prompt', 'prompt_ids' or 'messages' (or set "
                       f"prompts.prompt_key), this one has keys {sorted(row)}")
    if present[:2] == ["prompt_ids", "prompt"]:
        raise RowError("prompt: a row has either 'prompt' (text or messages) or 'prompt_ids', not both")
    return present[0]


def _parse(row: Any, encoder: PromptEncoder, cfg: PromptDataConfig, decode: Callable) -> Prompt:
    """The Prompt of one decoded row (its `source` filled in by the caller), or RowError."""
    if isinstance(row, BadRecord):
        raise RowError(f"row: {row.message}")
    if not isinstance(row, dict):
        raise RowError(f"row: expected an object, got {type(row).__name__}")
    key = _prompt_field(row, cfg)
    value = lookup(row, key)
    label = lookup(row, cfg.label_key, None) if cfg.label_key else next(
        (v for k in LABEL_KEYS if (v := lookup(row, k, None)) is not None), None)
    if key == "prompt_ids":
        if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
            raise RowError("prompt_ids: expected a list of non-negative integers")
        if not value:
            raise RowError("prompt_ids: empty (the first response token is predicted from the last prompt token)")
        if encoder.vocab_size is not None and max(value) >= encoder.vocab_size:
            raise RowError(f"prompt_ids: token id {max(value)} >= the model's vocab_size {encoder.vocab_size}")
        ids, text = tuple(value), decode(value)
    elif isinstance(value, list):
        if value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            # Chat data with its reference answer: prompt up to the answer, which is the label unless given.
            if label is None and not cfg.label_key:
                label = value[-1].get("content")
            value = value[:-1]
        ids, text = encoder.messages(value, key)
    else:
        ids, text = encoder.text(value, key)
    if len(ids) > cfg.max_prompt_tokens:
        raise RowError(f"{key}: {len(ids)} tokens > prompts.max_prompt_tokens={cfg.max_prompt_tokens}")
    data_source = lookup(row, cfg.data_source_key, "") if cfg.data_source_key else ""
    return Prompt(ids=ids, text=text, label=label, source="", data_source=str(data_source))


def load_prompts(path: str | list[str], cfg: PromptDataConfig, tokenizer: Any, vocab_size: int | None = None,
                 needs_label: Callable[[str], bool] | None = None,
                 field_name: str = "prompts.path") -> tuple[list[Prompt], PromptStats]:
    """The prompts `path` holds (module docstring), tokenized; bad rows raise or are skipped per cfg.on_bad_row.

    needs_label(data_source) says whether that row's reward needs a label (rewards.scoring.RewardConfig's
    `needs_label`); a row without one is then a bad row. None: labels are optional."""
    encoder = PromptEncoder(tokenizer, cfg, vocab_size)

    def decode(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    prompts, stats = [], PromptStats()
    for where, row in read_records(path, field_name):
        stats.rows += 1
        if isinstance(row, dict) and "id" in row and not isinstance(row["id"], (dict, list)):
            where += f" (id={row['id']!r})"
        try:
            prompt = _parse(row, encoder, cfg, decode)
            if prompt.label is None and needs_label is not None and needs_label(prompt.data_source):
                source = f" (data source {prompt.data_source!r})" if prompt.data_source else ""
                raise RowError(f"{cfg.label_key or 'label'}: missing, and this row's reward{source} needs one")
        except RowError as e:
            message = f"{where}: {e}"
            if cfg.on_bad_row == "error":
                raise ValueError(message) from None
            stats.skipped += 1
            stats.first_error = stats.first_error or message
            continue
        prompts.append(dataclasses.replace(prompt, source=where))
    stats.kept = len(prompts)
    if not prompts:
        raise ValueError(f"{field_name} {path}: no usable prompt ({stats.summary()})")
    return prompts, stats
