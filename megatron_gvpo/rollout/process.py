"""Supervised child programs with an HTTP readiness check: SGLang servers (rollout/sglang.py) and sglang-router
(rollout/router.py).

`SupervisedProcess` starts a program in its own session with its output in a log file, waits for it to be ready
with a deadline (failing with the log's tail), restarts it on another port when another program took its port
while it started, and stops it with everything it spawned. A process that dies says why (`failure`): its exit
status with the signal's name, a SIGKILL named as the likely work of the kernel's OOM killer (`describe_exit`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.http import health
from megatron_gvpo.utils.logging import get_logger
from megatron_gvpo.utils.process import die_with_parent

OOM_HINT = ("likely the kernel's OOM killer (check `dmesg`/the memory of the trainer and the server's KV cache, "
            "rollout.max_total_tokens)")


def describe_exit(returncode: int) -> str:
    """A process's exit status in words: 'exited with code 1'; a negative one (Popen's, multiprocessing's) is the
    signal that killed it: 'was killed by SIGKILL (exit status -9): likely the kernel's OOM killer (...)'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = f": {OOM_HINT}" if -returncode == signal.SIGKILL else ""
    return f"was killed by {name} (exit status {returncode}){hint}"


class _PortTaken(Exception):
    """The process could not bind its port: another program took it after it was chosen."""


class SupervisedProcess:
    """A child program with an HTTP readiness check: started in its own session with its output in a log file,
    awaited with a deadline (failing with the log's tail), and stopped with everything it spawned.
    Subclasses give `name`, `command()`, `environment()` and `ready()`."""

    name = "process"

    def __init__(self, host: str, port: int | None, log_path: str | None, startup_timeout_s: float):
        from megatron_gvpo.utils.distributed import free_port

        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._log_offset = 0  # where the current attempt's output starts in the log
        if log_path:
            self.log_path = Path(log_path)
        else:
            import tempfile

            prefix = re.sub(r"\W+", "_", self.name)  # "SGLang server" -> SGLang_server_*.log, no space to quote
            self.log_path = Path(tempfile.mkstemp(prefix=f"{prefix}_", suffix=".log")[1])

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> tuple[bool, str]:
        """(ready to serve, what is still missing, for the error message)."""
        return health(self.url, timeout_s=2.0), "no answer to /health"

    def start(self, attempts: int = 3):
        """Start and wait until ready. A free port can be taken by another program between choosing and
        binding it (busy test machines do it); then the process is restarted on another free port."""
        if self.process is not None and self.process.poll() is None:
            return self
        from megatron_gvpo.utils.distributed import free_port

        for attempt in range(attempts):
            with open(self.log_path, "ab") as log:
                self._log_offset = log.tell()
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                                env=self.environment(), start_new_session=True,
                                                preexec_fn=die_with_parent)
            try:
                self.wait_ready(self.startup_timeout_s)
                return self
            except _PortTaken:
                self.stop(report=False)
                if attempt == attempts - 1:
                    raise RolloutError(f"{self.name}: port {self.port} and {attempts - 1} others were taken "
                                       f"while it started; log {self.log_path}") from None
                self.port = free_port(self.host)
                self.url = f"http://{self.host}:{self.port}"
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        missing = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RolloutError(f"{self.name} {self.failure()} during start-up; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            ok, missing = self.ready()
            if ok:
                return
            if self._port_taken():
                raise _PortTaken
            time.sleep(0.5)
        self.stop(report=False)
        raise RolloutError(f"{self.name} at {self.url} not ready after {timeout_s:.0f} s "
                           f"(startup_timeout_s; {missing}); log {self.log_path}:\n{self.log_tail()}")

    def _port_taken(self) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return b"address already in use" in log.read().lower()
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _log_since_start(self, max_bytes: int = 1 << 20) -> bytes:
        """The current attempt's output, its last `max_bytes` at most (a long run's log grows without bound)."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - max_bytes))
                return log.read()
        except OSError:
            return b""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self) -> str | None:
        """Why the process died, in words ('exited with code 1', 'was killed by SIGKILL ...: likely the
        kernel's OOM killer ...'); None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        return describe_exit(self.process.returncode)

    def stop(self, grace_s: float = 15.0, report: bool = True) -> None:
        """Stop the process and every process it spawned. SIGTERM goes to the leader only, which drains and
        stops its children (signalling SGLang's whole group kills the scheduler first, which the leader treats
        as a crash: a diagnostics pause, then SIGKILL of itself); whatever is left after `grace_s` is killed.
        A process found dead (or dying) is reported with why (`failure`) as a warning, unless `report` is False."""
        if self.process is None:
            return
        if report and (reason := self.failure()) is not None:
            get_logger().warning(f"{self.name} at {self.url} {reason}; log {self.log_path}")
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(5.0)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
