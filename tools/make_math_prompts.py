"""Write a small arithmetic dataset in verl's RL parquet format, for the real-model recipe and tests.

    python tools/make_math_prompts.py --out runs/assets/arithmetic [--train 2000 --heldout 200 --seed 0]

Each row is what verl's data preprocessing scripts write (verl/examples/data_preprocess/gsm8k.py):

    {"data_source": "arithmetic", "prompt": [{"role": "user", "content": "What is 17 + 25? ..."}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "42"},
     "extra_info": {"split": "train", "index": 0}}

so `megatron_gvpo.train` reads it with no field mapping, renders the prompt with the model's chat template and
scores answers with the math reward. The questions are sums and differences of two numbers below 100: a
135M-parameter instruct model answers about a third of them greedily, so groups of sampled answers disagree
and GVPO has signal. Train and held-out questions are disjoint.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INSTRUCTION = "Answer with just the number."


def questions(count: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, str]]:
    """`count` distinct (question, answer) pairs not in `exclude` (which is extended with them)."""
    out = []
    while len(out) < count:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        question = f"What is {a} {op} {b}? {INSTRUCTION}"
        if question in exclude:
            continue
        exclude.add(question)
        out.append((question, str(a + b if op == "+" else a - b)))
    return out


def verl_rows(pairs: list[tuple[str, str]], split: str) -> list[dict]:
    return [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": q}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"split": split, "index": i}}
            for i, (q, a) in enumerate(pairs)]


def write(out: Path, train: int, heldout: int, seed: int) -> tuple[Path, Path]:
    """train.parquet and heldout.parquet under `out`; returns their paths."""
    import datasets

    datasets.disable_progress_bars()
    rng, seen = random.Random(seed), set()
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.parquet", out / "heldout.parquet"
    for path, count, split in zip(paths, (train, heldout), ("train", "heldout"), strict=True):
        tmp = path.with_suffix(".parquet.tmp")
        datasets.Dataset.from_list(verl_rows(questions(count, rng, seen), split)).to_parquet(str(tmp))
        tmp.replace(path)  # a killed run never leaves a half-written file under the final name
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.parquet and heldout.parquet")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 1 or args.heldout < 1 or args.train + args.heldout > 10000:
        parser.error("--train and --heldout must be >= 1, and together at most 10000 (distinct questions)")
    for path in write(args.out, args.train, args.heldout, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
