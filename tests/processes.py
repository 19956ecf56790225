"""Interrupting a training run the way a cluster would: start a command, wait until its metrics.jsonl holds
a number of lines, then signal it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def signal_after_lines(command: list[str], metrics: Path, lines: int, sig: int = signal.SIGKILL,
                       timeout_s: float = 300.0) -> tuple[int, str]:
    """Run `command` (in the repository, one OpenMP thread), send `sig` once `metrics` has `lines` lines, and
    return its exit status and output. Fails if it exits first or the lines do not come within timeout_s."""
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
            assert proc.poll() is None, f"exited before {lines} metrics lines:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, f"no {lines} metrics lines after {timeout_s:.0f} s"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def assert_quiet(output: str, genuine: str = "") -> None:
    """A run's terminal output shows none of the known-harmless notices (megatron_gvpo/utils/logging.py) and no
    line twice (a notice that each process, rank or server restart prints again would repeat), while `genuine`,
    a warning the run itself raised, gets through, once."""
    from collections import Counter

    from megatron_gvpo.utils.logging import KNOWN_NOTICES

    assert not [n.message for n in KNOWN_NOTICES if n.message in output], output
    repeated = [line for line, count in Counter(line for line in output.splitlines() if line.strip()).items()
                if count > 1]
    assert not repeated, output
    if genuine:
        assert output.count(genuine) == 1, output


def assert_no_known_notices(log: str) -> None:
    """No known-harmless notice in a log (an SGLang server's: each of its processes would print them)."""
    from megatron_gvpo.utils.logging import KNOWN_NOTICES

    assert not [n.message for n in KNOWN_NOTICES if n.message in log], log


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(want: list[dict], got: list[dict], context="") -> None:
    """Two runs' metrics.jsonl records are the same run: the same steps and keys, strings and counts exactly,
    floats to 1e-5 relative; timings (time_*) aside."""
    import pytest

    assert [r["step"] for r in got] == [r["step"] for r in want], context
    for w, g in zip(want, got):
        w, g = ({k: v for k, v in r.items() if not k.startswith("time_")} for r in (w, g))
        assert g.keys() == w.keys(), (g["step"], context)
        for key, value in w.items():
            assert g[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), \
                (g["step"], key, context)
