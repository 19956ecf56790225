"""Rollout routing replay (R3, arXiv 2510.11370): the trainer sends each token to the experts the rollout
engine sent it to.

A mixture of experts' top-k choice is discontinuous: the trainer and the inference engine compute router
logits that differ in the last bits (other kernels, other precision), and wherever two experts are nearly tied
they pick different experts, so the trainer scores a token with another network than the one that sampled it.
Replay removes that source of trainer-vs-rollout mismatch: SGLang returns the experts it routed every token to
(`Sample.routed_experts`), the batch carries them as `routed_experts` [rows, tokens, MoE layers, top_k]
aligned with `tokens` (`data.batch.ROUTES_KEY`), and every trainer forward on that batch (old and reference
log-probs, the training pass and its backward) routes with them. The gate weights still come from the trainer's
own router logits at the replayed experts, so the router is trained as before.

Megatron-Core 0.16 has the hook (`moe_enable_routing_replay`: each router owns a `RouterReplay` whose action
REPLAY_FORWARD replaces its top-k by given indices). Megatron keeps the instances in one process-wide list;
here each chunk's routers are found in the chunk itself, so a reference copy of the model or a test that
builds many models needs no global bookkeeping. Routes are set per micro-batch right before its forward
(`forward_step`), in the order the router sees tokens: [sequence, batch] flattened, this rank's slice of the
sequence under sequence parallelism.

Not covered: packed (THD) sequences and context parallelism (the rows would have to be laid out like the
tokens; both need Transformer Engine anyway), and activation recomputation under pipeline parallelism (the
recomputed forward would see the routes of a later micro-batch; Megatron's REPLAY_BACKWARD queue is not wired
in). `check_routing_replay_support` refuses those layouts up front.
"""

from __future__ import annotations

import torch


def check_routing_replay_support(*, packing: str, cp: int, pp: int, recompute: str) -> None:
    unsupported = [what for what, bad in (("train.packing='thd'", packing == "thd"), ("parallel.cp > 1", cp > 1),
                                          ("train.recompute='full' with parallel.pp > 1",
                                           recompute == "full" and pp > 1)) if bad]
    if unsupported:
        raise ValueError(f"rollout.routing_replay does not support {' and '.join(unsupported)} "
                         "(megatron_gvpo/megatron/routing_replay.py)")


def moe_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(index among the model's MoE layers, router) of every MoE layer in this chunk, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_gvpo.megatron.model import unwrap

    model = unwrap(model)
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    moe_before = getattr(model.config, "moe_layer_freq", None)
    pattern = moe_before if isinstance(moe_before, list) else None
    out = []
    for layer in layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if isinstance(router, TopKRouter):
            global_index = layer.layer_number - 1
            ordinal = sum(pattern[:global_index]) if pattern is not None else global_index
            out.append((ordinal, router))
    return out


def set_routes(model: torch.nn.Module, routes: torch.Tensor | None) -> None:
    """Make the chunk's routers replay `routes` [rows, s, MoE layers, k] on the next forward, or (None) route
    by their own top-k again (a recording, `record_routes`, goes on)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for ordinal, router in moe_routers(model):
        replay = router.router_replay
        if replay is None:
            if routes is not None:
                raise ValueError("the batch carries routed_experts but the model was built without routing replay "
                                 "(rollout.routing_replay)")
            continue
        if routes is None:
            if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                replay.clear_router_replay_action()
                replay.clear_indices()
            continue
        replay.clear_indices()
        per_token = routes[:, :, ordinal].transpose(0, 1)  # [s, b, k]: the router's token order
        if router.config.sequence_parallel:
            tp = router.tp_group.size()
            per_token = per_token.chunk(tp, dim=0)[router.tp_group.rank()]
        replay.set_target_indices(per_token.reshape(-1, per_token.shape[-1]).long())
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def record_routes(model: torch.nn.Module, record: bool) -> None:
    """Make the chunk's routers record the experts they choose on the next forwards (`recorded_routes`)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for _, router in moe_routers(model):
        router.router_replay.clear_indices()
        if record:
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        else:
            router.router_replay.clear_router_replay_action()


def recorded_routes(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per MoE layer of the chunk: the [tokens, k] experts of the last recorded forward, in router order."""
    return [router.router_replay.get_recorded_indices() for _, router in moe_routers(model)]
