"""Model architecture read from a Hugging Face config: one family-independent description, `Arch`.

Supported families are a registry keyed by HF `model_type`; each entry says how that family's config fields
map onto the shared description (Qwen2 always has a q/k/v bias, Llama only with `attention_bias`, ...).
Everything Megatron and the converters need is a field of `Arch`, so no other module reads HF configs.

Unsupported features fail here, at load time, with the config field named: a model that cannot be
represented exactly must never train silently wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

# Megatron-Core's llama3 RoPE scaling hard-codes these three values (rotary_pos_embedding.py); they are the
# values of every released Llama 3.1 / 3.2 / 3.3 config.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer with RMSNorm, SwiGLU MLP, RoPE and grouped-query attention."""

    model_type: str
    """HF model_type (the registry key): 'llama', 'qwen2', 'qwen3' or 'mistral'."""
    vocab_size: int
    """Vocabulary size as in the HF checkpoint (before any padding for tensor parallelism)."""
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """Number of key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    """Llama-3 RoPE scaling factor, None without scaling."""
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    """Attention window (Mistral); the local attention implementation is full causal, so sequences must not
    exceed it (checked by `check_sequence_length`)."""
    qk_norm: bool = False
    """RMSNorm over head_dim on every query and key head before RoPE (Qwen3's q_norm / k_norm)."""

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def tp_sizes(self) -> list[int]:
        """The tensor-parallel sizes this model splits evenly over: the common divisors of the attention heads,
        the key/value heads and the FFN width (the vocabulary is padded to fit any TP)."""
        common = math.gcd(self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        return [d for d in range(1, common + 1) if common % d == 0]

    def check_sequence_length(self, seq_len: int) -> None:
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise ValueError(
                f"sequence length {seq_len} exceeds sliding_window={self.sliding_window} of this "
                f"{self.model_type} config; sliding-window attention is not implemented"
            )


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _rope(cfg: Any) -> tuple[float, float | None]:
    """(theta, llama3 factor or None) from transformers 5 `rope_parameters` or the older flat fields."""
    params = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
    theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default' and 'llama3')")
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if not math.isclose(float(params.get(key, expected)), expected):
            raise ValueError(
                f"rope_parameters.{key}={params.get(key)} is not supported: Megatron-Core's llama3 RoPE scaling "
                f"fixes it to {expected}"
            )
    return float(theta), float(params["factor"])


def _reject(cfg: Any, **must_be: Any) -> None:
    for name, allowed in must_be.items():
        value = _get(cfg, name, allowed)
        if value != allowed:
            raise ValueError(f"config field {name}={value!r} is not supported (must be {allowed!r})")


def _llama_qkv_bias(cfg: Any) -> bool:
    # Llama's attention_bias also puts a bias on o_proj, which the Megatron layer spec cannot express.
    _reject(cfg, attention_bias=False, mlp_bias=False)
    return False


@dataclass(frozen=True)
class Family:
    """How one HF model_type maps onto `Arch`."""

    qkv_bias: Callable[[Any], bool]
    sliding_window: Callable[[Any], int | None] = lambda cfg: None
    qk_norm: bool = False


def _mistral_window(cfg: Any) -> int | None:
    return _get(cfg, "sliding_window")


def _qwen2_window(cfg: Any) -> int | None:
    return _get(cfg, "sliding_window") if _get(cfg, "use_sliding_window", False) else None


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=_llama_qkv_bias),
    "qwen2": Family(qkv_bias=lambda cfg: True, sliding_window=_qwen2_window),
    "mistral": Family(qkv_bias=lambda cfg: False, sliding_window=_mistral_window),
    # Qwen3's attention_bias, like Llama's, would also put a bias on o_proj.
    "qwen3": Family(qkv_bias=_llama_qkv_bias, sliding_window=_qwen2_window, qk_norm=True),
}


def arch_from_hf(cfg: Any) -> Arch:
    """`Arch` from a transformers config object or its `config.json` dict."""
    model_type = _get(cfg, "model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    _reject(cfg, hidden_act="silu")
    heads = _get(cfg, "num_attention_heads")
    kv_heads = _get(cfg, "num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, factor = _rope(cfg)
    return Arch(
        model_type=model_type,
        vocab_size=_get(cfg, "vocab_size"),
        hidden_size=_get(cfg, "hidden_size"),
        ffn_hidden_size=_get(cfg, "intermediate_size"),
        num_layers=_get(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=_get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads,
        norm_eps=float(_get(cfg, "rms_norm_eps")),
        rope_theta=theta,
        rope_scaling_factor=factor,
        qkv_bias=family.qkv_bias(cfg),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=_get(cfg, "max_position_embeddings"),
        sliding_window=family.sliding_window(cfg),
        qk_norm=family.qk_norm,
    )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so that every TP shard has the same width, a multiple of `divisible_by`."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
