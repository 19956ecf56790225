"""Contract: `MegatronEngine` (DDP + Megatron optimizer + LR schedule + GVPO step) gives the same per-step loss,
gradient norm and sequence log-probs at every parallel layout as in one process, over several optimizer steps
(fp32, rtol 1e-5 on the loss, 1e-4 after three Adam steps): the same config and seed give the same run.
Also: a non-finite gradient skips the update and leaves the parameters untouched."""

import math

import pytest
import torch

from tests.test_gvpo_megatron import make_batch

STEPS = 3


def engine_run(overrides, steps=STEPS, poison_step=None):
    engine, batch, teardown = _engine_for(overrides, total_steps=STEPS)
    try:
        history = []
        for step in range(steps):
            batch["ref_seq_logp"] = engine.sequence_logprobs(batch)  # pi_ref = pi_old
            if step == poison_step:
                batch["rewards"][0] = float("nan")  # bypasses validation: this is the training step's guard
                before = [p.detach().clone() for c in engine.chunks for p in c.parameters()]
            r = engine_step_unchecked(engine, batch) if step == poison_step else engine.train_step(batch)
            if step == poison_step:
                after = [p.detach() for c in engine.chunks for p in c.parameters()]
                assert all(torch.equal(a, b) for a, b in zip(before, after)), "skipped step changed parameters"
                batch["rewards"][0] = 0.25
            history.append((r.loss, r.grad_norm, r.lr, r.skipped, float(batch["ref_seq_logp"].sum())))
        return history
    finally:
        teardown()


def engine_step_unchecked(engine, batch):
    """Run a step whose GVPO loss is NaN by disabling the input check, as corrupted state would."""
    import megatron_gvpo.algo.gvpo as gvpo

    original = gvpo.check_finite
    gvpo.check_finite = lambda **_: None
    try:
        return engine.train_step(batch)
    finally:
        gvpo.check_finite = original


@pytest.fixture(scope="module")
def reference(gloo):
    return gloo.run(1, engine_run, [])[0]


@pytest.mark.parametrize(
    "world, overrides",
    [
        (2, ["parallel.tp=2"]),
        (2, ["parallel.pp=2"]),
        (2, ["train.distributed_optimizer=true"]),
        (4, ["parallel.tp=2", "parallel.pp=2", "algo.group_strategy=prepass"]),
        (4, ["parallel.pp=2", "parallel.vpp=2", "algo.group_strategy=allgather", "train.micro_batch_size=2"]),
        (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.fused_logprobs=true"]),
        (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", "train.distributed_optimizer=true"]),
    ],
)
def test_same_run_at_every_layout(gloo, reference, world, overrides):
    results = gloo.run(world, engine_run, overrides)
    for rank_history in results:  # every rank reports the same numbers
        for step, (got, want) in enumerate(zip(rank_history, reference)):
            loss, grad_norm, lr, skipped, ref_sum = got
            assert not skipped
            assert loss == pytest.approx(want[0], rel=1e-4), (step, overrides)
            assert grad_norm == pytest.approx(want[1], rel=1e-4), (step, overrides)
            assert lr == pytest.approx(want[2], rel=1e-9)
            assert ref_sum == pytest.approx(want[4], rel=1e-5)


MOE = ["model.path=configs/models/tiny_qwen3_moe.json", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"]


@pytest.fixture(scope="module")
def moe_reference(gloo):
    return gloo.run(1, engine_run, MOE)[0]


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallel.ep=2"]),
    (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true", "train.distributed_optimizer=true"]),
    # The same micro-batches (4 rows) as the reference: the load-balancing loss is a per-micro-batch statistic.
    (4, ["parallel.ep=2", "parallel.pp=2", "algo.group_strategy=allgather"]),
])
def test_moe_same_run_at_every_expert_layout(gloo, moe_reference, world, overrides):
    """A mixture of experts with its router losses on: the same run (losses, gradient norms, the policy's
    log-probs after each step) with the experts split over EP ranks, with TP, PP and the distributed optimizer
    (which shards expert and dense optimizer state over different groups)."""
    results = gloo.run(world, engine_run, MOE + overrides)
    for rank_history in results:
        for step, (got, want) in enumerate(zip(rank_history, moe_reference, strict=True)):
            assert not got[3]
            assert got[0] == pytest.approx(want[0], rel=1e-4), (step, overrides)
            assert got[1] == pytest.approx(want[1], rel=1e-4), (step, overrides)
            assert got[4] == pytest.approx(want[4], rel=1e-5), (step, overrides)


def test_reference_run_learns_and_schedules(reference):
    losses = [h[0] for h in reference]
    lrs = [h[2] for h in reference]
    assert all(math.isfinite(x) for x in losses)
    assert lrs[0] > 0 and lrs[-1] < max(lrs)  # warm-up then cosine decay
    assert len({round(h[4], 4) for h in reference}) == STEPS  # the policy (and so pi_old) moves every step


def test_non_finite_gradient_skips_the_update(gloo):
    history = gloo.run(2, engine_run, ["parallel.pp=2"], 2, 1)[0]
    assert history[1][3] is True and not math.isfinite(history[1][1])
    assert history[0][3] is False


def resume_run(overrides_first, overrides_second, directory, total_steps, stop_after):
    """Train `stop_after` steps at one layout, checkpoint, rebuild the engine at another layout, load, and
    train the remaining steps; return the per-step losses of both halves. With `stop_after == total_steps`
    it is the uninterrupted run."""
    from megatron_gvpo.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from tests.gloo_pool import checkpoint_helpers_allowed

    history = []
    with checkpoint_helpers_allowed():
        for phase, overrides in enumerate([overrides_first, overrides_second]):
            engine, batch, teardown = _engine_for(overrides)
            try:
                start = 0
                if phase == 1:
                    start, state = load_checkpoint(engine, latest_checkpoint(directory))
                    assert state == {"cursor": start}
                for step in range(start, stop_after if phase == 0 else total_steps):
                    batch["ref_seq_logp"] = engine.sequence_logprobs(batch)
                    history.append(engine.train_step(batch).loss)
                    if engine.reference is not None:
                        if step == 0:  # from now on the reference differs from the initial weights
                            engine.refresh_reference()
                        # ... so a resumed run shows whether it came back from the checkpoint
                        history.append(float(engine.sequence_logprobs(batch, reference=True).sum()))
                if phase == 0:
                    save_checkpoint(engine, directory, stop_after, {"cursor": stop_after})
            finally:
                teardown()
            if stop_after == total_steps:
                break
    return history


def _engine_for(overrides, total_steps=4):
    """An engine on the tiny Llama for `overrides`, a fixed batch of 4 groups of 4, and its teardown."""
    from megatron_gvpo.config import Config, config_from_dict
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import hf_weights, load_hf_config
    from megatron_gvpo.train import build_engine

    apply_cpu_compat()
    cfg = config_from_dict(Config, {}, [
        "model.seq_length=10", "algo.group_size=4", "algo.beta=0.2", "train.global_batch_size=16",
        "train.micro_batch_size=4", "train.lr=3e-3", "train.lr_warmup_steps=1", "train.lr_decay_style=cosine",
        f"train.steps={total_steps}", *overrides,
    ])
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    arch = arch_from_hf(load_hf_config(cfg.model.path))
    engine = build_engine(cfg, arch, ctx, hf_weights(cfg.model.path, cfg.model.resolved_init, cfg.run.seed))
    batch = make_batch([4, 4, 4, 4], seed=3)
    batch["tokens"] = batch["tokens"] % arch.vocab_size
    batch["targets"] = batch["targets"] % arch.vocab_size
    return engine, batch, destroy_parallel


@pytest.mark.parametrize(
    "first, second",
    [
        (["parallel.tp=2"], ["parallel.tp=2"]),
        (["parallel.tp=2"], ["parallel.pp=2"]),
        # Sequence parallelism changes activations, not parameters: its checkpoints resume without it.
        (["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.tp=2"]),
        (["parallel.pp=2", "train.distributed_optimizer=true"], ["parallel.tp=2", "train.distributed_optimizer=true"]),
        # A frozen reference is a second copy of the model in the same checkpoint.
        (["algo.reference=frozen"], ["algo.reference=frozen", "parallel.tp=2"]),
        # Experts are stored along one expert axis: saved with whole experts on 2 EP ranks (data parallel for
        # the rest), resumed at TP 2 for the rest of the model.
        (MOE + ["parallel.ep=2", "train.distributed_optimizer=true"],
         MOE + ["parallel.ep=2", "parallel.etp=1", "parallel.tp=2", "parallel.sequence_parallel=true",
                "train.distributed_optimizer=true"]),
    ],
)
def test_resume_continues_the_uninterrupted_run(gloo, tmp_path, first, second):
    """Stopped after step 2 and resumed (at the same or another layout), steps 3 and 4 have the losses of
    the uninterrupted run: model, optimizer moments and LR schedule all restored."""
    uninterrupted = gloo.run(2, resume_run, first, first, str(tmp_path / "a"), 4, 4)[0]
    resumed = gloo.run(2, resume_run, first, second, str(tmp_path / "b"), 4, 2)[0]
    assert len(resumed) == (8 if "algo.reference=frozen" in first else 4)
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)
    assert (tmp_path / "b" / "latest").read_text().strip() == "step_0000002"
    assert not list((tmp_path / "b").glob("*.tmp"))


def reference_modes_run():
    """Frozen reference: its log-probs stay those of the initial policy while the policy moves; after
    `refresh_reference` they equal the current policy's."""
    engine, batch, teardown = _engine_for(["algo.reference=frozen"])
    try:
        initial = engine.sequence_logprobs(batch, reference=True)
        for _ in range(2):
            batch["ref_seq_logp"] = engine.sequence_logprobs(batch, reference=True)
            engine.train_step(batch)
        frozen = engine.sequence_logprobs(batch, reference=True)
        policy = engine.sequence_logprobs(batch)
        engine.refresh_reference()
        refreshed = engine.sequence_logprobs(batch, reference=True)
        return (torch.equal(initial, frozen), float((policy - frozen).abs().max()),
                float((refreshed - policy).abs().max()))
    finally:
        teardown()


def test_frozen_and_refreshed_reference(gloo):
    unchanged, moved, refreshed_diff = gloo.run(2, reference_modes_run)[0]
    assert unchanged and moved > 1e-3 and refreshed_diff == 0.0


def baseline_run(overrides, rollouts=2):
    """GRPO / Dr. GRPO through the engine as the trainer drives it: `reference_logprobs` before a rollout's
    first update, then two optimizer steps on mini-batches of whole groups (the second one's PPO ratio
    against the stored old log-probs is no longer 1)."""
    from megatron_gvpo.train import mini_batches

    engine, batch, teardown = _engine_for(overrides)
    try:
        history = []
        for _ in range(rollouts):
            batch.update(engine.reference_logprobs(batch))
            # Token log-probs summed over a row are its sequence log-prob, computed the other way.
            seq_logp = engine.sequence_logprobs(batch, reference=engine.reference is not None)
            mismatch = float((batch["ref_seq_logp"] - seq_logp).abs().max())
            for mb in mini_batches(batch, 2):
                r = engine.train_step(mb)
                history.append((r.loss, r.grad_norm, r.skipped, mismatch, sorted(batch)))
        return history
    finally:
        teardown()


@pytest.mark.parametrize("algorithm", [["algo.name=grpo", "algo.kl_coef=0.05", "algo.reference=frozen"],
                                       ["algo.name=dr_grpo", "train.micro_batch_size=2"]],  # splits groups
                         ids=["grpo", "dr_grpo"])
def test_baselines_give_the_same_run_at_every_layout(gloo, algorithm):
    reference = gloo.run(1, baseline_run, algorithm)[0]
    # The policy moves every step. (Not seen in the loss: at ratio 1, a rollout's first mini-batch, the
    # policy-gradient loss is a function of advantages and lengths only.)
    assert len({round(h[1], 6) for h in reference}) == len(reference)
    keys = reference[0][4]
    assert "old_token_logp" in keys and ("ref_token_logp" in keys) == ("algo.kl_coef=0.05" in algorithm)
    for world, layout in [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2"]), (2, ["train.distributed_optimizer=true"]),
                          (2, ["parallel.tp=2", "parallel.sequence_parallel=true"])]:
        overrides = [*algorithm, *layout]
        for rank_history in gloo.run(world, baseline_run, overrides):
            for step, (got, want) in enumerate(zip(rank_history, reference, strict=True)):
                assert not got[2] and got[3] < 1e-4
                assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-7), (step, overrides)
                assert got[1] == pytest.approx(want[1], rel=1e-4), (step, overrides)
