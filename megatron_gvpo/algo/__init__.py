"""GVPO and its baselines as pure tensor functions: no config objects, no process groups, no globals.

Everything here takes per-sample tensors ([N] sequence log-probs, rewards, group ids) and returns tensors.
The Megatron glue (micro-batching, normalisers across ranks) lives in the trainer and passes numbers in.
"""

from megatron_gvpo.algo.baselines import (
    clipped_policy_gradient,
    dpo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    preference_pairs,
    truncated_importance_weights,
)
from megatron_gvpo.algo.groups import Groups, make_groups
from megatron_gvpo.algo.gvpo import (
    group_sizes,
    gvpo_loss,
    gvpo_loss_with_group_stats,
    gvpo_metrics,
    gvpo_surrogate_loss,
    gvpo_weights,
    num_valid_groups,
)
from megatron_gvpo.algo.sequence import packed_sequence_logprob, sequence_logprob

__all__ = [
    "Groups",
    "clipped_policy_gradient",
    "dpo_loss",
    "dr_grpo_loss",
    "group_advantages",
    "group_sizes",
    "grpo_loss",
    "gvpo_loss",
    "gvpo_loss_with_group_stats",
    "gvpo_metrics",
    "gvpo_surrogate_loss",
    "gvpo_weights",
    "make_groups",
    "num_valid_groups",
    "packed_sequence_logprob",
    "preference_pairs",
    "sequence_logprob",
    "truncated_importance_weights",
]
