"""Stability: GVPO vs GRPO vs Dr. GRPO over a learning-rate sweep, beside continued supervised training with the
same compute, on the main job's task.

What it measures. For every algorithm, learning rate and seed, one online run (`benchmarks/_rl.py`: the real
SGLang server, the Megatron trainer, `algo.name` choosing the objective and nothing else): STEPS rollout
steps of 16 prompts x 8 samples, 2 optimizer steps of 64 samples per batch, from the benchmarks' start
policy (the main job's warm start run on to ~35% held-out greedy accuracy). Reported per algorithm and rate,
over the seeds:
- held-out greedy accuracy (128 prompts, through SGLang) at the end, and its change from the start;
- collapse: the run ends below its start accuracy, or a loss or gradient was non-finite (skipped step);
- gradient-norm spread: the largest step's gradient norm over the median one (steps whose groups all had
  equal rewards have a zero gradient: counted apart);
- KL to the start policy at the end (sequence-level estimate on the first batch's samples).
The supervised baseline: the same start policy trained with cross-entropy on freshly generated problems
(`experiments.warm_start` with `init_from`) for the same number of optimizer steps on as many sequences per
step (STEPS x 2 steps of 64), at the same rates and seeds; evaluated with greedy decoding (transformers) on
the same 128 held-out prompts. So an RL gain can be told from more training.

Seeds: run.seed 1, 2, 3 (what is sampled and the prompt order; the start policy is the same). Sampling is
seeded, so a run reproduces exactly on the same machine; across machines, expect differences of a few
held-out prompts (float summation order).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stability.py     # 24 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stability.py --algorithms gvpo --lrs 2e-4 --seeds 1

Writes benchmarks/results/stability/{table.md, stability.png, runs.jsonl}. A rerun keeps the runs already in
runs.jsonl (an interrupted sweep continues where it stopped); --fresh starts over.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

import _rl
from _common import REPO_ROOT, RESULTS, publish

OUT = RESULTS / "stability"
RUNS = REPO_ROOT / "runs/benchmarks/stability"
ALGORITHMS = ("gvpo", "grpo", "dr_grpo")
LRS = (5e-5, 1e-4, 2e-4, 5e-4, 1.5e-3)
SEEDS = (1, 2, 3)
STEPS, BATCH, EVAL_INTERVAL = 30, 64, 10
"""Rollout steps per run, samples per optimizer step (2 per rollout step), rollout steps between evaluations."""
LABELS = {"gvpo": "GVPO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "sft": "SFT (same compute)"}


def rl_overrides(algorithm: str, lr: float, seed: int, start: Path) -> list[str]:
    return [f"model.path={start}", f"algo.name={algorithm}", f"train.lr={lr}", f"run.seed={seed}",
            f"train.steps={STEPS}", f"train.global_batch_size={BATCH}", f"rollout.eval_interval={EVAL_INTERVAL}",
            "run.save_interval=0"]


def sft_run(lr: float, seed: int, start: Path) -> dict:
    from megatron_gvpo.experiments.warm_start import WarmStartConfig, warm_start

    cfg = _rl.base_config([])
    assets = Path(cfg.prompts.path).parent
    t0 = time.perf_counter()
    optimizer_steps = STEPS * cfg.train.optimizer_steps_per_rollout
    summary = warm_start(None, WarmStartConfig(
        tokenizer=str(assets / "tokenizer"), heldout_prompts=cfg.prompts.eval_path, init_from=str(start),
        target_accuracy=None, max_steps=optimizer_steps, batch_size=BATCH,
        lr=lr, warmup_steps=cfg.train.lr_warmup_steps, lr_schedule="constant",
        eval_every=EVAL_INTERVAL * cfg.train.optimizer_steps_per_rollout, eval_size=cfg.prompts.eval_size, seed=seed,
    ), log=lambda _: None)
    history = summary["history"]
    first, last = history[0]["heldout_greedy"], history[-1]["heldout_greedy"]
    return {"start_greedy": first, "final_greedy": last, "collapsed": last < first, "diverged": False,
            "curve": [(h["step"] // cfg.train.optimizer_steps_per_rollout, h["heldout_greedy"]) for h in history],
            "seconds": time.perf_counter() - t0}


def report(runs: list[dict]) -> str:
    methods = [m for m in (*ALGORITHMS, "sft") if any(r["algorithm"] == m for r in runs)]
    lrs = sorted({r["lr"] for r in runs})
    starts = sorted({round(r["start_greedy"], 4) for r in runs})
    lines = [
        "# Stability: GVPO vs GRPO vs Dr. GRPO over learning rates, beside supervised training",
        "",
        _rl.provenance("stability.py", runs) + f" Each RL run: {STEPS} rollout steps of {2 * BATCH // 8} prompts x 8 "
        f"samples, 2 optimizer steps of {BATCH} (Adam, 4 warm-up steps, then constant), one seeded SGLang server, "
        "held-out greedy accuracy on 128 prompts. SFT: the same optimizer steps and sequences per step, "
        f"cross-entropy on generated problems. Start accuracies measured: {', '.join(f'{s:.1%}' for s in starts)} "
        "(RL through SGLang and SFT through transformers measure the same start policy alike).",
        "",
        "Per method and learning rate, mean ± std over seeds: final held-out greedy accuracy, its change from the "
        "start, runs that collapsed (ended below the start accuracy, or a non-finite loss), the gradient-norm "
        "spread (largest over median step, steps with a zero gradient left out), steps with a zero gradient "
        "(every group's rewards equal) and KL to the start policy at the end.",
        "",
    ]

    def rl_only(m, values):
        return _rl.mean_std(values, pct=False) if m != "sft" else "n/a"

    cells = {(m, lr): [r for r in runs if r["algorithm"] == m and r["lr"] == lr] for m in methods for lr in lrs}
    lines += _rl.markdown_table(
        ["method", "lr", "final accuracy", "change", "collapsed", "grad-norm spread", "zero-grad steps",
         "KL to start"],
        ([LABELS[m], f"{lr:g}", _rl.mean_std(r["final_greedy"] for r in rs),
          _rl.mean_std(r["final_greedy"] - r["start_greedy"] for r in rs),
          f"{sum(r['collapsed'] for r in rs)}/{len(rs)}",
          rl_only(m, [r.get("grad_norm_max_over_median") for r in rs]),
          rl_only(m, [r.get("zero_gradient_steps") for r in rs]), rl_only(m, [r.get("kl_to_start") for r in rs])]
         for (m, lr), rs in cells.items() if rs))

    def overall(m):
        rs = [r for r in runs if r["algorithm"] == m]
        by_lr = {lr: cells[m, lr] for lr in lrs if cells[m, lr]}
        best = max(by_lr, key=lambda lr: statistics.fmean(r["final_greedy"] for r in by_lr[lr]))
        stable = [lr for lr, v in by_lr.items() if not any(r["collapsed"] for r in v)]
        return [LABELS[m], f"{sum(r['collapsed'] for r in rs)}/{len(rs)}",
                f"{statistics.fmean(r['final_greedy'] for r in rs):.1%}",
                f"{best:g} ({statistics.fmean(r['final_greedy'] for r in by_lr[best]):.1%})",
                ", ".join(f"{lr:g}" for lr in stable) or "none"]

    lines += ["", "Over the whole sweep:", ""]
    lines += _rl.markdown_table(["method", "runs collapsed", "mean final accuracy", "best lr (mean final accuracy)",
                             "rates with no collapse"], map(overall, methods))
    lines += ["", "![accuracy, collapse and gradient-norm spread against the learning rate](stability.png)", ""]
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = _rl.subplots(3, 16)
    lrs = sorted({r["lr"] for r in runs})
    for m in (*ALGORITHMS, "sft"):
        rs = [r for r in runs if r["algorithm"] == m]
        if not rs:
            continue
        xs = [lr for lr in lrs if any(r["lr"] == lr for r in rs)]
        final = [[r["final_greedy"] for r in rs if r["lr"] == lr] for lr in xs]
        mean = [statistics.fmean(v) for v in final]
        axes[0].errorbar(xs, mean, yerr=[[mu - min(v) for mu, v in zip(mean, final, strict=True)],
                                         [max(v) - mu for mu, v in zip(mean, final, strict=True)]],
                         marker="o", capsize=3, label=LABELS[m])
        axes[1].plot(xs, [statistics.fmean(r["collapsed"] for r in rs if r["lr"] == lr) for lr in xs], marker="o",
                     label=LABELS[m])
        if m != "sft":
            spread = [[r["grad_norm_max_over_median"] for r in rs if r["lr"] == lr
                       and math.isfinite(r["grad_norm_max_over_median"])] for lr in xs]
            axes[2].plot([x for x, v in zip(xs, spread, strict=True) if v],
                         [statistics.fmean(v) for v in spread if v], marker="o", label=LABELS[m])
    start = statistics.fmean(r["start_greedy"] for r in runs)
    axes[0].axhline(start, color="grey", linestyle="--", label="start")
    titles = ("final held-out greedy accuracy (mean, min-max over seeds)", "fraction of runs that collapsed",
              "gradient-norm spread (max / median step)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
    _rl.save_figure(fig, axes, out, "learning rate", log_x=True)


def main() -> None:
    parser = _rl.sweep_parser(__doc__.split("\n\n")[0], OUT, SEEDS)
    parser.add_argument("--algorithms", nargs="+", default=[*ALGORITHMS, "sft"], choices=[*ALGORITHMS, "sft"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    args = parser.parse_args()
    log = _rl.RunLog(args.out / "runs.jsonl", fresh=args.fresh)
    t0 = time.perf_counter()
    start = _rl.bench_start()  # built on the first run (~2 min)
    todo = [(m, lr, seed) for seed in args.seeds for lr in args.lrs for m in args.algorithms
            if f"{m}_lr{lr:g}_seed{seed}" not in log]
    needs_server = any(m != "sft" for m, _, _ in todo)
    with _rl.shared_server(RUNS / "logs", [f"model.path={start}"]) if needs_server else contextlib.nullcontext() as url:
        for i, (m, lr, seed) in enumerate(todo, 1):
            name = f"{m}_lr{lr:g}_seed{seed}"
            result = (sft_run(lr, seed, start) if m == "sft"
                      else _rl.rl_run(url, RUNS / name, rl_overrides(m, lr, seed, start)))
            log.add({"name": name, "algorithm": m, "lr": lr, "seed": seed, **result})
            print(f"[{i}/{len(todo)}] {name}: held-out greedy {result['start_greedy']:.1%} -> "
                  f"{result['final_greedy']:.1%}{' (collapsed)' if result['collapsed'] else ''}, "
                  f"{result['seconds']:.0f} s", flush=True)
    runs = [r for r in log.runs.values() if r["algorithm"] in args.algorithms and r["lr"] in args.lrs
            and r["seed"] in args.seeds]
    plot(runs, args.out / "stability.png")
    print(f"this invocation: {time.perf_counter() - t0:.0f} s")
    publish(report(runs), args.out / "table.md")


if __name__ == "__main__":
    main()
