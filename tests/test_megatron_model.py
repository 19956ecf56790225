"""Contract: the Megatron model built by `megatron_gvpo.megatron.model` from a Hugging Face config, with HF
weights loaded by `megatron_gvpo.megatron.weights.load_hf_weights`, computes the same logits as Hugging Face
transformers' own modeling code (the independent oracle) on the same weights: fp32, max abs diff < 1e-4,
for Llama (with Llama-3 RoPE scaling), Qwen2 (q/k/v bias) and Mistral, tied and untied embeddings, at TP=1,
TP=2, PP=2 and TP=2 x PP=2. Also pins the name maps: HF -> Megatron -> HF is the identity."""

import pytest
import torch
import torch.distributed as dist

from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
from megatron_gvpo.models.hf_maps import expected_hf_names, hf_to_megatron, megatron_to_hf
from megatron_gvpo.models.sharding import shard, unshard

VOCAB, SEQ, BATCH = 97, 12, 2


def tiny_hf_config(model_type: str, tied: bool):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    if model_type == "llama":
        return transformers.LlamaConfig(
            **common, max_position_embeddings=16384,
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        )
    if model_type == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if model_type == "qwen3":  # q/k norms, and a head_dim that is not hidden_size / heads (as in Qwen3-4B)
        return transformers.Qwen3Config(**common, head_dim=24, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1e6})
    return transformers.MistralConfig(**common, head_dim=24, sliding_window=4096)


def tiny_hf_model(model_type: str, tied: bool, seed: int = 0):
    """A randomly initialised HF model; every tensor (biases and norms too) random so each mapping matters."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(model_type, tied)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model


CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False), ("qwen3", False),
         ("qwen3", True)]


@pytest.mark.parametrize("model_type, tied", CASES)
def test_name_maps_round_trip(model_type, tied):
    model = tiny_hf_model(model_type, tied)
    hf = model.state_dict()
    arch = arch_from_hf(model.config)
    hf = {k: v for k, v in hf.items() if not (tied and k == "lm_head.weight")}
    assert set(hf) == expected_hf_names(arch)
    padded = padded_vocab_size(arch.vocab_size, tp=2)
    megatron = dict(hf_to_megatron(arch, hf, padded))
    assert megatron["embedding.word_embeddings.weight"].shape[0] == padded
    for name, t in megatron.items():  # TP split/unsplit is lossless too
        assert torch.equal(unshard(name, [shard(name, t, r, 2) for r in range(2)]), t)
    back = dict(megatron_to_hf(arch, megatron, padded))
    assert set(back) == set(hf)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def megatron_logits_run(model_type, tied, tp, pp, megatron_checkpoint=None):
    """On every rank: build this stage's chunk, load HF weights (or the weights of a Megatron checkpoint made
    from them), run forward (through the pipeline schedule when PP > 1), gather the vocab-parallel logits on
    the last stage and compare to HF."""
    from functools import partial

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gvpo.megatron.checkpoint import load_model_weights
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config
    from megatron_gvpo.megatron.parallel import destroy_parallel
    from megatron_gvpo.megatron.weights import load_hf_weights

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        hf_model = tiny_hf_model(model_type, tied)
        arch = arch_from_hf(hf_model.config)
        padded = padded_vocab_size(arch.vocab_size, tp)
        config = transformer_config(arch, tp=tp, pp=pp)
        model = build_gpt_model(
            arch, config, padded_vocab_size=padded, max_sequence_length=64,
            pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        ).eval()
        if megatron_checkpoint is not None:
            load_model_weights([model], megatron_checkpoint)
        else:
            load_hf_weights([model], arch, hf_model.state_dict(),
                            tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
                            padded_vocab_size=padded)

        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
        pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        outputs = []

        def forward_step(data_iterator, model):
            out = model(ids, pos, None)

            def keep(output_tensor):
                outputs.append(output_tensor.detach())
                return output_tensor.sum() * 0, {}

            return out, partial(keep)

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[model], num_microbatches=1,
                seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
            )
        if not parallel_state.is_pipeline_last_stage():
            return None
        local = outputs[0]  # [B, S, V_padded / tp]
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(shards, dim=-1)[..., :VOCAB]
        with torch.no_grad():
            want = hf_model(ids).logits
        diff = float((logits - want).abs().max())
        assert diff < 1e-4, f"{model_type} tied={tied} tp={tp} pp={pp}: max |megatron - hf| = {diff}"
        return diff
    finally:
        destroy_parallel()


@pytest.mark.parametrize("model_type, tied", CASES)
def test_logits_equal_hf_single_process(gloo, model_type, tied):
    diffs = gloo.run(1, megatron_logits_run, model_type, tied, 1, 1)
    assert diffs[0] is not None and diffs[0] < 1e-4


PARALLEL_CASES = [(m, t, tp, pp) for m, t in [("llama", False), ("qwen2", True)] for tp, pp in [(2, 1), (1, 2), (2, 2)]]
# Mistral's explicit head_dim (24 != hidden / heads) is split over TP like every other family's heads.
PARALLEL_CASES += [("mistral", False, 2, 1), ("mistral", False, 2, 2), ("qwen3", True, 2, 1), ("qwen3", False, 2, 2)]


@pytest.mark.parametrize("model_type, tied, tp, pp", PARALLEL_CASES)
def test_logits_equal_hf_parallel(gloo, model_type, tied, tp, pp):
    diffs = gloo.run(tp * pp, megatron_logits_run, model_type, tied, tp, pp)
    last_stage = [d for d in diffs if d is not None]
    assert len(last_stage) == tp and max(last_stage) < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"),
         r"model_type='gpt2' is not supported; supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
        (dict(attention_bias=True), r"attention_bias=True is not supported"),
        (dict(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"rope_type='yarn' is not supported"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}),
         r"rope_parameters\.low_freq_factor=2\.0 is not supported"),
    ],
)
def test_unsupported_configs_fail_naming_the_field(change, message):
    cfg = tiny_hf_config("llama", False).to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        arch_from_hf(cfg)


def test_layout_errors_name_the_fields():
    from megatron_gvpo.megatron.model import transformer_config

    arch = arch_from_hf(tiny_hf_config("llama", False))
    with pytest.raises(ValueError, match=r"parallel\.tp=3 must divide num_attention_heads=4"):
        transformer_config(arch, tp=3)
    with pytest.raises(ValueError, match=r"num_hidden_layers=4 must be divisible by parallel\.pp \* parallel\.vpp = 6"):
        transformer_config(arch, pp=3, vpp=2)
    with pytest.raises(ValueError, match="Transformer Engine layer spec was requested"):
        transformer_config(arch, use_te=True)


def test_sequence_parallelism_needs_tensor_parallelism():
    """At TP 1 there is nothing to split the sequence over: the flag is ignored, as Megatron-LM's arguments do,
    and rows need no padding; at TP 2 rows must be a multiple of 2 tokens."""
    from megatron_gvpo.megatron.model import token_multiple, transformer_config

    arch = arch_from_hf(tiny_hf_config("llama", False))
    alone = transformer_config(arch, tp=1, sequence_parallel=True)
    assert not alone.sequence_parallel and token_multiple(alone) == 1
    config = transformer_config(arch, tp=2, sequence_parallel=True)
    assert config.sequence_parallel and token_multiple(config) == 2
    assert token_multiple(transformer_config(arch, tp=2)) == 1
