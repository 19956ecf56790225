"""Contract: the baselines GVPO is compared against run through the same Megatron schedule as GVPO, exactly.

- `forward_backward_policy_gradient` (GRPO, Dr. GRPO: forward_step -> vocab-parallel token log-probs ->
  policy-gradient head -> DDP) gives the gradient and loss of `algo.baselines.grpo_loss` / `dr_grpo_loss`
  computed on Hugging Face transformers' token log-probs of the whole batch in one process, for TP in {1,2},
  PP in {1,2, 2 with virtual stages}, DP in {1,2}, micro-batches that split groups, the fused head, with old
  log-probs far enough from the current ones that PPO clipping is active, and GRPO's KL penalty on.
- `compute_token_logprobs` returns Hugging Face's token log-probs at the scored positions (0 elsewhere) in
  the batch's own columns, for every layout.
"""

import pytest
import torch

from megatron_gvpo.algo import dr_grpo_loss, group_advantages, grpo_loss
from megatron_gvpo.data.batch import BEHAVIOUR_KEY
from megatron_gvpo.models.arch import arch_from_hf
from megatron_gvpo.models.hf_maps import hf_to_megatron
from tests.test_gvpo_megatron import SEQ, assert_matches_reference, make_batch, run_on_megatron
from tests.test_megatron_model import saved_tensors, tiny_hf_model

CLIP = 0.2
LENGTH_CONSTANT = SEQ - 3  # the longest response make_batch draws


def hf_token_logprobs(model, batch):
    logits = model(batch["tokens"]).logits.float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    return torch.where(batch["loss_mask"], token_logp, torch.zeros_like(token_logp))


def policy_gradient_batch(group_sizes, seed=0):
    """`make_batch` plus old and reference token log-probs: the policy's own, moved by noise of 0.3 nats so
    that ratios leave [1 - CLIP, 1 + CLIP] and the KL penalty is not at its minimum."""
    batch = make_batch(group_sizes, seed)
    with torch.no_grad():
        current = hf_token_logprobs(tiny_hf_model("llama", False), batch)
    g = torch.Generator().manual_seed(seed + 7)
    for key in ("old_token_logp", "ref_token_logp"):
        noise = 0.3 * torch.randn(current.shape, generator=g)
        batch[key] = torch.where(batch["loss_mask"], current + noise, torch.zeros_like(current))
    return batch


def reference_grads(algorithm, kl_coef, batch, model_type="llama", importance_cap=None):
    """Independent oracle: HF modeling code, full-vocabulary log_softmax, the baselines' [B, T] losses."""
    model = tiny_hf_model(model_type, False)
    token_logp = hf_token_logprobs(model, batch)
    advantages = group_advantages(batch["rewards"], batch["group_ids"], scale_by_std=algorithm == "grpo")
    correction = {"behaviour_token_logp": batch.get(BEHAVIOUR_KEY), "importance_cap": importance_cap}
    if algorithm == "grpo":
        loss = grpo_loss(token_logp, batch["old_token_logp"], advantages, batch["loss_mask"], clip_eps=CLIP,
                         ref_token_logp=batch["ref_token_logp"], kl_coef=kl_coef, **correction)
    else:
        loss = dr_grpo_loss(token_logp, batch["old_token_logp"], advantages, batch["loss_mask"], clip_eps=CLIP,
                            length_constant=LENGTH_CONSTANT, **correction)
    loss.backward()
    arch = arch_from_hf(model.config)
    grads = saved_tensors(model, {n: p.grad for n, p in model.named_parameters()})
    return loss.item(), dict(hf_to_megatron(arch, grads, arch.vocab_size))


def policy_gradient_run(batch, tp, pp, vpp, mbs, algorithm, kl_coef, fused, sequence_parallel=False,
                        model_type="llama", ep=1, importance_cap=None):
    from megatron_gvpo.megatron.step import forward_backward_policy_gradient

    def run(chunks, ctx, logprobs):
        return forward_backward_policy_gradient(
            chunks, batch, ctx, micro_batch_size=mbs, algorithm=algorithm, clip_eps=CLIP, kl_coef=kl_coef,
            length_constant=LENGTH_CONSTANT, logprobs=logprobs, importance_cap=importance_cap,
        )

    return run_on_megatron(run, model_type, False, tp, pp, vpp, fused, sequence_parallel, ep)


LAYOUTS = [
    # (tp, pp, vpp, dp, mbs, algorithm, kl_coef, fused, group sizes, sequence parallel)
    (1, 1, None, 1, 4, "grpo", 0.1, False, [4, 4, 4, 4], False),
    (1, 1, None, 1, 3, "dr_grpo", 0.0, False, [4, 3, 5], False),
    (2, 1, None, 1, 2, "grpo", 0.1, False, [4, 4, 4, 4], False),
    (1, 2, None, 1, 3, "dr_grpo", 0.0, False, [4, 4, 4], False),
    (1, 2, 2, 1, 2, "grpo", 0.1, False, [4, 4, 4, 4], False),
    (1, 1, None, 2, 3, "grpo", 0.1, False, [4, 3, 5, 2, 4, 6], False),
    (2, 1, None, 2, 2, "dr_grpo", 0.0, True, [4, 4, 4, 4], False),
    (1, 1, None, 1, 4, "grpo", 0.1, True, [4, 4, 4, 4], False),
    (2, 1, None, 1, 2, "grpo", 0.1, False, [4, 4, 4, 4], True),
    (2, 1, None, 2, 2, "dr_grpo", 0.0, True, [4, 4, 4, 4], True),
]


@pytest.mark.parametrize("tp, pp, vpp, dp, mbs, algorithm, kl_coef, fused, group_sizes, sequence_parallel", LAYOUTS)
def test_gradient_equals_single_process_hf_reference(gloo, tp, pp, vpp, dp, mbs, algorithm, kl_coef, fused,
                                                     group_sizes, sequence_parallel):
    batch = policy_gradient_batch(group_sizes)
    ref_loss, ref = reference_grads(algorithm, kl_coef, batch)
    ratio = torch.exp(hf_token_logprobs(tiny_hf_model("llama", False), batch) - batch["old_token_logp"])
    assert ((ratio - 1).abs() > CLIP)[batch["loss_mask"]].float().mean() > 0.2  # clipping is exercised
    results = gloo.run(tp * pp * dp, policy_gradient_run, batch, tp, pp, vpp, mbs, algorithm, kl_coef, fused,
                       sequence_parallel)
    assert_matches_reference(results, tp, dp, ref_loss, ref,
                             f"{algorithm} {tp=} {pp=} {vpp=} {dp=} {mbs=} {fused=} {sequence_parallel=}")


@pytest.mark.parametrize("model_type, tp, dp, ep, mbs, algorithm, kl_coef", [
    ("qwen3_moe", 1, 2, 2, 2, "grpo", 0.1),
    ("mixtral", 2, 2, 2, 2, "dr_grpo", 0.0),
])
def test_moe_gradient_equals_hf_reference_under_expert_parallelism(gloo, model_type, tp, dp, ep, mbs, algorithm,
                                                                     kl_coef):
    """The baselines on a mixture of experts, experts split over EP ranks (with TP and sequence parallelism)."""
    group_sizes = [4, 4, 4, 4]
    batch = policy_gradient_batch(group_sizes)
    ref_loss, ref = reference_grads(algorithm, kl_coef, batch, model_type)
    results = gloo.run(tp * dp, policy_gradient_run, batch, tp, 1, None, mbs, algorithm, kl_coef, False, tp > 1,
                       model_type, ep)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{model_type} {algorithm} {tp=} {dp=} {ep=}")


@pytest.mark.parametrize("tp, pp, dp, mbs, algorithm, kl_coef, fused", [
    (2, 1, 2, 2, "grpo", 0.1, False),
    (1, 2, 1, 4, "dr_grpo", 0.0, True),
])
def test_importance_corrected_gradient_equals_hf_reference(gloo, tp, pp, dp, mbs, algorithm, kl_coef, fused):
    """algo.importance_correction 'truncated': every token's term weighted by min(pi_old / pi_behaviour, cap),
    the behaviour log-probs (the rollout engine's) far enough from pi_old that the cap truncates some weights."""
    cap = 2.0
    batch = policy_gradient_batch([4, 4, 4, 4])
    mask = batch["loss_mask"]
    noise = 0.8 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    batch[BEHAVIOUR_KEY] = torch.where(mask, batch["old_token_logp"] + noise, torch.zeros_like(noise))
    weights = torch.exp(batch["old_token_logp"] - batch[BEHAVIOUR_KEY])[mask]
    assert (weights > cap).float().mean() > 0.05 and (weights < 1).float().mean() > 0.2
    ref_loss, ref = reference_grads(algorithm, kl_coef, batch, importance_cap=cap)
    _, uncorrected = reference_grads(algorithm, kl_coef, batch)
    assert not torch.allclose(ref["embedding.word_embeddings.weight"], uncorrected["embedding.word_embeddings.weight"])
    results = gloo.run(tp * pp * dp, policy_gradient_run, batch, tp, pp, None, mbs, algorithm, kl_coef, fused, False,
                       "llama", 1, cap)
    assert_matches_reference(results, tp, dp, ref_loss, ref, f"{algorithm} importance-corrected {tp=} {pp=} {dp=}")


def token_logprobs_run(batch, tp, pp, mbs):
    from megatron_gvpo.megatron.step import compute_token_logprobs

    def run(chunks, ctx, logprobs):
        token_logp = compute_token_logprobs(chunks, batch, ctx, mbs, logprobs)
        return None if token_logp is None else {"loss": token_logp}

    return run_on_megatron(run, "llama", False, tp, pp, None)[0]


@pytest.mark.parametrize("tp, pp, dp, mbs", [(1, 1, 1, 3), (2, 1, 1, 4), (1, 2, 1, 2), (1, 1, 2, 3)])
def test_token_logprobs_equal_hf(gloo, tp, pp, dp, mbs):
    batch = make_batch([4, 3, 5])
    with torch.no_grad():
        want = hf_token_logprobs(tiny_hf_model("llama", False), batch)
    got = [t for t in gloo.run(tp * pp * dp, token_logprobs_run, batch, tp, pp, mbs) if t is not None]
    assert len(got) == tp * dp
    for token_logp in got:
        assert token_logp.shape == want.shape
        assert torch.allclose(token_logp, want, atol=1e-5, rtol=0)
        assert (token_logp[~batch["loss_mask"]] == 0).all()
