"""Hugging Face <-> Megatron-Core parameter names and layouts, as data.

A conversion is a list of `Rule`s: a Megatron name, the HF name(s) it is made of, and the name of a tensor
transform. Names carry `{i}` for the layer index and, in mixture-of-experts layers, `{e}` for the (global)
expert index; a layer rule applies to every layer, or only to the dense or only to the MoE layers of a
model that has both. The transforms are the only code:
- `identity`: same tensor.
- `vocab`: rows padded with zeros to the TP-padded vocabulary on the way in, trimmed on the way out.
- `qkv`: HF q [H*d, h], k [G*d, h], v [G*d, h] <-> Megatron's fused linear_qkv, interleaved per query group
  ([q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]) so that TP can split it by whole groups.
- `gate_up`: HF gate [F, h], up [F, h] <-> Megatron's linear_fc1 = cat(gate, up).
The same tables serve the trainer (load HF weights), `tools/convert_hf.py` and the weight sync to SGLang.
Each transform is also a set of views of the Megatron tensor, one per HF tensor (`VIEWS`): the converter
reads HF bytes into them and writes them out directly, with no intermediate tensor.

Megatron names are those of the local (no Transformer Engine) layer spec; with the TE spec the two
RMSNorm weights live inside the fused linear layers, which `te_name` translates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_gvpo.models.arch import Arch


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    transform: str = "identity"
    when: Callable[[Arch], bool] = lambda arch: True
    """The rule applies only to architectures for which this is true (biases, untied output layer)."""
    layers: Literal["all", "dense", "moe"] = "all"
    """Layer rules: which layers have this tensor (a MoE model's dense layers have no router)."""


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

LLAMA_STYLE_FIRST = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
LLAMA_STYLE_LAST = [
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when=lambda a: not a.tie_word_embeddings),
]
ATTENTION = [
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
]
DENSE_MLP = [
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "gate_up",
         layers="dense"),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), layers="dense"),
]
LLAMA_STYLE_LAYER = ATTENTION + DENSE_MLP


def moe_rules(block: str, router: str, gate: str, up: str, down: str) -> list[Rule]:
    """A MoE layer's router and routed experts, HF names under `model.layers.{i}.{block}`."""
    hf, expert = _L + block, _L + block + "experts.{e}."
    return [
        Rule(_M + "mlp.router.weight", (hf + router + ".weight",), layers="moe"),
        Rule(_M + "mlp.experts.local_experts.{e}.linear_fc1.weight",
             (expert + gate + ".weight", expert + up + ".weight"), "gate_up", layers="moe"),
        Rule(_M + "mlp.experts.local_experts.{e}.linear_fc2.weight", (expert + down + ".weight",), layers="moe"),
    ]


LLAMA_STYLE = (LLAMA_STYLE_FIRST, LLAMA_STYLE_LAYER, LLAMA_STYLE_LAST)

NAME_MAPS: dict[str, tuple[list[Rule], list[Rule], list[Rule]]] = {
    "llama": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen3_moe": (LLAMA_STYLE_FIRST, LLAMA_STYLE_LAYER + moe_rules("mlp.", "gate", "gate_proj", "up_proj", "down_proj"),
                  LLAMA_STYLE_LAST),
    "mixtral": (LLAMA_STYLE_FIRST, ATTENTION + moe_rules("block_sparse_moe.", "gate", "w1", "w3", "w2"),
                LLAMA_STYLE_LAST),
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


@functools.cache
def rules(arch: Arch) -> tuple[Rule, ...]:
    """Every rule of `arch`, layer and expert placeholders expanded, in checkpoint order."""
    if arch.model_type not in NAME_MAPS:
        raise ValueError(f"no HF<->Megatron name map for model_type={arch.model_type!r}; have {sorted(NAME_MAPS)}")
    first, per_layer, last = NAME_MAPS[arch.model_type]
    out = [r for r in first if r.when(arch)]
    for i in range(arch.num_layers):
        kind = "moe" if arch.moe_layers and arch.moe_layers[i] else "dense"
        for r in per_layer:
            if not r.when(arch) or r.layers not in ("all", kind):
                continue
            for e in range(arch.num_experts) if "{e}" in r.megatron else (None,):
                out.append(Rule(r.megatron.format(i=i, e=e), tuple(h.format(i=i, e=e) for h in r.hf), r.transform))
    return tuple(out + [r for r in last if r.when(arch)])


@functools.cache
def _rule_positions(arch: Arch) -> dict[str, int]:
    return {r.megatron: k for k, r in enumerate(rules(arch))}


def _selected(arch: Arch, only: set[str] | None) -> list[Rule]:
    """The rules of the Megatron names `only` (all without it), in checkpoint order: looked up, not scanned,
    since a converter asks for one parameter at a time and a 235B MoE has tens of thousands."""
    every = rules(arch)
    if only is None:
        return list(every)
    positions = _rule_positions(arch)
    return [every[k] for k in sorted(positions[n] for n in only if n in positions)]


# ----------------------------------------------------------------------------------------------------------
# Transforms: views(arch, padded_vocab, tensor) -> tuple (the layout), to_megatron(arch, padded_vocab, *hf)
# -> tensor and to_hf(arch, padded_vocab, tensor) -> tuple
# ----------------------------------------------------------------------------------------------------------


def _qkv_to_megatron(arch: Arch, _: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g, d = arch.num_query_groups, arch.head_dim
    tail = q.shape[1:]
    q = q.reshape(g, arch.heads_per_group * d, *tail)
    return torch.cat([q, k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1).reshape(-1, *tail)


def _qkv_views(arch: Arch, _: int, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, d, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    return qkv.reshape(g, (hpg + 2) * d, *qkv.shape[1:]).split([hpg * d, d, d], dim=1)


def _vocab_to_megatron(arch: Arch, padded_vocab: int, w: torch.Tensor) -> torch.Tensor:
    if w.shape[0] != arch.vocab_size:
        raise ValueError(f"vocabulary tensor has {w.shape[0]} rows, config vocab_size is {arch.vocab_size}")
    if padded_vocab == arch.vocab_size:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - arch.vocab_size, *w.shape[1:])])


VIEWS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "identity": lambda arch, pv, t: (t,),
    "vocab": lambda arch, pv, t: (t[: arch.vocab_size],),
    "qkv": _qkv_views,
    "gate_up": lambda arch, pv, t: tuple(t.chunk(2)),
}
"""transform -> views(arch, padded_vocab, megatron_tensor): where each HF tensor of a rule lives inside the full
Megatron tensor, one view per HF tensor in the rule's order. A view holds its HF tensor's elements in row-major
order but need not have its shape (a fused qkv's q is [groups, rows, hidden], not one strided [rows, hidden]
view), so `view.reshape(hf_shape)` is the HF tensor; elements outside every view (vocabulary padding) are
zero. Converters read and write through the views without building intermediate tensors."""


def hf_views(arch: Arch, padded_vocab: int, transform: str, megatron_tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return VIEWS[transform](arch, padded_vocab, megatron_tensor)


def _to_hf(transform: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    def to_hf(arch: Arch, padded_vocab: int, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(v.reshape(-1, *t.shape[1:]).contiguous() for v in hf_views(arch, padded_vocab, transform, t))
    return to_hf


TRANSFORMS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, ...]]]] = {
    "identity": (lambda arch, pv, t: t, _to_hf("identity")),
    "vocab": (_vocab_to_megatron, _to_hf("vocab")),
    "qkv": (_qkv_to_megatron, _to_hf("qkv")),
    "gate_up": (lambda arch, pv, g, u: torch.cat([g, u]), _to_hf("gate_up")),
}
"""transform -> (to_megatron(arch, padded_vocab, *hf_tensors), to_hf(arch, padded_vocab, megatron_tensor)):
whole tensors in memory, for the trainer's load and the weight sync; to_hf is the views made contiguous."""


def hf_to_megatron(
    arch: Arch, hf: Mapping[str, torch.Tensor], padded_vocab: int, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron name, full unsharded tensor) from HF tensors; `hf` may be lazy (read on access).
    `only` restricts the output to those Megatron names (one pipeline stage's), skipping the reads.

    Raises ValueError naming any missing HF tensor; extra HF tensors are the caller's to check via
    `expected_hf_names`.
    """
    for rule in _selected(arch, only):
        missing = [name for name in rule.hf if name not in hf]
        if missing:
            raise ValueError(f"HF checkpoint is missing tensor {missing[0]!r} (needed for {rule.megatron})")
        yield rule.megatron, TRANSFORMS[rule.transform][0](arch, padded_vocab, *(hf[n] for n in rule.hf))


def megatron_to_hf(
    arch: Arch, megatron: Mapping[str, torch.Tensor], padded_vocab: int, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from full unsharded Megatron tensors (the inverse of `hf_to_megatron`);
    `only` restricts it to the rules of those Megatron names."""
    for rule in _selected(arch, only):
        if rule.megatron not in megatron:
            raise ValueError(f"Megatron state is missing tensor {rule.megatron!r}")
        outs = TRANSFORMS[rule.transform][1](arch, padded_vocab, megatron[rule.megatron])
        yield from zip(rule.hf, outs, strict=True)


def expected_hf_names(arch: Arch) -> set[str]:
    return {name for rule in rules(arch) for name in rule.hf}
