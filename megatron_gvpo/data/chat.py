"""Prompts as an instruct model was trained to see them: rendered by the tokenizer's own chat template.

    encoder = PromptEncoder(tokenizer, cfg.prompts, vocab_size)
    ids, text = encoder.messages([{"role": "user", "content": "What is 6 * 7?"}], field="prompt")
    ids, text = encoder.text("What is 6 * 7?", field="prompt")   # a user message when prompts.chat_template

A conversation (a list of {"role", "content"} messages) is rendered with
`tokenizer.apply_chat_template(messages, add_generation_prompt=True, **prompts.chat_template_kwargs)` and the
rendered text is tokenized without adding special tokens (the template wrote them), which is exactly what
`apply_chat_template(tokenize=True)` returns. The trainer tokenizes once and sends these ids to SGLang, so the
policy that samples and the policy that trains see the same tokens whatever either side's template handling.

Options (the `prompts` section, data/prompts.py): `system_prompt` puts a system message before a conversation
that has none; `chat_template_path` replaces the tokenizer's template with a jinja file; `chat_template_kwargs`
are passed to the template (e.g. Qwen3's `enable_thinking: false`); `chat_template` renders plain-text prompts
as one user message. A plain-text prompt without `chat_template` is tokenized as it is, with the tokenizer's
special tokens when `prompt_add_special_tokens` (the format of base models and of this project's toy task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_gvpo.data.records import RowError
from megatron_gvpo.data.tokenizer import adapt_tokenizer


class PromptEncoder:
    """Token ids (and the text they spell) of prompts given as text or as messages; see the module docstring.

    cfg: the `prompts` section (PromptDataConfig) or anything with its chat fields. Malformed messages raise
    `RowError` naming the field; a missing template raises ValueError (no row can fix it)."""

    def __init__(self, tokenizer: Any, cfg: Any, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.vocab_size = vocab_size
        # Either kind of tokenizer behind one encode(); refuses a tokenizer with ids the model has no row for.
        self._adapted = adapt_tokenizer(tokenizer, vocab_size)
        self.template: str | None = getattr(tokenizer, "chat_template", None)
        if cfg.chat_template_path:
            path = Path(cfg.chat_template_path)
            if not path.is_file():
                raise ValueError(f"prompts.chat_template_path {str(path)!r} does not exist")
            self.template = path.read_text(encoding="utf-8")

    # ------------------------------------------------------------------------------------------------
    def text(self, text: str, field: str) -> tuple[tuple[int, ...], str]:
        """A plain-text prompt: one user message under `chat_template`, else the text as it is."""
        if not isinstance(text, str):
            raise RowError(f"{field}: expected a string or a list of messages, got {type(text).__name__}")
        if not text:
            raise RowError(f"{field}: empty (the first response token is predicted from the last prompt token)")
        if self.cfg.chat_template:
            return self.messages([{"role": "user", "content": text}], field)
        return self._encode(text, self.cfg.prompt_add_special_tokens, field), text

    def messages(self, messages: Any, field: str) -> tuple[tuple[int, ...], str]:
        """A conversation rendered with the chat template and a generation prompt for the assistant's turn."""
        messages = _check_messages(messages, field)
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self._template(), tokenize=False,
                                                  add_generation_prompt=True, **self.cfg.chat_template_kwargs)
        return self._encode(text, False, field), text

    def _template(self) -> str:
        if not hasattr(self.tokenizer, "apply_chat_template"):
            raise ValueError("prompts given as messages (or prompts.chat_template) need a transformers tokenizer "
                             f"with a chat template; got {type(self.tokenizer).__name__}")
        if not self.template:
            raise ValueError("prompts given as messages (or prompts.chat_template) need a chat template, and the "
                             "tokenizer has none: set prompts.chat_template_path to a jinja file")
        return self.template

    def _encode(self, text: str, add_special_tokens: bool, field: str) -> tuple[int, ...]:
        ids = tuple(self._adapted.encode(text, add_special_tokens))
        if not ids:
            raise RowError(f"{field}: no tokens (the first response token is predicted from the last prompt token)")
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            raise RowError(f"{field}: tokenizes to id {max(ids)} >= the model's vocab_size {self.vocab_size}")
        return ids


def _check_messages(messages: Any, field: str) -> list[dict]:
    """`messages` itself once every message has a non-empty string role and a string content; else RowError."""
    if not isinstance(messages, list):
        raise RowError(f"{field}: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RowError(f"{field}: an empty conversation")
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{where}: expected a message object {{'role', 'content'}}, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}.role: " + ("missing" if role is None else
                                                f"expected a non-empty string, got {role!r}"))
        if not isinstance(content, str):
            raise RowError(f"{where}.content: " + ("missing" if content is None else
                                                   f"expected a string, got {type(content).__name__}"))
    return messages
