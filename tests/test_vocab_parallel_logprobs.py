"""Contract: `megatron_gvpo.ops.vocab_parallel_logprobs` on a vocabulary sharded over TP = 1, 2, 4 gloo ranks
equals `log_softmax(full_logits).gather(...)` and the full-distribution entropy: values, and gradients with
respect to each rank's logits shard (fp32, rtol 1e-5), for several chunk sizes (dividing and not dividing
the token count), odd vocabulary sizes, and targets in every shard. The input is never modified."""

import pytest
import torch
import torch.distributed as dist

from megatron_gvpo.ops import vocab_parallel_logprobs

RTOL, ATOL = 1e-5, 1e-6


def full_reference(logits_TV, targets_T, g_logp_T, g_ent_T):
    """Unsharded autograd reference: log_softmax + gather, entropy -(p * log p).sum()."""
    x = logits_TV.detach().clone().requires_grad_()
    lsm = torch.log_softmax(x, dim=-1)
    logp = lsm.gather(-1, targets_T[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ((logp * g_logp_T).sum() + (ent * g_ent_T).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def make_problem(seed, num_tokens, vocab, tp):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(num_tokens, vocab, generator=g)
    targets = torch.randint(0, vocab, (num_tokens,), generator=g)
    shard = vocab // tp
    # Force at least one target into every shard, including the first and last id.
    for r in range(tp):
        targets[r % num_tokens] = r * shard + (shard - 1 if r % 2 else 0)
    targets[-1] = vocab - 1
    return logits, targets, torch.randn(num_tokens, generator=g), torch.randn(num_tokens, generator=g)


def sharded_run(seed, num_tokens, vocab, chunk_size, with_entropy):
    """Runs on every rank of the pool: its shard through the production op, compared to the full reference."""
    tp, rank = dist.get_world_size(), dist.get_rank()
    logits, targets, g_logp, g_ent = make_problem(seed, num_tokens, vocab, tp)
    shard = vocab // tp
    local = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
    before = local.detach().clone()
    out = vocab_parallel_logprobs(local, targets, tp_group=dist.group.WORLD, chunk_size=chunk_size,
                                  return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
    loss.backward()
    want_logp, want_ent, want_grad = full_reference(logits, targets, g_logp, g_ent if with_entropy else 0 * g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    if with_entropy:
        torch.testing.assert_close(ent.detach(), want_ent, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(local.grad, want_grad[:, rank * shard : (rank + 1) * shard], rtol=RTOL, atol=ATOL)
    assert torch.equal(local.detach(), before), "input logits were modified"
    return float((logp.detach() - want_logp).abs().max())


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("num_tokens, vocab, chunk_size", [(37, 4 * 29, 5), (64, 4 * 251, 16), (9, 4 * 7, None)])
def test_sharded_matches_full_vocab_reference(gloo, tp, with_entropy, num_tokens, vocab, chunk_size):
    diffs = gloo.run(tp, sharded_run, 0, num_tokens, vocab, chunk_size, with_entropy)
    assert len(diffs) == tp and max(diffs) < ATOL + RTOL


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1000, None])
def test_single_process_matches_reference(with_entropy, chunk_size):
    logits, targets, g_logp, g_ent = make_problem(1, 37, 211, 1)
    x = logits.clone().requires_grad_()
    out = vocab_parallel_logprobs(x, targets, chunk_size=chunk_size, return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    ((logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)).backward()
    want_logp, want_ent, want_grad = full_reference(logits, targets, g_logp, g_ent if with_entropy else 0 * g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    if with_entropy:
        torch.testing.assert_close(ent.detach(), want_ent, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x.grad, want_grad, rtol=RTOL, atol=ATOL)
    assert torch.equal(x.detach(), logits)


def test_gradcheck_float64_and_batched_shape():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 13, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randint(0, 13, (2, 5), generator=g)
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, t, chunk_size=3, return_entropy=True), (x,))
    assert vocab_parallel_logprobs(x, t).shape == (2, 5)


def test_entropy_only_gradient_and_bf16():
    logits, targets, _, g_ent = make_problem(3, 20, 50, 1)
    x = logits.clone().requires_grad_()
    _, ent = vocab_parallel_logprobs(x, targets, chunk_size=6, return_entropy=True)
    (ent * g_ent).sum().backward()
    _, _, want_grad = full_reference(logits, targets, torch.zeros(20), g_ent)
    torch.testing.assert_close(x.grad, want_grad, rtol=RTOL, atol=ATOL)

    xb = logits.bfloat16().requires_grad_()
    logp = vocab_parallel_logprobs(xb, targets)
    logp.sum().backward()
    assert logp.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    want = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "logits, targets, kwargs, message",
    [
        (torch.zeros(4, 10), torch.tensor([0, 1, 10, 2]), {}, r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"),
        (torch.zeros(4, 10), torch.tensor([0, -100, 1, 2]), {}, r"targets\[1\] = -100"),
        (torch.zeros(4, 10), torch.zeros(3, dtype=torch.long), {}, "targets shape"),
        (torch.zeros(4, 10), torch.zeros(4), {}, "targets must be integer"),
        (torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, "logits must be a floating"),
        (torch.zeros(4, 10), torch.zeros(4, dtype=torch.long), {"chunk_size": 0}, "chunk_size must be >= 1"),
    ],
)
def test_bad_input(logits, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(logits, targets, **kwargs)


def out_of_range_on_shards():
    """Global vocabulary is 2 x 5: id 10 is out of range for the group even though each shard is 5 wide."""
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\) \(5 per shard x 2 shards\)"):
        vocab_parallel_logprobs(torch.zeros(2, 5), torch.tensor([9, 10]), tp_group=dist.group.WORLD)
    return True


def test_bad_target_names_global_vocabulary(gloo):
    assert gloo.run(2, out_of_range_on_shards) == [True, True]


def subgroup_run(vocab, num_tokens):
    """4 ranks as two TP groups of 2 (ranks {0,1} and {2,3}), each group with its own problem: the op must use
    the rank inside the group it is given, not the global rank."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    rank = dist.get_rank()
    tp_group, tp_rank = groups[rank // 2], rank % 2
    logits, targets, g_logp, g_ent = make_problem(10 + rank // 2, num_tokens, vocab, 2)
    shard = vocab // 2
    local = logits[:, tp_rank * shard : (tp_rank + 1) * shard].clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(local, targets, tp_group=tp_group, chunk_size=4, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    want_logp, want_ent, want_grad = full_reference(logits, targets, g_logp, g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ent.detach(), want_ent, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(local.grad, want_grad[:, tp_rank * shard : (tp_rank + 1) * shard], rtol=RTOL, atol=ATOL)
    for group in groups:  # the pool's workers persist: do not leave gloo groups (and their threads) behind
        dist.destroy_process_group(group)
    return rank // 2, float(logp.detach().sum())


def test_tp_subgroups_of_a_larger_world(gloo):
    results = gloo.run(4, subgroup_run, 2 * 53, 11)
    assert [g for g, _ in results] == [0, 0, 1, 1]
    assert results[0][1] == results[1][1] and results[2][1] == results[3][1] and results[0][1] != results[2][1]


def megatron_oracle_run(vocab, num_tokens):
    """Second, independent oracle: Megatron-Core's own vocab_parallel_cross_entropy over its TP group."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_gvpo.megatron.parallel import destroy_parallel

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        logits, targets, g_logp, _ = make_problem(21, num_tokens, vocab, tp)
        shard = vocab // tp
        local = logits[:, rank * shard : (rank + 1) * shard]
        ours = local.clone().requires_grad_()
        theirs = local.clone().requires_grad_()
        logp = vocab_parallel_logprobs(ours, targets, tp_group=parallel_state.get_tensor_model_parallel_group())
        (logp * g_logp).sum().backward()
        # Megatron's op overwrites its input in place: hand it a copy.
        nll = tensor_parallel.vocab_parallel_cross_entropy(theirs.clone(), targets)
        (-nll * g_logp).sum().backward()
        torch.testing.assert_close(logp.detach(), -nll.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL)
        return True
    finally:
        destroy_parallel()


@pytest.mark.parametrize("tp", [2, 4])
def test_matches_megatron_vocab_parallel_cross_entropy(gloo, tp):
    assert gloo.run(tp, megatron_oracle_run, tp * 97, 23) == [True] * tp


def padded_vocab_run(padded_vocab, true_vocab, num_tokens):
    """Megatron pads the vocabulary for TP: columns >= true_vocab must take no probability mass and get zero
    gradient, on every rank, including a rank whose whole shard is padding."""
    tp, rank = dist.get_world_size(), dist.get_rank()
    logits, _, g_logp, g_ent = make_problem(5, num_tokens, padded_vocab, tp)
    targets = torch.randint(0, true_vocab, (num_tokens,), generator=torch.Generator().manual_seed(6))
    shard = padded_vocab // tp
    local = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(local, targets, tp_group=dist.group.WORLD, chunk_size=3,
                                        return_entropy=True, vocab_size=true_vocab)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    want_logp, want_ent, want_grad = full_reference(logits[:, :true_vocab], targets, g_logp, g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ent.detach(), want_ent, rtol=RTOL, atol=ATOL)
    full_grad = torch.cat([want_grad, torch.zeros(num_tokens, padded_vocab - true_vocab)], dim=1)
    torch.testing.assert_close(local.grad, full_grad[:, rank * shard : (rank + 1) * shard], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=rf"targets\[0\] = {true_vocab} is outside the vocabulary \[0, {true_vocab}\)"):
        vocab_parallel_logprobs(local, torch.full((num_tokens,), true_vocab), tp_group=dist.group.WORLD,
                                vocab_size=true_vocab)
    return True


@pytest.mark.parametrize("padded_vocab, true_vocab", [(4 * 16, 4 * 16 - 5), (4 * 16, 2 * 16 - 3)])
def test_padded_vocabulary_columns_are_excluded(gloo, padded_vocab, true_vocab):
    """The second case leaves ranks 2 and 3 with nothing but padding."""
    assert gloo.run(4, padded_vocab_run, padded_vocab, true_vocab, 13) == [True] * 4
