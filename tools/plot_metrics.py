"""Render a run's metrics.jsonl to PNG: reward, held-out accuracy, KL to the start policy, loss terms, gradient
norm, step-time breakdown.

    .venv/bin/python tools/plot_metrics.py RUN_DIR [--out FILE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron_gvpo.utils.plots import plot_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with metrics.jsonl (or the file itself)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_metrics(args.run_dir, args.out))


if __name__ == "__main__":
    main()
