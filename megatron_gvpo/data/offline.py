"""Offline group dataset: a fixed set of prompts, each with several scored responses (JSONL or `datasets`).

GVPO's optimum does not depend on the sampling distribution (gvpo-reference.md, Theorem 3.1), so a fixed
dataset of k scored responses per prompt trains correctly with no importance weights: this is a first-class
mode, not an approximation. This module reads such a file into `Group`s (data/groups.py, which also orders
them, `GroupSampler`, and batches them for the trainer, `collate`).

JSONL schema (one JSON object per line, one line per prompt; blank lines are ignored; line numbers in error
messages count every physical line from 1). A row takes exactly one of two forms:

    text form:  {"prompt": str | [message, ...], "responses": [{"text": str, "reward": number}, ...], "id": scalar?}
    ids form:   {"prompt_ids": [int, ...], "responses": [{"ids": [int, ...], "reward": number}, ...], "id": scalar?}

- "id" is optional, any JSON scalar (string, number, true/false, null); it is only quoted in error messages.
- No other keys are allowed, in the row or in a response. A row may not mix the forms: "prompt" with
  "prompt_ids", or a response with "ids" in a text row (or "text" in an ids row), is an error.
- Text rows are tokenized with the tokenizer passed to `load_groups` (required for them): the prompt with
  `OfflineDataConfig.prompt_add_special_tokens` (e.g. a BOS), each response without special tokens and, when
  `append_eos`, followed by the tokenizer's end-of-sequence id. Ids rows are taken verbatim (no EOS appended:
  include it in "ids" if the model should learn to stop).
- "prompt" must be non-empty: the first response token is predicted from the last prompt token, so a row
  with no prompt token would leave it unscored. Every response must be non-empty ("text": "" or "ids": []).
- "reward" must be a finite JSON number (not a string, not true/false, not NaN/Infinity).
- Token ids must be non-negative integers (3.0 and true are rejected), below `vocab_size` when one is given;
  for text rows the tokenizer's ids are checked against `vocab_size` too.
- Lengths in tokens: prompt <= max_prompt_tokens, each response (including an appended EOS) <=
  max_response_tokens. Over-long rows are bad rows, never truncated: a truncated response no longer matches
  its reward.
- A row needs at least `min_responses` responses (>= 2: a group of one has no variance and carries no
  signal); with `max_responses` set, only the first `max_responses` are kept (any subset is an unbiased
  sample for GVPO; a fixed group size is what the trainer's batch layout expects).
- Rows whose rewards are all equal are KEPT: GVPO gives them zero weight only when their log-ratios are
  equal too, and the trainer reports them; they are counted in `DataStats.equal_reward_groups`.

A bad row raises ValueError("<path>:<line> (id=...): <field>: <what is wrong>") with on_bad_row="error"; with
"skip" it is counted under its reason in `DataStats.skipped` (the reasons are `SKIP_REASONS`) and the first
message per reason is kept in `DataStats.first_error`. Errors that no row can fix (missing file, a text row
with no tokenizer, no usable row at all) always raise.

The same rows can come from a Hugging Face `datasets` source instead of JSONL: a `Dataset.save_to_disk`
directory or a .parquet file, one row per prompt with the same keys (a null value counts as an absent key,
since Arrow gives every row every column); errors then name `<path>[<row index>]`.

A prompt given as a list of {"role", "content"} messages is rendered with the tokenizer's chat template and
the `prompts.*` template options, exactly as online prompts are (data/chat.py; so is a text prompt under
`prompts.chat_template`); responses are the assistant's text that follows.

`data.path` may also be a glob or a list of sources, and JSON or arrow files (data/records.py).

Simplification: the whole file is loaded into memory (the offline mode targets datasets of up to a few
million responses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_gvpo.data.chat import PromptEncoder
from megatron_gvpo.data.groups import Group
from megatron_gvpo.data.records import BadRecord, RowError, read_records
from megatron_gvpo.data.tokenizer import TokenizerAdapter, adapt_tokenizer

SKIP_REASONS = (
    "not_json",  # the line does not parse as JSON
    "bad_schema",  # not an object, missing/unknown keys, wrong types
    "mixed_forms",  # text and token-id fields in one row
    "too_few_responses",  # fewer than min_responses (including none)
    "empty_prompt",  # a prompt with no tokens
    "empty_response",  # a response with no tokens
    "prompt_too_long",  # over max_prompt_tokens
    "response_too_long",  # over max_response_tokens
    "bad_reward",  # missing, non-numeric or non-finite reward
    "bad_token_id",  # not a non-negative int, or >= vocab_size
)


@dataclass
class OfflineDataConfig:
    path: str | list[str] = ""
    """Prompts with scored responses (schema in the module docstring of data/offline.py): a JSONL file, or a
    Hugging Face `datasets` source (a `Dataset.save_to_disk` directory, .parquet, .arrow), a glob, or a list of
    them. Required."""
    max_prompt_tokens: int = 512
    """Longest prompt in tokens; longer rows are bad rows (never truncated)."""
    max_response_tokens: int = 512
    """Longest response in tokens, an appended EOS included; longer rows are bad rows (never truncated)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """'error' raises on the first bad row (path:line and field); 'skip' drops it and counts it by reason."""
    min_responses: int = 2
    """Rows with fewer responses are bad rows; >= 2 because a group of one carries no signal."""
    max_responses: int | None = None
    """Keep only the first this-many responses of a row; None keeps all. Set min_responses = max_responses =
    algo.group_size for the fixed-size groups the trainer's batch layout expects."""
    append_eos: bool = True
    """Append the tokenizer's end-of-sequence id to text responses, so the policy learns to stop."""
    eos_token: str | None = None
    """Token appended when append_eos; None uses the tokenizer's eos_token (required for a raw
    `tokenizers.Tokenizer`, which has no notion of EOS)."""
    prompt_add_special_tokens: bool = True
    """Tokenize text prompts with the tokenizer's special tokens (e.g. a leading BOS); responses never get them."""
    shuffle: bool = True
    """Reshuffle the groups every epoch (seeded with run.seed + epoch); False keeps file order."""

    def validate(self) -> None:
        # An empty path is allowed here so the section has defaults; load_groups rejects it.
        for name in ("max_prompt_tokens", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be one of ['error', 'skip'], got {self.on_bad_row!r}")
        if self.min_responses < 2:
            raise ValueError(
                f"data.min_responses must be >= 2 (a group of one response carries no signal), got {self.min_responses}"
            )
        if self.max_responses is not None and self.max_responses < self.min_responses:
            raise ValueError(
                f"data.max_responses={self.max_responses} must be >= data.min_responses={self.min_responses}"
            )

    def max_seq_len(self) -> int:
        """The longest prompt + response a kept row can have: a fixed `collate` seq_len that always fits."""
        return self.max_prompt_tokens + self.max_response_tokens


@dataclass
class DataStats:
    """What `load_groups` did with the file."""

    rows_read: int = 0
    """Non-blank lines read."""
    rows_kept: int = 0
    """Rows turned into groups."""
    responses_kept: int = 0
    """Responses in the kept groups (after max_responses)."""
    equal_reward_groups: int = 0
    """Kept groups whose rewards are all equal (no reward signal; kept, GVPO weighs them by log-ratio only)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows per reason (keys from SKIP_REASONS); empty with on_bad_row='error'."""
    first_error: dict[str, str] = field(default_factory=dict)
    """The first error message per skip reason, to show the user what went wrong."""

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        skipped = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.rows_kept}/{self.rows_read} rows kept ({self.responses_kept} responses, "
            f"{self.equal_reward_groups} with all-equal rewards); skipped: {skipped}"
        )


# ---------------------------------------------------------------------------------------------------------
# Row parsing
# ---------------------------------------------------------------------------------------------------------


class _BadRow(Exception):
    """A row-level problem; `load_groups` adds path:line and applies on_bad_row."""

    def __init__(self, reason: str, field_name: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{field_name}: {message}")
        self.reason = reason


_TEXT_ROW_KEYS = {"prompt", "responses", "id"}
_IDS_ROW_KEYS = {"prompt_ids", "responses", "id"}


def _check_ids(value: Any, field_name: str, vocab_size: int | None) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _BadRow("bad_schema", field_name, f"must be a list of token ids, got {type(value).__name__}")
    for i, t in enumerate(value):
        # bool is an int subclass in Python and 3.0 is a float in JSON: neither is a token id.
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise _BadRow("bad_token_id", f"{field_name}[{i}]", f"token ids must be non-negative integers, got {t!r}")
        if vocab_size is not None and t >= vocab_size:
            raise _BadRow("bad_token_id", f"{field_name}[{i}]", f"token id {t} >= vocab_size {vocab_size}")
    return tuple(value)


def _check_reward(response: dict, field_name: str) -> float:
    if "reward" not in response:
        raise _BadRow("bad_reward", field_name, "missing")
    r = response["reward"]
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise _BadRow("bad_reward", field_name, f"must be a number, got {r!r}")
    if not math.isfinite(r):
        # Python's json accepts NaN/Infinity literals; a non-finite reward would poison the whole group.
        raise _BadRow("bad_reward", field_name, f"must be finite, got {r!r}")
    return float(r)


def _check_tokenized(ids: list[int], field_name: str, vocab_size: int | None) -> tuple[int, ...]:
    """Tokenizer output checked against the model's vocabulary (the tokenizer may be larger than the model)."""
    if vocab_size is not None:
        for i, t in enumerate(ids):
            if t >= vocab_size:
                raise _BadRow(
                    "bad_token_id", field_name, f"tokenizes to id {t} (token {i}) >= vocab_size {vocab_size}"
                )
    return tuple(ids)


def _parse_row(
    row: Any, cfg: OfflineDataConfig, tokenizer: TokenizerAdapter | None, vocab_size: int | None, where: str,
    prompt_encoder: PromptEncoder | None = None,
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[float, ...]]:
    """(prompt_ids, response_ids, rewards) of one decoded JSON row, or _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow("bad_schema", "row", f"must be a JSON object, got {type(row).__name__}")
    if "id" in row and isinstance(row["id"], (dict, list)):
        raise _BadRow("bad_schema", "id", f"must be a JSON scalar, got {type(row['id']).__name__}")
    if "prompt" in row and "prompt_ids" in row:
        raise _BadRow("mixed_forms", "prompt_ids", "a row has either 'prompt' (text) or 'prompt_ids', not both")
    if "prompt" not in row and "prompt_ids" not in row:
        raise _BadRow("bad_schema", "prompt", "missing (a row needs 'prompt' or 'prompt_ids')")
    text_form = "prompt" in row
    if text_form and tokenizer is None:
        # Not a bad row: every text row would fail, so skipping cannot help.
        raise ValueError(f"{where}: text row ('prompt') needs a tokenizer; pass one to load_groups")
    allowed = _TEXT_ROW_KEYS if text_form else _IDS_ROW_KEYS
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise _BadRow("bad_schema", unknown[0], f"unknown key; valid keys: {sorted(allowed)}")
    if "responses" not in row:
        raise _BadRow("bad_schema", "responses", "missing")
    responses = row["responses"]
    if not isinstance(responses, list):
        raise _BadRow("bad_schema", "responses", f"must be a list, got {type(responses).__name__}")
    if len(responses) < cfg.min_responses:
        raise _BadRow(
            "too_few_responses",
            "responses",
            f"{len(responses)} response(s), need at least min_responses={cfg.min_responses}",
        )

    if text_form:
        assert tokenizer is not None
        prompt = row["prompt"]
        chat = isinstance(prompt, list) or (prompt_encoder is not None and prompt_encoder.cfg.chat_template)
        if not isinstance(prompt, (str, list)):
            raise _BadRow("bad_schema", "prompt",
                          f"must be a string or a list of messages, got {type(prompt).__name__}")
        if prompt in ("", []):
            raise _BadRow("empty_prompt", "prompt", "empty (the first response token would have nothing to follow)")
        if chat and prompt_encoder is None:
            raise ValueError(f"{where}: a prompt given as messages needs the chat template: pass a PromptEncoder")
        if chat:
            try:
                encode = prompt_encoder.messages if isinstance(prompt, list) else prompt_encoder.text
                prompt_ids = encode(prompt, "prompt")[0]
            except RowError as e:
                raise _BadRow("bad_schema", *str(e).split(": ", 1)) from None
        else:
            ids = tokenizer.encode(prompt, cfg.prompt_add_special_tokens)
            prompt_ids = _check_tokenized(ids, "prompt", vocab_size)
    else:
        prompt_ids = _check_ids(row["prompt_ids"], "prompt_ids", vocab_size)
    if not prompt_ids:
        name = "prompt" if text_form else "prompt_ids"
        raise _BadRow("empty_prompt", name, "no tokens (the first response token would have nothing to follow)")
    if len(prompt_ids) > cfg.max_prompt_tokens:
        name = "prompt" if text_form else "prompt_ids"
        raise _BadRow(
            "prompt_too_long", name, f"{len(prompt_ids)} tokens > max_prompt_tokens={cfg.max_prompt_tokens}"
        )

    content_key, other_key = ("text", "ids") if text_form else ("ids", "text")
    response_ids, rewards = [], []
    for i, resp in enumerate(responses):
        name = f"responses[{i}]"
        if not isinstance(resp, dict):
            raise _BadRow("bad_schema", name, f"must be an object, got {type(resp).__name__}")
        if other_key in resp:
            form = "a text" if text_form else "an ids"
            raise _BadRow("mixed_forms", f"{name}.{other_key}", f"not allowed in {form}-form row")
        unknown = sorted(set(resp) - {content_key, "reward"})
        if unknown:
            raise _BadRow("bad_schema", f"{name}.{unknown[0]}", f"unknown key; valid keys: [{content_key!r}, 'reward']")
        if content_key not in resp:
            raise _BadRow("bad_schema", f"{name}.{content_key}", "missing")
        if text_form:
            text = resp["text"]
            if not isinstance(text, str):
                raise _BadRow("bad_schema", f"{name}.text", f"must be a string, got {type(text).__name__}")
            # Checked on the text, before the EOS: an empty completion in a dataset is almost always a bug.
            ids = list(tokenizer.encode(text, False)) if text else []
            if not ids:
                raise _BadRow("empty_response", f"{name}.text", "empty")
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            ids = _check_tokenized(ids, f"{name}.text", vocab_size)
        else:
            ids = _check_ids(resp["ids"], f"{name}.ids", vocab_size)
            if not ids:
                raise _BadRow("empty_response", f"{name}.ids", "empty")
        if len(ids) > cfg.max_response_tokens:
            raise _BadRow(
                "response_too_long",
                f"{name}.{content_key}",
                f"{len(ids)} tokens > max_response_tokens={cfg.max_response_tokens}",
            )
        rewards.append(_check_reward(resp, f"{name}.reward"))
        response_ids.append(ids)
    if cfg.max_responses is not None:
        # The whole row is validated first, so a bad response past the cut is still reported.
        response_ids, rewards = response_ids[: cfg.max_responses], rewards[: cfg.max_responses]
    return prompt_ids, tuple(response_ids), tuple(rewards)


def load_groups(
    cfg: OfflineDataConfig, tokenizer: Any = None, vocab_size: int | None = None,
    prompt_encoder: PromptEncoder | None = None,
) -> tuple[list[Group], DataStats]:
    """Read `cfg.path` into groups in file order (schema and error policy in the module docstring).

    tokenizer: a transformers tokenizer or a `tokenizers.Tokenizer`; required only when the file has text rows.
    vocab_size: the model's vocabulary size; token ids at or above it are bad rows. None skips that check.
    prompt_encoder: renders prompts given as messages (and text prompts under prompts.chat_template) with the
    chat template, as online prompts are (data/chat.py); None: such rows fail.
    """
    cfg.validate()
    adapter = (adapt_tokenizer(tokenizer, vocab_size, append_eos=cfg.append_eos, eos_token=cfg.eos_token)
               if tokenizer is not None else None)

    groups: list[Group] = []
    stats = DataStats()
    for where, row in read_records(cfg.path, "data.path"):
        stats.rows_read += 1
        try:
            if isinstance(row, BadRecord):
                raise _BadRow("not_json", "row", row.message)
            prompt_ids, response_ids, rewards = _parse_row(row, cfg, adapter, vocab_size, where, prompt_encoder)
        except _BadRow as bad:
            row_id = f" (id={row['id']!r})" if isinstance(row, dict) and "id" in row else ""
            message = f"{where}{row_id}: {bad}"
            if cfg.on_bad_row == "error":
                raise ValueError(message) from None
            stats.skipped[bad.reason] = stats.skipped.get(bad.reason, 0) + 1
            stats.first_error.setdefault(bad.reason, message)
            continue
        groups.append(Group(prompt_ids, response_ids, rewards, where))
        stats.rows_kept += 1
        stats.responses_kept += len(response_ids)
        if len(set(rewards)) == 1:
            stats.equal_reward_groups += 1
    if not groups:
        detail = "; ".join(stats.first_error.values()) or "the file has no rows"
        raise ValueError(f"{cfg.path}: no usable rows ({stats.summary()}): {detail}")
    return groups, stats
