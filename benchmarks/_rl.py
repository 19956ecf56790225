"""Short RL runs of the main job's task, many in one process against one SGLang server: what the evidence
benchmarks (`stability.py`, `off_policy.py`, `beta_k.py`) share.

A run is `megatron_gvpo.train` on configs/addition_gvpo.yaml (8-digit addition, the start policy that
`bench_start` builds, exact-match reward) with the benchmark's overrides, attached (`rollout.urls`) to one
server that `shared_server` starts once on the start policy. Every run loads its own initial weights into
the server before its first request, and sampling is seeded (`rollout.seeded`: samples depend on the run's
seed, the step and the weights only), so runs do not see each other and a rerun reproduces a run. Weights go
to the server through shared memory (`rollout.weight_sync: tensor`).

`summarise` reduces a run's metrics.jsonl to what the benchmark tables report: held-out greedy accuracy and
pass@k at the start and the end, KL to the start policy, gradient-norm spread, non-finite (skipped) steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import shutil
import socket
import statistics
import time
from pathlib import Path

from _common import REPO_ROOT

BASE_CONFIG = REPO_ROOT / "configs/addition_gvpo.yaml"
BASE_OVERRIDES = ["prompts.path=runs/assets/tiny/train_prompts.jsonl", "train.lr_decay_style=constant"]
"""Where the main job has moved on from the recipe the benchmarks' committed tables were measured with: they keep
the 512 prompts of train.jsonl (a benchmark run stays within one pass over them; the main job's long run needs
online_prompts.jsonl) and a constant learning rate after the warm-up."""
START_ACCURACY = 0.35
"""The benchmarks' start policy: the main job's warm start recipe, run on until this held-out greedy accuracy
(256 prompts). The main job starts weaker (15%) so that its gain is plain to see; at 15%, temperature-1 samples
are right ~1.5% of the time, so a benchmark batch of 64 holds about one rewarded sample and a short run
measures mostly noise. From ~35%, ~12% are right and 30 steps separate the methods."""


def bench_start() -> Path:
    """The task's assets and the benchmarks' start policy (built if missing, ~2 min); returns its directory."""
    from megatron_gvpo.data.addition import make_tiny_assets
    from megatron_gvpo.experiments.warm_start import WarmStartConfig, warm_start

    cfg = base_config([])
    assets = Path(cfg.prompts.path).parent
    for line in make_tiny_assets(assets):
        print(line)
    model = assets / f"warm_start_{round(START_ACCURACY * 100)}"
    if not (model / "warm_start.json").is_file():
        print(f"benchmark start policy into {model} (supervised, stops at held-out greedy accuracy "
              f"{START_ACCURACY:.0%})")
        summary = warm_start(model, WarmStartConfig(tokenizer=str(assets / "tokenizer"),
                                                    heldout_prompts=cfg.prompts.eval_path,
                                                    target_accuracy=START_ACCURACY))
        if not summary["reached_target"]:
            raise RuntimeError(f"the benchmark start policy stopped at {summary['heldout_greedy']:.1%}")
    return model


def base_config(overrides: list[str]):
    from megatron_gvpo.config import Config, load_config

    return load_config(Config, BASE_CONFIG, [*BASE_OVERRIDES, *overrides])


@contextlib.contextmanager
def shared_server(log_dir: Path, overrides: list[str] = ()):
    """One seeded SGLang server on `model.path` of the base config with `overrides`; yields its URL."""
    import torch

    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    cfg = base_config(list(overrides))
    log_dir.mkdir(parents=True, exist_ok=True)
    server = SGLangServer(SGLangServerConfig(
        model_path=cfg.model.path, random_seed=cfg.run.seed, deterministic=torch.cuda.is_available(),
        custom_logit_processor=not torch.cuda.is_available(), max_total_tokens=cfg.rollout.max_total_tokens,
        log_path=str(log_dir / "sglang.log")))
    with server:
        yield server.url


def rl_run(url: str, run_dir: Path, overrides: list[str]) -> dict:
    """One fresh run (run_dir is emptied first) attached to `url`; returns `summarise(run_dir)`."""
    from megatron_gvpo.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = base_config([f"run.dir={run_dir}", "run.resume=false", "rollout.weight_sync=tensor", *overrides])
    cfg.rollout.urls = [url]
    cfg.validate()
    start = time.perf_counter()
    records = train(cfg)
    if len(records) != cfg.train.steps:  # e.g. SIGTERM: the trainer checkpoints and stops
        raise RuntimeError(f"{run_dir}: the run stopped before step {cfg.train.steps}")
    return {**summarise(run_dir), "seconds": time.perf_counter() - start}


def summarise(run_dir: Path) -> dict:
    from megatron_gvpo.utils.plots import read_metrics

    records = read_metrics(run_dir)
    evals = [r for r in records if "eval_greedy" in r]
    steps = [r for r in records if "grad_norm" in r]
    first, last = evals[0], evals[-1]
    norms = [r["grad_norm"] for r in steps if isinstance(r["grad_norm"], float) and math.isfinite(r["grad_norm"])]
    live = [x for x in norms if x > 0]  # a zero gradient: every group's rewards were equal (nothing to learn)
    losses = [r["loss"] for r in steps]
    diverged = any(not (isinstance(x, float) and math.isfinite(x)) for x in losses) or last["skipped_steps"] > 0
    return {
        "start_greedy": first["eval_greedy"], "final_greedy": last["eval_greedy"],
        "start_pass": first.get("eval_pass@4"), "final_pass": last.get("eval_pass@4"),
        "kl_to_start": last.get("kl_to_start"),
        "reward_first": steps[0]["reward_mean"], "reward_last": statistics.fmean(r["reward_mean"] for r in steps[-5:]),
        "grad_norm_median": statistics.median(live) if live else float("nan"),
        # Spread: how far the largest step's gradient is from the typical one (1 = all alike).
        "grad_norm_max_over_median": max(live) / statistics.median(live) if live else float("nan"),
        "zero_gradient_steps": len(norms) - len(live),
        "skipped_steps": last["skipped_steps"],
        "diverged": diverged,
        "collapsed": diverged or last["eval_greedy"] < first["eval_greedy"],
        "curve": [(r["step"], r["eval_greedy"]) for r in evals],
    }


class RunLog:
    """A sweep's finished runs, one JSON line each in `path`: a rerun skips them, so an interrupted sweep
    continues where it stopped (`fresh`: start over)."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            path.unlink(missing_ok=True)
        self.runs = {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}

    def __contains__(self, name: str) -> bool:
        return name in self.runs

    def add(self, record: dict) -> None:
        self.runs[record["name"]] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def mean_std(values, pct: bool = True) -> str:
    """'mean ± std' of the finite values (n/a when none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean, spread = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
    return f"{mean:.1%} ± {spread:.1%}" if pct else f"{mean:.3g} ± {spread:.2g}"


def sweep_parser(description: str, out: Path, seeds):
    """The arguments every sweep takes: --seeds, --out (results directory), --fresh."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--fresh", action="store_true", help="discard the runs recorded in <out>/runs.jsonl")
    return parser


def provenance(script: str, runs: list[dict]) -> str:
    """The first sentences of a results table: where, when, how many runs, their compute time and seeds."""
    minutes = sum(r["seconds"] for r in runs) / 60
    return (f"Generated by `benchmarks/{script}` on {socket.gethostname()}, {datetime.date.today().isoformat()}, "
            f"OMP_NUM_THREADS=1: {len(runs)} runs, {minutes:.0f} min of runs in all. Seeds "
            f"{sorted({r['seed'] for r in runs})}; start accuracy "
            f"{statistics.fmean(r['start_greedy'] for r in runs):.1%}.")


def subplots(ncols: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 4.5))


def save_figure(fig, axes, out: Path, xlabel: str, log_x: bool = False, ticks=None) -> None:
    """Grid, legend and x label (and `ticks`, labelled as numbers) on every panel, then the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes:
        if log_x:
            ax.set_xscale("log")
        if ticks is not None:
            ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown_table(header: list[str], rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]
