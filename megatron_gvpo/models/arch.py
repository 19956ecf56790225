"""Model architecture read from a Hugging Face config: one family-independent description, `Arch`.

Supported families are a registry keyed by HF `model_type`; each entry says how that family's config fields
map onto the shared description (Qwen2 always has a q/k/v bias, Llama only with `attention_bias`, ...).
Everything Megatron and the converters need is a field of `Arch`, so no other module reads HF configs.

Unsupported features fail here, at load time, with the config field named: a model that cannot be
represented exactly must never train silently wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Megatron-Core's llama3 RoPE scaling hard-codes these three values (rotary_pos_embedding.py); they are the
# values of every released Llama 3.1 / 3.2 / 3.3 config.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer with RMSNorm, SwiGLU MLP (or a mixture of SwiGLU experts), RoPE and
    grouped-query attention."""

    model_type: str
    """HF model_type (the registry key): 'llama', 'qwen2', 'qwen3', 'mistral', 'qwen3_moe' or 'mixtral'."""
    vocab_size: int
    """Vocabulary size as in the HF checkpoint (before any padding for tensor parallelism)."""
    hidden_size: int
    ffn_hidden_size: int
    """Width of the dense MLP (of the dense layers, in a mixture-of-experts model)."""
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
    num_experts: int = 0
    """Routed experts per mixture-of-experts layer; 0 for a dense model. No shared experts."""
    moe_top_k: int = 0
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int = 0
    """Width of each expert's SwiGLU MLP."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True where the MLP is a mixture of experts, False for a dense MLP (Qwen3-MoE's
    mlp_only_layers / decoder_sparse_step)."""
    moe_norm_topk_prob: bool = True
    """The top-k routing weights are renormalised to sum to 1 (softmax over the chosen experts' logits);
    False keeps the softmax over all experts (Qwen3-MoE's norm_topk_prob)."""
    router_aux_loss_coef: float = 0.0
    """The checkpoint's load-balancing loss coefficient (the pretraining value; `moe.aux_loss_coeff` decides)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def tp_sizes(self) -> list[int]:
        """The tensor-parallel sizes this model splits evenly over: the common divisors of the attention heads,
        the key/value heads and the dense FFN width (the vocabulary is padded to fit any TP)."""
        common = math.gcd(self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        return _divisors(common)

    @property
    def expert_tp_sizes(self) -> list[int]:
        """The expert-tensor-parallel sizes: the divisors of the expert FFN width."""
        return _divisors(self.moe_ffn_hidden_size) if self.is_moe else [1]

    @property
    def ep_sizes(self) -> list[int]:
        """The expert-parallel sizes: the divisors of the number of experts."""
        return _divisors(self.num_experts) if self.is_moe else [1]

    def check_sequence_length(self, seq_len: int) -> None:
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise ValueError(
                f"sequence length {seq_len} exceeds sliding_window={self.sliding_window} of this "
                f"{self.model_type} config; sliding-window attention is not implemented"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
    moe: Callable[[Any], dict[str, Any]] | None = None
    """The mixture-of-experts fields of `Arch` from the config; None for a dense family."""


def _mistral_window(cfg: Any) -> int | None:
    return _get(cfg, "sliding_window")


def _qwen2_window(cfg: Any) -> int | None:
    return _get(cfg, "sliding_window") if _get(cfg, "use_sliding_window", False) else None


def _moe_fields(cfg: Any, num_experts: int, layers: tuple[bool, ...], norm_topk_prob: bool) -> dict[str, Any]:
    top_k = _get(cfg, "num_experts_per_tok")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"config field num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")
    return dict(num_experts=num_experts, moe_top_k=top_k, moe_layers=layers, moe_norm_topk_prob=norm_topk_prob,
                router_aux_loss_coef=float(_get(cfg, "router_aux_loss_coef", 0.0) or 0.0))


def _qwen3_moe(cfg: Any) -> dict[str, Any]:
    # transformers 5 saves the expert count as num_local_experts, the released configs as num_experts.
    experts = _get(cfg, "num_experts") or _get(cfg, "num_local_experts")
    step, dense = _get(cfg, "decoder_sparse_step", 1), set(_get(cfg, "mlp_only_layers") or ())
    layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(_get(cfg, "num_hidden_layers")))
    return dict(**_moe_fields(cfg, experts, layers, bool(_get(cfg, "norm_topk_prob", False))),
                moe_ffn_hidden_size=_get(cfg, "moe_intermediate_size"))


def _mixtral(cfg: Any) -> dict[str, Any]:
    # Jitter multiplies the router input by noise during training: no Megatron counterpart, and not exact.
    _reject(cfg, router_jitter_noise=0.0)
    layers = (True,) * _get(cfg, "num_hidden_layers")
    return dict(**_moe_fields(cfg, _get(cfg, "num_local_experts"), layers, True),
                moe_ffn_hidden_size=_get(cfg, "intermediate_size"))


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=_llama_qkv_bias),
    "qwen2": Family(qkv_bias=lambda cfg: True, sliding_window=_qwen2_window),
    "mistral": Family(qkv_bias=lambda cfg: False, sliding_window=_mistral_window),
    # Qwen3's attention_bias, like Llama's, would also put a bias on o_proj.
    "qwen3": Family(qkv_bias=_llama_qkv_bias, sliding_window=_qwen2_window, qk_norm=True),
    # Routed experts only (no shared expert), top-k of the softmax over all experts, renormalised over the k
    # chosen when norm_topk_prob (as Qwen3-30B-A3B and Qwen3-235B-A22B are); dense layers where mlp_only_layers
    # or decoder_sparse_step say so.
    "qwen3_moe": Family(qkv_bias=_llama_qkv_bias, sliding_window=_qwen2_window, qk_norm=True, moe=_qwen3_moe),
    # Every layer a mixture, top-k always renormalised.
    "mixtral": Family(qkv_bias=lambda cfg: False, sliding_window=_mistral_window, moe=_mixtral),
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
        **(family.moe(cfg) if family.moe else {}),
    )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so that every TP shard has the same width, a multiple of `divisible_by`."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
