"""The one module that reads Megatron-Core's global `parallel_state`.

`initialize_parallel` sets Megatron's process groups up for a layout and returns a `ParallelContext`: the
groups and ranks everything else is handed explicitly. Code outside this module never calls
`parallel_state.get_*`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_gvpo.megatron.config import ParallelConfig


@dataclass(frozen=True)
class ParallelContext:
    """Process groups and ranks of this process in a TP x CP x DP x PP layout (Megatron order tp-cp-ep-dp-pp).

    Mixture-of-experts layers lay a second grid over the tp * cp * dp ranks of each pipeline stage: expert
    tensor parallelism (etp) x expert parallelism (ep) x expert data parallelism (edp). An expert's weights
    are split over its etp group, held by one ep rank, and replicated over edp (where its gradients are
    reduced)."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    """Data-parallel ranks holding the same model shard (without CP)."""
    dp_cp_group: dist.ProcessGroup
    """Data- and context-parallel ranks: the group gradients are reduced over."""
    cp_group: dist.ProcessGroup
    """Context-parallel ranks: they split every sequence and sum its log-prob."""
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    vpp_size: int | None
    ep_group: dist.ProcessGroup | None = None
    """Expert-parallel ranks: each holds its own experts of every MoE layer."""
    etp_group: dist.ProcessGroup | None = None
    """Expert-tensor-parallel ranks: they split each expert's MLP."""
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    edp_rank: int = 0
    """Rank among the replicas of this rank's experts."""

    @property
    def num_model_chunks(self) -> int:
        return self.vpp_size or 1

    def is_first_stage(self, vp_stage: int = 0) -> bool:
        return self.pp_rank == 0 and vp_stage == 0

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        last_chunk = self.num_model_chunks - 1
        return self.pp_rank == self.pp_size - 1 and (vp_stage is None or vp_stage == last_chunk)


def initialize_parallel(parallel: ParallelConfig, seed: int) -> ParallelContext:
    """Create Megatron's groups for `parallel` on the already-initialised default process group.

    Also seeds Megatron's model-parallel RNG tracker (`seed` plus offsets per TP/PP rank, as Megatron does).
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_parallel")
    parallel.data_parallel_size(dist.get_world_size())  # raises with the field names when it does not divide
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_context()


def current_context() -> ParallelContext:
    """The context of Megatron's current global state (after `initialize_parallel`)."""
    ps = parallel_state
    return ParallelContext(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_group=ps.get_context_parallel_group(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(),
    )


def destroy_parallel(wait: bool = True) -> threading.Thread | None:
    """Tear Megatron's state down and destroy every process group but the default one.

    Megatron's `destroy_model_parallel` only drops its references: the groups' backends (gloo keeps dozens of
    threads per group) live on. A process that sets up many layouts (test workers, resharding tools) then
    accumulates thousands of threads, and the forking checkpoint writer deadlocks in such a process.

    The groups are gone when this returns; their backends stop their threads as the last reference to them
    goes, which waits for those threads (about 8 ms a gloo group, with the GIL released: 0.15 s for the
    twenty of a one-process layout). `wait=False` lets that happen on a thread of its own, returned, so that a
    caller with other work (the converter's copying) goes on meanwhile; join it before the process ends.

    A destroyed gloo group still lives (its transport thread included) while anything references it, and that
    thread is not idle: gloo's TCP loop polls with a 10 ms timeout, 100 wake-ups a second for as long as the
    process lives (measured: 50 such threads cost an idle test worker 1.4% of a core, a full test run's workers
    5-13% each). So the references Megatron 0.16 itself keeps are dropped here too: module globals that
    `destroy_model_parallel` forgets (`_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo twin) and the
    `lru_cache` of the rotary embeddings' `forward`, which holds the last models' embeddings and their
    `cp_group`, and the MoE router losses' tracker, whose entries keep their reduce groups. What the caller's
    own objects (a model, an optimizer: reference cycles) hold is freed once they are garbage and collected
    (`gc.collect()`; the test pool's workers run one whenever they fall idle), as long as no cycle runs through
    autograd's C++ nodes, which the collector cannot see (`step._drop_forward_state`).
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    from megatron.core.transformer.moe import moe_utils

    parallel_state.destroy_model_parallel()
    for name, value in vars(parallel_state).items():
        if isinstance(value, dist.ProcessGroup) or (
                isinstance(value, list) and value and all(isinstance(g, dist.ProcessGroup) for g in value)):
            setattr(parallel_state, name, None)
    for embedding in (RotaryEmbedding, YarnRotaryEmbedding):
        embedding.forward.cache_clear()
    moe_utils.get_moe_layer_wise_logging_tracker().clear()  # router-loss entries hold their reduce groups
    groups = [group for group in dist.distributed_c10d._world.pg_map if group is not dist.GroupMember.WORLD]
    for group in groups:
        dist.destroy_process_group(group)
    if wait:
        return None  # `groups`, the last references, go on return
    release = threading.Thread(target=groups.clear, name="release-process-groups")
    release.start()
    return release
