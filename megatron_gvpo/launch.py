"""Launch a run on a SLURM allocation: which node runs what, the exact command of each, and (without --dry-run)
running them.

    python -m megatron_gvpo.launch --config configs/gvpo_70b.yaml [--set a.b=c ...] [--dry-run]
    sbatch launch/gvpo_70b.sh                       # the same from an sbatch script (launch/README.md)
    launch/local.sh                                 # one machine, no SLURM (--local)

Inputs: the config (its `cluster:` section says how many nodes train and how many serve rollouts) and the
allocation, from the environment: SLURM_JOB_NODELIST (compressed lists such as `gpu-[001-003,007],login5` are
expanded here, no scontrol), SLURM_JOB_ID, SLURM_NNODES, SLURM_CPUS_ON_NODE and SLURM_GPUS_ON_NODE when set,
MASTER_PORT (the trainer's rendezvous port, default 29500), NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (passed to
every command; unset, NCCL and gloo choose an interface themselves), GVPO_RUN_DIR (replaces run.dir; each
command logs to <run.dir>/logs/<host>.<role>.log) and CONTAINER_IMAGE / CONTAINER_MOUNTS (pyxis, below).

Roles. With cluster.rollout_nodes = R > 0 the last R nodes of the nodelist serve rollouts: gpus_per_node /
rollout.server_tp SGLang servers per node, each on its own GPUs (CUDA_VISIBLE_DEVICES) and port (30000 + i), and
an sglang-router on the first of them (port 28000) for evaluation and external clients. The servers start with
random weights of the model's architecture (--load-format dummy; model.path's config.json, copied to
<run.dir>/rollout_model/ when model.path is the file itself) and the trainer loads its own into them. The
trainer does not go through the router: weight updates must reach every server, so it gets them all in
rollout.urls. The other nodes run one torchrun each (c10d rendezvous on the first node) of
`megatron_gvpo.train`. With R = 0 every node trains and the trainer starts its own servers (rollout.servers).

Order: validate the config against the allocation, run the planner (`python -m megatron_gvpo.plan`; a non-zero
exit aborts with its output, --skip-plan skips it), start the servers, wait for their /health (deadline
rollout.startup_timeout_s), start the router and wait for it, start the trainer. Every command runs as
`srun --nodes=1 --ntasks=1 --nodelist=HOST --overlap ... bash -c 'exec env VARS COMMAND' > LOG 2>&1` (with
--local: the `bash -c` part on this machine); each log's first line is `launch: ` and that command, the dry run's
with its wrapping (tests/test_slurm.py compares them). SIGUSR1 (SLURM's warning before the time limit,
--signal=B:USR1) goes to the trainer, which checkpoints and stops; SIGTERM, which SLURM sends to every job step
itself, is forwarded only with --local. A server or the router that exits while the trainer runs is started
again, rollout.max_server_restarts times each (the trainer waits for it: rollout.urls_supervised); a trainer
node that fails is named, the others get TRAINER_GRACE_S to stop, and the nodes SLURM holds for down are named
with what ran there. The launcher then stops the servers and exits with the trainer's status.

Containers (pyxis). With CONTAINER_IMAGE set every srun gets --container-image, --container-mounts
(CONTAINER_MOUNTS, default: the working directory) and --container-workdir. srun does not exist inside a pyxis
container, so this process stays on the host, where it needs only Python 3.9+: the config is read and the plan
made by `launch --json` in a one-task srun inside the image.

Everything up to the commands is functions without side effects (`expand_nodelist`, `build_plan`, `render_plan`,
`wrap`), which the dry run and tests/test_launch.py exercise; only `main` and `run` start processes or write
files. Module-level imports are the standard library only (the host side of the container case).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_PORT = 30000
"""SGLang server i of a rollout node listens on SERVER_PORT + i."""
ROUTER_PORT = 28000
ROUTER_METRICS_PORT = 28001  # the router's own Prometheus default (29000) clashes with a second router
RDZV_PORT = 29500
SHUTDOWN_TIMEOUT_S = 240
"""How long torchrun waits for its workers after forwarding SIGUSR1/SIGTERM before it kills them: the trainer
finishes its step and writes a checkpoint. launch/gvpo_70b.sh's --signal=B:USR1@300 leaves 300 s."""
TRAINER_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun forwards these to its workers; without SIGUSR1 here, SIGUSR1 would kill torchrun itself."""
ROUTER_STARTUP_S = 60.0
TRAINER_GRACE_S = 120.0
"""After one trainer node fails, the others get this long to fail on their own (NCCL errors) before they are
stopped: a node whose peers are gone can otherwise wait for its collective timeout."""
STOP_GRACE_S = 30.0

# Every command's environment; a variable already set in the launcher's environment keeps its value. Names as
# documented by PyTorch (torch_nccl_environment_variables) and NCCL (env.html); NCCL itself has no
# collective timeout variable: the trainer's process group timeout bounds collectives.
DEFAULT_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or timed-out collective aborts and exits, never hangs
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    "TORCH_FR_BUFFER_SIZE": "20000",  # flight recorder: the last collectives of each rank, for hangs
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ... written out on a timeout (to TORCH_FR_DUMP_TEMP_FILE)
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",  # 4.096 us * 2^22 = 17 s per InfiniBand retry: rides out a short link flap
    "PYTHONUNBUFFERED": "1",  # logs reach <host>.<role>.log as they are written
}
INTERFACE_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


# ---------------------------------------------------------------------------------------------------------
# The allocation
# ---------------------------------------------------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names, in order: `gpu-[001-003,007],login5` -> gpu-001, gpu-002,
    gpu-003, gpu-007, login5. Ranges keep the zero padding of their first number; several bracket groups in one
    name expand to every combination (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2)."""
    names: list[str] = []
    for item in _split_top_level(nodelist):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        if any(c in p for p in parts[::2] for c in "[]"):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets in {item!r}")
        choices = [_expand_range(p[1:-1], nodelist) if p.startswith("[") else [p] for p in parts]
        names += ["".join(combo) for combo in itertools.product(*choices)]
    if len(set(names)) != len(names):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names a node twice")
    return names


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            if not nodelist[start:i].strip():
                raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: empty host name")
            items.append(nodelist[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
    return items


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: {part!r} is not a number or a range a-b")
        first, last = m.group(1), m.group(2) or m.group(1)
        if int(last) < int(first):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: range {part!r} runs backwards")
        out += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return out


@dataclass
class Allocation:
    nodes: list[str]
    job_id: str
    rdzv_port: int = RDZV_PORT
    cpus_per_node: int | None = None
    """SLURM_CPUS_ON_NODE: srun steps get --cpus-per-task of all of them (since SLURM 22.05 a step otherwise
    gets one CPU, and a trainer with 8 ranks would share it)."""
    gpus_per_node: int | None = None
    """SLURM_GPUS_ON_NODE, checked against cluster.gpus_per_node."""


def _int_env(environ, name: str, default: int | None = None) -> int | None:
    value = environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def allocation_from_env(environ) -> Allocation:
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: run inside a SLURM allocation (sbatch launch/gvpo_70b.sh) "
                         "or on one machine with launch/local.sh")
    nodes = expand_nodelist(nodelist)
    nnodes = _int_env(environ, "SLURM_NNODES")
    if nnodes is not None and nnodes != len(nodes):
        raise ValueError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(nodes)} nodes")
    if not environ.get("SLURM_JOB_ID"):
        raise ValueError("SLURM_JOB_ID is not set (it names the trainer's rendezvous)")
    return Allocation(nodes, environ["SLURM_JOB_ID"], _int_env(environ, "MASTER_PORT", RDZV_PORT),
                      _int_env(environ, "SLURM_CPUS_ON_NODE"), _int_env(environ, "SLURM_GPUS_ON_NODE"))


def local_allocation(environ) -> Allocation:
    """This machine as a one-node allocation (launch/local.sh)."""
    return Allocation([socket.gethostname()], "local", _int_env(environ, "MASTER_PORT", RDZV_PORT))


# ---------------------------------------------------------------------------------------------------------
# The plan: processes and their commands (no side effects)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Process:
    host: str
    role: str
    """'trainer', 'sglang-<i>' (the i-th server of its node) or 'router'."""
    argv: list[str]
    env: dict[str, str]
    """This process's own variables (on top of Plan.env), e.g. CUDA_VISIBLE_DEVICES of a server."""
    log: str
    health_url: str = ""
    """Servers and the router: started before the trainer and awaited on <health_url>/health."""

    def command(self) -> str:
        return shlex.join([f"{k}={v}" for k, v in self.env.items()] + self.argv)


@dataclass
class Plan:
    job_id: str
    nodes: list[str]
    gpus_per_node: int
    trainer_nodes: list[str]
    rollout_nodes: list[str]
    run_dir: str
    env: dict[str, str]
    processes: list[Process]
    startup_timeout_s: float
    cpus_per_node: int | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """Written (path: text) before anything starts: the servers' config.json when model.path is a file."""
    planner_output: str = ""
    max_restarts: int = 0
    """How often each server and the router is restarted, through srun, when it exits while the trainer runs
    (rollout.max_server_restarts); the trainer waits for a restarted server and loads its weights into it
    (rollout.urls_supervised)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["processes"] = [Process(**p) for p in data["processes"]]
        return cls(**data)


def check_layout(cfg, alloc: Allocation) -> None:
    """The config's cluster section against the allocation and the rest of the config; ValueError naming both."""
    c, r = cfg.cluster, cfg.rollout
    if len(alloc.nodes) != c.nodes:
        raise ValueError(f"the allocation has {len(alloc.nodes)} nodes (SLURM_JOB_NODELIST: {', '.join(alloc.nodes)})"
                         f" but cluster.nodes={c.nodes}")
    if alloc.gpus_per_node is not None and alloc.gpus_per_node != c.gpus_per_node:
        raise ValueError(f"SLURM_GPUS_ON_NODE={alloc.gpus_per_node} but cluster.gpus_per_node={c.gpus_per_node}")
    cfg.check_world_size(c.trainer_gpus)  # names parallel.* / train.* when the trainer's nodes do not fit
    if c.rollout_nodes == 0:
        return
    if r.source == "offline":
        raise ValueError(f"cluster.rollout_nodes={c.rollout_nodes} but rollout.source='offline' samples nothing: "
                         "set cluster.rollout_nodes=0 or rollout.source to 'online' or 'mix'")
    if c.gpus_per_node % r.server_tp:
        raise ValueError(f"cluster.gpus_per_node={c.gpus_per_node} is not a multiple of rollout.server_tp="
                         f"{r.server_tp}: every GPU of a rollout node must belong to one server")
    if r.urls:
        raise ValueError(f"rollout.urls={r.urls} and cluster.rollout_nodes={c.rollout_nodes}: the launcher sets "
                         "rollout.urls to the servers it starts; leave it empty or set cluster.rollout_nodes=0")
    if r.weight_sync == "tensor":
        raise ValueError("rollout.weight_sync='tensor' shares memory with servers on the trainer's machine; with "
                         f"cluster.rollout_nodes={c.rollout_nodes} use 'distributed' or 'disk'")
    if cfg.model.path.endswith(".json") and not cfg.model.tokenizer:
        raise ValueError(f"model.path={cfg.model.path!r} is a config.json without tokenizer files: the rollout "
                         "nodes' SGLang servers need model.tokenizer (a Hugging Face directory with the tokenizer)")


def common_env(environ, run_dir: str) -> tuple[dict[str, str], list[str]]:
    """(the environment of every command, notes for the plan)."""
    env = {k: environ.get(k) or v for k, v in DEFAULT_ENV.items()}
    env["TORCH_FR_DUMP_TEMP_FILE"] = environ.get("TORCH_FR_DUMP_TEMP_FILE") or f"{run_dir}/logs/flight_recorder/rank_"
    notes = []
    for name in INTERFACE_VARS:
        if environ.get(name):
            env[name] = environ[name]
    unset = [n for n in INTERFACE_VARS if not environ.get(n)]
    if unset:
        notes.append(f"{' and '.join(unset)} unset: NCCL and gloo pick a network interface themselves (set "
                     "them, e.g. to the InfiniBand or cluster interface, if they pick a wrong one)")
    return env, notes


def sglang_argv(cfg, model_dir: str, port: int, seed: int, python: str) -> list[str]:
    """One SGLang server on the GPUs it is given: GPU flags, which `megatron_gvpo.rollout.serve` adapts on a node
    without CUDA (the plan is made where the dry run runs, often a login node). It starts with random weights
    of model_dir's architecture (--load-format dummy): the trainer loads its own (model.load, a resumed
    checkpoint, ...) into every server before the first rollout, so nothing here has to match them, and no
    rollout node reads a 140 GB checkpoint just to have it overwritten."""
    from megatron_gvpo.plan import SERVER_MEM_FRACTION  # the planner's KV-cache budget assumes it
    from megatron_gvpo.rollout.sglang import IDLE_FLAGS

    r = cfg.rollout
    argv = [python, "-m", "megatron_gvpo.rollout.serve", "--model-path", model_dir, "--load-format", "dummy",
            "--host", "0.0.0.0", "--port", str(port), "--tp-size", str(r.server_tp), "--random-seed", str(seed),
            "--dtype", cfg.model.dtype, "--mem-fraction-static", str(SERVER_MEM_FRACTION), *IDLE_FLAGS]
    if cfg.model.tokenizer:
        argv += ["--tokenizer-path", cfg.model.tokenizer]
    if r.seeded:  # SGLang honours per-request seeds on GPU only in its deterministic mode (rollout/sglang.py)
        argv.append("--enable-deterministic-inference")
    if r.max_total_tokens is not None:
        argv += ["--max-total-tokens", str(r.max_total_tokens)]
    if r.routing_replay:
        argv.append("--enable-return-routed-experts")
    return argv


def router_argv(worker_urls: list[str], python: str) -> list[str]:
    """sglang-router in front of the servers; round_robin, as rollout/router.py explains."""
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--host", "0.0.0.0",
            "--port", str(ROUTER_PORT), "--policy", "round_robin", "--prometheus-host", "0.0.0.0",
            "--prometheus-port", str(ROUTER_METRICS_PORT), "--log-level", "warn"]


def trainer_argv(trainers: list[str], gpus_per_node: int, alloc: Allocation, config_path: str,
                 overrides: list[str], python: str) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nnodes", str(len(trainers)),  # torchrun, under `python`
            "--nproc-per-node", str(gpus_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{trainers[0]}:{alloc.rdzv_port}", "--rdzv-id", alloc.job_id,
            "--signals-to-handle", TRAINER_SIGNALS, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
            "-m", "megatron_gvpo.train", "--config", config_path] + (["--set", *overrides] if overrides else [])


def build_plan(cfg, alloc: Allocation, config_path: str, overrides: list[str], environ,
               python: str = sys.executable) -> Plan:
    """Every process of the run, per node in nodelist order (servers, router, trainer). `overrides` are the
    `--set` values the config was loaded with; the trainer gets them plus rollout.urls. `python` runs every
    command: this interpreter (the project's environment, on a file system the nodes share), or the image's
    `python` in a container."""
    check_layout(cfg, alloc)
    c, r = cfg.cluster, cfg.rollout
    logs = f"{cfg.run.dir}/logs"
    trainers, rollout = alloc.nodes[:c.nodes - c.rollout_nodes], alloc.nodes[c.nodes - c.rollout_nodes:]
    env, notes = common_env(environ, cfg.run.dir)
    per_host: dict[str, list[Process]] = {host: [] for host in alloc.nodes}
    urls: list[str] = []
    model_dir, files = server_model_dir(cfg) if rollout else ("", {})
    for host in rollout:
        for i in range(c.gpus_per_node // r.server_tp):
            url = f"http://{host}:{SERVER_PORT + i}"
            gpus = ",".join(str(g) for g in range(i * r.server_tp, (i + 1) * r.server_tp))
            argv = sglang_argv(cfg, model_dir, SERVER_PORT + i, seed=cfg.run.seed + len(urls), python=python)
            per_host[host].append(Process(host, f"sglang-{i}", argv, {"CUDA_VISIBLE_DEVICES": gpus},
                                          f"{logs}/{host}.sglang-{i}.log", url))
            urls.append(url)
    if rollout:
        per_host[rollout[0]].append(Process(rollout[0], "router", router_argv(urls, python), {},
                                            f"{logs}/{rollout[0]}.router.log", f"http://{rollout[0]}:{ROUTER_PORT}"))
        notes.append(f"the SGLang servers start with random weights of {model_dir}'s architecture; the trainer "
                     f"loads its own into them (rollout.weight_sync={r.weight_sync!r}) before the first rollout")
    train_overrides = list(overrides)
    if urls:
        train_overrides += [f"rollout.urls=[{','.join(urls)}]", "rollout.urls_supervised=true"]
    for host in trainers:
        argv = trainer_argv(trainers, c.gpus_per_node, alloc, config_path, train_overrides, python)
        per_host[host].append(Process(host, "trainer", argv, {}, f"{logs}/{host}.trainer.log"))
    return Plan(alloc.job_id, alloc.nodes, c.gpus_per_node, trainers, rollout, cfg.run.dir, env,
                [p for host in alloc.nodes for p in per_host[host]], r.startup_timeout_s, alloc.cpus_per_node, notes,
                files, max_restarts=r.max_server_restarts if rollout else 0)


def server_model_dir(cfg) -> tuple[str, dict[str, str]]:
    """(the directory the servers' --model-path names, files to write first). SGLang reads the architecture from
    a directory's config.json; when model.path is the config.json itself, the launcher writes a copy to
    <run.dir>/rollout_model/ (the tokenizer comes from model.tokenizer)."""
    if not cfg.model.path.endswith(".json"):
        return cfg.model.path, {}
    try:
        text = Path(cfg.model.path).read_text()
    except OSError as e:
        raise ValueError(f"model.path={cfg.model.path!r}: {e.strerror}") from None
    model_dir = f"{cfg.run.dir}/rollout_model"
    return model_dir, {f"{model_dir}/config.json": text}


# ---------------------------------------------------------------------------------------------------------
# How each command runs (no side effects)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Container:
    image: str
    mounts: str
    workdir: str


def container_from_env(environ, workdir: str) -> Container | None:
    """pyxis settings: CONTAINER_IMAGE, CONTAINER_MOUNTS (default: the working directory at the same path)."""
    if not environ.get("CONTAINER_IMAGE"):
        return None
    return Container(environ["CONTAINER_IMAGE"], environ.get("CONTAINER_MOUNTS") or f"{workdir}:{workdir}", workdir)


def srun_prefix(host: str, cpus_per_node: int | None, container: Container | None) -> list[str]:
    argv = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap"]
    if cpus_per_node:
        argv.append(f"--cpus-per-task={cpus_per_node}")
    if container:
        argv += [f"--container-image={container.image}", f"--container-mounts={container.mounts}",
                 f"--container-workdir={container.workdir}"]
    return argv


def wrap(proc: Process, env: dict[str, str], cpus_per_node: int | None = None, container: Container | None = None,
         local: bool = False) -> list[str]:
    """The argv that runs `proc` on its node with `env` (Plan.env): srun (with `local`, nothing) around
    `bash -c 'exec env ...'` (exec, so that the signals srun forwards reach the program itself)."""
    inner = ["bash", "-c", "exec " + shlex.join(["env", *[f"{k}={v}" for k, v in env.items()]]) + " " + proc.command()]
    return inner if local else srun_prefix(proc.host, cpus_per_node, container) + inner


def render_plan(plan: Plan, container: Container | None = None, local: bool = False) -> str:
    """The dry run: the layout, the shared environment, how commands are wrapped, then one block per node."""
    servers = [p for p in plan.processes if p.role.startswith("sglang-")]
    routers = [p for p in plan.processes if p.role == "router"]
    lines = [f"job {plan.job_id}: {len(plan.nodes)} nodes x {plan.gpus_per_node} GPUs, run dir {plan.run_dir}",
             f"  trainer: {' '.join(plan.trainer_nodes)} (torchrun, "
             f"{len(plan.trainer_nodes) * plan.gpus_per_node} processes, rendezvous on {plan.trainer_nodes[0]})"]
    if plan.rollout_nodes:
        lines.append(f"  rollout: {' '.join(plan.rollout_nodes)} ({len(servers)} SGLang servers, "
                     f"sglang-router on {routers[0].health_url.removeprefix('http://')})")
    else:
        lines.append("  rollout: colocated (the trainer starts its SGLang servers on its own GPUs)")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("environment of every command:")
    lines += [f"  {k}={shlex.quote(v)}" for k, v in plan.env.items()]
    prefix = [] if local else srun_prefix("HOST", plan.cpus_per_node, container)
    lines.append(f"each command runs as: {shlex.join(prefix + ['bash', '-c'])} 'exec env ENVIRONMENT COMMAND' "
                 "> LOG 2>&1")
    order = "SGLang servers, wait for their /health, " if servers else ""
    order += "sglang-router, wait for its /health, " if routers else ""
    deadline = f" (server deadline {plan.startup_timeout_s:.0f} s)" if servers else ""
    lines.append(f"start order: {order}trainer{deadline}")
    if servers:
        lines.append(f"a server or router that exits while the trainer runs is restarted, up to {plan.max_restarts} "
                     "times each (rollout.max_server_restarts); the trainer reloads its weights into it")
    lines += [f"writes {path} (a copy of model.path)" for path in plan.files]
    if plan.planner_output.strip():
        lines.append("planner (python -m megatron_gvpo.plan):")
        lines += [f"  {line}" for line in plan.planner_output.rstrip().splitlines()]
    for host in plan.nodes:
        procs = [p for p in plan.processes if p.host == host]
        lines += ["", f"[{host}] {'trainer' if host in plan.trainer_nodes else 'rollout'}"]
        for p in procs:
            lines += [f"  {p.role}: {p.command()}", f"    log: {p.log}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------


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
    from megatron_gvpo.rollout.sglang import health

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


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


class _PlannerFailed(Exception):
    def __init__(self, code: int, output: str):
        super().__init__(output)
        self.code, self.output = code, output


def run_planner(config: str | None, overrides: list[str], nodes: int, gpus_per_node: int) -> str:
    """`python -m megatron_gvpo.plan`: its output, or _PlannerFailed with its exit code and output."""
    cmd = [sys.executable, "-m", "megatron_gvpo.plan"] + (["--config", config] if config else [])
    cmd += (["--set", *overrides] if overrides else []) + ["--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise _PlannerFailed(done.returncode, f"launch: the planner rejected the plan ({shlex.join(cmd)} exited with "
                                              f"{done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def make_plan(args, alloc: Allocation, overrides: list[str], environ, python: str) -> Plan:
    from megatron_gvpo.config import Config, load_config

    cfg = load_config(Config, args.config, overrides)
    plan = build_plan(cfg, alloc, args.config, overrides, environ, python)
    if not args.skip_plan:
        plan.planner_output = run_planner(args.config, overrides, cfg.cluster.nodes, cfg.cluster.gpus_per_node)
    return plan


def plan_in_container(args, alloc: Allocation, container: Container, environ) -> Plan:
    """`launch --json` in a one-task srun inside the image (the host may lack the project's dependencies)."""
    env = {"SLURM_JOB_NODELIST": ",".join(alloc.nodes), "SLURM_NNODES": str(len(alloc.nodes)),
           "SLURM_JOB_ID": alloc.job_id, "MASTER_PORT": str(alloc.rdzv_port)}
    env.update({k: environ[k] for k in ("GVPO_RUN_DIR", *INTERFACE_VARS, *DEFAULT_ENV) if environ.get(k)})
    for name, value in (("SLURM_CPUS_ON_NODE", alloc.cpus_per_node), ("SLURM_GPUS_ON_NODE", alloc.gpus_per_node)):
        if value is not None:
            env[name] = str(value)
    argv = ["python", "-m", "megatron_gvpo.launch"] + (["--config", args.config] if args.config else [])
    argv += (["--set", *args.overrides] if args.overrides else []) + ["--json"]
    argv += ["--skip-plan"] if args.skip_plan else []
    planner = Process(alloc.nodes[0], "plan", argv, {}, "")
    done = subprocess.run(wrap(planner, env, alloc.cpus_per_node, container), capture_output=True, text=True)
    if done.returncode:
        raise _PlannerFailed(done.returncode, f"launch: planning in {container.image} failed:\n{done.stdout}"
                                              f"{done.stderr}")
    return Plan.from_json(done.stdout)


def main(argv: list[str] | None = None, environ=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with the values, including the cluster: section")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, passed on to the planner and the trainer")
    parser.add_argument("--dry-run", action="store_true", help="print each node's role and commands, run nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON, run nothing")
    parser.add_argument("--skip-plan", action="store_true", help="do not run python -m megatron_gvpo.plan")
    parser.add_argument("--local", action="store_true",
                        help="this machine as a one-node allocation (cluster.nodes=1, cluster.rollout_nodes=0: the "
                             "trainer starts its servers), commands run without srun (launch/local.sh)")
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    try:
        alloc = local_allocation(environ) if args.local else allocation_from_env(environ)
        # --local: this machine is the whole cluster, whatever the config's cluster section says (the user's own
        # --set come after, so they still win).
        overrides = (["cluster.nodes=1", "cluster.rollout_nodes=0"] if args.local else []) + list(args.overrides)
        if environ.get("GVPO_RUN_DIR"):
            overrides.append(f"run.dir={environ['GVPO_RUN_DIR']}")
        container = None if args.local else container_from_env(environ, os.getcwd())
        if container and not (args.dry_run or args.json):
            plan = plan_in_container(args, alloc, container, environ)
        else:
            # In the image its own `python`: the host's interpreter (this one) is not there.
            plan = make_plan(args, alloc, overrides, environ, "python" if container else sys.executable)
    except ValueError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except _PlannerFailed as e:
        print(e.output, file=sys.stderr)
        return e.code
    if args.json:
        print(plan.to_json())
        return 0
    if args.dry_run:
        print(render_plan(plan, container, args.local))
        return 0
    return run(plan, container, args.local)


if __name__ == "__main__":
    sys.exit(main())
