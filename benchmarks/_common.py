"""What the benchmark scripts share: the repository on sys.path, where results go, and how a report is published.

Scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ on sys.path, so `from _common import ...` works
in any of them; import it before the project's modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def publish(report: str, out: Path | None) -> None:
    """Print a benchmark's Markdown report and write it to `out` (none: print only)."""
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
