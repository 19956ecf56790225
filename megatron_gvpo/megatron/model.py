"""Model provider: a Megatron-Core `GPTModel` for an `Arch` (Llama, Qwen2, Qwen3, Mistral, and the mixtures of
experts Qwen3-MoE and Mixtral) on any TP/PP/VPP/EP layout.

One function translates the architecture plus the parallel layout into Megatron's `TransformerConfig`; one
builds the model chunk of a pipeline stage. The layer spec is Transformer Engine's when TE is importable and
asked for (production), Megatron's local spec otherwise (CPU machines). The caller says which stage it builds
(`pre_process`, `post_process`, `vp_stage`); only the layer count of a stage comes from Megatron's parallel
state, as in GPTModel itself.

Sequence parallelism (`sequence_parallel=True`, TP > 1): Megatron splits the sequence over the TP ranks
outside the tensor-parallel matmuls (norms, residuals, dropout), so the activations that TP alone replicates
are sharded too; the linears all-gather their input and reduce-scatter their output instead of all-reducing
it (the same traffic). Every row (padded) or sequence (THD) must then be a multiple of TP tokens long
(`token_multiple`).

Mixture of experts: each MoE layer's MLP is Megatron's `MoELayer`, a top-k router (fp32 softmax, as the HF
models compute it) and `SequentialMLP` experts split over the expert-parallel ranks, tokens moved by the
dropless all-to-all dispatcher. Dense layers of a MoE model (Qwen3-MoE's mlp_only_layers) keep a dense MLP:
Megatron's block spec picks each layer's MLP from `moe_layer_freq`.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_gvpo.megatron.config import MoEConfig
from megatron_gvpo.megatron.cpu_compat import CPU_TRANSFORMER_CONFIG, patch_moe_without_te
from megatron_gvpo.models.arch import Arch


@functools.cache
def te_available() -> bool:
    """Whether Transformer Engine imports. On CPU machines the `transformer_engine` meta package raises
    RuntimeError (not ImportError) at import, so both count as absent."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def check_attention_support(*, use_te: bool, cp: int, packing: str) -> None:
    """Context parallelism and packed (THD) sequences run in Transformer Engine's attention only; Megatron's
    local attention would fail deep inside the first forward."""
    wanted = [what for what, on in (("parallel.cp > 1", cp > 1), ("train.packing='thd'", packing == "thd")) if on]
    if wanted and not use_te:
        raise ValueError(
            f"{' and '.join(wanted)} need Transformer Engine's attention, but the model uses Megatron's local "
            "layer spec (transformer_engine does not import, or model.transformer_impl='local'); install "
            "Transformer Engine (it ships in the NGC PyTorch container) or set parallel.cp=1 train.packing=padded"
        )


def transformer_config(
    arch: Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    moe: MoEConfig | None = None,
    routing_replay: bool = False,
    **overrides,
) -> TransformerConfig:
    """Megatron's TransformerConfig for `arch` on a TP x PP (x VPP) x CP (x EP x ETP for the experts) layout,
    with sequence parallelism where asked for and TP > 1 (at TP 1 there is nothing to split it over), and the
    router losses of `moe` and, with `routing_replay`, routers that can replay given experts
    (`megatron_gvpo.megatron.routing_replay`); `overrides` win."""
    if use_te and not te_available():
        raise ValueError(
            "the Transformer Engine layer spec was requested but transformer_engine does not import; install it "
            "(it ships in the NGC PyTorch container) or use the local spec"
        )
    if tp not in arch.tp_sizes:  # the one TP check: the trainer, the planner and the converter all come here
        if tp < 1 or arch.num_attention_heads % tp or arch.num_query_groups % tp:
            what = f"num_attention_heads={arch.num_attention_heads} and num_key_value_heads={arch.num_query_groups}"
        else:
            what = f"intermediate_size={arch.ffn_hidden_size}"
        raise ValueError(
            f"parallel.tp={tp} must divide {what}; the tensor-parallel sizes that fit this model are "
            f"{', '.join(map(str, arch.tp_sizes))}"
        )
    moe_kwargs = _moe_kwargs(arch, ep, tp if etp is None else etp, moe or MoEConfig())
    if routing_replay:
        if not arch.is_moe:
            raise ValueError(f"rollout.routing_replay needs a mixture-of-experts model; {arch.model_type} is dense")
        moe_kwargs["moe_enable_routing_replay"] = True
    if arch.is_moe and tp > 1 and not sequence_parallel:
        # Megatron's MoE layer refuses to train under TP without it (each TP rank would route every token).
        raise ValueError(f"a mixture-of-experts model at parallel.tp={tp} needs parallel.sequence_parallel=true")
    stages = pp * (vpp or 1)
    if arch.num_layers % stages:
        raise ValueError(
            f"num_hidden_layers={arch.num_layers} must be divisible by parallel.pp * parallel.vpp = {stages}"
        )
    kwargs: dict = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        # Read by the layer spec's q/k norms and by finalize_model_grads, which sums their gradients over TP
        # (each TP rank normalises only its own heads) only when this is set.
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        **moe_kwargs,
    )
    if not torch.cuda.is_available():
        kwargs.update(CPU_TRANSFORMER_CONFIG)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_kwargs(arch: Arch, ep: int, etp: int, moe: MoEConfig) -> dict:
    """TransformerConfig fields of the mixture of experts (checked against the layout); {} for a dense model."""
    if not arch.is_moe:
        if ep != 1:
            raise ValueError(f"parallel.ep={ep} needs a mixture-of-experts model; {arch.model_type} is dense")
        return {}
    if ep not in arch.ep_sizes:
        raise ValueError(f"parallel.ep={ep} must divide the {arch.num_experts} experts; the expert-parallel sizes "
                         f"that fit this model are {', '.join(map(str, arch.ep_sizes))}")
    if etp not in arch.expert_tp_sizes:
        raise ValueError(f"parallel.etp={etp} (default: tp) must divide moe_intermediate_size="
                         f"{arch.moe_ffn_hidden_size}")
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_top_k,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_layer_freq=[int(m) for m in arch.moe_layers],
        # The HF models: softmax over all experts in fp32, top-k, renormalised over the k chosen when
        # norm_topk_prob. Top-k of the logits then a softmax over them is the same (softmax is monotone);
        # without renormalisation it is Megatron's pre-softmax.
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=moe.token_dispatcher,
        # SequentialMLP on both layer specs: its parameters (local_experts.{j}.linear_fc1/2) are what the name
        # maps and the weight sync speak. Transformer Engine's grouped GEMM (one weight{j} per expert in one
        # module) is faster on GPUs and the next step there.
        moe_grouped_gemm=False,
        moe_router_load_balancing_type=moe.load_balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def build_gpt_model(
    arch: Arch,
    config: TransformerConfig,
    *,
    padded_vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_te: bool = False,
) -> GPTModel:
    """The model chunk of one (virtual) pipeline stage."""
    if arch.is_moe:
        patch_moe_without_te()
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                          vp_stage=vp_stage)
        if config.sequence_parallel and not use_te:
            spec = dataclasses.replace(_with_sequence_parallel_norms(spec), layer_norm=SequenceParallelNorm)
    elif use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
        if config.sequence_parallel:
            spec = _sequence_parallel_local_spec(spec, config, vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def token_multiple(config: TransformerConfig) -> int:
    """Rows (padded) and sequences (THD) must be a multiple of this many tokens on each CP rank: sequence
    parallelism splits them over the TP ranks."""
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


class SequenceParallelNorm:
    """torch's RMSNorm / LayerNorm for Megatron's local spec under sequence parallelism.

    Each TP rank normalises only its part of the sequence, so its weight gradient is partial: Megatron's
    `finalize_model_grads` sums the gradients of parameters marked `sequence_parallel` over the TP group, and
    Transformer Engine's and Apex's norms mark theirs. Megatron's own torch wrapper (`WrappedTorchNorm`) does
    not and refuses sequence parallelism instead; this is the same norm, marked."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"sequence parallelism on the local spec supports {sorted(norms)}, "
                             f"not normalization={config.normalization!r}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _with_sequence_parallel_norms(spec):
    """`spec` with every `WrappedTorchNorm` in its tree replaced by `SequenceParallelNorm`."""
    if spec is WrappedTorchNorm:
        return SequenceParallelNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_with_sequence_parallel_norms(spec.submodules))
    if isinstance(spec, list):
        return [_with_sequence_parallel_norms(s) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _with_sequence_parallel_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec)})
    return spec


def _sequence_parallel_local_spec(layer_spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None):
    """The local spec as a block of this stage's layers whose norms (the final one included, which the block
    would otherwise take from Megatron's module-level default) support sequence parallelism."""
    return TransformerBlockSubmodules(
        layer_specs=[_with_sequence_parallel_norms(layer_spec)] * get_num_layers_to_build(config, vp_stage),
        layer_norm=SequenceParallelNorm,
    )


def _hidden_states_passthrough(self, input_, weight=None, runtime_gather_output=None):
    if self.sequence_parallel:
        # What the output layer would do to its input: the whole sequence on every TP rank, each scoring it
        # against its vocabulary shard. The fused head already sums the hidden-state gradient over the TP
        # ranks (on scored tokens only), so backward keeps this rank's slice rather than reduce-scattering.
        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                      group=self.tp_group)
    return input_, None


def return_hidden_states(model: GPTModel) -> None:
    """Make a last-stage chunk return its final hidden states [b, s, h] instead of logits [b, s, V/tp]
    (the whole sequence, gathered from the TP ranks under sequence parallelism).

    For the fused log-prob head (`megatron_gvpo.ops.fused_linear_logprobs`), which multiplies by the output
    weight chunk by chunk so the [tokens, vocab] logits never exist. Only the output layer's `forward` is
    replaced (on this instance): parameter names, weight tying and checkpoints are unchanged.
    """
    if not model.post_process:
        return
    model.output_layer.forward = types.MethodType(_hidden_states_passthrough, model.output_layer)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's wrappers (DDP, Float16Module), or the chunk itself."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def output_weight(model) -> torch.Tensor | None:
    """The output-layer weight [V/tp, h] of a last-stage chunk (the shared embedding when tied), else None."""
    model = unwrap(model)
    if not getattr(model, "post_process", False):
        return None
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
