"""Contract: rollout routing replay (`megatron_gvpo.megatron.routing_replay`). A batch's `routed_experts`
[rows, tokens, MoE layers, top_k] route every token of every trainer forward: replaying the experts the model
chose itself changes nothing, and replaying other experts gives the logits and the GVPO gradient of
transformers' model forced to the same experts (the independent oracle: its router's top-k replaced, its
gate weights still its own softmax), under expert, tensor (with sequence parallelism) and pipeline
parallelism."""

import contextlib

import pytest
import torch

from megatron_gvpo.algo import gvpo_loss, sequence_logprob
from megatron_gvpo.models.arch import arch_from_hf
from megatron_gvpo.models.hf_maps import hf_to_megatron
from tests.test_gvpo_megatron import BETA, SEQ, assert_matches_reference, make_batch, run_on_megatron
from tests.test_megatron_model import saved_tensors, tiny_hf_model, tiny_megatron_model


def random_routes(rows: int, tokens: int, layers: int, experts: int, top_k: int, seed: int = 11) -> torch.Tensor:
    """k distinct experts per token and layer, drawn uniformly: mostly not the ones the router would pick."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, tokens, layers, experts, generator=g).argsort(-1)[..., :top_k]


@contextlib.contextmanager
def hf_forced_routing(model, routes: torch.Tensor):
    """transformers' MoE routers choose `routes` [rows, tokens, MoE layers, k] instead of their top-k; the gate
    weights are still the softmax of the router's own logits (renormalised over the k when the config says
    so), which is all a router does besides the top-k."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    classes = {type(r) for r in routers}
    originals = {cls: cls.forward for cls in classes}

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        chosen = self.forced_routes
        weights = torch.softmax(logits.float(), -1).gather(1, chosen)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(logits.dtype), chosen

    for ordinal, router in enumerate(routers):
        router.forced_routes = routes[:, :, ordinal].reshape(-1, routes.shape[-1])  # HF: [batch, seq] order
    for cls in classes:
        cls.forward = forward
    try:
        yield
    finally:
        for cls, f in originals.items():
            cls.forward = f


def replay_logits_run(model_type, tp, ep, pp, routes):
    """Every rank: the tiny model with replay-capable routers; logits of (a) its own routing, recorded, (b) a
    replay of what was recorded and (c) a replay of `routes`; last stage returns them, TP-gathered."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.megatron.routing_replay import moe_routers, record_routes, recorded_routes
    from megatron_gvpo.megatron.step import forward_step

    apply_cpu_compat()
    ctx = initialize_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep), seed=0)
    try:
        _, arch, _, model = tiny_megatron_model(model_type, False, ctx, routing_replay=True)
        model.eval()
        b, s = routes.shape[:2]
        tokens = torch.randint(0, arch.vocab_size, (b, s), generator=torch.Generator().manual_seed(7))
        mb = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s)}

        def logits(routed=None):
            out = []

            def head(_mb, _weight, output):
                out.append(output.detach())
                return output.sum() * 0, {}

            with torch.no_grad():
                get_forward_backward_func()(
                    forward_step_func=lambda it, m: forward_step(it, m, head=head),
                    data_iterator=iter([{**mb, **({"routed_experts": routed} if routed is not None else {})}]),
                    model=[model], num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
            if not out:
                return None
            shards = [torch.empty_like(out[0]) for _ in range(tp)]
            dist.all_gather(shards, out[0].contiguous(), group=ctx.tp_group)
            return torch.cat(shards, -1)[..., :arch.vocab_size]

        record_routes(model, True)
        own = logits()
        # This stage's recorded [tokens, k] per MoE layer, [s(/tp), b] order, back to [b, s, k] in the given
        # routes' place of that layer.
        stage_routes = routes.clone()
        for (layer, _), r in zip(moe_routers(model), recorded_routes(model), strict=True):
            r = r.reshape(-1, b, r.shape[-1])
            if tp > 1:  # sequence parallelism: each TP rank routed its slice of the sequence
                parts = [torch.empty_like(r) for _ in range(tp)]
                dist.all_gather(parts, r.contiguous(), group=ctx.tp_group)
                r = torch.cat(parts)
            stage_routes[:, :, layer] = r.transpose(0, 1)
        record_routes(model, False)
        replayed_own = logits(stage_routes)
        replayed = logits(routes)
        return None if own is None else (tokens, own, replayed_own, replayed)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("model_type, tp, ep, pp, world", [
    ("qwen3_moe", 1, 2, 1, 2),
    ("mixtral", 2, 2, 1, 4),
    ("qwen3_moe_softmax", 1, 1, 2, 2),
])
def test_replayed_forward_uses_exactly_the_given_experts(gloo, model_type, tp, ep, pp, world):
    hf_model = tiny_hf_model(model_type, False)
    arch = arch_from_hf(hf_model.config)
    routes = random_routes(2, 12, sum(arch.moe_layers), arch.num_experts, arch.moe_top_k)
    results = [r for r in gloo.run(world, replay_logits_run, model_type, tp, ep, pp, routes) if r is not None]
    assert results
    for tokens, own, replayed_own, replayed in results:
        with torch.no_grad():
            want_own = hf_model(tokens).logits
            with hf_forced_routing(hf_model, routes):
                want = hf_model(tokens).logits
        if pp == 1:  # with PP the recorded routes are the last stage's only; replay must still change nothing
            assert float((own - want_own).abs().max()) < 1e-4
        assert torch.equal(replayed_own, own)
        assert float((replayed - want).abs().max()) < 1e-4
        assert float((want - want_own).abs().max()) > 1e-2  # the forced experts matter


def replay_grads_run(model_type, tp, ep, dp, mbs, strategy, routes):
    from megatron_gvpo.megatron.step import forward_backward_gvpo

    def run(chunks, ctx, logprobs):
        batch = {**make_batch([4, 4, 4, 4]), "routed_experts": routes.to(torch.int16)}  # as `collate` stores them
        return forward_backward_gvpo(chunks, batch, ctx, micro_batch_size=mbs, beta=BETA, strategy=strategy,
                                     logprobs=logprobs)

    return run_on_megatron(run, model_type, False, tp, 1, None, sequence_parallel=tp > 1, ep=ep,
                           routing_replay=True)


@pytest.mark.parametrize("model_type, tp, ep, dp, mbs, strategy", [
    ("qwen3_moe", 1, 2, 2, 2, "allgather"),
    ("mixtral", 2, 2, 2, 4, "group_atomic"),
])
def test_replayed_gvpo_gradient_equals_forced_transformers(gloo, model_type, tp, ep, dp, mbs, strategy):
    """Forward and backward both use the replayed experts; the router still learns through the gate weights of
    the replayed experts."""
    batch = make_batch([4, 4, 4, 4])
    model = tiny_hf_model(model_type, False)
    arch = arch_from_hf(model.config)
    routes = random_routes(16, SEQ, sum(arch.moe_layers), arch.num_experts, arch.moe_top_k)
    with hf_forced_routing(model, routes):
        logits = model(batch["tokens"]).logits.float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    loss = gvpo_loss(sequence_logprob(token_logp, batch["loss_mask"]), batch["ref_seq_logp"], batch["rewards"],
                     batch["group_ids"], BETA)
    loss.backward()
    ref = dict(hf_to_megatron(arch, saved_tensors(model, {n: p.grad for n, p in model.named_parameters()}),
                              arch.vocab_size))
    assert float(ref["decoder.layers.0.mlp.router.weight"].abs().max()) > 0
    results = gloo.run(tp * dp, replay_grads_run, model_type, tp, ep, dp, mbs, strategy, routes)
    assert_matches_reference(results, tp, dp, float(loss.detach()), ref, f"{model_type} {tp=} {ep=} {dp=}")


def test_unsupported_layouts_are_refused():
    from megatron_gvpo.megatron.routing_replay import check_routing_replay_support

    with pytest.raises(ValueError, match=r"does not support train.packing='thd' and parallel.cp > 1"):
        check_routing_replay_support(packing="thd", cp=2, pp=1, recompute="none")
    check_routing_replay_support(packing="padded", cp=1, pp=2, recompute="none")


def test_collate_aligns_routes_with_the_rows():
    """A group's routes (one per response: prompt + response - 1 positions) land on their row's tokens; the
    last token and the padding get distinct experts 0..k-1; a route count that does not fit its row fails."""
    from megatron_gvpo.data.groups import Group, collate

    routes = [torch.full((3 + r - 1, 2, 2), 7 + r, dtype=torch.int16) for r in (2, 4)]
    group = Group((1, 2, 3), ((4, 5), (4, 5, 6, 7)), (1.0, 0.0), "test:1", tuple(routes))
    batch = collate([group], seq_len=9)
    got = batch["routed_experts"]
    assert got.shape == (2, 9, 2, 2) and got.dtype == torch.int16
    assert (got[0, :4] == 9).all() and (got[1, :6] == 11).all()
    assert (got[0, 4:] == torch.tensor([0, 1], dtype=torch.int16)).all()
    bad = Group((1, 2, 3), ((4, 5),), (1.0,), "data.jsonl:3", (routes[1],))
    with pytest.raises(ValueError, match=r"6 routed positions for a row of 5 tokens \(data.jsonl:3\)"):
        collate([bad], seq_len=9)
