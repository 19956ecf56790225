"""Contract: the GVPO gradient computed through Megatron's schedule (`megatron_gvpo.megatron.step.
forward_backward_gvpo`: forward_step -> vocab-parallel log-probs -> GVPO head, DDP gradient reduction) equals
the gradient of the paper's loss computed by Hugging Face transformers' model with plain log_softmax on the
whole batch in one process (fp32, rtol 1e-5 relative to the largest gradient entry of each tensor), for every
layout TP in {1,2}, PP in {1,2,4, 2 with virtual stages}, DP in {1,2}, micro-batch sizes 1..4 and all three
group strategies. The loss value reported equals the reference loss too."""

import pytest
import torch

from megatron_gvpo.algo import gvpo_loss, sequence_logprob
from megatron_gvpo.data.batch import check_group_layout, make_targets
from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
from megatron_gvpo.models.hf_maps import hf_to_megatron
from tests.test_megatron_model import saved_tensors, tiny_hf_model

BETA = 0.3
SEQ = 10


def make_batch(group_sizes, seed=0, seq=SEQ):
    """Rows of `seq` tokens in contiguous groups: 3-token prompts, responses of 2..seq-3 tokens, right padding,
    one group with all-equal rewards, and reference log-probs that differ from the policy's so the beta term
    matters."""
    g = torch.Generator().manual_seed(seed)
    n = sum(group_sizes)
    tokens = torch.randint(1, 97, (n, seq), generator=g)
    response = torch.zeros(n, seq, dtype=torch.bool)
    for i in range(n):
        length = int(torch.randint(2, seq - 3 + 1, (1,), generator=g))
        response[i, 3 : 3 + length] = True
        tokens[i, 3 + length :] = 0
    targets, loss_mask = make_targets(tokens, response)
    group_ids = torch.cat([torch.full((k,), 1000 + j) for j, k in enumerate(group_sizes)])
    rewards = torch.rand(n, generator=g, dtype=torch.float64).float()
    rewards[group_ids == 1001] = 0.5
    ref_seq_logp = -30 + 3 * torch.randn(n, generator=g)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, rewards=rewards, group_ids=group_ids,
                ref_seq_logp=ref_seq_logp)


def reference_grads(model_type, tied, batch, length_normalized=False):
    """Independent oracle: HF modeling code, full-vocabulary log_softmax, the whole batch at once."""
    model = tiny_hf_model(model_type, tied)
    logits = model(batch["tokens"]).logits.float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    seq_logp, ref_seq_logp = sequence_logprob(token_logp, batch["loss_mask"]), batch["ref_seq_logp"]
    if length_normalized:  # the variant: mean token log-probs of each response
        lengths = batch["loss_mask"].sum(1)
        seq_logp, ref_seq_logp = seq_logp / lengths, ref_seq_logp / lengths
    loss = gvpo_loss(seq_logp, ref_seq_logp, batch["rewards"], batch["group_ids"], BETA)
    loss.backward()
    arch = arch_from_hf(model.config)
    grads = saved_tensors(model, {n: p.grad for n, p in model.named_parameters()})  # checkpoint names and layout
    return float(loss.detach()), dict(hf_to_megatron(arch, grads, arch.vocab_size))


def megatron_grads_run(model_type, tied, tp, pp, vpp, mbs, strategy, group_sizes, fused=False,
                       sequence_parallel=False, seq=SEQ, ep=1, etp=None, moe=None, length_normalized=False):
    """Every rank: build its chunks, load HF weights, wrap in Megatron DDP, run forward_backward_gvpo; return
    the loss (last stage) and this rank's full-vocab-trimmed gradient shards by global name."""
    from megatron_gvpo.megatron.step import forward_backward_gvpo

    def run(chunks, ctx, logprobs):
        batch = make_batch(group_sizes, seq=seq)
        check_group_layout(batch["group_ids"], ctx.dp_size, mbs, strategy)
        return forward_backward_gvpo(chunks, batch, ctx, micro_batch_size=mbs, beta=BETA, strategy=strategy,
                                     logprobs=logprobs, length_normalized=length_normalized)

    return run_on_megatron(run, model_type, tied, tp, pp, vpp, fused, sequence_parallel, ep, etp, moe)


def run_on_megatron(run, model_type, tied, tp, pp, vpp, fused=False, sequence_parallel=False, ep=1, etp=None,
                    moe=None, routing_replay=False):
    """Every rank: build its chunks from `tiny_hf_model`'s weights, wrap them in Megatron DDP and call
    `run(chunks, ctx, logprobs)` (a forward-backward pass returning {"loss", ...} or None); return the loss
    (last stage), the (TP, expert-TP) ranks and this rank's gradient shards by global name."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.model import build_gpt_model, return_hidden_states, token_multiple, transformer_config
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.megatron.step import LogprobSpec
    from megatron_gvpo.megatron.weights import global_named_parameters, load_hf_weights

    apply_cpu_compat()
    ctx = initialize_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp), seed=1)
    try:
        hf_model = tiny_hf_model(model_type, tied)
        arch = arch_from_hf(hf_model.config)
        padded = padded_vocab_size(arch.vocab_size, tp)
        config = transformer_config(arch, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sequence_parallel=sequence_parallel,
                                    moe=moe, routing_replay=routing_replay)
        chunks = [
            build_gpt_model(arch, config, padded_vocab_size=padded, max_sequence_length=64,
                            pre_process=ctx.is_first_stage(v), post_process=ctx.is_last_stage(v),
                            vp_stage=v if vpp else None)
            for v in range(ctx.num_model_chunks)
        ]
        load_hf_weights(chunks, arch, saved_tensors(hf_model), tp_rank=ctx.tp_rank, tp_size=tp,
                        padded_vocab_size=padded, etp_rank=ctx.etp_rank, etp_size=ctx.etp_size)
        if fused:
            for c in chunks:
                return_hidden_states(c)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
        chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        config.finalize_model_grads_func = finalize_model_grads
        for c in chunks:
            c.zero_grad_buffer()
        # The fused head as the engine runs it: the output weight's gradient straight into DDP's main_grad.
        logprobs = LogprobSpec(tp_group=ctx.tp_group, vocab_size=arch.vocab_size, chunk_size=5, fused=fused,
                               main_grad_accumulation=fused, pad_multiple=token_multiple(config))
        out = run(chunks, ctx, logprobs)
        grads = {}
        for chunk in chunks:
            for name, p in global_named_parameters(chunk):
                grads[name] = p.main_grad.detach().clone()
        return (out["loss"] if out else None), (ctx.tp_rank, ctx.etp_rank), grads
    finally:
        destroy_parallel()


def assemble(results, tp, etp=None):
    """Full gradients from every rank's shards (TP, and expert-TP for experts, unshard through the production
    sharding rules). Each expert's gradient comes from the EP rank that holds it."""
    from megatron_gvpo.models.sharding import is_expert, unshard

    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for _, (tp_rank, etp_rank), grads in results:
        for name, g in grads.items():
            by_name.setdefault(name, {})[etp_rank if is_expert(name) else tp_rank] = g
    size = {True: tp if etp is None else etp, False: tp}
    return {name: unshard(name, [shards[r] for r in range(size[is_expert(name)])]) for name, shards in by_name.items()}


def assert_matches_reference(results, tp, dp, ref_loss, ref, context="", etp=None):
    """Every last-stage rank's loss and the gradients assembled from every rank's shards equal the reference:
    rtol 1e-5 on the loss, on each gradient relative to its largest entry."""
    losses = [loss for loss, _, _ in results if loss is not None]
    assert len(losses) == tp * dp, context
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=1e-5), context
    got = assemble(results, tp, etp)
    ref = dict(ref)
    if "output_layer.weight" in got and "output_layer.weight" not in ref:
        # Tied embeddings across stages: the last stage's copy gets the summed gradient too.
        ref["output_layer.weight"] = ref["embedding.word_embeddings.weight"]
    assert set(got) == set(ref), context
    for name, want in ref.items():
        err = float((got[name][: want.shape[0]] - want).abs().max() / want.abs().max().clamp(min=1e-12))
        assert err < 1e-5, f"{name}: max |grad - ref| / max |ref| = {err:.2e} ({context})"


LAYOUTS = [
    # (tp, pp, vpp, dp, mbs, strategy, group sizes)
    (1, 1, None, 1, 4, "group_atomic", [4, 4, 4, 4]),
    (1, 1, None, 1, 1, "prepass", [4, 3, 5, 2, 1, 1]),
    (2, 1, None, 1, 4, "group_atomic", [4, 4, 4, 4]),
    (1, 2, None, 1, 2, "prepass", [3, 5, 2, 4, 1, 1]),
    (1, 2, 2, 1, 2, "prepass", [4, 4, 4, 4]),
    (1, 4, None, 1, 4, "group_atomic", [4, 4, 4, 4]),
    (1, 1, None, 2, 2, "allgather", [4, 4, 4, 4]),
    (1, 1, None, 2, 4, "group_atomic", [2, 2, 4, 4, 4]),
    (1, 1, None, 2, 3, "prepass", [4, 3, 5, 2, 4, 6]),
    (2, 2, None, 1, 4, "allgather", [4, 4, 4, 4]),
    (2, 1, None, 2, 2, "allgather", [2, 2, 4, 4, 4]),
    (1, 2, None, 2, 1, "allgather", [2, 2, 2, 2, 2, 2, 2, 2]),
]


@pytest.mark.parametrize("tp, pp, vpp, dp, mbs, strategy, group_sizes", LAYOUTS)
def test_gradient_equals_single_process_hf_reference(gloo, tp, pp, vpp, dp, mbs, strategy, group_sizes):
    batch = make_batch(group_sizes)
    ref_loss, ref = reference_grads("llama", False, batch)
    results = gloo.run(tp * pp * dp, megatron_grads_run, "llama", False, tp, pp, vpp, mbs, strategy, group_sizes)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{tp=} {pp=} {vpp=} {dp=} {mbs=} {strategy}")


@pytest.mark.parametrize("tp, pp, dp, mbs, strategy, group_sizes", [
    (2, 1, 1, 4, "group_atomic", [4, 4, 4, 4]),
    (1, 2, 2, 2, "allgather", [4, 4, 4, 4]),
    (1, 1, 2, 3, "prepass", [4, 3, 5, 2, 4, 6]),
])
def test_length_normalized_variant_equals_its_reference(gloo, tp, pp, dp, mbs, strategy, group_sizes):
    """`algo.gvpo_variant: length_normalized` (a variant, not the paper's loss): the same loss on mean token
    log-probs, policy's and reference's; exact under each group strategy, and not the paper's gradient."""
    batch = make_batch(group_sizes)
    ref_loss, ref = reference_grads("llama", False, batch, length_normalized=True)
    paper_loss, _ = reference_grads("llama", False, batch)
    assert abs(ref_loss - paper_loss) > 1e-3 * abs(paper_loss)
    results = gloo.run(tp * pp * dp, megatron_grads_run, "llama", False, tp, pp, None, mbs, strategy, group_sizes,
                       False, False, SEQ, 1, None, None, True)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"length-normalized {tp=} {pp=} {dp=} {strategy}")


@pytest.mark.parametrize(
    "model_type, tied, tp, pp, dp, mbs, strategy",
    [
        ("llama", False, 1, 1, 1, 4, "group_atomic"),
        ("llama", False, 2, 1, 1, 2, "prepass"),
        ("qwen2", True, 1, 2, 1, 4, "group_atomic"),
        ("llama", False, 2, 1, 2, 2, "allgather"),
        # Tied on one stage: the lookup's gradient comes through DDP's hook, the head's straight into main_grad.
        ("qwen2", True, 1, 1, 1, 4, "group_atomic"),
        ("qwen2", True, 2, 1, 1, 2, "prepass"),
        # q/k norms: each TP rank normalises its own heads, so their gradients are summed over TP.
        ("qwen3", False, 2, 1, 1, 4, "group_atomic"),
        ("qwen3", True, 2, 2, 1, 4, "group_atomic"),
    ],
)
def test_fused_logprob_head_gives_the_same_gradient(gloo, model_type, tied, tp, pp, dp, mbs, strategy):
    """`train.fused_logprobs`: the model returns hidden states and the head multiplies by the output weight
    chunk by chunk; loss and every gradient (the output weight's included) equal the HF reference."""
    group_sizes = [4, 4, 4, 4]
    batch = make_batch(group_sizes)
    ref_loss, ref = reference_grads(model_type, tied, batch)
    results = gloo.run(tp * pp * dp, megatron_grads_run, model_type, tied, tp, pp, None, mbs, strategy,
                       group_sizes, True)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{model_type} {tied=} {tp=} {pp=} {dp=} {mbs=}")


@pytest.mark.parametrize(
    "model_type, tied, tp, pp, dp, mbs, strategy, fused, seq",
    [
        ("llama", False, 2, 1, 1, 4, "group_atomic", False, SEQ),
        ("llama", False, 2, 1, 1, 2, "prepass", False, 9),  # rows padded to a multiple of TP
        ("llama", False, 2, 2, 1, 2, "prepass", False, SEQ),
        ("llama", False, 2, 1, 2, 2, "allgather", True, 9),
        ("qwen2", True, 2, 1, 1, 4, "group_atomic", True, SEQ),
        ("qwen2", True, 2, 2, 1, 4, "group_atomic", False, 9),
        ("qwen3", False, 2, 1, 1, 4, "group_atomic", True, SEQ),
    ],
)
def test_sequence_parallel_gives_the_same_gradient(gloo, model_type, tied, tp, pp, dp, mbs, strategy, fused, seq):
    """Sequence parallelism splits each row over the TP ranks between the tensor-parallel matmuls: loss and
    every gradient (the norms', summed over the TP ranks, included) still equal the HF reference, with the
    logits head and the fused head (which gathers the sequence first)."""
    group_sizes = [4, 4, 4, 4]
    ref_loss, ref = reference_grads(model_type, tied, make_batch(group_sizes, seq=seq))
    results = gloo.run(tp * pp * dp, megatron_grads_run, model_type, tied, tp, pp, None, mbs, strategy,
                       group_sizes, fused, True, seq)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{model_type} {tied=} {tp=} {pp=} {dp=} {fused=}")


def test_tied_embeddings_across_pipeline_stages(gloo):
    """With tied embeddings and PP=2 the embedding gradient is the sum of both stages' contributions."""
    group_sizes = [4, 4, 4, 4]
    batch = make_batch(group_sizes)
    ref_loss, ref = reference_grads("qwen2", True, batch)
    results = gloo.run(2, megatron_grads_run, "qwen2", True, 1, 2, None, 4, "group_atomic", group_sizes)
    assert "embedding.word_embeddings.weight" in ref and "output_layer.weight" not in ref
    assert_matches_reference(results, 1, 1, ref_loss, ref, "qwen2, tied, PP=2")


MOE_LAYOUTS = [
    # (model, tp, pp, dp, ep, etp, mbs, strategy, fused): experts over EP ranks carved out of DP, with TP
    # (experts split like the dense MLP, or whole at etp 1; sequence parallelism, which MoE needs under TP),
    # PP and the fused head; micro-batches that split groups (allgather, prepass).
    ("qwen3_moe", 1, 1, 2, 2, None, 4, "group_atomic", False),
    ("qwen3_moe", 1, 1, 2, 2, None, 2, "allgather", True),
    ("mixtral", 1, 1, 4, 4, None, 1, "prepass", False),
    ("qwen3_moe", 2, 1, 2, 2, None, 2, "prepass", False),
    ("qwen3_moe", 2, 1, 1, 2, 1, 4, "group_atomic", True),
    ("mixtral", 1, 2, 2, 2, None, 2, "allgather", False),
    # Each expert on two ranks (expert data parallelism 2): its gradient is averaged over them.
    ("qwen3_moe", 1, 1, 4, 2, None, 2, "allgather", False),
    ("mixtral", 2, 1, 2, 2, 1, 2, "prepass", True),
]


@pytest.mark.parametrize("model_type, tp, pp, dp, ep, etp, mbs, strategy, fused", MOE_LAYOUTS)
def test_moe_gradient_equals_hf_reference_under_expert_parallelism(gloo, model_type, tp, pp, dp, ep, etp, mbs,
                                                                     strategy, fused):
    """GVPO on a mixture of experts (router losses off): loss and every gradient (router, each expert's, the
    dense layer's) equal transformers' single-process reference, the expert gradients reduced by Megatron's
    DDP over the expert-data-parallel group."""
    group_sizes = [4, 4, 4, 4]
    ref_loss, ref = reference_grads(model_type, False, make_batch(group_sizes))
    results = gloo.run(tp * pp * dp, megatron_grads_run, model_type, False, tp, pp, None, mbs, strategy,
                       group_sizes, fused, tp > 1, SEQ, ep, etp)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{model_type} {tp=} {pp=} {dp=} {ep=} {etp=} {strategy}",
                             etp=etp)


def hf_router_losses(model, tokens):
    """[MoE layers] load-balancing and z-losses from transformers' router logits, by their definitions
    (Switch / GShard: E / (k T^2) * sum_e P_e N_e with P_e the summed softmax probability of expert e over
    the T tokens and N_e the tokens routed to it; ST-MoE: the mean of logsumexp(logits)^2)."""
    k = model.config.num_experts_per_tok
    aux, z = [], []
    for logits in model(tokens, output_router_logits=True).router_logits:
        probs = torch.softmax(logits.float(), -1)
        t, e = probs.shape
        counts = torch.zeros(e).index_add(0, logits.topk(k, -1).indices.reshape(-1), torch.ones(t * k))
        aux.append(e / (k * t * t) * (probs.sum(0) * counts).sum())
        z.append(torch.logsumexp(logits, -1).square().mean())
    return torch.stack(aux), torch.stack(z)


def router_losses_run(model_type, dp, ep, moe):
    from megatron_gvpo.megatron.engine import router_loss_metrics
    from megatron_gvpo.megatron.step import forward_backward_gvpo

    def run(chunks, ctx, logprobs):
        out = forward_backward_gvpo(chunks, make_batch([4, 4, 4, 4]), ctx, micro_batch_size=16 // dp, beta=BETA,
                                    strategy="group_atomic", logprobs=logprobs)
        metrics = router_loss_metrics(arch_from_hf(tiny_hf_model(model_type, False).config), moe, ctx, 1)
        return {"loss": (out["loss"], metrics)}

    return run_on_megatron(run, model_type, False, 1, 1, None, ep=ep, moe=moe)


@pytest.mark.parametrize("model_type, dp, ep", [("qwen3_moe", 1, 1), ("mixtral", 2, 2)])
def test_router_losses_are_added_and_logged_as_megatron_does(gloo, model_type, dp, ep):
    """moe.aux_loss_coeff / z_loss_coeff: every gradient equals that of the GVPO loss plus the coefficients times
    the router losses of transformers' router logits, each data-parallel rank's rows on their own and averaged
    over the ranks (Megatron's scaling); the GVPO loss is reported alone and each router loss is logged
    without its coefficient, averaged over MoE layers."""
    from megatron_gvpo.megatron.config import MoEConfig

    moe = MoEConfig(aux_loss_coeff=0.3, z_loss_coeff=0.05)
    batch = make_batch([4, 4, 4, 4])
    model = tiny_hf_model(model_type, False)
    logits = model(batch["tokens"]).logits.float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    gvpo = gvpo_loss(sequence_logprob(token_logp, batch["loss_mask"]), batch["ref_seq_logp"], batch["rewards"],
                     batch["group_ids"], BETA)
    per_rank = [hf_router_losses(model, rows) for rows in batch["tokens"].chunk(dp)]
    aux = torch.stack([a for a, _ in per_rank]).mean(0)  # [layers], averaged over DP ranks
    z = torch.stack([z for _, z in per_rank]).mean(0)
    (gvpo + moe.aux_loss_coeff * aux.sum() + moe.z_loss_coeff * z.sum()).backward()
    arch = arch_from_hf(model.config)
    ref = dict(hf_to_megatron(arch, saved_tensors(model, {n: p.grad for n, p in model.named_parameters()}),
                              arch.vocab_size))

    results = gloo.run(dp, router_losses_run, model_type, dp, ep, moe)
    assemble_input = [((loss if loss is None else loss[0]), ranks, grads) for loss, ranks, grads in results]
    assert_matches_reference(assemble_input, 1, dp, float(gvpo), ref, f"{model_type} {dp=} {ep=}")
    for loss, _, _ in results:
        metrics = loss[1]
        assert metrics["moe_load_balancing_loss"] == pytest.approx(float(aux.mean()), rel=1e-5)
        assert metrics["moe_z_loss"] == pytest.approx(float(z.mean()), rel=1e-5)


@pytest.mark.parametrize(
    "group_ids, dp, mbs, strategy, message",
    [
        ([0, 0, 1, 1, 0], 1, 1, "prepass", "group 0 is not contiguous"),
        ([0, 0, 0, 1, 1, 1], 1, 2, "group_atomic", r"group 0 straddles a micro-batch boundary at row 2"),
        ([0, 0, 0, 1, 1, 1], 2, 2, "allgather", r"group 1 straddles a micro-batch index across DP ranks"),
    ],
)
def test_group_layout_errors(group_ids, dp, mbs, strategy, message):
    with pytest.raises(ValueError, match=message):
        check_group_layout(torch.tensor(group_ids), dp, mbs, strategy)
