"""Hugging Face <-> Megatron-Core parameter names and layouts, as data.

A conversion is a list of `Rule`s: a Megatron name, the HF name(s) it is made of, and the name of a tensor
transform. Names carry `{i}` for the layer index. The transforms are the only code:
- `identity`: same tensor.
- `vocab`: rows padded with zeros to the TP-padded vocabulary on the way in, trimmed on the way out.
- `qkv`: HF q [H*d, h], k [G*d, h], v [G*d, h] <-> Megatron's fused linear_qkv, interleaved per query group
  ([q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]) so that TP can split it by whole groups.
- `gate_up`: HF gate [F, h], up [F, h] <-> Megatron's linear_fc1 = cat(gate, up).
The same tables serve the trainer (load HF weights), `tools/convert_hf.py` and the weight sync to SGLang.

Megatron names are those of the local (no Transformer Engine) layer spec; with the TE spec the two
RMSNorm weights live inside the fused linear layers, which `te_name` translates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from megatron_gvpo.models.arch import Arch


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    transform: str = "identity"
    when: Callable[[Arch], bool] = lambda arch: True
    """The rule applies only to architectures for which this is true (biases, untied output layer)."""


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

LLAMA_STYLE_FIRST = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
LLAMA_STYLE_LAST = [
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when=lambda a: not a.tie_word_embeddings),
]
LLAMA_STYLE_LAYER = [
    Rule(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",)),
    Rule(
        _M + "self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule(
        _M + "self_attention.linear_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        "qkv",
        when=lambda a: a.qkv_bias,
    ),
    Rule(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), when=lambda a: a.qk_norm),
    Rule(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), when=lambda a: a.qk_norm),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    Rule(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "gate_up"),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
]

LLAMA_STYLE = (LLAMA_STYLE_FIRST, LLAMA_STYLE_LAYER, LLAMA_STYLE_LAST)

NAME_MAPS: dict[str, tuple[list[Rule], list[Rule], list[Rule]]] = {
    "llama": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
}
"""model_type -> (rules before the layers, rules of every layer with {i}, rules after the layers)."""

TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_name(megatron_name: str) -> str:
    """The name a local-spec parameter has in the Transformer Engine layer spec."""
    for local, te in TE_RENAMES.items():
        if megatron_name.endswith(local):
            return megatron_name[: -len(local)] + te
    return megatron_name


def local_spec_name(megatron_name: str) -> str:
    """The local-spec name of a parameter of either layer spec (inverse of `te_name`)."""
    for local, te in TE_RENAMES.items():
        if megatron_name.endswith(te):
            return megatron_name[: -len(te)] + local
    return megatron_name


def rules(arch: Arch) -> list[Rule]:
    """Every rule of `arch`, layer placeholders expanded, in checkpoint order."""
    if arch.model_type not in NAME_MAPS:
        raise ValueError(f"no HF<->Megatron name map for model_type={arch.model_type!r}; have {sorted(NAME_MAPS)}")
    first, per_layer, last = NAME_MAPS[arch.model_type]
    out = [r for r in first if r.when(arch)]
    for i in range(arch.num_layers):
        out += [
            Rule(r.megatron.format(i=i), tuple(h.format(i=i) for h in r.hf), r.transform)
            for r in per_layer
            if r.when(arch)
        ]
    return out + [r for r in last if r.when(arch)]


# ----------------------------------------------------------------------------------------------------------
# Transforms: to_megatron(arch, padded_vocab, *hf) -> tensor and to_hf(arch, padded_vocab, tensor) -> tuple
# ----------------------------------------------------------------------------------------------------------


def _qkv_to_megatron(arch: Arch, _: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g, d = arch.num_query_groups, arch.head_dim
    tail = q.shape[1:]
    q = q.reshape(g, arch.heads_per_group * d, *tail)
    return torch.cat([q, k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1).reshape(-1, *tail)


def _qkv_to_hf(arch: Arch, _: int, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, d, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def _vocab_to_megatron(arch: Arch, padded_vocab: int, w: torch.Tensor) -> torch.Tensor:
    if w.shape[0] != arch.vocab_size:
        raise ValueError(f"vocabulary tensor has {w.shape[0]} rows, config vocab_size is {arch.vocab_size}")
    if padded_vocab == arch.vocab_size:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - arch.vocab_size, *w.shape[1:])])


TRANSFORMS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, ...]]]] = {
    "identity": (lambda arch, pv, t: t, lambda arch, pv, t: (t,)),
    "vocab": (_vocab_to_megatron, lambda arch, pv, t: (t[: arch.vocab_size].contiguous(),)),
    "qkv": (_qkv_to_megatron, _qkv_to_hf),
    "gate_up": (lambda arch, pv, g, u: torch.cat([g, u]), lambda arch, pv, t: tuple(t.chunk(2))),
}


def hf_to_megatron(
    arch: Arch, hf: Mapping[str, torch.Tensor], padded_vocab: int, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron name, full unsharded tensor) from HF tensors; `hf` may be lazy (read on access).
    `only` restricts the output to those Megatron names (one pipeline stage's), skipping the reads.

    Raises ValueError naming any missing HF tensor; extra HF tensors are the caller's to check via
    `expected_hf_names`.
    """
    for rule in rules(arch):
        if only is not None and rule.megatron not in only:
            continue
        missing = [name for name in rule.hf if name not in hf]
        if missing:
            raise ValueError(f"HF checkpoint is missing tensor {missing[0]!r} (needed for {rule.megatron})")
        yield rule.megatron, TRANSFORMS[rule.transform][0](arch, padded_vocab, *(hf[n] for n in rule.hf))


def megatron_to_hf(
    arch: Arch, megatron: Mapping[str, torch.Tensor], padded_vocab: int, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from full unsharded Megatron tensors (the inverse of `hf_to_megatron`);
    `only` restricts it to the rules of those Megatron names."""
    for rule in rules(arch):
        if only is not None and rule.megatron not in only:
            continue
        if rule.megatron not in megatron:
            raise ValueError(f"Megatron state is missing tensor {rule.megatron!r}")
        outs = TRANSFORMS[rule.transform][1](arch, padded_vocab, megatron[rule.megatron])
        yield from zip(rule.hf, outs, strict=True)


def expected_hf_names(arch: Arch) -> set[str]:
    return {name for rule in rules(arch) for name in rule.hf}
