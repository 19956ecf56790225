"""Plan a GVPO run before it starts, on a CPU: the rank layout of every role, memory per GPU, a step-time and
MFU estimate from a FLOP and bandwidth model, and the weight-sync estimate. Invalid layouts fail with the reason.

    python -m megatron_gvpo.plan --config configs/gvpo_70b.yaml --nodes 8 --gpus-per-node 8

The launch scripts run it first (launch/); `plan()` returns the same numbers as a `Plan` for tests and tools.

The model is deliberately simple and states its assumptions (`Hardware`, `EFFICIENCY`):
- Memory per trainer GPU, for the pipeline stage that holds the most: weights in `model.dtype` (FP8 weights
  with `model.fp8_param_gather`), fp32 gradient buffers (the engine reduces gradients in fp32), Adam's fp32
  moments and master weights (sharded over DP with the distributed optimizer), a reference copy for
  `algo.reference` frozen/refresh, and activations: the tensors a Megatron layer keeps for backward, per token
  (`activation_elements_per_token`; sequence parallelism splits the ones TP alone replicates), times the
  micro-batches in flight on the first stage (1F1B keeps up to PP,
  interleaving a little more). A fixed reserve (`Hardware.reserve_gb`) covers the CUDA context, NCCL buffers
  and fragmentation.
- Memory per rollout GPU: the server's weight shard, and what is left for SGLang's KV cache at
  `SERVER_MEM_FRACTION`, as tokens.
- Time per rollout step (the loop is synchronous): generation (decode is bound by reading the weight shard and
  the KV cache from HBM, prefill by FLOPs), the old/reference log-prob pass and the training pass (FLOPs at
  `EFFICIENCY["gemm"]` of peak, plus the pipeline bubble, TP all-reduces over NVLink and the DP gradient
  reduction), and the weight sync (`weight_sync_seconds`). MFU is the training pass's model FLOPs over its
  time at the GPUs' dense bf16 peak.
Response lengths are taken at rollout.max_new_tokens (an upper bound) and every row is model.seq_length long
(the padded layout's cost).

Mixture-of-experts models (`Arch.num_experts` > 0) add, under the same simplifications:
- Parameters total and active per token (attention, dense MLPs, routers, the top-k experts of each MoE layer,
  embeddings); FLOPs (training, prefill, decode) and MFU count the active ones.
- Expert weights, fp32 gradients and Adam state per GPU: each MoE layer's experts split over parallel.ep ranks
  and each expert over parallel.etp; the distributed optimizer shards the experts' state over the
  expert-data-parallel group (edp = tp * cp * dp / (etp * ep)) and the dense parameters' over dp * cp.
- Activations of a MoE layer: every token routed to top_k experts (balanced routing: each EP rank receives its
  share), each routed copy keeping the expert's input, fc1 output and SwiGLU output; plus the router's scores.
- The token dispatcher's traffic per MoE layer and micro-batch: dispatch and combine, forward and backward
  (with `alltoall`, each rank sends tokens x top_k x hidden x (ep - 1) / ep elements each time), at
  `EFFICIENCY["alltoall"]` of NVLink when the EP group lies inside a node and of the NIC for the part that leaves
  it. The EP group is etp * ep consecutive ranks (Megatron's expert order etp-ep-dp-pp inside a pipeline
  stage). Expert-TP's all-gather and reduce-scatter of routed tokens are not counted.
- Decode reads the dense weights and the experts a step's batch touches (1 - (1 - top_k / E)^batch of them).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from megatron_gvpo.config import Config, add_config_arguments, load_config
from megatron_gvpo.models.arch import Arch, arch_from_hf, padded_vocab_size


@dataclass(frozen=True)
class Hardware:
    """Published datasheet figures (dense, without sparsity), per GPU."""

    memory_gb: float
    bf16_tflops: float
    fp8_tflops: float
    hbm_gbps: float
    nvlink_gbps: float
    """Per direction."""
    nic_gbps: float
    """Inter-node network per GPU (one 400 Gb/s NIC per GPU = 50 GB/s)."""
    reserve_gb: float = 5.0
    """Per trainer GPU beyond the tensors: CUDA context, NCCL buffers, allocator fragmentation."""


HARDWARE = {
    # NVIDIA H100 SXM datasheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s bf16 and 1979 fp8 dense, NVLink 4 900 GB/s
    # both directions; DGX H100: a ConnectX-7 400 Gb/s NIC per GPU.
    "H100-SXM-80GB": Hardware(80, 989, 1979, 3350, 450, 50),
    # H200 SXM: the H100's compute with 141 GB HBM3e at 4.8 TB/s.
    "H200-SXM-141GB": Hardware(141, 989, 1979, 4800, 450, 50),
    # A100 SXM 80 GB: 312 TFLOP/s bf16, no FP8, HBM2e 2.04 TB/s, NVLink 3 600 GB/s both directions, 200 Gb/s NIC.
    "A100-SXM-80GB": Hardware(80, 312, 0, 2039, 300, 25),
    # HGX B200: 180 GB HBM3e at 7.7 TB/s, 2250 TFLOP/s bf16 and 4500 fp8 dense, NVLink 5 1.8 TB/s both directions.
    "B200-180GB": Hardware(180, 2250, 4500, 7700, 900, 50),
    # The development VM (2 cores, 24 GB): for the memory check of the CPU configs; its rates are rough (fp32
    # GEMMs at ~0.1 TFLOP/s, memory ~20 GB/s, gloo over loopback), so its times are indicative only.
    "cpu": Hardware(24, 0.1, 0, 20, 10, 10, reserve_gb=0.0),
}

EFFICIENCY = {
    "gemm": 0.6,
    # Fraction of peak FLOP/s large training GEMMs reach end to end in a layer (Megatron-Core reports up to ~47%
    # MFU for a 175B model including communication and bubbles).
    "fp8_gemm": 0.4,
    # Of FP8 peak: NVIDIA's published Llama-3 70B FP8 runs are ~1.3-1.4x faster than bf16, not the 2x of peak.
    "hbm": 0.7,  # of HBM bandwidth a decode step reaches reading weights and KV cache
    "link": 0.8,  # of NVLink / NIC bandwidth NCCL collectives reach (nccl-tests bus bandwidth)
    "alltoall": 0.6,
    # Of NVLink / NIC bandwidth a MoE dispatch or combine reaches with Megatron's NCCL all-to-all dispatcher:
    # assumed below the ring collectives' 0.8, as it moves ep - 1 smaller messages at once. Tuned kernels do
    # better: DeepEP's README reports ~150 of H800's ~160 GB/s NVLink and 43-58 of a 50 GB/s NIC.
}
SERVER_MEM_FRACTION = 0.85
"""SGLang's --mem-fraction-static: weights + KV cache; the rest is for activations and CUDA graphs."""
BUCKET_COST_S = 6.5e-3
"""Fixed cost of one weight-sync bucket, measured (benchmarks/results/weight_sync.md)."""
BUCKET_BYTES = 256 << 20
GB = 1e9


class PlanError(ValueError):
    """The configuration cannot run on the given cluster; the message says why."""


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    trainer_memory_gb: dict[str, float] = field(default_factory=dict)
    server_memory_gb: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    mfu: float = 0.0
    params: dict[str, float] = field(default_factory=dict)
    """'total' and 'active' (per token) parameters of the model."""
    experts: dict[str, float] = field(default_factory=dict)
    """Mixture of experts only: the all-to-all per MoE layer and micro-batch ('transfer_mb' per rank for one
    dispatch or combine, 'transfer_ms') and per rollout step ('train_s', in the training pass)."""

    def text(self) -> str:
        return "\n".join(self.lines)


# ------------------------------------------------------------------------------------------------------------
# Model arithmetic


def attention_params(arch) -> int:
    """One layer's attention (with its q/k norms) and the layer's two RMSNorm weights."""
    h, kv, q = arch.hidden_size, arch.num_query_groups * arch.head_dim, arch.num_attention_heads * arch.head_dim
    attention = h * (q + 2 * kv) + q * h
    if arch.qkv_bias:
        attention += q + 2 * kv
    if arch.qk_norm:
        attention += 2 * arch.head_dim
    return attention + 2 * h


def is_moe_layer(arch, layer: int) -> bool:
    return arch.is_moe and arch.moe_layers[layer]


def expert_layer_params(arch, layer: int) -> int:
    """The experts of decoder layer `layer` (0 for a dense layer): what expert parallelism splits."""
    return arch.num_experts * 3 * arch.hidden_size * arch.moe_ffn_hidden_size if is_moe_layer(arch, layer) else 0


def layer_params(arch, layer: int = 0, *, active: bool = False) -> int:
    """Decoder layer `layer`: attention, norms and a SwiGLU MLP, or a router and its experts (`active`: the
    top_k experts a token runs through instead of all)."""
    if not is_moe_layer(arch, layer):
        return attention_params(arch) + 3 * arch.hidden_size * arch.ffn_hidden_size
    experts = expert_layer_params(arch, layer) * (arch.moe_top_k if active else arch.num_experts) // arch.num_experts
    return attention_params(arch) + arch.hidden_size * arch.num_experts + experts


def model_params(arch, *, active: bool = False) -> int:
    """All parameters, or (`active`) those one token runs through: the same for a dense model."""
    embedding = arch.vocab_size * arch.hidden_size
    layers = sum(layer_params(arch, i, active=active) for i in range(arch.num_layers))
    return layers + embedding * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size


def activation_elements_per_token(arch, tp: int, flash: bool, seq_length: int,
                                  sequence_parallel: bool = False, *, moe_layer: bool = False,
                                  etp: int = 1) -> float:
    """Elements one Megatron transformer layer keeps for backward per token (no recomputation): the two norms'
    inputs and the QKV and fc1 (or router) inputs (replicated over TP, split over it by sequence parallelism);
    per TP shard the rotated q, k, v, the attention output, the projection input, fc1's gate|up output and
    SwiGLU's output. Megatron's local spec (no Transformer Engine, the CPU path) keeps more: its unfused RMSNorm
    also keeps the normalised input, its attention repeats K and V to every query head and keeps the attention
    scores and probabilities (heads / tp x seq_length per token).
    A mixture-of-experts layer (`moe_layer`) keeps the router's logits and scores, and for each of a token's
    top_k routed copies the expert's input, fc1 output and SwiGLU output: with balanced routing a rank holds
    tokens / tp x top_k copies, gathered over the etp ranks that share its experts, at width moe_ffn / etp."""
    h, kv, f = arch.hidden_size, arch.num_query_groups * arch.head_dim, arch.ffn_hidden_size
    q = arch.num_attention_heads * arch.head_dim
    mlp = 3 * f
    replicated = (4 if flash else 6) * h
    if moe_layer:
        mlp = arch.moe_top_k * (etp * h + 3 * arch.moe_ffn_hidden_size)
        replicated += 2 * arch.num_experts
    sharded = (q + 2 * kv) + q + q + mlp
    replicated /= tp if sequence_parallel else 1
    if flash:
        return replicated + sharded / tp
    local = 2 * (q - kv) + 2 * arch.num_attention_heads * seq_length
    return replicated + (sharded + local) / tp


def weight_sync_seconds(weight_bytes: float, hw: Hardware, *, trainer_tp: int, across_nodes: bool) -> dict:
    """One DistributedWeightSync of `weight_bytes`: the TP gather on each stage's sender over NVLink, the
    broadcast to the servers (over one NIC when they are on other nodes; stages take turns), and the measured
    fixed cost per bucket."""
    link = EFFICIENCY["link"]
    gather = weight_bytes * (trainer_tp - 1) / trainer_tp / (hw.nvlink_gbps * link * GB)
    broadcast = weight_bytes / ((hw.nic_gbps if across_nodes else hw.nvlink_gbps) * link * GB)
    fixed = math.ceil(weight_bytes / BUCKET_BYTES) * BUCKET_COST_S
    return {"gather": gather, "broadcast": broadcast, "buckets": fixed, "total": gather + broadcast + fixed}


# ------------------------------------------------------------------------------------------------------------
# The plan


def plan(cfg: Config, nodes: int | None = None, gpus_per_node: int | None = None) -> Plan:
    """The plan for `cfg` on `nodes` x `gpus_per_node` GPUs (default: cfg.cluster); raises PlanError."""
    lay = _layout(cfg, nodes or cfg.cluster.nodes, gpus_per_node or cfg.cluster.gpus_per_node)
    out = Plan(params={"total": lay.total_params, "active": lay.active_params})
    _ranks(cfg, lay, out)
    alltoall_s = _experts(cfg, lay, out)
    _trainer_memory(cfg, lay, out)
    rollout = _rollout(cfg, lay, out)
    _step_time(cfg, lay, rollout, alltoall_s, out)
    return out


@dataclass(frozen=True)
class _Layout:
    """What the sections share: the hardware, the model and the parallel layout on this cluster."""

    hw: Hardware
    arch: Arch
    nodes: int
    gpn: int
    trainer_gpus: int
    dp: int
    servers: int
    colocated: bool
    online: bool
    micro_batches: int
    """Per DP rank and optimizer step."""
    tokens_mb: float
    """Tokens of one micro-batch on one CP rank."""
    layers_per_stage: int
    sequence_parallel: bool
    """In effect: asked for, and TP > 1 (`transformer_config`'s rule)."""
    dtype_bytes: int
    """Bytes per weight and per activation in model.dtype."""
    total_params: int
    active_params: int
    """Parameters one token runs through (= total_params for a dense model)."""
    gpu_params: float
    """Parameters per trainer GPU on pipeline stage 0 but for the experts."""
    embedding: int
    """Padded vocabulary x hidden size."""
    ep: int = 1
    etp: int = 1
    edp: int = 1
    """Expert data parallelism: the ranks of a stage (tp * cp * dp) over etp * ep."""
    expert_gpu_params: float = 0.0
    """Expert parameters per trainer GPU on pipeline stage 0."""
    moe_layers_per_stage: int = 0
    """MoE layers of pipeline stage 0."""


def _layout(cfg: Config, nodes: int, gpn: int) -> _Layout:
    """Check that the layout can run on the cluster (PlanError with the reason) and derive what the sections
    share."""
    from megatron_gvpo.models.hf_io import load_hf_config

    c, p, t, r = cfg.cluster, cfg.parallel, cfg.train, cfg.rollout
    if c.gpu not in HARDWARE:
        raise PlanError(f"cluster.gpu={c.gpu!r} is not in the planner's table: {sorted(HARDWARE)}")
    if c.rollout_nodes >= nodes:
        raise PlanError(f"cluster.rollout_nodes={c.rollout_nodes} leaves none of the {nodes} nodes to the trainer")
    arch = arch_from_hf(load_hf_config(cfg.model.path))
    trainer_gpus = (nodes - c.rollout_nodes) * gpn
    model_parallel = p.tp * p.pp * p.cp
    if p.tp * p.cp > gpn:
        raise PlanError(f"parallel.tp * parallel.cp = {p.tp * p.cp} exceeds the {gpn} GPUs of a node: tensor and "
                        "context parallelism need NVLink; use pipeline parallelism across nodes")
    if trainer_gpus % model_parallel:
        raise PlanError(f"{trainer_gpus} trainer GPUs ({nodes - c.rollout_nodes} nodes x {gpn}) are not a multiple "
                        f"of parallel.tp * parallel.pp * parallel.cp = {model_parallel}")
    try:
        from megatron_gvpo.megatron.model import transformer_config

        # Megatron's own divisibility rules (and MoE's need for sequence parallelism under TP), and whether
        # sequence parallelism is in effect
        megatron_config = transformer_config(arch, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=p.etp,
                                             moe=cfg.moe, sequence_parallel=p.sequence_parallel)
        cfg.check_world_size(trainer_gpus)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if r.server_tp > gpn or gpn % r.server_tp:
        raise PlanError(f"rollout.server_tp={r.server_tp} must divide cluster.gpus_per_node={gpn}")
    if arch.num_attention_heads % r.server_tp:
        raise PlanError(f"rollout.server_tp={r.server_tp} must divide num_attention_heads={arch.num_attention_heads}")

    dp = trainer_gpus // model_parallel
    colocated = c.rollout_nodes == 0
    embedding = padded_vocab_size(arch.vocab_size, p.tp) * arch.hidden_size
    layers_per_stage = arch.num_layers // p.pp
    stage0 = range(layers_per_stage)
    experts = sum(expert_layer_params(arch, i) for i in stage0)
    layers = sum(layer_params(arch, i) for i in stage0) - experts
    output_layer = 0 if arch.tie_word_embeddings else embedding
    stage_params = layers + embedding + output_layer if p.pp == 1 else max(layers + embedding, layers + output_layer)
    return _Layout(
        hw=HARDWARE[c.gpu], arch=arch, nodes=nodes, gpn=gpn, trainer_gpus=trainer_gpus, dp=dp,
        servers=(c.rollout_nodes if not colocated else nodes) * gpn // r.server_tp, colocated=colocated,
        online=r.source != "offline", micro_batches=t.global_batch_size // (t.micro_batch_size * dp),
        tokens_mb=t.micro_batch_size * cfg.model.seq_length / p.cp, layers_per_stage=layers_per_stage,
        sequence_parallel=megatron_config.sequence_parallel,
        dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype],
        total_params=model_params(arch), active_params=model_params(arch, active=True),
        gpu_params=stage_params / p.tp, embedding=embedding, ep=p.ep, etp=p.expert_tp,
        edp=p.tp * p.cp * dp // (p.expert_tp * p.ep), expert_gpu_params=experts / (p.ep * p.expert_tp),
        moe_layers_per_stage=sum(is_moe_layer(arch, i) for i in stage0),
    )


def _ranks(cfg: Config, lay: _Layout, out: Plan) -> None:
    c, p, r = cfg.cluster, cfg.parallel, cfg.rollout
    arch, gpn, trainer_gpus = lay.arch, lay.gpn, lay.trainer_gpus
    w = out.lines.append
    w(f"# Plan: {cfg.model.path} on {lay.nodes} nodes x {gpn} {c.gpu}")
    w("")
    w("## Ranks")
    trainer_nodes = lay.nodes - c.rollout_nodes
    span = "node 0" if trainer_nodes == 1 else f"nodes 0-{trainer_nodes - 1}"
    vpp = f" (VPP {p.vpp})" if p.vpp else ""
    sp = " with sequence parallelism" if lay.sequence_parallel else ""
    w(f"trainer: {span}, {trainer_gpus} ranks = TP {p.tp}{sp} x CP {p.cp} x DP {lay.dp} x PP {p.pp}{vpp}; rank = "
      f"node * {gpn} + local GPU; Megatron's order tp-cp-dp-pp: TP and CP groups are consecutive ranks inside a node, "
      f"pipeline stages {trainer_gpus // p.pp} ranks apart")
    for stage in range(p.pp):
        first = stage * trainer_gpus // p.pp
        last = first + trainer_gpus // p.pp - 1
        span = f"node {first // gpn}" if first // gpn == last // gpn else f"nodes {first // gpn}-{last // gpn}"
        w(f"  stage {stage}: ranks {first}-{last} ({span}), layers "
          f"{stage * arch.num_layers // p.pp}-{(stage + 1) * arch.num_layers // p.pp - 1}")
    where = ("on the trainer's GPUs (colocated)" if lay.colocated
             else f"on nodes {lay.nodes - c.rollout_nodes}-{lay.nodes - 1}")
    if lay.online:
        w(f"rollout: {lay.servers} SGLang servers x TP {r.server_tp} {where}, {gpn // r.server_tp} per node; a "
          "router on the first rollout node")


def _experts(cfg: Config, lay: _Layout, out: Plan) -> float:
    """The mixture of experts' parameters, layout and token traffic. Returns the seconds one rank spends in
    the dispatcher's transfers during one forward and backward over a rollout step's micro-batches (0 for a
    dense model)."""
    arch, p, hw, gpn = lay.arch, cfg.parallel, lay.hw, lay.gpn
    if not arch.is_moe:
        return 0.0
    experts = sum(expert_layer_params(arch, i) for i in range(arch.num_layers))
    # Tokens on one rank before the dispatch: its micro-batch on its CP rank, split over TP by sequence
    # parallelism.
    tokens = lay.tokens_mb / (p.tp if lay.sequence_parallel else 1)
    token_bytes = arch.hidden_size * lay.dtype_bytes
    if cfg.moe.token_dispatcher == "alltoall":  # balanced routing: each peer gets top_k / ep of the copies
        per_peer = tokens * arch.moe_top_k / lay.ep * token_bytes
    else:  # all-gather: every rank receives every peer's tokens whole
        per_peer = tokens * token_bytes
    # The EP group is etp * ep consecutive ranks: the peers on this rank's node are reached over NVLink, the
    # others through its NIC, at the same time.
    on_node = min(lay.ep, max(gpn // lay.etp, 1))
    near, far = (on_node - 1) * per_peer, (lay.ep - on_node) * per_peer
    efficiency = EFFICIENCY["alltoall"]
    transfer = max(near / (hw.nvlink_gbps * GB * efficiency), far / (hw.nic_gbps * GB * efficiency))
    # dispatch and combine, forward and backward, in every MoE layer of the stage, for every micro-batch
    micro_batches = lay.micro_batches * cfg.train.optimizer_steps_per_rollout
    step = 4 * transfer * lay.moe_layers_per_stage * micro_batches
    out.experts = {"transfer_mb": (near + far) / 1e6, "transfer_ms": transfer * 1e3}
    moe_layers = sum(arch.moe_layers)
    group = lay.etp * lay.ep
    span = ("inside a node: NVLink" if group <= gpn
            else f"over {math.ceil(group / gpn)} nodes: {on_node - 1} peers over NVLink, {lay.ep - on_node} over the "
                 "NIC")
    w = out.lines.append
    w("")
    w(f"## Mixture of experts: {arch.num_experts} experts, top {arch.moe_top_k}, in {moe_layers} of "
      f"{arch.num_layers} layers")
    w(f"parameters: {lay.total_params / 1e9:.2f} B total, {lay.active_params / 1e9:.2f} B active per token "
      f"(experts {experts / 1e9:.2f} B, of which {experts * arch.moe_top_k / arch.num_experts / 1e9:.2f} B active)")
    w(f"experts: EP {lay.ep} x ETP {lay.etp} x expert DP {lay.edp} over the {p.tp * p.cp * lay.dp} ranks of a "
      f"pipeline stage: {arch.num_experts // lay.ep} experts per GPU in each MoE layer"
      f"{f', each split over {lay.etp} GPUs' if lay.etp > 1 else ''}; "
      f"the distributed optimizer shards their state over the {lay.edp} expert-DP ranks, the dense parameters' "
      f"over DP x CP = {lay.dp * p.cp}")
    w(f"token dispatch ({cfg.moe.token_dispatcher}): per MoE layer and micro-batch of {tokens:,.0f} tokens a rank "
      f"sends {(near + far) / 1e6:,.1f} MB in the dispatch and again in the combine, forward and backward; EP group "
      f"of {group} consecutive ranks {span}; {transfer * 1e3:.2f} ms per transfer, {step:.1f} s per forward and "
      f"backward of a rollout step ({lay.moe_layers_per_stage} MoE layers x {micro_batches} micro-batches x 4)")
    w(f"  assumed: balanced routing, {efficiency:.0%} of {hw.nvlink_gbps:.0f} GB/s NVLink and {hw.nic_gbps:.0f} "
      "GB/s NIC per GPU reached, no overlap with compute; expert-TP gathers not counted")
    return step


def _trainer_memory(cfg: Config, lay: _Layout, out: Plan) -> None:
    """Memory per trainer GPU on pipeline stage 0, which holds the embedding and the most micro-batches in
    flight."""
    c, p, t = cfg.cluster, cfg.parallel, cfg.train
    arch, hw, gpu_params = lay.arch, lay.hw, lay.gpu_params
    weight_bytes = 1 if cfg.model.fp8_param_gather else lay.dtype_bytes
    optimizer_bytes = 8 + (4 if lay.dtype_bytes != 4 else 0)  # Adam moments, fp32 master weights
    in_flight = min(p.pp, lay.micro_batches) if p.pp > 1 else 1
    if p.vpp:
        in_flight = min(lay.micro_batches * p.vpp, p.pp + (p.pp - 1) / p.vpp)
    impl = cfg.model.transformer_impl  # 'auto' is Transformer Engine (flash attention) on GPUs, local on CPU
    flash = impl == "transformer_engine" or (impl == "auto" and c.gpu != "cpu")
    sp, act_bytes = lay.sequence_parallel, lay.dtype_bytes
    dense_layer, moe_layer = (
        activation_elements_per_token(arch, p.tp, flash, cfg.model.seq_length // p.cp, sp, moe_layer=moe,
                                      etp=lay.etp) * lay.tokens_mb for moe in (False, True))
    moe_layers = lay.moe_layers_per_stage
    stage_layers = dense_layer * (lay.layers_per_stage - moe_layers) + moe_layer * moe_layers
    largest = moe_layer if moe_layers else dense_layer
    # Backward holds one more layer's worth: the gradients of the layer it is differentiating (with full
    # recomputation, that layer's rebuilt activations too).
    if t.recompute == "full":  # each layer keeps its input (its share of the sequence, with SP)
        layer_input = arch.hidden_size * lay.tokens_mb / (p.tp if sp else 1)
        activations = (layer_input * lay.layers_per_stage * in_flight + 2 * largest) * act_bytes
    else:
        activations = (stage_layers * in_flight + largest) * act_bytes
    shards = t.distributed_optimizer
    experts = lay.expert_gpu_params
    mem = {
        "weights": gpu_params * weight_bytes,
        "gradients (fp32)": gpu_params * 4,
        "optimizer (Adam, fp32)": gpu_params * optimizer_bytes / (lay.dp * p.cp if shards else 1),
    }
    if arch.is_moe:
        mem |= {"expert weights": experts * weight_bytes, "expert grads (fp32)": experts * 4,
                "expert Adam (fp32)": experts * optimizer_bytes / (lay.edp if shards else 1)}
    mem |= {
        "reference copy": (gpu_params + experts) * lay.dtype_bytes if cfg.algo.reference != "old_policy" else 0.0,
        "activations": activations,
        "reserve": hw.reserve_gb * GB,
    }
    out.trainer_memory_gb = {k: v / GB for k, v in mem.items()}
    total = sum(mem.values())
    out.trainer_memory_gb["total"] = total / GB
    w = out.lines.append
    w("")
    of_which = f": {experts / 1e6:,.1f} M of experts" if arch.is_moe else ""
    w(f"## Memory per trainer GPU (pipeline stage 0, {(gpu_params + experts) / 1e6:,.1f} M parameters per GPU"
      f"{of_which})")
    for k, v in out.trainer_memory_gb.items():
        w(f"  {k:<24} {_size(v)}")
    if lay.colocated and lay.online:
        w("  (colocated: the servers release their memory while the trainer steps, SGLang's memory saver)")
    if total > hw.memory_gb * GB:
        raise PlanError(f"the trainer does not fit: {total / GB:.1f} GB per GPU on pipeline stage 0 > "
                        f"{hw.memory_gb:.0f} GB of a {c.gpu} (activations {mem['activations'] / GB:.1f} GB for "
                        f"{in_flight:g} micro-batches of {t.micro_batch_size} x {cfg.model.seq_length} tokens); "
                        f"raise parallel.tp/pp{'/ep' if arch.is_moe else ''}, set train.recompute=full or "
                        "train.distributed_optimizer=true, or "
                        "lower train.micro_batch_size or model.seq_length")


@dataclass(frozen=True)
class _Rollout:
    seconds: float
    decode_step: float
    """Seconds of one decode step."""
    per_server: float
    """Sequences per server."""
    waves: int


def _rollout(cfg: Config, lay: _Layout, out: Plan) -> _Rollout:
    """Memory per rollout GPU and the generation time of one rollout step (none offline)."""
    r, c, arch, hw = cfg.rollout, cfg.cluster, lay.arch, lay.hw
    w = out.lines.append
    if not lay.online:
        w("")
        w("## Rollout: none (rollout.source offline: groups come from data.path)")
        return _Rollout(0.0, 0.0, 0.0, 0)
    total_params, active_params = lay.total_params, lay.active_params
    server_weights = total_params * 2 / r.server_tp  # SGLang serves bf16
    server_experts = sum(expert_layer_params(arch, i) for i in range(arch.num_layers)) * 2 / r.server_tp
    # Each server GPU holds its share of the key/value heads, and a whole one where they are fewer than its TP.
    kv_per_token = 2 * arch.num_layers * max(arch.num_query_groups / r.server_tp, 1) * arch.head_dim * 2
    budget = hw.memory_gb * GB * SERVER_MEM_FRACTION
    kv_bytes = budget - server_weights
    if kv_bytes <= 0:
        raise PlanError(f"an SGLang server with TP {r.server_tp} does not fit: {server_weights / GB:.1f} GB of "
                        f"weights per GPU > {budget / GB:.1f} GB ({SERVER_MEM_FRACTION:.0%} of {c.gpu}); raise "
                        "rollout.server_tp")
    kv_tokens = kv_bytes / kv_per_token
    out.server_memory_gb = {"weights": server_weights / GB, "kv cache": kv_bytes / GB}
    w("")
    w(f"## Memory per rollout GPU (SGLang, --mem-fraction-static {SERVER_MEM_FRACTION})")
    w(f"  weights                  {_size(server_weights / GB)}")
    w(f"  kv cache                 {_size(kv_bytes / GB)} = {kv_tokens / 1e3:,.0f}k tokens per server")

    samples = cfg.groups_per_rollout * cfg.algo.group_size
    prompt_len = max(cfg.model.seq_length - r.max_new_tokens, 1)
    per_server = samples / lay.servers
    context = prompt_len + r.max_new_tokens / 2  # mean KV length over the decode
    waves = max(1, math.ceil(per_server * (prompt_len + r.max_new_tokens) / kv_tokens))
    batch = per_server / waves
    peak = hw.bf16_tflops * 1e12 * EFFICIENCY["gemm"]
    # A decode step reads the experts that some sequence of the batch is routed to.
    touched = 1 - (1 - arch.moe_top_k / arch.num_experts) ** batch if arch.is_moe else 1.0
    weights_read = server_weights - server_experts * (1 - touched)
    decode_step = max((weights_read + batch * context * kv_per_token) / (hw.hbm_gbps * GB * EFFICIENCY["hbm"]),
                      2 * active_params * batch / r.server_tp / peak)
    prefill = 2 * active_params * per_server * prompt_len / r.server_tp / peak
    return _Rollout(waves * r.max_new_tokens * decode_step + prefill, decode_step, per_server, waves)


def _step_time(cfg: Config, lay: _Layout, rollout: _Rollout, alltoall_s: float, out: Plan) -> None:
    """Seconds per rollout step (generation, log-prob passes, training, weight sync) and the training MFU."""
    c, p, t, r = cfg.cluster, cfg.parallel, cfg.train, cfg.rollout
    arch, hw, dp = lay.arch, lay.hw, lay.dp
    total_params = lay.total_params
    k = cfg.algo.group_size
    samples = cfg.groups_per_rollout * k
    tokens = samples * cfg.model.seq_length
    attention = 2 * arch.num_layers * cfg.model.seq_length * arch.num_attention_heads * arch.head_dim  # causal
    fwd_per_token = 2 * (lay.active_params - lay.embedding) + attention + 2 * lay.embedding  # output head; lookup free
    compute_peak = (hw.fp8_tflops * EFFICIENCY["fp8_gemm"] if cfg.model.fp8 else hw.bf16_tflops * EFFICIENCY["gemm"]
                    ) * 1e12
    fwd = fwd_per_token * tokens / lay.trainer_gpus / compute_peak
    bubble = (p.pp - 1) / (lay.micro_batches * (p.vpp or 1))
    # Without sequence parallelism a layer all-reduces its output twice forward and twice backward; with it, an
    # all-gather and a reduce-scatter take the place of each all-reduce, moving the same bytes.
    allreduce = 2 * (p.tp - 1) / p.tp * lay.tokens_mb * arch.hidden_size * lay.dtype_bytes / (hw.nvlink_gbps * GB
                                                                                        * EFFICIENCY["link"])
    tp_comm = (0 if p.tp == 1 else 4 * lay.layers_per_stage * allreduce * lay.micro_batches)
    # The gradients of the dense parameters are reduced over dp * cp ranks, the experts' over edp ranks; both
    # groups span a pipeline stage's ranks.
    dp_link = (hw.nvlink_gbps if p.tp * p.cp * dp <= lay.gpn else hw.nic_gbps) * GB * EFFICIENCY["link"]
    dp_comm = sum(2 * (n - 1) / n * params * 4 / dp_link
                  for n, params in ((dp * p.cp, lay.gpu_params), (lay.edp, lay.expert_gpu_params)) if n > 1)
    logprob_passes = 1 + (cfg.algo.reference != "old_policy")
    # The all-to-alls of one forward and backward are half of each, like the TP traffic.
    logprob_s = logprob_passes * (fwd + tp_comm / 2 + alltoall_s / 2) * (1 + bubble)
    passes = 4 if t.recompute == "full" else 3  # forward, backward (2x), and the recomputed forward
    passes += cfg.algo.group_strategy == "prepass"  # a forward-only pass for the group means
    train_alltoall = alltoall_s * passes / 3
    train_s = ((passes * fwd + tp_comm * passes / 3 + train_alltoall) * (1 + bubble)
               + dp_comm * t.optimizer_steps_per_rollout)
    if lay.arch.is_moe:
        out.experts["train_s"] = train_alltoall * (1 + bubble)
    sync = weight_sync_seconds(total_params * 2, hw, trainer_tp=p.tp, across_nodes=not lay.colocated)
    if not lay.online:
        sync = dict.fromkeys(sync, 0.0)
    out.seconds = {"rollout": rollout.seconds, "log-probs": logprob_s, "train": train_s, "weight sync": sync["total"]}
    step = sum(out.seconds.values())
    out.seconds["step"] = step
    out.mfu = 3 * fwd_per_token * tokens / (train_s * lay.trainer_gpus * hw.bf16_tflops * 1e12)
    w = out.lines.append
    w("")
    w(f"## Time per rollout step ({cfg.groups_per_rollout} prompts x {k} samples, rows of {cfg.model.seq_length} "
      f"tokens, responses at most {r.max_new_tokens})")
    for name, s in out.seconds.items():
        w(f"  {name:<24} {s:8.1f} s" + (f"  ({s / step:.0%})" if name != "step" else ""))
    if lay.online:
        w(f"  rollout: {rollout.per_server:.0f} sequences per server in {rollout.waves} wave(s), a decode step "
          f"{rollout.decode_step * 1e3:.1f} ms")
    alltoall = f", all-to-all {out.experts['train_s']:.1f} s" if arch.is_moe else ""
    w(f"  train: MFU {out.mfu:.1%} of {c.gpu} dense bf16 peak (pipeline bubble {bubble:.0%}, TP traffic "
      f"{tp_comm:.1f} s{alltoall}, DP gradient traffic {dp_comm:.1f} s per optimizer step)")
    if not lay.online:
        return
    w(f"  the trainer waits for rollout {rollout.seconds / step:.0%} of the step"
      + ("" if lay.colocated else f"; the rollout nodes idle {1 - rollout.seconds / step:.0%}"))
    w("")
    w(f"## Weight sync: {total_params * 2 / GB:.0f} GB of bf16 weights, {sync['total']:.1f} s")
    if arch.is_moe:
        w("  (experts: their gather over the EP ranks is not counted, only the TP gather)")
    w(f"  TP gather {sync['gather']:.2f} s + broadcast {sync['broadcast']:.2f} s "
      f"({'NIC' if not lay.colocated else 'NVLink'}) + {math.ceil(total_params * 2 / BUCKET_BYTES)} buckets x "
      f"{BUCKET_COST_S * 1e3:.1f} ms {sync['buckets']:.2f} s")


def _size(gb: float) -> str:
    return f"{gb:8.1f} GB" if gb >= 1 or gb == 0 else f"{gb * 1e3:8.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: cluster.gpus_per_node)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        result = plan(cfg, args.nodes, args.gpus_per_node)
    except ValueError as e:
        print(f"plan: invalid: {e}", file=sys.stderr)
        return 2
    print(result.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
