"""beta and the group size k: their effect on held-out accuracy and on KL to the start policy (GVPO, a small grid).

What it measures. Online GVPO runs of the main job's task (`benchmarks/_rl.py`: the shared SGLang server, the
benchmarks' start policy) at lr LR for STEPS steps, over beta in BETAS and k in KS, seeds SEEDS. The samples
per step are fixed at 128 (2 optimizer steps of 64), so k=4 trains on 32 prompts per step and k=16 on 8: the
grid compares how a fixed sampling budget is best split, not more compute. Reported per (beta, k), mean ± std
over the seeds: final held-out greedy accuracy and pass@4 (through SGLang), the trainer's KL to the start
policy at the end (`kl_to_start`: mean of log pi_start - log pi on the first step's samples, which are the
start policy's), and the mean reward of the last 5 steps' samples.

beta sets how far each update may move from pi_ref (here the sampling policy: `algo.reference: old_policy`,
the paper's Algorithm 1): the optimum of one step is pi_ref * exp(R / beta) / Z.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/beta_k.py     # 9 min on 2 cores

Writes benchmarks/results/beta_k/{table.md, beta_k.png, runs.jsonl}; a rerun keeps the runs in runs.jsonl
(--fresh: start over).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import _rl
from _common import REPO_ROOT, RESULTS, publish

OUT = RESULTS / "beta_k"
RUNS = REPO_ROOT / "runs/benchmarks/beta_k"
BETAS = (0.02, 0.1, 0.5)
KS = (4, 8, 16)
SEEDS = (1, 2)
STEPS, LR = 30, 2e-4


def overrides(beta: float, k: int, seed: int, start: Path) -> list[str]:
    return [f"model.path={start}", "algo.name=gvpo", f"algo.beta={beta}", f"algo.group_size={k}",
            f"train.lr={LR}", f"run.seed={seed}", f"train.steps={STEPS}", "train.global_batch_size=64",
            "rollout.eval_interval=10", "run.save_interval=0"]


def report(runs: list[dict]) -> str:
    betas, ks = sorted({r["beta"] for r in runs}), sorted({r["k"] for r in runs})
    lines = [
        "# GVPO's beta and group size k: held-out accuracy and KL to the start policy",
        "",
        _rl.provenance("beta_k.py", runs) + f" lr {LR:g}; {STEPS} steps of 128 samples (128 / k prompts). Mean ± std "
        "over seeds.",
        "",
    ]
    cells = {(b, k): [r for r in runs if r["beta"] == b and r["k"] == k] for b in betas for k in ks}
    lines += _rl.markdown_table(
        ["beta", "k", "final greedy accuracy", "final pass@4", "KL to start", "reward, last 5 steps"],
        ([f"{b:g}", str(k), _rl.mean_std(r["final_greedy"] for r in rs), _rl.mean_std(r["final_pass"] for r in rs),
          _rl.mean_std((r["kl_to_start"] for r in rs), pct=False), _rl.mean_std(r["reward_last"] for r in rs)]
         for (b, k), rs in cells.items() if rs))
    lines += ["", "![accuracy and KL to the start policy against beta, one line per k](beta_k.png)", ""]
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = _rl.subplots(2, 11)
    betas = sorted({r["beta"] for r in runs})
    for k in sorted({r["k"] for r in runs}):
        for ax, key in zip(axes, ("final_greedy", "kl_to_start"), strict=True):
            xs = [b for b in betas if any(r["beta"] == b and r["k"] == k for r in runs)]
            ax.plot(xs, [statistics.fmean(r[key] for r in runs if r["beta"] == b and r["k"] == k) for b in xs],
                    marker="o", label=f"k={k}")
    for ax, title in zip(axes, ("final held-out greedy accuracy", "KL(pi_start || pi) at the end"), strict=True):
        ax.set_title(f"{title} (mean over seeds)", fontsize=10)
    _rl.save_figure(fig, axes, out, "beta", log_x=True, ticks=betas)


def main() -> None:
    parser = _rl.sweep_parser(__doc__.split("\n\n")[0], OUT, SEEDS)
    parser.add_argument("--betas", nargs="+", type=float, default=list(BETAS))
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    args = parser.parse_args()
    log = _rl.RunLog(args.out / "runs.jsonl", fresh=args.fresh)
    t0 = time.perf_counter()
    start = _rl.bench_start()
    todo = [(beta, k, seed) for seed in args.seeds for beta in args.betas for k in args.ks
            if f"beta{beta:g}_k{k}_seed{seed}" not in log]
    if todo:
        with _rl.shared_server(RUNS / "logs", [f"model.path={start}"]) as url:
            for i, (beta, k, seed) in enumerate(todo, 1):
                name = f"beta{beta:g}_k{k}_seed{seed}"
                result = _rl.rl_run(url, RUNS / name, overrides(beta, k, seed, start))
                log.add({"name": name, "beta": beta, "k": k, "seed": seed, **result})
                print(f"[{i}/{len(todo)}] {name}: held-out greedy {result['start_greedy']:.1%} -> "
                      f"{result['final_greedy']:.1%}, KL to start {result['kl_to_start']:.3f}, "
                      f"{result['seconds']:.0f} s", flush=True)
    runs = [r for r in log.runs.values() if r["beta"] in args.betas and r["k"] in args.ks and r["seed"] in args.seeds]
    plot(runs, args.out / "beta_k.png")
    print(f"this invocation: {time.perf_counter() - t0:.0f} s")
    publish(report(runs), args.out / "table.md")


if __name__ == "__main__":
    main()
