"""Write the tiny CPU assets: the addition task's tokenizer and offline train / held-out group datasets.

    .venv/bin/python tools/make_tiny_assets.py [--out runs/assets/tiny] [--digits 8] [--k 4] [--force]

Writes DIR/tokenizer (save_pretrained; load with AutoTokenizer.from_pretrained, offline), DIR/train.jsonl and
DIR/heldout.jsonl (schema in megatron_gvpo/data/offline.py), their prompts alone for online training, and
DIR/online_prompts.jsonl, the main job's prompts. The held-out prompts are drawn with another seed and exclude
every training prompt; the online prompts exclude every held-out one. Idempotent: existing outputs are kept unless
--force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a plain script from the repo root: make the package importable without installing it.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron_gvpo.data.addition import DEFAULT_DIGITS, make_tiny_assets  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/assets/tiny"), help="output dir (default: %(default)s)")
    parser.add_argument("--digits", type=int, default=DEFAULT_DIGITS, help="operand digits (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (default: %(default)s)")
    parser.add_argument("--train-prompts", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument("--heldout-prompts", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--online-prompts", type=int, default=16384,
                        help="prompts of online_prompts.jsonl, the main job's (default: %(default)s)")
    parser.add_argument("--p-correct", type=float, default=0.5, help="P(response is correct) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="train seed; held-out uses seed + 1 (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    args = parser.parse_args(argv)
    report = make_tiny_assets(
        args.out, args.digits, args.k, args.train_prompts, args.heldout_prompts, args.p_correct, args.seed, args.force,
        args.online_prompts,
    )
    print("\n".join(report))


if __name__ == "__main__":
    main()
