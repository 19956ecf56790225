"""Contract: `megatron_gvpo.ops.fused_linear_logprobs(hidden, weight_shard, targets)` equals the unfused path
`vocab_parallel_logprobs(hidden @ weight_shard.T, targets)` and the full-vocabulary autograd reference:
log-probs, entropy, and gradients w.r.t. the hidden states and the weight shard (fp32, rtol 1e-5), at
TP = 1, 2, 4, with chunk sizes that do not divide the token count and with vocabulary padding (including a
rank whose shard is all padding)."""

import pytest
import torch
import torch.distributed as dist

from megatron_gvpo.ops import fused_linear_logprobs

RTOL, ATOL = 1e-5, 1e-5


def problem(num_tokens, hidden_size, padded_vocab, true_vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g)
    weight = 0.5 * torch.randn(padded_vocab, hidden_size, generator=g)
    targets = torch.randint(0, true_vocab, (num_tokens,), generator=g)
    return hidden, weight, targets, torch.randn(num_tokens, generator=g), torch.randn(num_tokens, generator=g)


def reference(hidden, weight, targets, true_vocab, g_logp, g_ent):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lsm = torch.log_softmax((h @ w.T)[:, :true_vocab], dim=-1)
    logp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def fused_run(num_tokens, hidden_size, padded_vocab, true_vocab, chunk_size):
    tp = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = dist.group.WORLD if tp > 1 else None
    hidden, weight, targets, g_logp, g_ent = problem(num_tokens, hidden_size, padded_vocab, true_vocab)
    shard = padded_vocab // tp
    h = hidden.clone().requires_grad_()
    w = weight[rank * shard : (rank + 1) * shard].clone().requires_grad_()
    logp, ent = fused_linear_logprobs(h, w, targets, tp_group=group, chunk_size=chunk_size, return_entropy=True,
                                      vocab_size=true_vocab)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    want_logp, want_ent, want_gh, want_gw = reference(hidden, weight, targets, true_vocab, g_logp, g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ent.detach(), want_ent, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.grad, want_gh, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(w.grad, want_gw[rank * shard : (rank + 1) * shard], rtol=RTOL, atol=ATOL)
    return True


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_single_process(chunk_size):
    assert fused_run(23, 16, 64, 59, chunk_size)


@pytest.mark.parametrize("tp, true_vocab", [(2, 61), (4, 64), (4, 29)])
def test_tensor_parallel(gloo, tp, true_vocab):
    assert gloo.run(tp, fused_run, 19, 16, 64, true_vocab, 5) == [True] * tp


def test_log_probs_only_and_bad_input():
    hidden, weight, targets, g_logp, _ = problem(9, 8, 32, 32)
    h = hidden.clone().requires_grad_()
    (fused_linear_logprobs(h, weight, targets, chunk_size=4) * g_logp).sum().backward()
    _, _, want_gh, _ = reference(hidden, weight, targets, 32, g_logp, torch.zeros(9))
    torch.testing.assert_close(h.grad, want_gh, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_linear_logprobs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match=r"targets\[0\] = 32 is outside the vocabulary \[0, 32\)"):
        fused_linear_logprobs(hidden, weight, torch.full((9,), 32))


def test_bfloat16_inputs_use_fp32_softmax_and_keep_their_dtype():
    """bf16 hidden states and weight (the GPU training dtype): matmuls in bf16 as Megatron's output layer runs
    them, softmax statistics and gradient accumulation in fp32; outputs and gradients come back in bf16."""
    hidden, weight, targets, g_logp, g_ent = problem(37, 16, 64, 61)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    logp, ent = fused_linear_logprobs(h, w, targets, chunk_size=8, return_entropy=True, vocab_size=61)
    ((logp.float() * g_logp).sum() + (ent.float() * g_ent).sum()).backward()
    assert logp.dtype == ent.dtype == h.grad.dtype == w.grad.dtype == torch.bfloat16
    want_logp, want_ent, want_gh, want_gw = reference(hidden.bfloat16().float(), weight.bfloat16().float(), targets,
                                                      61, g_logp, g_ent)
    # bf16 logits carry ~3 significant digits; the reference sees the same rounded inputs in fp32.
    torch.testing.assert_close(logp.float(), want_logp, rtol=0.02, atol=0.05)
    torch.testing.assert_close(ent.float(), want_ent, rtol=0.02, atol=0.05)
    torch.testing.assert_close(h.grad.float(), want_gh, rtol=0.05, atol=0.05)
    torch.testing.assert_close(w.grad.float(), want_gw, rtol=0.05, atol=0.05)


def test_weight_gradient_straight_into_main_grad():
    """With main_grad_accumulation the weight gradient is added to `weight.main_grad` (what Megatron DDP
    reduces) and autograd gets none; every other output is unchanged. Without a main_grad it refuses."""
    hidden, weight, targets, g_logp, g_ent = problem(23, 16, 64, 59)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    w.main_grad = torch.full(w.shape, 0.5)  # earlier micro-batches' accumulated gradient
    logp, ent = fused_linear_logprobs(h, w, targets, chunk_size=7, return_entropy=True, vocab_size=59,
                                      main_grad_accumulation=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    want_logp, want_ent, want_gh, want_gw = reference(hidden, weight, targets, 59, g_logp, g_ent)
    torch.testing.assert_close(logp.detach(), want_logp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.grad, want_gh, rtol=RTOL, atol=ATOL)
    assert w.grad is None
    torch.testing.assert_close(w.main_grad, want_gw + 0.5, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="needs a weight with a main_grad buffer"):
        fused_linear_logprobs(h, weight.clone().requires_grad_(), targets, main_grad_accumulation=True)
