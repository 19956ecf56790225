"""Moving weights between Hugging Face tensors and the parameters of sharded Megatron model chunks.

A chunk's parameter names are local: `decoder.layers.{j}` counts from 0 on every pipeline stage (and every
virtual stage). The global layer index is the layer's `layer_number - 1`, which Megatron computes from the
layout, so the same HF checkpoint loads into any TP/PP/VPP split. Likewise an expert's index is local to its
expert-parallel rank (`local_experts.{j}`) and made global through the MoE layer's `local_expert_indices`.
Full tensors come from the name maps in `megatron_gvpo.models.hf_maps`, TP (and expert-TP) slices from
`megatron_gvpo.models.sharding`. `load_model_weights` reads the policy's weights from a Megatron checkpoint
instead (`model.load`: the converter's import or a training checkpoint), at any layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_gvpo.megatron.model import unwrap
from megatron_gvpo.models.arch import Arch
from megatron_gvpo.models.hf_maps import hf_to_megatron, local_spec_name
from megatron_gvpo.models.sharding import is_expert, shard

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")
_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global local-spec name, parameter) of one model chunk: layer indices made global, TE names mapped."""
    model = unwrap(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        m = _LAYER.match(name)
        if m:
            layer = layers[int(m.group(1))]
            rest = name[m.end():]
            e = _EXPERT.match(rest)
            if e:
                rest = f"mlp.experts.local_experts.{layer.mlp.local_expert_indices[int(e.group(1))]}." + rest[e.end():]
            name = f"decoder.layers.{layer.layer_number - 1}." + rest
        yield local_spec_name(name), param


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module],
    arch: Arch,
    hf: Mapping[str, torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    padded_vocab_size: int,
    etp_rank: int | None = None,
    etp_size: int | None = None,
) -> int:
    """Copy HF tensors into this rank's model chunks; return the number of parameters loaded. Experts are split
    over the expert-TP ranks (`etp_*`, default: the TP ranks).

    Every parameter of every chunk must be covered; a shape mismatch names the parameter. With tied
    embeddings the last pipeline stage's separate output layer is filled from the embedding.
    """
    params = dict(p for chunk in chunks for p in global_named_parameters(chunk))
    tied_head = arch.tie_word_embeddings and _OUTPUT in params
    needed = set(params) | ({_EMBEDDING} if tied_head else set())
    full = dict(hf_to_megatron(arch, hf, padded_vocab_size, only=needed))
    for name, param in params.items():
        source = _EMBEDDING if (tied_head and name == _OUTPUT) else name
        if source not in full:
            raise ValueError(f"no HF tensor maps to Megatron parameter {name!r} (model_type={arch.model_type})")
        rank, size = (tp_rank, tp_size) if not is_expert(name) or etp_size is None else (etp_rank, etp_size)
        value = shard(source, full[source], rank, size)
        if value.shape != param.shape:
            raise ValueError(
                f"{name}: converted HF tensor has shape {tuple(value.shape)} on TP rank {rank}/{size}, "
                f"the Megatron parameter has {tuple(param.shape)}"
            )
        param.copy_(value)
    return len(params)


def model_sharded_state_dict(chunks: list, prefix: str, key_prefix: str = "") -> dict:
    """Megatron's sharded state dict of model chunks, keyed <prefix>0, <prefix>1, ... (checkpoints)."""
    # DDP wraps the GPTModel; vp stages are saved under model0, model1, ... like Megatron-LM does.
    # `key_prefix` keeps a second copy of the model (the reference) apart in the checkpoint's key space.
    return {f"{prefix}{i}": unwrap(c).sharded_state_dict(prefix=key_prefix) for i, c in enumerate(chunks)}


def load_model_weights(chunks: list, path: str | Path) -> None:
    """Collective: the policy weights of a Megatron checkpoint (a training checkpoint or the output of
    `tools/convert_hf.py import`) into `chunks`, at any layout; everything else in it is ignored."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise ValueError(f"model.load={str(path)!r} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks, "model"), str(path))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"])
