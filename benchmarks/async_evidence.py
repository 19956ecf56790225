"""Stale samples: GVPO against GRPO and Dr. GRPO, with and without importance correction, at staleness 0-4.

What it measures. GVPO's objective has the same optimum for any sampling distribution, so it should need no
correction for samples from older weights; GRPO and Dr. GRPO are policy gradients of the sampling policy, and
the anchors correct them with truncated importance weights to the behaviour policy (NeMo-RL calls it
"required for convergence"). For every method, staleness S and seed, one online run (`benchmarks/_rl.py`: the
real SGLang server, the Megatron trainer): S = 0 is `rollout.mode: sync`, S >= 1 `rollout.mode: async` with
`rollout.max_staleness: S` (each batch generated while up to S earlier steps train, its weight updates landing
mid-generation). Methods: GVPO; GRPO and Dr. GRPO without and with `algo.importance_correction: truncated`
(cap 2, weights to the rollout engine's log-probs). Sampling is unseeded (the correction needs the engine's
log-probs, which seeded CPU sampling does not give), so a rerun differs by sampling noise. STEPS rollout steps
of 16 prompts x 8 samples, 2 optimizer steps of 64 per batch, lr LR, from the benchmarks' start policy.
Reported per method and staleness, over the seeds: final held-out greedy accuracy, runs that collapsed (ended
below the start accuracy, or a non-finite loss), KL to the start policy, and trained samples per second;
plotted: held-out accuracy against samples seen and against wall time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_evidence.py      # ~65 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_evidence.py --study staleness --staleness 0 1 --seeds 1

`--study lr` asks whether GVPO's response to staleness depends on the step size: GVPO at LR_STUDY_LRS and
staleness 0, 1 and 4, beside the staleness study's runs at LR.

The same harness answers another question (`--study variant`): the stability sweep's GVPO collapsed at a
lower learning rate than GRPO; is it because its weights are unnormalised sequence-level log-ratios? At
VARIANT_LRS, synchronously, the paper's loss against `algo.gvpo_variant: length_normalized` (the same loss on
each response's mean token log-prob, clearly a variant) and GRPO.

Writes benchmarks/results/async_evidence/{table.md, curves.png, runs.jsonl}. A rerun keeps the runs already in
runs.jsonl; --fresh starts over.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import _rl
from _common import REPO_ROOT, RESULTS, publish

OUT = RESULTS / "async_evidence"
RUNS = REPO_ROOT / "runs/benchmarks/async_evidence"
METHODS = {"gvpo": ["algo.name=gvpo"], "grpo": ["algo.name=grpo"],
           "grpo+is": ["algo.name=grpo", "algo.importance_correction=truncated"], "dr_grpo": ["algo.name=dr_grpo"],
           "dr_grpo+is": ["algo.name=dr_grpo", "algo.importance_correction=truncated"],
           "gvpo_len": ["algo.name=gvpo", "algo.gvpo_variant=length_normalized"]}
LABELS = {"gvpo": "GVPO", "grpo": "GRPO", "grpo+is": "GRPO + IS", "dr_grpo": "Dr. GRPO", "dr_grpo+is": "Dr. GRPO + IS",
          "gvpo_len": "GVPO, length-normalised (variant)"}
STALENESS = (0, 1, 2, 4)
SEEDS = (1, 2, 3)
STEPS, BATCH, EVAL_INTERVAL, LR = 30, 64, 10, 2e-4
STALENESS_METHODS = ("gvpo", "grpo", "grpo+is", "dr_grpo", "dr_grpo+is")
VARIANT_METHODS, VARIANT_LRS = ("gvpo", "gvpo_len", "grpo"), (5e-4, 1e-3)
"""The variant study (synchronous): the stability sweep's GVPO collapsed at 5e-4 in 1 of 3 seeds where GRPO did
not; the paper's loss, its length-normalised variant and GRPO at the rates where that happens."""
LR_STUDY_METHODS, LR_STUDY_STALENESS, LR_STUDY_LRS = ("gvpo",), (0, 1, 4), (1e-4, 5e-5)
"""The learning-rate study: is GVPO's sensitivity to stale samples at LR a matter of step size? GVPO at lower
rates and staleness 0, 1 and 4 (the staleness study's runs give LR)."""


def overrides(method: str, staleness: int, lr: float, seed: int, start: Path, steps: int) -> list[str]:
    mode = ["rollout.mode=sync"] if staleness == 0 else ["rollout.mode=async", f"rollout.max_staleness={staleness}"]
    return [f"model.path={start}", f"train.lr={lr}", f"run.seed={seed}", f"train.steps={steps}",
            f"train.global_batch_size={BATCH}", f"rollout.eval_interval={EVAL_INTERVAL}", "run.save_interval=0",
            "rollout.seeded=false", *mode, *METHODS[method]]


def timed_curve(run_dir: Path, samples_per_step: int) -> list[tuple[int, float, float]]:
    """(samples seen, seconds of training steps, held-out greedy accuracy) at every evaluation."""
    from megatron_gvpo.utils.plots import read_metrics

    out, elapsed = [], 0.0
    for r in read_metrics(run_dir):
        if "time_step_s" in r:  # the evaluation before step 1 has no step; evaluations are not training time
            elapsed += r["time_step_s"] - r.get("time_eval_s", 0.0)
        if "eval_greedy" in r:
            out.append((r["step"] * samples_per_step, elapsed, r["eval_greedy"]))
    return out


def report(runs: list[dict], variant: list[dict], by_lr: list[dict]) -> str:
    lines = ["# Stale samples: GVPO against GRPO and Dr. GRPO with and without importance correction", ""]
    if runs:
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        stale = sorted({r["staleness"] for r in runs})
        lines += [
            _rl.provenance("async_evidence.py", runs) + f" Each run: {runs[0]['steps']} rollout steps of "
            f"{2 * BATCH // 8} prompts x 8 samples, 2 optimizer steps of {BATCH}, lr {LR:g}, unseeded sampling from "
            "one SGLang server sharing the 2 cores with the trainer; staleness 0 is the synchronous loop, S >= 1 "
            "asynchronous rollout with rollout.max_staleness S. '+ IS': truncated importance weights (cap 2) to "
            "the rollout's log-probs.",
            "",
            "Per method and staleness, mean ± std over seeds: final held-out greedy accuracy (128 prompts), runs "
            "that collapsed (ended below the start accuracy, or a non-finite loss), KL to the start policy at the "
            "end, trained samples per second of training-step wall time, and the batches' mean staleness.",
            "",
        ]
        cells = {(m, s): [r for r in runs if r["method"] == m and r["staleness"] == s] for m in methods for s in stale}
        lines += _rl.markdown_table(
            ["method", "staleness", "final accuracy", "collapsed", "KL to start", "samples/s", "mean staleness"],
            ([LABELS[m], str(s), _rl.mean_std(r["final_greedy"] for r in rs),
              f"{sum(r['collapsed'] for r in rs)}/{len(rs)}", _rl.mean_std((r["kl_to_start"] for r in rs), pct=False),
              _rl.mean_std((r["samples_per_s"] for r in rs), pct=False),
              _rl.mean_std((r["staleness_mean"] for r in rs), pct=False)]
             for (m, s), rs in cells.items() if rs))
        lines += ["", "![held-out accuracy against samples seen and against wall time](curves.png)", ""]
    if variant:
        lines += [
            "## Why GVPO collapsed at a lower learning rate than GRPO: its sequence-level weights?", "",
            f"The same harness, synchronous, {variant[0]['steps']} rollout steps, at the learning rates where the "
            "stability sweep's GVPO began to collapse: the paper's loss, the same loss on each response's mean "
            "token log-prob (`algo.gvpo_variant: length_normalized`, a variant, not the paper's objective) and "
            "GRPO. Mean ± std over seeds.",
            "",
        ]
        cells = {(m, lr): [r for r in variant if r["method"] == m and r["lr"] == lr]
                 for lr in sorted({r["lr"] for r in variant}) for m in VARIANT_METHODS}
        lines += _rl.markdown_table(
            ["method", "lr", "final accuracy", "collapsed", "KL to start", "grad-norm spread"],
            ([LABELS[m], f"{lr:g}", _rl.mean_std(r["final_greedy"] for r in rs),
              f"{sum(r['collapsed'] for r in rs)}/{len(rs)}", _rl.mean_std((r["kl_to_start"] for r in rs), pct=False),
              _rl.mean_std((r["grad_norm_max_over_median"] for r in rs), pct=False)]
             for (m, lr), rs in cells.items() if rs))
        lines.append("")
    if by_lr:
        lines += [
            "## GVPO's response to staleness at lower learning rates", "",
            f"GVPO as in the staleness study ({by_lr[0]['steps']} rollout steps), at lower learning rates; the "
            f"rows at lr {LR:g} are the staleness study's runs. Mean ± std over seeds.",
            "",
        ]
        cells = {(lr, s): [r for r in by_lr if r["lr"] == lr and r["staleness"] == s]
                 for lr in sorted({r["lr"] for r in by_lr}) for s in sorted({r["staleness"] for r in by_lr})}
        lines += _rl.markdown_table(
            ["method", "lr", "staleness", "final accuracy", "collapsed", "KL to start", "mean staleness"],
            ([LABELS["gvpo"], f"{lr:g}", str(s), _rl.mean_std(r["final_greedy"] for r in rs),
              f"{sum(r['collapsed'] for r in rs)}/{len(rs)}", _rl.mean_std((r["kl_to_start"] for r in rs), pct=False),
              _rl.mean_std((r["staleness_mean"] for r in rs), pct=False)]
             for (lr, s), rs in cells.items() if rs))
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stale = sorted({r["staleness"] for r in runs})
    fig, axes = plt.subplots(2, len(stale), figsize=(4.2 * len(stale), 8), squeeze=False)
    for col, s in enumerate(stale):
        for m in METHODS:
            rs = [r for r in runs if r["method"] == m and r["staleness"] == s]
            if not rs:
                continue
            points = list(zip(*[r["timed_curve"] for r in rs], strict=True))  # per evaluation, over seeds
            samples = [p[0][0] for p in points]
            seconds = [statistics.fmean(x[1] for x in p) for p in points]
            accuracy = [statistics.fmean(x[2] for x in p) for p in points]
            style = "--" if m.endswith("+is") else "-"
            axes[0][col].plot(samples, accuracy, style, marker="o", label=LABELS[m])
            axes[1][col].plot(seconds, accuracy, style, marker="o", label=LABELS[m])
        axes[0][col].set_title(f"staleness {s}" + (" (sync)" if s == 0 else " (async)"), fontsize=10)
        axes[0][col].set_xlabel("samples seen")
        axes[1][col].set_xlabel("training wall time [s]")
    for ax in axes.flat:
        ax.set_ylabel("held-out greedy accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    from megatron_gvpo.utils.plots import read_metrics

    parser = _rl.sweep_parser(__doc__.split("\n\n")[0], OUT, SEEDS)
    parser.add_argument("--methods", nargs="+", default=list(STALENESS_METHODS), choices=list(METHODS))
    parser.add_argument("--staleness", nargs="+", type=int, default=list(STALENESS))
    parser.add_argument("--steps", type=int, default=STEPS, help="rollout steps per run (a quick look: fewer)")
    parser.add_argument("--study", nargs="+", default=["staleness", "variant", "lr"],
                        choices=["staleness", "variant", "lr"])
    args = parser.parse_args()
    log = _rl.RunLog(args.out / "runs.jsonl", fresh=args.fresh)
    t0 = time.perf_counter()
    start = _rl.bench_start()
    wanted = []  # (study, method, staleness, lr, seed)
    if "staleness" in args.study:
        wanted += [("staleness", m, s, LR, seed) for seed in args.seeds for s in args.staleness for m in args.methods]
    if "variant" in args.study:
        wanted += [("variant", m, 0, lr, seed) for seed in args.seeds for lr in VARIANT_LRS for m in VARIANT_METHODS]
    if "lr" in args.study:
        wanted += [("lr", m, s, lr, seed) for seed in args.seeds for lr in LR_STUDY_LRS for s in LR_STUDY_STALENESS
                   for m in LR_STUDY_METHODS]
    names = {w: f"{w[1]}_S{w[2]}_lr{w[3]:g}_seed{w[4]}" for w in wanted}
    todo = [w for w in wanted if names[w] not in log]
    samples_per_step = 2 * BATCH
    with _rl.shared_server(RUNS / "logs", [f"model.path={start}"]) as url:
        for i, w in enumerate(todo, 1):
            _, m, s, lr, seed = w
            name = names[w]
            result = _rl.rl_run(url, RUNS / name, overrides(m, s, lr, seed, start, args.steps))
            steps = [r for r in read_metrics(RUNS / name) if "time_step_s" in r and "loss" in r]
            train_seconds = sum(r["time_step_s"] - r.get("time_eval_s", 0.0) for r in steps)
            log.add({"name": name, "method": m, "staleness": s, "lr": lr, "seed": seed, "steps": args.steps, **result,
                     "samples_per_s": samples_per_step * len(steps) / train_seconds,
                     "staleness_mean": statistics.fmean(r["staleness"] for r in steps),
                     "timed_curve": timed_curve(RUNS / name, samples_per_step)})
            print(f"[{i}/{len(todo)}] {name}: held-out greedy {result['start_greedy']:.1%} -> "
                  f"{result['final_greedy']:.1%}{' (collapsed)' if result['collapsed'] else ''}, "
                  f"{result['seconds']:.0f} s", flush=True)
    chosen = {names[w]: w[0] for w in wanted}
    runs = [r for r in log.runs.values() if chosen.get(r["name"]) == "staleness"]
    variant = [r for r in log.runs.values() if chosen.get(r["name"]) == "variant"]
    by_lr = [r for r in log.runs.values() if chosen.get(r["name"]) == "lr"]
    if by_lr:  # beside the staleness study's runs of the same methods at LR
        by_lr += [r for r in log.runs.values() if r["lr"] == LR and r["method"] in LR_STUDY_METHODS
                  and r["staleness"] in LR_STUDY_STALENESS and r["seed"] in args.seeds]
    if runs:
        plot(runs, args.out / "curves.png")
    print(f"this invocation: {time.perf_counter() - t0:.0f} s")
    publish(report(runs, variant, by_lr), args.out / "table.md")


if __name__ == "__main__":
    main()
