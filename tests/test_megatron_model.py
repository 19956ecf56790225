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
    if model_type == "qwen3_moe":  # 8 experts top-2, renormalised; layer 1 dense (mlp_only_layers)
        return transformers.Qwen3MoeConfig(**common, head_dim=24, num_experts=8, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if model_type == "qwen3_moe_softmax":  # top-2 weights straight from the softmax over all experts
        return transformers.Qwen3MoeConfig(**common, head_dim=24, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=False)
    if model_type == "mixtral":
        return transformers.MixtralConfig(**{**common, "intermediate_size": 48}, num_local_experts=4,
                                          num_experts_per_tok=2)
    return transformers.MistralConfig(**common, head_dim=24, sliding_window=4096)


def saved_tensors(model, values: dict | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors (or `values`, e.g. gradients, by parameter name in their place) under the names and
    layout of its saved checkpoint, by transformers' own save_pretrained: transformers 5 fuses a MoE layer's
    experts into one tensor in memory and splits them again on save, and the checkpoint is what users,
    SGLang and our name maps see. Tied models keep no lm_head.weight."""
    import copy
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    if values is not None:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(values[name] if values.get(name) is not None else torch.zeros_like(p))
    # Under torch.distributed transformers writes on global rank 0 only; every test rank needs its own copy.
    model.should_save_on_this_rank = lambda is_main_process: True
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(f))
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


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
         ("qwen3", True), ("qwen3_moe", False), ("qwen3_moe_softmax", True), ("mixtral", False)]


@pytest.mark.parametrize("model_type, tied", CASES)
def test_name_maps_round_trip(model_type, tied):
    model = tiny_hf_model(model_type, tied)
    hf = saved_tensors(model)
    arch = arch_from_hf(model.config)
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


def tiny_megatron_model(model_type: str, tied: bool, ctx, load_hf: bool = True, **config_kwargs):
    """(HF model, arch, padded vocabulary, this rank's single-chunk Megatron model of it) at `ctx`'s layout,
    with the HF weights loaded unless `load_hf` is False. A mixture of experts gets sequence parallelism (which
    it needs under TP); `config_kwargs` go to `transformer_config`."""
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config
    from megatron_gvpo.megatron.weights import load_hf_weights

    hf_model = tiny_hf_model(model_type, tied)
    arch = arch_from_hf(hf_model.config)
    padded = padded_vocab_size(arch.vocab_size, ctx.tp_size)
    config = transformer_config(arch, tp=ctx.tp_size, pp=ctx.pp_size, ep=ctx.ep_size, etp=ctx.etp_size,
                                sequence_parallel=arch.is_moe, **config_kwargs)
    model = build_gpt_model(arch, config, padded_vocab_size=padded, max_sequence_length=64,
                            pre_process=ctx.is_first_stage(), post_process=ctx.is_last_stage())
    if load_hf:
        load_hf_weights([model], arch, saved_tensors(hf_model), tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                        padded_vocab_size=padded, etp_rank=ctx.etp_rank, etp_size=ctx.etp_size)
    return hf_model, arch, padded, model


def megatron_logits_run(model_type, tied, tp, pp, megatron_checkpoint=None, ep=1, etp=None, dispatcher="alltoall"):
    """On every rank: build this stage's chunk, load HF weights (or the weights of a Megatron checkpoint made
    from them), run forward (through the pipeline schedule when PP > 1), gather the vocab-parallel logits on
    the last stage and compare to HF."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gvpo.megatron.config import MoEConfig, ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.megatron.weights import load_model_weights

    apply_cpu_compat()
    ctx = initialize_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp), seed=123)
    try:
        hf_model, arch, _, model = tiny_megatron_model(model_type, tied, ctx, load_hf=megatron_checkpoint is None,
                                                       moe=MoEConfig(token_dispatcher=dispatcher))
        model.eval()
        if megatron_checkpoint is not None:
            load_model_weights([model], megatron_checkpoint)

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
        if not ctx.is_last_stage():
            return None
        local = outputs[0]  # [B, S, V_padded / tp]
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
        logits = torch.cat(shards, dim=-1)[..., :VOCAB]
        with torch.no_grad():
            want = hf_model(ids).logits
        diff = float((logits - want).abs().max())
        assert diff < 1e-4, f"{model_type} tied={tied} tp={tp} pp={pp} ep={ep}: max |megatron - hf| = {diff}"
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


MOE_CASES = [
    # (model, tied, tp, pp, ep, etp, world): experts split over EP ranks carved out of DP, alone or with TP
    # (experts split like the dense MLP, or whole with etp 1) and PP (a stage may hold the dense layer).
    ("qwen3_moe", False, 1, 1, 2, None, 2),
    ("mixtral", False, 1, 1, 4, None, 4),
    ("qwen3_moe", False, 2, 1, 2, None, 4),
    ("qwen3_moe", False, 2, 1, 2, 1, 2),
    ("mixtral", False, 1, 2, 2, None, 4),
    ("qwen3_moe_softmax", True, 2, 2, 1, None, 4),
]


def test_moe_allgather_dispatcher_gives_the_same_logits(gloo):
    """moe.token_dispatcher='allgather' (every EP rank sees all tokens and keeps its experts' share)."""
    diffs = gloo.run(4, megatron_logits_run, "qwen3_moe", False, 2, 1, None, 2, None, "allgather")
    assert max(diffs) < 1e-4


@pytest.mark.parametrize("model_type, tied, tp, pp, ep, etp, world", MOE_CASES)
def test_moe_logits_equal_hf_under_expert_parallelism(gloo, model_type, tied, tp, pp, ep, etp, world):
    """Mixture-of-experts layers (router, routed experts, the all-to-all token dispatch on gloo) give
    transformers' logits on every layout: every data-parallel replica's last stage checks them."""
    diffs = gloo.run(world, megatron_logits_run, model_type, tied, tp, pp, None, ep, etp)
    last_stage = [d for d in diffs if d is not None]
    assert len(last_stage) == world // pp and max(last_stage) < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"),
         r"model_type='gpt2' is not supported; supported: \['llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', "
         r"'qwen3_moe'\]"),
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


def test_moe_layout_errors_name_the_fields():
    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.model import transformer_config

    moe = arch_from_hf(tiny_hf_config("qwen3_moe", False))  # 8 experts of width 32
    with pytest.raises(ValueError, match=r"parallel\.ep=3 must divide the 8 experts; .* are 1, 2, 4, 8"):
        transformer_config(moe, ep=3)
    with pytest.raises(ValueError, match=r"parallel\.etp=3 \(default: tp\) must divide moe_intermediate_size=32"):
        transformer_config(moe, etp=3)
    with pytest.raises(ValueError, match=r"at parallel\.tp=2 needs parallel\.sequence_parallel=true"):
        transformer_config(moe, tp=2)
    with pytest.raises(ValueError, match=r"parallel\.ep=2 needs a mixture-of-experts model; llama is dense"):
        transformer_config(arch_from_hf(tiny_hf_config("llama", False)), ep=2)
    with pytest.raises(ValueError, match=r"parallel\.etp \* parallel\.ep = 1 \* 4 must divide the 2 ranks"):
        ParallelConfig(ep=4, world_size=2).validate()
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 is not supported"):
        arch_from_hf({**tiny_hf_config("mixtral", False).to_dict(), "router_jitter_noise": 0.1})


def write_hf_run(model_type, tp, ep, etp, pp, assets, out):
    """Every rank: load the tiny model's weights into its shard (experts split over EP and expert TP) and write
    them back as an HF checkpoint with the weight sync's writer (a collective)."""
    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.rollout.weight_sync import write_hf_checkpoint

    apply_cpu_compat()
    ctx = initialize_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp), seed=0)
    try:
        _, arch, padded, model = tiny_megatron_model(model_type, False, ctx)
        write_hf_checkpoint([model], arch, ctx, padded, out, assets)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("model_type, tp, ep, etp, pp, world", [
    ("qwen3_moe", 2, 2, None, 1, 4),
    ("mixtral", 2, 2, 1, 1, 2),
    ("qwen3_moe", 1, 2, None, 2, 4),
])
def test_moe_weights_reach_rollout_whole_from_every_expert_layout(gloo, tmp_path, model_type, tp, ep, etp, pp, world):
    """What every weight sync sends (`weight_sync.hf_tensors`, here through the disk writer): each expert
    gathered from its EP rank and expert-TP shards, every tensor bitwise the checkpoint's, and transformers
    loads the result."""
    import transformers
    from safetensors.torch import load_file

    hf_model = tiny_hf_model(model_type, False)
    hf_model.save_pretrained(tmp_path / "assets")
    gloo.run(world, write_hf_run, model_type, tp, ep, etp, pp, str(tmp_path / "assets"), str(tmp_path / "out"))
    written = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        written.update(load_file(f))
    want = saved_tensors(hf_model)
    assert set(written) == set(want)
    for name, t in want.items():
        assert torch.equal(written[name], t), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf_model(ids).logits)
