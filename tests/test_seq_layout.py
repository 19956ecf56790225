"""Contract of megatron_gvpo/megatron/seq_layout.py and the heads' reductions for packed (THD) and
context-parallel (CP) micro-batches.

The model half of THD and CP is Transformer Engine's attention, which does not run on CPU; everything around
it does and is pinned here. Each CP rank receives the slice of the full model output that Megatron's layout
gives it (the model's output at a position depends only on the sequence, not on the layout), runs the
production head (`gvpo_head` -> `sequence_logprobs` -> `cp_sum`, or GRPO's `policy_gradient_head` with
per-token old and reference log-probs laid out like the tokens), and Megatron's two divisions are applied
(micro-batches; DDP's average over DP x CP). Sequence log-probs, token log-probs (`token_logprob_head`), the
loss and the gradient with respect to the full output must equal the single-process padded reference, for
cp in {1, 2, 4}, padded and THD layouts, the logits head and the fused head.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_gvpo.data.batch import BEHAVIOUR_KEY
from megatron_gvpo.megatron.seq_layout import (
    SequenceLayout,
    cp_token_index,
    layout_microbatch,
    pack_rows,
    scored_lengths,
)

VOCAB, HIDDEN, BETA = 23, 8, 0.3


def make_microbatch(seed=0):
    """Rows of different lengths (prompt 2..4, response 1..5), right-padded to 12 columns; 2 groups of 3."""
    from megatron_gvpo.data.batch import make_targets

    g = torch.Generator().manual_seed(seed)
    b, s = 6, 12
    tokens = torch.zeros(b, s, dtype=torch.long)
    response = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        p, r = 2 + i % 3, 1 + (i * 2) % 5
        tokens[i, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        response[i, p : p + r] = True
    targets, loss_mask = make_targets(tokens, response)
    return {
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
        "position_ids": torch.arange(s).expand(b, s), "row_index": torch.arange(b),
        "rewards": torch.rand(b, generator=g), "group_ids": torch.arange(b) // 3,
        "ref_seq_logp": -torch.rand(b, generator=g) * 5,
    }


def test_pack_rows_keeps_every_scored_position_and_nothing_after():
    mb = make_microbatch()
    packed = pack_rows(mb, pad_multiple=4)
    lengths = scored_lengths(mb["loss_mask"])
    # Row i needs its positions up to and including its last scored one: prompt + response - 1 tokens.
    assert lengths.tolist() == [2 + i % 3 + 1 + (i * 2) % 5 - 1 for i in range(6)]
    cu, cu_pad = packed["cu_seqlens"], packed["cu_seqlens_padded"]
    assert cu.diff().tolist() == lengths.tolist()
    assert (cu_pad.diff() % 4 == 0).all() and (cu_pad.diff() - cu.diff()).lt(4).all()
    assert packed["tokens"].shape == (1, int(cu_pad[-1]))
    for i in range(6):
        start, n = int(cu_pad[i]), int(lengths[i])
        span = slice(start, int(cu_pad[i + 1]))
        assert torch.equal(packed["tokens"][0, start:start + n], mb["tokens"][i, :n])
        assert torch.equal(packed["targets"][0, start:start + n], mb["targets"][i, :n])
        assert torch.equal(packed["loss_mask"][0, start:start + n], mb["loss_mask"][i, :n])
        assert not packed["loss_mask"][0, start + n:int(cu_pad[i + 1])].any()
        assert (packed["seq_index"][0, span] == i).all()
        assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))
    assert int(packed["loss_mask"].sum()) == int(mb["loss_mask"].sum())


def test_cp_token_index_is_the_load_balanced_split():
    # Two sequences of 8 at CP=2: chunks of 2; rank 0 keeps chunks 0 and 3 of each, rank 1 chunks 1 and 2.
    cu = torch.tensor([0, 8, 16])
    assert cp_token_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert cp_token_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    both = torch.cat([cp_token_index(cu, 4, r) for r in range(4)])
    assert sorted(both.tolist()) == list(range(16))
    with pytest.raises(ValueError, match=r"sequence 1 has length 6, not a multiple of 2 \* cp = 4"):
        cp_token_index(torch.tensor([0, 8, 14]), 2, 0)


def megatron_cp_split_run():
    """Our padded-layout CP split equals Megatron's `get_batch_on_this_cp_rank` on the same rank."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    rank, cp = dist.get_rank(), dist.get_world_size()
    mb = make_microbatch()
    ours = layout_microbatch(mb, SequenceLayout(cp_size=cp, cp_rank=rank))
    padded = {k: ours_full for k, ours_full in layout_microbatch(mb, SequenceLayout()).items()
              if k in ("tokens", "targets", "loss_mask", "position_ids")}
    theirs = get_batch_on_this_cp_rank(dict(padded), cp_group=dist.group.WORLD)
    return all(torch.equal(ours[k], theirs[k]) for k in padded)


def test_padded_cp_split_equals_megatrons(gloo):
    # 12 columns split 2 x 2 = 4 ways exactly; Megatron's helper reads the group's size and rank.
    assert gloo.run(2, megatron_cp_split_run) == [True, True]


def test_padded_layout_pads_columns_to_the_cp_multiple():
    mb = make_microbatch()
    out = layout_microbatch(mb, SequenceLayout(cp_size=4, cp_rank=1))
    # 12 columns -> 16 (a multiple of 2 * 4), then this rank's 2 chunks of 2 columns.
    assert out["tokens"].shape == (6, 4) and out["seq_index"].shape == (6, 4)


def head_run(packing: str, fused: bool, pad_multiple: int = 1, algorithm: str = "gvpo"):
    """One micro-batch through a production training head (`gvpo_head`, or `policy_gradient_head` for GRPO)
    on this CP rank (the world); returns the completed sequence log-probs, the loss as Megatron reports it,
    this rank's gradient w.r.t. the full output, and `token_logprob_head`'s token log-probs."""
    from megatron_gvpo.megatron.step import (
        GVPOLossSpec,
        LogprobSpec,
        PolicyGradientSpec,
        gvpo_head,
        policy_gradient_head,
        token_logprob_head,
    )

    cp = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mb = make_microbatch()
    b, s = mb["tokens"].shape
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).requires_grad_(fused)
    # The model output at every (row, position) of the padded batch: what any layout's model would produce.
    full = torch.randn(b, s, HIDDEN if fused else VOCAB, generator=g).requires_grad_()
    mb.update(old_token_logp=-torch.rand(b, s, generator=g) * 4, ref_token_logp=-torch.rand(b, s, generator=g) * 4,
              advantages=torch.randn(b, generator=g), token_weights=torch.rand(b, generator=g))
    mb[BEHAVIOUR_KEY] = mb["old_token_logp"] + torch.randn(b, s, generator=g)  # importance weights up to the cap
    tracker = dict(mb, tokens=torch.arange(b * s).view(b, s))  # the layout moves positions like tokens
    local = layout_microbatch(tracker, SequenceLayout(packing=packing, cp_size=cp, cp_rank=rank,
                                                      pad_multiple=pad_multiple))
    source = local["tokens"].clamp(max=b * s - 1)
    output = full.reshape(b * s, -1)[source]  # [b', t', .] this rank's model output
    group = dist.group.WORLD if cp > 1 else None
    logprobs = LogprobSpec(tp_group=None, vocab_size=VOCAB, cp_group=group, packing=packing, fused=fused,
                           pad_multiple=pad_multiple)
    if algorithm == "gvpo":
        loss, metrics = gvpo_head(local, weight if fused else None, output, spec=GVPOLossSpec(
            beta=BETA, strategy="group_atomic", num_groups=2, megatron_scale=1 * 1 * cp, dp_group=None,
            logprobs=logprobs))
    else:
        loss, metrics = policy_gradient_head(local, weight if fused else None, output, spec=PolicyGradientSpec(
            clip_eps=0.2, kl_coef=0.1, importance_cap=2.0, megatron_scale=1 * 1 * cp, logprobs=logprobs))
    # Megatron: loss / num_microbatches (here 1) in the schedule, then DDP averages gradients over DP x CP.
    loss.backward()
    grads = [full.grad] + ([weight.grad] if fused else [])
    if cp > 1:
        for grad in grads:
            dist.all_reduce(grad)
            grad /= cp
    _, tokens = token_logprob_head(local, weight if fused else None, output, spec=logprobs, columns=s)
    return metrics["seq_logp"], float(metrics["loss"]), grads, tokens["token_logp"]


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("packing", ["padded", "thd"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_and_thd_heads_equal_the_padded_single_process_reference(gloo, cp, packing, fused, algorithm):
    """Megatron averages gradients over DP x CP, so the DDP average above is what a real CP run applies."""
    want_logp, want_loss, want_grads, want_tokens = head_run("padded", fused, algorithm=algorithm)
    assert (want_tokens != 0).sum() == make_microbatch()["loss_mask"].sum()
    results = ([head_run(packing, fused, algorithm=algorithm)] if cp == 1
               else gloo.run(cp, head_run, packing, fused, 1, algorithm))
    for logp, loss, grads, tokens in results:
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens, want_tokens, rtol=1e-5, atol=1e-5)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for got, want in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("packing", ["padded", "thd"])
def test_fp8_padding_leaves_the_head_unchanged(packing, fused):
    """FP8 GEMMs need token counts in multiples of 16 (32 for MXFP8): padding every sequence (THD) or the
    micro-batch width (padded) that far adds only unscored positions, so log-probs, loss and gradients equal the
    unpadded layout's."""
    from megatron_gvpo.megatron.config import ModelConfig
    from megatron_gvpo.megatron.fp8 import fp8_pad_multiple

    multiple = fp8_pad_multiple(ModelConfig(dtype="bfloat16", fp8="hybrid"))
    assert multiple == 16 and fp8_pad_multiple(ModelConfig(dtype="bfloat16", fp8="e4m3", fp8_recipe="mxfp8")) == 32
    layout = layout_microbatch(make_microbatch(), SequenceLayout(packing=packing, pad_multiple=multiple))
    bounds = layout["cu_seqlens_padded"] if packing == "thd" else torch.tensor(layout["tokens"].shape[1:])
    assert (bounds % multiple == 0).all()
    want_logp, want_loss, want_grads, _ = head_run(packing, fused)
    logp, loss, grads, _ = head_run(packing, fused, pad_multiple=multiple)
    torch.testing.assert_close(logp, want_logp, rtol=1e-6, atol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_te_thd_partition_matches_ours():
    """On machines with Transformer Engine: its THD CP partition is the one `cp_token_index` computes."""
    tex = pytest.importorskip("transformer_engine_torch", reason="Transformer Engine is GPU-only")
    cu = torch.tensor([0, 8, 24, 32], dtype=torch.int32, device="cuda")
    for cp in (2, 4):
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu, 32, cp, rank).cpu()
            assert theirs.tolist() == cp_token_index(cu.cpu().long(), cp, rank).tolist()


def test_cp_and_thd_without_transformer_engine_fail_before_building():
    from megatron_gvpo.megatron.model import check_attention_support

    check_attention_support(use_te=False, cp=1, packing="padded")
    check_attention_support(use_te=True, cp=2, packing="thd")
    with pytest.raises(ValueError, match=r"parallel.cp > 1 and train.packing='thd' need Transformer Engine"):
        check_attention_support(use_te=False, cp=2, packing="thd")
    with pytest.raises(ValueError, match=r"^train.packing='thd' need Transformer Engine"):
        check_attention_support(use_te=False, cp=1, packing="thd")
    with pytest.raises(ValueError, match="train.packing must be 'padded' or 'thd'"):
        SequenceLayout(packing="bshd")
