"""Rewards for online training: rule-based math checks (`math`), a user function, a reward-model HTTP endpoint
(`remote`), and `scoring.score`, which the trainer calls and which records failures instead of crashing."""

from megatron_gvpo.rewards.math import extract_answer, math_reward
from megatron_gvpo.rewards.remote import RewardError, RewardTimeout, request_rewards
from megatron_gvpo.rewards.scoring import (
    RewardConfig,
    RewardFailure,
    RewardResult,
    load_reward_function,
    score,
)

__all__ = [
    "RewardConfig",
    "RewardError",
    "RewardFailure",
    "RewardResult",
    "RewardTimeout",
    "extract_answer",
    "load_reward_function",
    "math_reward",
    "request_rewards",
    "score",
]
