"""GVPO training on Megatron-Core from offline group data (prompts, each with several scored responses).

    python -m megatron_gvpo.train --config configs/tiny_cpu.yaml [--set train.steps=20 parallel.tp=2 ...]
    torchrun --nproc-per-node 4 -m megatron_gvpo.train --config configs/tiny_cpu.yaml --set parallel.tp=2

Each rollout step takes a batch of whole groups, computes pi_old / pi_ref log-probs with a forward-only pass,
then runs `train.optimizer_steps_per_rollout` optimizer steps on mini-batches of whole groups (the paper's
Algorithm 1; with pi_ref = pi_old the first mini-batch is REINFORCE with a group-mean baseline and later ones
are trust-region steps). Writes <run.dir>/config.yaml, metrics.jsonl and checkpoints/; resumes automatically.
The online loop (SGLang rollouts) reuses every piece of this file but the data source.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import yaml

from megatron_gvpo.config import Config, add_config_arguments, load_config, to_dict
from megatron_gvpo.data.offline import GroupSampler, collate, load_groups
from megatron_gvpo.utils.logging import MetricsSink, get_logger


def build(cfg: Config):
    """Process groups, model, optimizer and data; everything the loop needs."""
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.engine import MegatronEngine
    from megatron_gvpo.megatron.parallel import initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import hf_weights, load_hf_config
    from megatron_gvpo.utils.distributed import init_distributed

    apply_cpu_compat()
    _, world_size = init_distributed()
    cfg.check_world_size(world_size)
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    arch = arch_from_hf(load_hf_config(cfg.model.path))
    arch.check_sequence_length(cfg.model.seq_length)
    hf_state = None if cfg.model.load else hf_weights(cfg.model.path, cfg.model.resolved_init, cfg.run.seed)
    engine = MegatronEngine(cfg, arch, ctx, hf_state)
    k = cfg.algo.group_size
    # Every group has exactly k responses: the first k of longer rows (an unbiased subset), shorter rows are bad.
    data_cfg = dataclasses.replace(cfg.data, min_responses=k, max_responses=k)
    if data_cfg.max_seq_len() > cfg.model.seq_length:
        raise ValueError(
            f"data.max_prompt_tokens + data.max_response_tokens = {data_cfg.max_seq_len()} exceeds "
            f"model.seq_length={cfg.model.seq_length}"
        )
    groups, stats = load_groups(data_cfg, tokenizer=load_tokenizer(cfg), vocab_size=arch.vocab_size)
    sampler = GroupSampler(groups, cfg.train.global_batch_size * cfg.train.optimizer_steps_per_rollout // k,
                           seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    return engine, sampler, stats


def load_tokenizer(cfg: Config):
    path = cfg.model.tokenizer or (cfg.model.path if Path(cfg.model.path).is_dir() else "")
    if not path:
        return None  # token-id datasets need none; text rows then fail with a clear error
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def mini_batches(batch: dict, count: int) -> list[dict]:
    """Split a rollout batch (rows of whole groups, contiguous) into `count` equal mini-batches of whole groups."""
    n = batch["tokens"].shape[0] // count
    return [{key: value[i * n:(i + 1) * n] for key, value in batch.items()} for i in range(count)]


def train(cfg: Config) -> list[dict]:
    from megatron_gvpo.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_gvpo.megatron.parallel import destroy_parallel

    log = get_logger()
    engine, sampler, stats = build(cfg)
    rank0 = torch.distributed.get_rank() == 0
    run_dir, ckpt_dir = Path(cfg.run.dir), Path(cfg.run.dir) / "checkpoints"
    start = 0
    if cfg.run.resume and (latest := latest_checkpoint(ckpt_dir)) is not None:
        start, state = load_checkpoint(engine, latest)
        sampler.load_state_dict(state["sampler"])
        log.info(f"resumed from {latest} at step {start}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log.info(f"data: {stats.summary()}")
    sink = MetricsSink(run_dir, enabled=rank0, tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project,
                       config=to_dict(cfg), append=start > 0)
    records = []
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = collate(sampler.next_batch(), seq_len=cfg.model.seq_length)
            batch["ref_seq_logp"] = engine.sequence_logprobs(batch, reference=cfg.algo.reference != "old_policy")
            t_logprob = time.perf_counter() - t0
            results = [engine.train_step(mb) for mb in mini_batches(batch, cfg.train.optimizer_steps_per_rollout)]
            if cfg.algo.reference == "refresh" and step % cfg.algo.ref_refresh_interval == 0:
                engine.refresh_reference()
            record = {
                "loss": results[0].loss, "grad_norm": results[-1].grad_norm, "lr": results[-1].lr,
                "reward_mean": float(batch["rewards"].mean()), "tokens": int(batch["loss_mask"].sum()),
                "skipped_steps": engine.skipped_steps, **results[0].metrics,
                "time_logprob_s": t_logprob, "time_step_s": time.perf_counter() - t0,
            }
            records.append(record)
            if step % cfg.run.log_interval == 0 or step == cfg.train.steps:
                sink.log(step, record)
                if rank0:
                    log.info(f"step {step}/{cfg.train.steps} loss {record['loss']:.4g} grad_norm "
                             f"{record['grad_norm']:.3g} reward {record['reward_mean']:.3f} "
                             f"lr {record['lr']:.3g} {record['time_step_s']:.2f}s")
            if (cfg.run.save_interval and step % cfg.run.save_interval == 0) or step == cfg.train.steps:
                save_checkpoint(engine, ckpt_dir, step, {"sampler": sampler.state_dict()})
    finally:
        sink.close()
        destroy_parallel()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default_config="configs/tiny_cpu.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(Config, args.config, args.overrides)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
