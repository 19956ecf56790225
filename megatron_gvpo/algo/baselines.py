"""Baselines GVPO is compared against: GRPO, Dr. GRPO and DPO, as pure tensor functions.

- GRPO (Shao et al. 2024): group advantages (R - mean) / (std + eps), PPO ratio clipping against the
  sampling policy, a k3 estimator of KL(pi_theta || pi_ref) as a penalty, each response's token losses
  averaged over its length before averaging over responses.
- Dr. GRPO (Liu et al. 2025): the same without std scaling, without the KL term, and with token losses
  summed and divided by a constant (the padded length) instead of each response's length.
- DPO (Rafailov et al. 2023) on preference pairs formed inside each group (higher reward preferred).

Token tensors are [B, T] with a [B, T] response mask; for single-action (tabular) problems T = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from megatron_gvpo.algo.checks import check_beta, check_finite, check_vectors
from megatron_gvpo.algo.groups import make_groups


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """[N] group-relative advantages; std is the unbiased per-group std (as GRPO implementations use)."""
    check_vectors(rewards=rewards, group_ids=group_ids)
    check_finite(rewards=rewards)
    groups = make_groups(group_ids)
    centered = groups.center(rewards.float())
    if not scale_by_std:
        return centered
    k = groups.sizes_G.to(centered.dtype)
    var_G = groups.sum(centered.square()) / (k - 1).clamp(min=1)
    return centered / (var_G.sqrt()[groups.index_N] + eps)


def _check_tokens(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"token tensors must all be [B, T] with one shape, got {shapes}")


def grpo_loss(
    token_logp: torch.Tensor,
    old_token_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    ref_token_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    length_norm: Literal["sequence", "constant"] = "sequence",
    length_constant: int | None = None,
    behaviour_token_logp: torch.Tensor | None = None,
    importance_cap: float | None = None,
) -> torch.Tensor:
    """Clipped policy-gradient loss with an optional k3 KL penalty to `ref_token_logp`.

    Args:
        token_logp: [B, T] log-probs under pi_theta (differentiable).
        old_token_logp: [B, T] log-probs under the policy that sampled the responses.
        advantages: [B] one advantage per response (see `group_advantages`).
        response_mask: [B, T] which positions are response tokens.
        clip_eps: PPO clip range for the ratio pi_theta / pi_old.
        ref_token_logp, kl_coef: k3 penalty exp(q - l) - (q - l) - 1 per token, weighted by kl_coef.
        length_norm: "sequence" (GRPO: mean over each response's tokens) or "constant" (Dr. GRPO: sum over
            tokens divided by `length_constant`, T when None; Dr. GRPO uses the generation budget).
        behaviour_token_logp, importance_cap: with both, the correction for samples of another policy than
            pi_old: each token's policy-gradient term weighted by `truncated_importance_weights`.
    """
    _check_tokens(token_logp=token_logp, old_token_logp=old_token_logp, response_mask=response_mask)
    if advantages.shape != token_logp.shape[:1]:
        raise ValueError(f"advantages must be [B]={token_logp.shape[0]}, got shape {tuple(advantages.shape)}")
    if kl_coef and ref_token_logp is not None:
        _check_tokens(token_logp=token_logp, ref_token_logp=ref_token_logp)
    mask = response_mask.to(token_logp.dtype)
    weights = None
    if importance_cap is not None:
        _check_tokens(token_logp=token_logp, behaviour_token_logp=behaviour_token_logp)
        weights = truncated_importance_weights(old_token_logp, behaviour_token_logp, importance_cap)
    per_token = clipped_policy_gradient(token_logp, old_token_logp, advantages.unsqueeze(-1).expand_as(token_logp),
                                        clip_eps=clip_eps, ref_token_logp=ref_token_logp, kl_coef=kl_coef,
                                        importance_weights=weights)
    per_token = torch.where(response_mask.bool(), per_token, torch.zeros_like(per_token))
    if length_norm == "sequence":
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    elif length_norm == "constant":
        per_seq = per_token.sum(-1) / (length_constant or token_logp.shape[-1])
    else:
        raise ValueError(f"length_norm must be 'sequence' or 'constant', got {length_norm!r}")
    return per_seq.mean()


def clipped_policy_gradient(
    token_logp: torch.Tensor,
    old_token_logp: torch.Tensor,
    token_advantages: torch.Tensor,
    *,
    clip_eps: float,
    ref_token_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    importance_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO's loss per token, elementwise over tensors of one shape: -min(r A, clip(r, 1 +- eps) A) with
    r = pi_theta / pi_old, times `importance_weights` where given, plus kl_coef * (exp(q - l) - (q - l) - 1),
    the k3 estimate of KL(pi_theta || pi_ref). Normalisation (over a response's tokens, over the batch) is the
    caller's: `grpo_loss` for [B, T] tensors, the Megatron head for the scored tokens of a micro-batch."""
    ratio = torch.exp(token_logp - old_token_logp.detach())
    adv = token_advantages.detach()
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    if kl_coef:
        if ref_token_logp is None:
            raise ValueError("kl_coef > 0 needs ref_token_logp")
        log_r = ref_token_logp.detach() - token_logp
        per_token = per_token + kl_coef * (torch.exp(log_r) - log_r - 1)
    return per_token


def truncated_importance_weights(old_token_logp: torch.Tensor, behaviour_token_logp: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap) per token (truncated importance sampling; Ionides 2008, and in RL for
    LLMs slime's --use-tis, verl's rollout correction): PPO's ratio is taken to pi_old, the trainer's policy
    before the update, so tokens that another policy sampled (stale weights, the rollout engine's numerics) are
    reweighted towards pi_old; the cap bounds the variance that rare tokens would add."""
    if not torch.isfinite(behaviour_token_logp).all():
        raise ValueError("importance correction: the rollout's log-probs are not finite (seeded sampling on CPU "
                         "returns none: rollout.seeded=false)")
    return torch.exp(old_token_logp.detach() - behaviour_token_logp).clamp(max=cap)


def dr_grpo_loss(
    token_logp: torch.Tensor,
    old_token_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    length_constant: int | None = None,
    behaviour_token_logp: torch.Tensor | None = None,
    importance_cap: float | None = None,
) -> torch.Tensor:
    """Dr. GRPO: `grpo_loss` with constant length normalisation and no KL term; pass advantages from
    `group_advantages(..., scale_by_std=False)`."""
    return grpo_loss(
        token_logp, old_token_logp, advantages, response_mask, clip_eps=clip_eps, length_norm="constant",
        length_constant=length_constant, behaviour_token_logp=behaviour_token_logp, importance_cap=importance_cap,
    )


@torch.no_grad()
def preference_pairs(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (chosen, rejected) inside a group with R_chosen > R_rejected, as two [P] index
    tensors. Ties form no pair. Builds an [N, N] mask: meant for rollout batches, not whole datasets."""
    check_vectors(rewards=rewards, group_ids=group_ids)
    check_finite(rewards=rewards)
    index = make_groups(group_ids).index_N
    better = (index[:, None] == index[None, :]) & (rewards[:, None] > rewards[None, :])
    chosen, rejected = better.nonzero(as_tuple=True)
    return chosen, rejected


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean of -log sigmoid(beta * ((l_c - q_c) - (l_r - q_r))) over [P] pairs of sequence log-probs."""
    check_vectors(
        chosen_logp=chosen_logp,
        rejected_logp=rejected_logp,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
    )
    check_beta(beta)
    margin = (chosen_logp - ref_chosen_logp.detach()) - (rejected_logp - ref_rejected_logp.detach())
    if margin.numel() == 0:
        return margin.sum()
    return -F.logsigmoid(beta * margin).mean()
