"""Contract: `gvpo_loss`, `gvpo_weights`, `gvpo_surrogate_loss` and `gvpo_loss_with_group_stats` equal an
independent, loop-based transcription of the paper's Eq. 16 / Eq. 12 (value and autograd gradient) on batches
with mixed group sizes, shuffled order, tied rewards, all-equal rewards and singleton groups."""

import itertools

import pytest
import torch

from megatron_gvpo.algo import (
    group_sizes,
    gvpo_loss,
    gvpo_loss_with_group_stats,
    gvpo_metrics,
    gvpo_surrogate_loss,
    gvpo_weights,
    make_groups,
    num_valid_groups,
)

RTOL, ATOL = 1e-10, 1e-12  # float64 throughout: the two implementations differ only in summation order


def reference_loss(seq_logp, ref_seq_logp, rewards, group_ids, beta):
    """Eq. 16 written as the paper states it: a Python loop over groups, no shared code with the library."""
    members = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)
    total, count = 0.0, 0
    for idx in members.values():
        k = len(idx)
        if k < 2:
            continue
        d = [seq_logp[i] - ref_seq_logp[i] for i in idx]
        mean_d = sum(d) / k
        mean_r = sum(float(rewards[i]) for i in idx) / k
        sq = sum((beta * (d[j] - mean_d) - (float(rewards[i]) - mean_r)) ** 2 for j, i in enumerate(idx))
        total = total + sq / (k - 1)
        count += 1
    return total / count if count else seq_logp.sum() * 0.0


def random_batch(seed, sizes, tie_groups=(), constant_groups=(), shuffle=True):
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.cat([torch.full((k,), 100 + 7 * j) for j, k in enumerate(sizes)])
    n = group_ids.numel()
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    start = 0
    for j, k in enumerate(sizes):
        if j in tie_groups and k >= 3:
            rewards[start + 1] = rewards[start]
        if j in constant_groups:
            rewards[start : start + k] = 0.5
        start += k
    seq_logp = -5 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    ref_seq_logp = seq_logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    if shuffle:
        perm = torch.randperm(n, generator=g)
        group_ids, rewards, seq_logp, ref_seq_logp = group_ids[perm], rewards[perm], seq_logp[perm], ref_seq_logp[perm]
    return seq_logp.requires_grad_(), ref_seq_logp, rewards, group_ids


CASES = [
    dict(sizes=[4, 4, 4, 4]),
    dict(sizes=[2, 5, 3, 8, 1], tie_groups=(1, 3)),
    dict(sizes=[3, 1, 6, 2], constant_groups=(0, 2)),
    dict(sizes=[1, 1, 1]),
    dict(sizes=[16]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c["sizes"])))
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_value_and_grad_match_reference(case, beta, seed):
    seq_logp, ref, rewards, gids = random_batch(seed, **{"shuffle": True, **case})
    got = gvpo_loss(seq_logp, ref, rewards, gids, beta)
    want = reference_loss(seq_logp, ref, rewards, gids, beta)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    (g_got,) = torch.autograd.grad(got, seq_logp, allow_unused=True)
    (g_want,) = torch.autograd.grad(want, seq_logp, allow_unused=True)
    g_got = torch.zeros_like(seq_logp) if g_got is None else g_got
    g_want = torch.zeros_like(seq_logp) if g_want is None else g_want
    torch.testing.assert_close(g_got, g_want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c["sizes"])))
def test_weights_are_zero_sum_and_surrogate_gradient_matches(case):
    beta = 0.5
    seq_logp, ref, rewards, gids = random_batch(3, **case)
    w = gvpo_weights(seq_logp, ref, rewards, gids, beta)
    assert not w.requires_grad
    groups = make_groups(gids)
    torch.testing.assert_close(groups.sum(w), torch.zeros(groups.num_groups, dtype=w.dtype), atol=1e-12, rtol=0)
    singleton = groups.sample_sizes() == 1
    assert torch.all(w[singleton] == 0)

    (g_loss,) = torch.autograd.grad(gvpo_loss(seq_logp, ref, rewards, gids, beta), seq_logp, allow_unused=True)
    surrogate = gvpo_surrogate_loss(seq_logp, w, group_sizes(gids), beta, num_valid_groups(gids))
    (g_sur,) = torch.autograd.grad(surrogate, seq_logp, allow_unused=True)
    g_loss = torch.zeros_like(seq_logp) if g_loss is None else g_loss
    g_sur = torch.zeros_like(seq_logp) if g_sur is None else g_sur
    torch.testing.assert_close(g_sur, g_loss, rtol=RTOL, atol=ATOL)
    # Eq. 12 directly: dL/dlogpi_i = -(2 beta / (G (k-1))) w_i.
    G = max(num_valid_groups(gids), 1)
    k = group_sizes(gids).to(w.dtype)
    eq12 = torch.where(k >= 2, -2 * beta * w / (G * (k - 1).clamp(min=1)), torch.zeros_like(w))
    torch.testing.assert_close(g_loss, eq12, rtol=RTOL, atol=ATOL)


def test_partitioned_losses_sum_to_whole_batch_loss():
    """Split-invariance: any partition of the batch, each part using whole-group statistics computed from
    detached values and the global group count, sums to the whole-batch loss, gradient included."""
    beta = 0.2
    seq_logp, ref, rewards, gids = random_batch(5, sizes=[4, 3, 5, 2, 1, 6], tie_groups=(0,))
    whole = gvpo_loss(seq_logp, ref, rewards, gids, beta)
    (g_whole,) = torch.autograd.grad(whole, seq_logp)

    groups = make_groups(gids)
    d = (seq_logp - ref).detach()
    mean_d_N = groups.mean(d)[groups.index_N]
    a_N = groups.center(rewards)
    G = num_valid_groups(gids)
    perm = torch.randperm(gids.numel(), generator=torch.Generator().manual_seed(0))
    parts = perm.tensor_split(4)
    total = sum(
        gvpo_loss_with_group_stats(
            seq_logp[p], ref[p], a_N[p], mean_d_N[p], groups.sample_sizes()[p], beta, num_groups=G
        )
        for p in parts
    )
    torch.testing.assert_close(total, whole, rtol=RTOL, atol=ATOL)
    (g_parts,) = torch.autograd.grad(total, seq_logp)
    torch.testing.assert_close(g_parts, g_whole, rtol=RTOL, atol=ATOL)


def test_authors_scale_reproduces_their_micro_batch_loss():
    """The documented factor: the authors' verl loss (0.5/(k-1) * sum of squared residuals per micro-batch,
    averaged over accumulation steps and DP ranks) equals gvpo_loss(scale=mbs / (2k))."""
    beta, k, mbs, accum, dp = 0.1, 4, 8, 2, 2
    n_groups = mbs * accum * dp // k
    seq_logp, ref, rewards, gids = random_batch(7, sizes=[k] * n_groups, shuffle=False)
    groups = make_groups(gids)
    rtheta = beta * (seq_logp - ref)
    mean_N = groups.mean(rtheta.detach())[groups.index_N]
    adv = groups.center(rewards)
    authors = 0.0
    for rank, step in itertools.product(range(dp), range(accum)):
        lo = (rank * accum + step) * mbs
        sl = slice(lo, lo + mbs)
        pg = (0.5 * ((rtheta[sl] - mean_N[sl]) - adv[sl]) ** 2).sum() / (k - 1)
        authors = authors + pg / accum / dp
    ours = gvpo_loss(seq_logp, ref, rewards, gids, beta, scale=mbs / (2 * k))
    torch.testing.assert_close(ours, authors, rtol=RTOL, atol=ATOL)


def test_singletons_only_give_zero_loss_and_zero_grad():
    seq_logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = gvpo_loss(seq_logp, torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), 0.1)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.all(seq_logp.grad == 0)


def test_metrics_decompose_the_loss_as_eq17():
    """loss = beta^2 var_logp - 2 beta^2 cov_logp_ref - 2 beta cov_reward_logp + loss_constant."""
    for beta in (0.3, 1.0):
        seq_logp, ref, rewards, gids = random_batch(11, sizes=[4, 6, 1, 3, 3], constant_groups=(3,))
        m = gvpo_metrics(seq_logp, ref, rewards, gids, beta)
        recomposed = (
            beta**2 * m["var_logp"] - 2 * beta**2 * m["cov_logp_ref"] - 2 * beta * m["cov_reward_logp"]
            + m["loss_constant"]
        )
        torch.testing.assert_close(recomposed, m["loss"], rtol=1e-10, atol=1e-12)
        assert m["num_groups"].item() == 4 and m["singleton_groups"].item() == 1
        assert m["zero_variance_group_frac"].item() == pytest.approx(0.25)


def test_loss_reaches_zero_exactly_at_the_optimum():
    """pi* = pi_ref exp(R/beta)/Z makes every residual vanish, whatever responses were sampled."""
    beta = 0.5
    ref = torch.log_softmax(torch.randn(8, dtype=torch.float64), -1)
    rewards = torch.rand(8, dtype=torch.float64)
    opt = torch.log_softmax(ref + rewards / beta, -1)
    pick = torch.tensor([0, 3, 3, 5, 1, 2, 7, 7])
    loss = gvpo_loss(opt[pick], ref[pick], rewards[pick], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), beta)
    assert loss.item() < 1e-28


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "rewards": torch.tensor([1.0, float("nan"), 0.0])}, r"rewards\[1\] is nan"),
        (lambda a: {**a, "ref_seq_logp": torch.tensor([0.0, float("-inf"), 0.0])}, r"ref_seq_logp\[1\] is -inf"),
        (lambda a: {**a, "rewards": torch.zeros(2)}, "rewards has 2 entries but seq_logp has 3"),
        (lambda a: {**a, "group_ids": torch.zeros(3, 1, dtype=torch.long)}, "group_ids must be 1-D"),
        (lambda a: {**a, "group_ids": torch.zeros(3)}, "group_ids must be an integer tensor"),
        (lambda a: {**a, "beta": 0.0}, "beta must be a finite number > 0"),
        (lambda a: {**a, "beta": -1.0}, "beta must be a finite number > 0"),
    ],
)
def test_bad_input_raises_value_error_naming_it(mutate, message):
    args = dict(
        seq_logp=torch.zeros(3), ref_seq_logp=torch.zeros(3), rewards=torch.zeros(3),
        group_ids=torch.zeros(3, dtype=torch.long), beta=0.1,
    )
    args = mutate(args)
    for fn in (gvpo_loss, gvpo_weights, gvpo_metrics):
        with pytest.raises(ValueError, match=message):
            fn(**args)
