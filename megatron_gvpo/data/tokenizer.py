"""Transformers tokenizers and raw `tokenizers.Tokenizer`s behind one small interface: `encode(text,
add_special_tokens)` and the end-of-sequence id, checked against the model's vocabulary (data/offline.py's text
rows, data/chat.py's prompts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenizerAdapter:
    encode_fn: Callable[[str, bool], list[int]]
    eos_id: int | None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.encode_fn(text, add_special_tokens)


def adapt_tokenizer(tokenizer: Any, vocab_size: int | None, *, append_eos: bool = False,
                    eos_token: str | None = None) -> TokenizerAdapter:
    """Wrap a transformers tokenizer or a `tokenizers.Tokenizer`; resolve the EOS id when `append_eos` (offline
    data: `data.append_eos`, `data.eos_token`, None for the tokenizer's own); refuse a
    tokenizer with more ids than the model has embeddings (a model larger than its tokenizer is common and fine:
    vocabularies are padded)."""
    import tokenizers  # light; transformers is only touched through the object it made

    if isinstance(tokenizer, tokenizers.Tokenizer):

        def encode(text: str, add_special_tokens: bool) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

        vocab = tokenizer.get_vocab(with_added_tokens=True)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        default_eos = None
    elif hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab"):
        # transformers.PreTrainedTokenizerBase (duck-typed so this module does not import transformers).
        def encode(text: str, add_special_tokens: bool) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

        vocab = tokenizer.get_vocab()
        size = len(tokenizer)  # includes added tokens, unlike tokenizer.vocab_size
        default_eos = getattr(tokenizer, "eos_token", None)
    else:
        raise ValueError(
            f"tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    if vocab_size is not None and size > vocab_size:
        raise ValueError(
            f"the tokenizer has {size} tokens (added tokens included) but the model's vocab_size is {vocab_size}: "
            f"ids {vocab_size}..{size - 1} have no embedding. Use the model's own tokenizer (model.tokenizer) or "
            "resize the model's embeddings before training"
        )
    eos_id = None
    if append_eos:
        eos_token = eos_token if eos_token is not None else default_eos
        if eos_token is None:
            raise ValueError(
                "data.append_eos is set but the tokenizer has no eos_token; set data.eos_token "
                "(required with a raw tokenizers.Tokenizer) or data.append_eos=false"
            )
        if eos_token not in vocab:
            raise ValueError(f"data.eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        eos_id = vocab[eos_token]
    return TokenizerAdapter(encode, eos_id)
