"""Samples per second of the main job, synchronous against asynchronous rollout (`rollout.mode`).

What it measures: `megatron_gvpo.train` with configs/addition_gvpo.yaml (the main job: 32 prompts x 8 samples
from one SGLang server on the CPU path, a one-process Megatron trainer taking 2 optimizer steps per batch,
distributed weight sync over gloo; server and trainer share this machine's cores) for STEPS rollout steps in a
fresh run directory, evaluating only before the first and after the last step, in each mode:

    sync         rollout.mode sync: sample, then train, then sync (the trainer waits for every rollout)
    async S=1    rollout.mode async, max_staleness 1: step t + 1's samples are generated while step t trains,
                 each weight update pausing the requests in flight (rollout.in_flight_updates: pause)
    async S=1 drain  the same, each update waiting for the requests in flight to finish instead
    async S=2    as async S=1, up to two steps ahead

Throughput is trained samples per second of wall time over steps WARMUP+1..STEPS-1 (the warm-up steps and the
last, which evaluates, left out), reported as a ratio to sync mode's. Every mode runs ROUNDS times, the rounds
alternating the modes so that a slow spell of this shared machine hits them alike; the table has each mode's
throughput over its round's sync run, averaged over rounds. Also per mode: the seconds per step the trainer
waits for its batch (`time_batch_s`), how long a rollout takes (`time_rollout_s`; overlapped with training in
async mode), the mean staleness of the trained batches, and the share of samples that a weight update reached
mid-way.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_throughput.py    # ~9 min; writes benchmarks/results/...
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, RESULTS, publish

DEFAULT_OUT = RESULTS / "async_throughput.md"

MODES = {"sync": ["rollout.mode=sync"],
         "async S=1": ["rollout.mode=async", "rollout.max_staleness=1", "rollout.in_flight_updates=pause"],
         "async S=1 drain": ["rollout.mode=async", "rollout.max_staleness=1", "rollout.in_flight_updates=drain"],
         "async S=2": ["rollout.mode=async", "rollout.max_staleness=2", "rollout.in_flight_updates=pause"]}


def run(overrides: list[str], steps: int, warmup: int) -> dict:
    """One fresh run of the main job; its throughput and means over the measured steps."""
    from megatron_gvpo.config import Config, load_config
    from megatron_gvpo.experiments.addition import prepare
    from megatron_gvpo.train import train
    from megatron_gvpo.utils.plots import read_metrics

    work = Path(tempfile.mkdtemp(prefix="async_throughput_"))
    try:
        cfg = load_config(Config, REPO_ROOT / "configs/addition_gvpo.yaml",
                          [f"run.dir={work}", f"train.steps={steps}", "rollout.eval_interval=0", "run.save_interval=0",
                           *overrides])
        prepare(cfg)
        train(cfg)
        measured = [r for r in read_metrics(work) if "time_step_s" in r and warmup < r["step"] < steps]
        samples = cfg.groups_per_rollout * cfg.algo.group_size
        return {
            "samples_per_s": samples * len(measured) / sum(r["time_step_s"] for r in measured),
            "step_s": statistics.mean(r["time_step_s"] for r in measured),
            "wait_s": statistics.mean(r["time_batch_s"] for r in measured),
            "rollout_s": statistics.mean(r["time_rollout_s"] for r in measured),
            "staleness": statistics.mean(r["staleness"] for r in measured),
            "in_flight": sum(r["updated_in_flight"] for r in measured) / (samples * len(measured)),
            "reward": statistics.mean(r["reward_mean"] for r in measured),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    t_start = time.perf_counter()
    rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):
        for mode, overrides in MODES.items():
            rounds[mode].append(run(overrides, args.steps, args.warmup))
            print(f"round {i + 1} {mode}: {rounds[mode][-1]['samples_per_s']:.1f} samples/s", flush=True)
    # Each round's modes against that round's sync run, then the mean over rounds: a slow spell of the machine
    # moves a round's runs together more than it moves one run.
    ratios = {mode: [r["samples_per_s"] / s["samples_per_s"] for r, s in zip(rs, rounds["sync"], strict=True)]
              for mode, rs in rounds.items()}
    lines = [
        "# Asynchronous rollout: throughput of the main job",
        "",
        f"Generated by `benchmarks/async_throughput.py` on {socket.gethostname()}, "
        f"{datetime.date.today().isoformat()}, OMP_NUM_THREADS=1, {args.rounds} rounds, total runtime "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        f"configs/addition_gvpo.yaml (32 prompts x 8 samples, one SGLang server and a one-process trainer sharing "
        f"2 cores), steps {args.warmup + 1}..{args.steps - 1} of {args.steps}. 'vs sync': each round's run over that "
        "round's sync run, the mean over rounds (each round's in brackets); the other columns are means over "
        "rounds. 'wait' is the time per step the trainer waits for its batch; 'rollout' the time a rollout takes "
        "(overlapped with training in async mode); 'updated mid-way' the share of samples a weight update reached "
        "while they were generated; 'reward' the mean rollout reward of the measured steps (how far training got).",
        "",
        "| mode | samples/s | vs sync | step s | wait s | rollout s | mean staleness | updated mid-way | reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rs in rounds.items():
        m = {key: statistics.mean(r[key] for r in rs) for key in rs[0]}
        each = ", ".join(f"{x:.2f}" for x in ratios[mode])
        lines.append(f"| {mode} | {m['samples_per_s']:.1f} | **{statistics.mean(ratios[mode]):.2f}x** ({each}) | "
                     f"{m['step_s']:.3f} | {m['wait_s']:.3f} | {m['rollout_s']:.3f} | {m['staleness']:.2f} | "
                     f"{m['in_flight']:.1%} | {m['reward']:.3f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
