"""Child processes that do not outlive the trainer."""

from __future__ import annotations

import signal
import sys


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Runs in a child (before exec, or as a spawned process's initializer): send it `sig` when the thread that
    started it dies (Linux), so a trainer killed without clean-up (SIGKILL, OOM) leaves no orphan holding
    memory, ports or the trainer's stdout."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
