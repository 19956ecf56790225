"""GVPO training on Megatron-Core: offline group data (prompts with scored responses) or online SGLang rollouts.

    python -m megatron_gvpo.train --config configs/tiny_cpu.yaml [--set train.steps=20 parallel.tp=2 ...]
    torchrun --nproc-per-node 4 -m megatron_gvpo.train --config configs/tiny_cpu.yaml --set parallel.tp=2

Each rollout step takes a batch of whole groups, computes pi_old / pi_ref log-probs with a forward-only pass,
then runs `train.optimizer_steps_per_rollout` optimizer steps on mini-batches of whole groups (the paper's
Algorithm 1; with pi_ref = pi_old the first mini-batch is REINFORCE with a group-mean baseline and later ones
are trust-region steps). Writes <run.dir>/config.yaml, metrics.jsonl and checkpoints/; resumes automatically.
Where batches come from is the source: `OfflineSource` below, or `rollout.online.OnlineSource` (SGLang
rollouts and rewards, a weight sync after every step, held-out evaluation) with `rollout.source: online`.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from megatron_gvpo.config import Config, add_config_arguments, load_config, to_dict
from megatron_gvpo.data.chat import PromptEncoder
from megatron_gvpo.data.groups import GroupSampler, collate
from megatron_gvpo.data.offline import load_groups
from megatron_gvpo.utils.cli import run_main, user_errors
from megatron_gvpo.utils.logging import MetricsSink, get_logger


@user_errors()  # a bad config value or a missing path ends the command with one line (utils/cli.py)
def build(cfg: Config):
    """Process groups, the model with its optimizer, and the tokenizer."""
    from megatron_gvpo.models.hf_io import check_model_paths, hf_weights, load_hf_config

    check_model_paths(cfg.model.path, cfg.model.tokenizer, cfg.model.load)  # before seconds of imports
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.utils.distributed import init_distributed

    apply_cpu_compat()
    _, world_size = init_distributed()
    cfg.check_world_size(world_size)
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    try:
        arch = arch_from_hf(load_hf_config(cfg.model.path))
        arch.check_sequence_length(cfg.model.seq_length)
        hf_state = None if cfg.model.load else hf_weights(cfg.model.path, cfg.model.resolved_init, cfg.run.seed)
        return build_engine(cfg, arch, ctx, hf_state), arch, load_tokenizer(cfg)
    except BaseException:
        destroy_parallel()  # a process that goes on (a notebook, a test worker) can build again
        raise


def build_engine(cfg: Config, arch, ctx, hf_state):
    """The policy on Megatron, given the config sections it reads."""
    from megatron_gvpo.megatron.engine import MegatronEngine

    return MegatronEngine(arch, ctx, hf_state, model=cfg.model, parallel=cfg.parallel, train=cfg.train,
                          algo=cfg.algo, moe=cfg.moe, routing_replay=cfg.rollout.routing_replay,
                          max_new_tokens=cfg.rollout.max_new_tokens)


class OfflineSource:
    """Batches of scored groups from data.path (megatron_gvpo/data/offline.py). Weight sync and held-out
    evaluation only with an `evaluator` (rollout.eval_offline: an OnlineSource that samples nothing)."""

    def __init__(self, cfg: Config, arch, tokenizer):
        self.evaluator = None
        k = cfg.algo.group_size
        # Every group has exactly k responses: the first k of longer rows (an unbiased subset), shorter rows are bad.
        data_cfg = dataclasses.replace(cfg.data, min_responses=k, max_responses=k)
        if data_cfg.max_seq_len() > cfg.model.seq_length:
            raise ValueError(
                f"data.max_prompt_tokens + data.max_response_tokens = {data_cfg.max_seq_len()} exceeds "
                f"model.seq_length={cfg.model.seq_length}"
            )
        encoder = PromptEncoder(tokenizer, cfg.prompts, arch.vocab_size) if tokenizer is not None else None
        groups, self.stats = load_groups(data_cfg, tokenizer=tokenizer, vocab_size=arch.vocab_size,
                                         prompt_encoder=encoder)
        self.sampler = GroupSampler(groups, cfg.groups_per_rollout, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        self.seq_length = cfg.model.seq_length

    def next_batch(self) -> tuple[dict, dict]:
        batch = collate(self.sampler.next_batch(), seq_len=self.seq_length)
        return batch, {"reward_mean": float(batch["rewards"].mean())}

    def sync_weights(self, step: int) -> float:
        return self.evaluator.sync_weights(step) if self.evaluator is not None else 0.0

    def evaluate(self) -> dict:
        return self.evaluator.evaluate() if self.evaluator is not None else {}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def load_tokenizer(cfg: Config):
    path = cfg.model.tokenizer or (cfg.model.path if Path(cfg.model.path).is_dir() else "")
    if not path:
        return None  # token-id datasets need none; text rows then fail with a clear error
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


class Preemption:
    """SIGTERM and SIGUSR1 (SLURM's warning before pre-emption or time-out) ask the loop to checkpoint and stop
    after the current step. `requested()` is collective: ranks may get the signal at different steps, so they
    agree on the flag before anyone saves."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        flag = torch.tensor([float(self.received is not None)],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class KLToStart:
    """KL(pi_start || pi), the distance the policy has moved, estimated on the first rollout batch of a run
    that starts from step 0: its responses are samples of pi_start (at rollout.temperature 1 exactly), so
    mean over rows of log pi_start(y|x) - log pi(y|x) (sequence log-probs) is an unbiased estimate. Captured
    at step 1, measured at every evaluation, kept in checkpoints. Offline data is not sampled from pi_start:
    no estimate there."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.batch: dict | None = None
        self.start_logp: torch.Tensor | None = None

    def capture(self, batch: dict, step: int) -> None:
        """At step 1 the reference log-probs (old policy, frozen or refreshed copy alike) are pi_start's."""
        if self.enabled and step == 1 and self.batch is None:
            self.batch = {k: batch[k].clone() for k in ("tokens", "targets", "loss_mask", "rewards", "group_ids")}
            self.start_logp = batch["ref_seq_logp"].clone()

    def measure(self, engine) -> dict:
        """Collective."""
        if self.batch is None:
            return {}
        return {"kl_to_start": float((self.start_logp - engine.sequence_logprobs(self.batch)).mean())}

    def state_dict(self) -> dict:
        return {"batch": self.batch, "start_logp": self.start_logp}

    def load_state_dict(self, state: dict) -> None:
        self.batch, self.start_logp = state["batch"], state["start_logp"]


def mini_batches(batch: dict, count: int) -> list[dict]:
    """Split a rollout batch (rows of whole groups, contiguous) into `count` equal mini-batches of whole groups."""
    n = batch["tokens"].shape[0] // count
    return [{key: value[i * n:(i + 1) * n] for key, value in batch.items()} for i in range(count)]


def train(cfg: Config) -> list[dict]:
    from megatron_gvpo.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_gvpo.megatron.parallel import destroy_parallel
    from megatron_gvpo.rollout.online import OnlineSource

    log = get_logger()
    engine, arch, tokenizer = build(cfg)
    rank0 = torch.distributed.get_rank() == 0
    run_dir, ckpt_dir = Path(cfg.run.dir), Path(cfg.run.dir) / "checkpoints"
    start, state = 0, None
    if cfg.run.resume and (latest := latest_checkpoint(ckpt_dir)) is not None:
        start, state = load_checkpoint(engine, latest)
        log.info(f"resumed from {latest} at step {start}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    with user_errors():  # a missing data file or a bad row ends the command with one line (utils/cli.py)
        if cfg.rollout.source != "offline":
            source = OnlineSource(cfg, engine, arch, tokenizer, start)
        else:
            source = OfflineSource(cfg, arch, tokenizer)  # the data are checked before any server starts
            if cfg.rollout.eval_offline:
                source.evaluator = OnlineSource(cfg, engine, arch, tokenizer, start)
    kl = KLToStart(enabled=cfg.rollout.source != "offline")
    if state is not None:
        source.load_state_dict(state)
        if "kl_to_start" in state:
            kl.load_state_dict(state["kl_to_start"])
    log.info(f"data: {source.stats.summary()}")
    sink = MetricsSink(run_dir, enabled=rank0, tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project,
                       config=to_dict(cfg), resume_step=start)
    records, preemption = [], Preemption()
    try:
        if start == 0 and (evaluation := source.evaluate()):  # a resumed run evaluated its start step already
            sink.log(start, evaluation)
            log.info(f"step {start} eval{_brief(evaluation)}")
        progress = _progress(start, cfg.train.steps, enabled=rank0)
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch, record = source.next_batch()
            t1 = time.perf_counter()
            batch.update(engine.reference_logprobs(batch))
            kl.capture(batch, step)
            t2 = time.perf_counter()
            results = [engine.train_step(mb) for mb in mini_batches(batch, cfg.train.optimizer_steps_per_rollout)]
            if cfg.algo.reference == "refresh" and step % cfg.algo.ref_refresh_interval == 0:
                engine.refresh_reference()
            t3 = time.perf_counter()
            t_sync = source.sync_weights(step)
            record.update({
                "loss": results[0].loss, "grad_norm": results[-1].grad_norm, "lr": results[-1].lr,
                "tokens": int(batch["loss_mask"].sum()), "skipped_steps": engine.skipped_steps, **results[0].metrics,
                "time_batch_s": t1 - t0, "time_logprob_s": t2 - t1, "time_train_s": t3 - t2, "time_sync_s": t_sync,
            })
            last = step == cfg.train.steps
            if last or (cfg.rollout.eval_interval and step % cfg.rollout.eval_interval == 0):
                record.update(source.evaluate(), **kl.measure(engine))
            record["time_step_s"] = time.perf_counter() - t0
            records.append(record)
            progress.update(1)
            progress.set_postfix_str(_postfix(record, records))
            if step % cfg.run.log_interval == 0 or last or "time_eval_s" in record:
                sink.log(step, record)
                if rank0:
                    log.info(f"step {step}/{cfg.train.steps} loss {record['loss']:.4g} grad_norm "
                             f"{record['grad_norm']:.3g} reward {record['reward_mean']:.3f} "
                             f"lr {record['lr']:.3g} {record['time_step_s']:.2f}s{_brief(record)}")
            preempted = preemption.requested()
            if (cfg.run.save_interval and step % cfg.run.save_interval == 0) or last or preempted:
                save_checkpoint(engine, ckpt_dir, step, {**source.state_dict(), "kl_to_start": kl.state_dict()})
            if preempted:
                log.info(f"pre-emption signal: checkpointed step {step}, stopping (rerun to resume)")
                break
        progress.close()
    finally:
        preemption.restore()
        source.close()
        sink.close()
        destroy_parallel()
    return records


def _progress(start: int, total: int, enabled: bool):
    """A progress bar on an interactive terminal (log lines say the same in files and under SLURM)."""
    from tqdm import tqdm

    return tqdm(initial=start, total=total, unit="step", dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _postfix(record: dict, records: list[dict]) -> str:
    """The progress bar's: rollout reward and accuracy, the latest held-out accuracy, step time."""
    text = f"reward {record['reward_mean']:.3f}"
    if "accuracy" in record:
        text += f" acc {record['accuracy']:.3f}"
    if latest := next((r for r in reversed(records) if "eval_greedy" in r), None):
        text += f" held-out {latest['eval_greedy']:.3f}"
    return text + f" {record['time_step_s']:.2f}s/step"


def _brief(record: dict) -> str:
    return "".join(f" {k} {v:.3f}" for k, v in record.items() if k.startswith("eval_") and isinstance(v, float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default_config="configs/tiny_cpu.yaml")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="continue from the newest checkpoint in run.dir (the default, run.resume) or not")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([] if args.resume is None else [f"run.resume={str(args.resume).lower()}"])
    with user_errors():
        cfg = load_config(Config, args.config, overrides)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main("megatron_gvpo.train", main))
