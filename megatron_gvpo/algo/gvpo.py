"""The GVPO objective (Zhang et al., arXiv 2504.19599) as pure tensor functions.

For a prompt x with k scored responses, d_i = log pi_theta(y_i|x) - log pi_ref(y_i|x) (sequence log-probs),
a_i = R_i - mean_j R_j and b_i = beta * (d_i - mean_j d_j). The paper's unbiased loss (Eq. 16) is

    L = (1/G) * sum_groups 1/(k-1) * sum_i (b_i - a_i)^2,

and its gradient (Eq. 12) is -(2*beta/(G*(k-1))) * sum_i w_i * grad log pi_theta(y_i|x) with w_i = a_i - b_i,
zero-sum in every group. Its unique minimiser is pi* = pi_ref * exp(R/beta) / Z for any sampling distribution.

Three entry points, one piece of math:
- `gvpo_loss`: whole groups in the batch; autograd through the residual.
- `gvpo_loss_with_group_stats`: the same loss when the group means (of R and of d) were computed elsewhere,
  e.g. from a detached all-gather across data-parallel ranks; its gradient is exact because sum_i w_i = 0
  makes the gradient through the mean vanish.
- `gvpo_weights` + `gvpo_surrogate_loss`: weights computed once by a forward-only pass, then a linear loss
  whose gradient equals `gvpo_loss`'s, so micro-batches can be packed without regard to groups.

Normalisation: every loss divides by `num_groups`, the number of groups of size >= 2 in the GLOBAL batch,
so that the sum of micro-batch losses is the same for every split of the batch. Singleton groups carry
no signal (their residual is identically 0) and are excluded from the count.

Matching the authors' verl code: there each micro-batch contributes 0.5/(k-1) * sum_i (b_i - a_i)^2,
averaged over gradient-accumulation steps and data-parallel ranks, i.e. (mbs / (2k)) times this loss where
mbs is the per-GPU micro-batch size in samples. Pass `scale=mbs / (2 * k)` to reproduce their effective
learning rate (it matters for SGD and for gradient clipping; Adam is nearly invariant to it).
"""

from __future__ import annotations

import torch

from megatron_gvpo.algo.checks import check_beta, check_finite, check_vectors
from megatron_gvpo.algo.groups import Groups, make_groups


def _bessel_factor(group_sizes_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/(k-1) per sample, and 0 for samples of singleton groups (0/0 in the paper: no signal)."""
    k = group_sizes_N.to(dtype)
    return torch.where(k >= 2, 1.0 / (k - 1).clamp(min=1), torch.zeros_like(k))


def _valid_group_count(groups: Groups) -> int:
    return int((groups.sizes_G >= 2).sum())


def _normalise(total: torch.Tensor, num_groups: int | None, scale: float) -> torch.Tensor:
    if num_groups is not None and num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    if not num_groups:
        # No group with two or more samples: the loss is 0 but stays attached to the graph, so a
        # micro-batch of singletons still runs backward (Megatron's schedule needs every stage to).
        return total * 0.0
    return total * (scale / num_groups)


def _check_inputs(seq_logp, ref_seq_logp, rewards, group_ids, beta) -> None:
    check_vectors(seq_logp=seq_logp, ref_seq_logp=ref_seq_logp, rewards=rewards, group_ids=group_ids)
    check_finite(seq_logp=seq_logp, ref_seq_logp=ref_seq_logp, rewards=rewards)
    check_beta(beta)


def gvpo_loss_with_group_stats(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    reward_centered: torch.Tensor,
    mean_log_ratio: torch.Tensor,
    group_sizes: torch.Tensor,
    beta: float,
    num_groups: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """GVPO loss of a subset of samples, given group statistics computed over whole groups elsewhere.

    Args:
        seq_logp: [N] sequence log-probs under the policy; the only input gradients flow into.
        ref_seq_logp: [N] sequence log-probs under the reference policy.
        reward_centered: [N] a_i = R_i - mean of R over sample i's whole group.
        mean_log_ratio: [N] mean of d_j = seq_logp_j - ref_seq_logp_j over sample i's whole group (detached).
        group_sizes: [N] the size k of sample i's whole group.
        beta: KL strength, > 0.
        num_groups: number of groups of size >= 2 in the global batch (the normaliser).
        scale: constant factor, see the module docstring.

    Summing this over any partition of the global batch gives `gvpo_loss` of the whole batch.
    """
    check_vectors(
        seq_logp=seq_logp,
        ref_seq_logp=ref_seq_logp,
        reward_centered=reward_centered,
        mean_log_ratio=mean_log_ratio,
        group_sizes=group_sizes,
    )
    check_beta(beta)
    d = seq_logp - ref_seq_logp.detach()
    residual = beta * (d - mean_log_ratio.detach()) - reward_centered.detach()
    total = (residual.square() * _bessel_factor(group_sizes, residual.dtype)).sum()
    return _normalise(total, num_groups, scale)


def gvpo_loss(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    *,
    num_groups: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The paper's Eq. 16 on a batch of whole groups; differentiable in `seq_logp`.

    Args:
        seq_logp: [N] log pi_theta(y_i|x_i), the sum of response-token log-probs.
        ref_seq_logp: [N] log pi_ref(y_i|x_i); treated as a constant.
        rewards: [N] scalar rewards; treated as constants.
        group_ids: [N] integer id of each sample's prompt; groups may differ in size and be in any order.
        beta: KL strength, > 0.
        num_groups: the normaliser; default the number of groups of size >= 2 in this batch. Pass the global
            count when this batch is one micro-batch of a larger one.
        scale: constant factor (1.0 is the paper's estimator; see the module docstring for the authors' code).
    """
    _check_inputs(seq_logp, ref_seq_logp, rewards, group_ids, beta)
    groups = make_groups(group_ids)
    d = seq_logp - ref_seq_logp.detach()
    residual = beta * groups.center(d) - groups.center(rewards.detach().to(d.dtype))
    total = (residual.square() * _bessel_factor(groups.sample_sizes(), residual.dtype)).sum()
    return _normalise(total, _valid_group_count(groups) if num_groups is None else num_groups, scale)


@torch.no_grad()
def gvpo_weights(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """[N] detached GVPO weights w_i = (R_i - mean R) - beta * (d_i - mean d), zero-sum in every group.

    Positive weight raises the sample's log-prob. Samples of singleton groups get weight 0.
    """
    _check_inputs(seq_logp, ref_seq_logp, rewards, group_ids, beta)
    groups = make_groups(group_ids)
    d = seq_logp - ref_seq_logp
    return groups.center(rewards.to(d.dtype)) - beta * groups.center(d)


def gvpo_surrogate_loss(
    seq_logp: torch.Tensor,
    weights: torch.Tensor,
    group_sizes: torch.Tensor,
    beta: float,
    num_groups: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """Linear loss whose gradient in `seq_logp` equals `gvpo_loss`'s when `weights` come from `gvpo_weights`
    at the same parameters: -(scale/num_groups) * sum_i 2*beta/(k_i-1) * w_i * seq_logp_i.

    Its value is not the GVPO loss (log `gvpo_loss` from the pre-pass for that). Any subset of samples may
    be passed; `group_sizes` [N] are the sizes of their whole groups.
    """
    check_vectors(seq_logp=seq_logp, weights=weights, group_sizes=group_sizes)
    check_beta(beta)
    coeff = (2.0 * beta) * _bessel_factor(group_sizes, seq_logp.dtype)
    total = -(coeff * weights.detach() * seq_logp).sum()
    return _normalise(total, num_groups, scale)


def group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """[N] the size of each sample's group, for `gvpo_surrogate_loss`."""
    return make_groups(group_ids).sample_sizes()


def num_valid_groups(group_ids: torch.Tensor) -> int:
    """Number of groups with at least two samples: the default normaliser of every GVPO loss."""
    return _valid_group_count(make_groups(group_ids))


@torch.no_grad()
def gvpo_metrics(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Detached diagnostics of a batch of whole groups (0-dim tensors; call `.item()` when logging).

    The paper's Eq. 17 splits the loss into policy-dependent terms (averaged over groups of size >= 2,
    Bessel-corrected, l = seq_logp, q = ref_seq_logp):
        loss = beta^2 * var_logp - 2 * beta^2 * cov_logp_ref - 2 * beta * cov_reward_logp + loss_constant
    where loss_constant = var_reward + beta^2 * var_ref + 2 * beta * cov_reward_ref does not depend on theta.
    cov_reward_logp is the GRPO-like advantage term, cov_logp_ref the pull toward pi_ref, var_logp the
    variance regulariser that replaces an entropy bonus.
    """
    _check_inputs(seq_logp, ref_seq_logp, rewards, group_ids, beta)
    if seq_logp.numel() == 0:
        raise ValueError("gvpo_metrics needs at least one sample, got an empty batch")
    groups = make_groups(group_ids)
    l, q, r = seq_logp, ref_seq_logp.to(seq_logp.dtype), rewards.to(seq_logp.dtype)
    lc, qc, rc = groups.center(l), groups.center(q), groups.center(r)
    bessel_N = _bessel_factor(groups.sample_sizes(), l.dtype)
    valid_G = groups.sizes_G >= 2
    n_valid = int(valid_G.sum())
    denom = max(n_valid, 1)

    def cov(x, y):
        return groups.sum(x * y * bessel_N).sum() / denom

    w = rc - beta * (groups.center(l - q))
    reward_var_G = groups.sum(rc.square())
    zero_var = (valid_G & (reward_var_G == 0)).sum()
    d = l - q
    out = {
        "loss": gvpo_loss(l, q, r, group_ids, beta),
        "cov_reward_logp": cov(rc, lc),
        "cov_logp_ref": cov(lc, qc),
        "var_logp": cov(lc, lc),
        "loss_constant": cov(rc, rc) + beta**2 * cov(qc, qc) + 2 * beta * cov(rc, qc),
        "weight_abs_mean": w.abs().mean(),
        "weight_abs_max": w.abs().max(),
        "weight_std": w.std(unbiased=False),
        "log_ratio_mean": d.mean(),
        "log_ratio_abs_max": d.abs().max(),
        "reward_mean": r.mean(),
        "num_groups": torch.tensor(float(n_valid)),
        "singleton_groups": torch.tensor(float(groups.num_groups - n_valid)),
        "zero_variance_group_frac": zero_var.to(l.dtype) / denom,
    }
    return out
