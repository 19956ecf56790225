"""Running a plan: start the servers and the router and await their /health, start the trainer, forward signals
to it, start again a server or router that exits, name the nodes of a failure, stop everything at the end.

Kept apart because it alone installs signal handlers, writes files (the logs, Plan.files) and keeps processes
running; what it starts was decided in commands.py, where the dry run shows it.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_gvpo.launch.commands import Container, Plan, Process, wrap

ROUTER_STARTUP_S = 60.0
TRAINER_GRACE_S = 120.0
"""After one trainer node fails, the others get this long to fail on their own (NCCL errors) before they are
stopped: a node whose peers are gone can otherwise wait for its collective timeout."""
STOP_GRACE_S = 30.0


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGUSR1 / SIGTERM: before the trainer runs they abort the start-up; then `forwarded` ones go to it.
    Under SLURM that is SIGUSR1 only (--signal=B:USR1 reaches the batch shell alone): SLURM itself sends SIGTERM
    to every job step (cancel, pre-emption, time limit), and a second signal while torchrun waits for its ranks
    to checkpoint makes it exit at once, after which SLURM kills what is left of the step."""

    def __init__(self, forwarded: tuple[int, ...]):
        self.forwarded = forwarded
        self.received: list[int] = []
        self.targets: list[subprocess.Popen] = []
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.targets:
            print(f"launch: {name}: stopping the start-up", flush=True)
        elif signum not in self.forwarded:
            print(f"launch: {name}: SLURM sends it to the trainer's job step itself; waiting for the trainer",
                  flush=True)
        else:
            print(f"launch: {name}: forwarding it to the trainer", flush=True)
            for p in self.targets:
                if p.poll() is None:
                    p.send_signal(signum)

    def check(self) -> None:
        if self.received and not self.targets:
            raise _Interrupted(self.received[0])

    def forward_to(self, popens: list[subprocess.Popen]) -> None:
        """From now on signals go to `popens`; one that came since the last check() goes now."""
        pending, self.targets = list(self.received), popens
        for signum in pending:
            self._forward(signum)


def _log_tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(proc: Process, plan: Plan, container: Container | None, local: bool) -> subprocess.Popen:
    argv = wrap(proc, plan.env, plan.cpus_per_node, container, local)
    with open(proc.log, "ab") as log:
        log.write(f"launch: {shlex.join(argv)}\n".encode())  # what ran, beside what it wrote
        log.flush()
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"launch: started {proc.role} on {proc.host} (log {proc.log})", flush=True)
    return popen


def _await_health(started: list[tuple[Process, subprocess.Popen]], timeout_s: float, what: str,
                  signals: _Signals) -> None:
    from megatron_gvpo.rollout.http import health

    t0 = time.monotonic()
    waiting = list(started)
    while waiting:
        signals.check()
        for proc, popen in list(waiting):
            if popen.poll() is not None:
                raise RuntimeError(f"{proc.role} on {proc.host} exited with code {popen.returncode} during start-up; "
                                   f"log {proc.log}:\n{_log_tail(proc.log)}")
            if health(proc.health_url, timeout_s=2.0):
                print(f"launch: {proc.role} on {proc.host} healthy after {time.monotonic() - t0:.0f} s", flush=True)
                waiting.remove((proc, popen))
        if waiting and time.monotonic() - t0 > timeout_s:
            proc = waiting[0][0]
            raise RuntimeError(f"{proc.role} on {proc.host} ({proc.health_url}) not healthy after {timeout_s:.0f} s "
                               f"({what}); log {proc.log}:\n{_log_tail(proc.log)}")
        if waiting:
            time.sleep(1.0)


def describe_status(code: int) -> str:
    """A command's exit status in words. srun (bash, with --local) exits with 128 + N when signal N killed its
    task; Popen reports -N when a signal killed srun itself."""
    number = -code if code < 0 else code - 128 if code > 128 else 0
    try:
        return f"was killed by {signal.Signals(number).name} (exit status {code})"
    except ValueError:
        return f"exited with code {code}"


def _await_trainers(trainers: list[tuple[Process, subprocess.Popen]],
                    services: list[tuple[Process, subprocess.Popen]], signals: _Signals, restart,
                    max_restarts: int) -> int:
    """The trainer's status: the first non-zero exit seen, else 0. Each trainer node that fails is named as it
    fails; the others get TRAINER_GRACE_S to fail on their own, then are stopped. Until then, a server or the
    router that exits is started again with `restart(process)` (a new Popen), up to `max_restarts` times each,
    unless a signal came (SLURM stops every step of a job it ends)."""
    signals.forward_to([popen for _, popen in trainers])
    failures: list[tuple[Process, int]] = []
    failed_at, stopped, restarts = None, False, [0] * len(services)
    while True:
        for proc, popen in trainers:
            if popen.poll() not in (None, 0) and all(p is not proc for p, _ in failures):
                failures.append((proc, popen.returncode))
                print(f"launch: trainer on {proc.host} {describe_status(popen.returncode)}; log {proc.log}", flush=True)
        if all(popen.poll() is not None for _, popen in trainers):
            return failures[0][1] if failures else 0
        if failures and failed_at is None:
            failed_at = time.monotonic()
            if any(popen.poll() is None for _, popen in trainers):
                print(f"launch: the other trainer nodes get {TRAINER_GRACE_S:.0f} s to stop", flush=True)
        if failed_at is not None and time.monotonic() - failed_at > TRAINER_GRACE_S and not stopped:
            for proc, popen in trainers:
                if popen.poll() is None:
                    print(f"launch: trainer on {proc.host} still runs {TRAINER_GRACE_S:.0f} s after the failure (its "
                          "node may be down, or the trainer hung in a collective): stopping it", flush=True)
            _stop([popen for _, popen in trainers])
            stopped = True
        _restart_services(services, restarts, restart, max_restarts,
                          allowed=failed_at is None and not signals.received)
        time.sleep(1.0)


def _restart_services(services: list[tuple[Process, subprocess.Popen]], restarts: list[int], restart,
                      max_restarts: int, allowed: bool) -> None:
    """Start again (in place) each server or router that exited, counting in `restarts` (-1: given up)."""
    for i, (proc, popen) in enumerate(services):
        if popen.poll() is None or restarts[i] < 0:
            continue
        what = f"launch: {proc.role} on {proc.host} {describe_status(popen.returncode)}"
        if allowed and restarts[i] < max_restarts:
            restarts[i] += 1
            print(f"{what}; starting it again ({restarts[i]} of rollout.max_server_restarts={max_restarts})",
                  flush=True)
            services[i] = (proc, restart(proc))
        else:
            restarts[i] = -1
            print(f"{what}; not started again; log {proc.log}", flush=True)


def _report_nodes(plan: Plan) -> None:
    """After a failure: the job's nodes SLURM holds for down, draining or not responding, with what ran there (a
    node that crashed takes its processes with it and the srun that ran them may say nothing)."""
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "node", ",".join(plan.nodes)], capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for line in shown.splitlines():
        node, state = re.search(r"NodeName=(\S+)", line), re.search(r"\bState=(\S+)", line)
        if not node or not state or not re.search(r"DOWN|DRAIN|FAIL|NOT_RESPONDING", state.group(1)):
            continue
        roles = ", ".join(p.role for p in plan.processes if p.host == node.group(1)) or "nothing"
        reason = re.search(r"\bReason=(.*?)(?= \w+=|$)", line)
        print(f"launch: SLURM has node {node.group(1)} {state.group(1)}"
              f"{f' ({reason.group(1)})' if reason else ''}; it ran: {roles}", flush=True)


def _stop(popens: list[subprocess.Popen]) -> None:
    """SIGTERM (srun forwards it to its task), then SIGKILL after STOP_GRACE_S."""
    alive = [p for p in popens if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(plan: Plan, container: Container | None = None, local: bool = False) -> int:
    """Start the servers, wait for them, start the router, wait, start the trainer, forward SIGUSR1/SIGTERM to
    it, stop the rest when it ends; the trainer's exit status (1 when the start-up fails, 128 + signal when a
    signal stops the start-up)."""
    Path(plan.run_dir, "logs", "flight_recorder").mkdir(parents=True, exist_ok=True)
    for path, text in plan.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    signals = _Signals((signal.SIGUSR1, signal.SIGTERM) if local else (signal.SIGUSR1,))
    services: list[tuple[Process, subprocess.Popen]] = []
    try:
        servers = [p for p in plan.processes if p.role.startswith("sglang-")]
        routers = [p for p in plan.processes if p.role == "router"]
        for group, timeout_s, what in ((servers, plan.startup_timeout_s, "rollout.startup_timeout_s"),
                                       (routers, ROUTER_STARTUP_S, "the router's deadline")):
            started = [(p, _start(p, plan, container, local)) for p in group]
            services += started
            _await_health(started, timeout_s, what, signals)
        signals.check()
        trainers = [(p, _start(p, plan, container, local)) for p in plan.processes if p.role == "trainer"]
        # A signal between check() and here is forwarded by forward_to() in _await_trainers.
        try:
            status = _await_trainers(trainers, services, signals, lambda p: _start(p, plan, container, local),
                                     plan.max_restarts)
        finally:
            _stop([popen for _, popen in trainers])
        print(f"launch: trainer exited with status {status}", flush=True)
        if status and not local:
            _report_nodes(plan)
        if status and set(signals.received) & set(signals.forwarded):
            print("launch: (torchrun reports a run it stopped for a forwarded signal as failed even when every rank "
                  "checkpointed and exited 0; the ranks' own exit is in the trainer's log)", flush=True)
        return status
    except _Interrupted as e:
        print(f"launch: stopped by {e} during start-up", flush=True)
        return 128 + e.signum
    except (RuntimeError, OSError) as e:  # OSError: srun or bash missing, log directory not writable
        print(f"launch: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop([popen for _, popen in services])
