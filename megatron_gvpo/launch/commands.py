"""The plan of a launch, without side effects: the allocation (SLURM's environment, its nodelist expanded), the
processes of each node and their commands, how each command is wrapped (srun, pyxis) and the dry run's text.

Kept apart from the runner so that the dry run and tests/test_launch.py see exactly what `runner.run` would start, and
so that `launch --json` can make the plan inside a container for a launcher on the host (package docstring).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
import socket
import sys
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
# The plan: processes and their commands
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
# How each command runs
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

