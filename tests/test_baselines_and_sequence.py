"""Contract: the baselines (GRPO, Dr. GRPO, DPO) and the sequence log-prob reductions equal straightforward
per-sample transcriptions of their papers' formulas."""

import math

import pytest
import torch

from megatron_gvpo.algo import (
    dpo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    packed_sequence_logprob,
    preference_pairs,
    sequence_logprob,
    truncated_importance_weights,
)


def test_group_advantages_match_per_group_statistics():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 3.0, 7.0])
    gids = torch.tensor([5, 5, 9, 9, 5, 9, 1])
    adv = group_advantages(rewards, gids)
    for g in gids.unique():
        sel = gids == g
        r = rewards[sel]
        if r.numel() == 1:
            assert adv[sel].item() == 0.0
            continue
        torch.testing.assert_close(adv[sel], (r - r.mean()) / (r.std() + 1e-6))
    torch.testing.assert_close(group_advantages(rewards, gids, scale_by_std=False)[gids == 9],
                               rewards[gids == 9] - rewards[gids == 9].mean())


def reference_grpo(logp, old, ref, adv, mask, clip, kl_coef, length_norm):
    total = 0.0
    for b in range(len(logp)):
        terms = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            pg = -min(ratio * adv[b], min(max(ratio, 1 - clip), 1 + clip) * adv[b])
            q = ref[b][t] - logp[b][t]
            terms.append(pg + kl_coef * (math.exp(q) - q - 1))
        n = len(terms) if length_norm == "sequence" else len(logp[b])
        total += sum(terms) / max(n, 1)
    return total / len(logp)


@pytest.mark.parametrize("length_norm, kl_coef", [("sequence", 0.04), ("constant", 0.0)])
def test_grpo_matches_reference(length_norm, kl_coef):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    got = grpo_loss(logp, old, adv, mask, clip_eps=0.2, ref_token_logp=ref, kl_coef=kl_coef, length_norm=length_norm)
    want = reference_grpo(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, kl_coef,
                          length_norm)
    assert got.item() == pytest.approx(want, rel=1e-12)
    if not kl_coef:
        assert dr_grpo_loss(logp, old, adv, mask).item() == pytest.approx(
            grpo_loss(logp, old, adv, mask, length_norm="constant").item(), rel=1e-12)


def test_importance_correction_recovers_the_on_policy_gradient_from_another_policys_samples():
    """Single-token actions, pi_old = pi_theta, samples from a behaviour policy mu != pi: with the correction, the
    batch gradient over a batch that holds each action in proportion to mu (the exact expectation under mu) is the
    on-policy gradient, sum_a pi(a) A(a) grad log pi(a) (closed form); without it, it is mu's. A cap below the
    largest ratio truncates exactly those ratios; an importance weight of NaN (seeded CPU rollouts) is refused."""
    counts = torch.tensor([1, 2, 3, 4])  # mu = counts / 10
    mu = counts / counts.sum()
    advantages_a = torch.tensor([1.0, -0.5, 0.25, -1.0])
    logits = torch.tensor([0.3, -0.2, 0.5, -0.4], requires_grad=True)
    actions = torch.arange(4).repeat_interleave(counts)
    mask = torch.ones(len(actions), 1, dtype=torch.bool)

    def batch_gradient(cap):
        token_logp = torch.log_softmax(logits, -1)[actions].unsqueeze(1)
        loss = grpo_loss(token_logp, token_logp.detach(), advantages_a[actions], mask, importance_cap=cap,
                         behaviour_token_logp=None if cap is None else mu.log()[actions].unsqueeze(1))
        return torch.autograd.grad(loss, logits)[0]

    pi = torch.softmax(logits, -1).detach()
    grad_log_pi = torch.eye(4) - pi  # row a: d log pi(a) / d logits
    on_policy = -(pi[:, None] * advantages_a[:, None] * grad_log_pi).sum(0)
    behaviour = -(mu[:, None] * advantages_a[:, None] * grad_log_pi).sum(0)
    torch.testing.assert_close(batch_gradient(cap=100.0), on_policy)
    torch.testing.assert_close(batch_gradient(cap=None), behaviour)
    assert not torch.allclose(on_policy, behaviour, atol=1e-3)
    ratios = pi / mu  # the first action's ratio is the largest, above 2.5
    weights = truncated_importance_weights(pi.log(), mu.log(), cap=2.0)
    torch.testing.assert_close(weights, ratios.clamp(max=2.0))
    assert ratios[0] > 2.5 and weights[0] == 2.0
    with pytest.raises(ValueError, match="rollout.seeded=false"):
        truncated_importance_weights(pi.log(), torch.full((4,), float("nan")), cap=2.0)


def test_preference_pairs_and_dpo():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.2, 0.9])
    gids = torch.tensor([0, 0, 0, 1, 1])
    chosen, rejected = preference_pairs(rewards, gids)
    assert sorted(zip(chosen.tolist(), rejected.tolist())) == [(0, 1), (2, 1), (4, 3)]
    l = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], requires_grad=True)
    q = torch.tensor([-1.2, -1.0, -0.7, -2.0, -2.5])
    beta = 0.3
    got = dpo_loss(l[chosen], l[rejected], q[chosen], q[rejected], beta)
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((l[c] - q[c]) - (l[r] - q[r])).item())))
               for c, r in [(0, 1), (2, 1), (4, 3)]) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert l.grad[0] < 0 < l.grad[1]  # descent raises the chosen, lowers the rejected


def test_sequence_logprob_masks_padding_even_when_infinite():
    token_logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.25, -0.125]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(sequence_logprob(token_logp, mask), torch.tensor([-3.0, -0.375]))
    packed = packed_sequence_logprob(token_logp.flatten(), mask.flatten(), torch.tensor([0, 3, 6]))
    torch.testing.assert_close(packed, torch.tensor([-3.0, -0.375]))
    uneven = packed_sequence_logprob(torch.arange(5.0), torch.ones(5), torch.tensor([0, 1, 1, 5]))
    torch.testing.assert_close(uneven, torch.tensor([0.0, 0.0, 10.0]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sequence_logprob(torch.zeros(2, 3), torch.zeros(2, 4)), "token_logp shape"),
        (lambda: packed_sequence_logprob(torch.zeros(4), torch.ones(4), torch.tensor([0, 3])),
         "cu_seqlens must run from 0 to T=4"),
        (lambda: packed_sequence_logprob(torch.zeros(4), torch.ones(4), torch.tensor([0, 3, 2, 4])),
         "non-decreasing"),
        (lambda: grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)),
         r"advantages must be \[B\]=2"),
        (lambda: grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), kl_coef=0.1),
         "needs ref_token_logp"),
        (lambda: group_advantages(torch.tensor([0.0, float("inf")]), torch.tensor([0, 0])), r"rewards\[1\] is inf"),
        (lambda: dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0), "beta must be"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
