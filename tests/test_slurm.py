"""`sbatch launch/gvpo_70b.sh` on a real SLURM cluster: tools/slurm_testbed.sh's slurmctld and two slurmd nodes
on this machine (Debian's slurm-wlm, installed by the script), started for this module and stopped after it.

- The test bed: `up` twice is one cluster, `down` leaves no daemon behind; where cgroups can be made, what a
  step daemonized dies with the step.
- The two shapes the launcher knows, each run to completion through sbatch and compared, metric by metric, with
  a run of the same config and seed without SLURM: (a) one node trains and the other serves SGLang and the
  router (the 70B config's shape); (b) both nodes train, one torchrun each, joined by the c10d rendezvous over
  gloo, against launch/local.sh's torchrun of as many processes on one machine.
- What the dry run prints is what the real run executed, node by node.
- Pre-emption: SIGUSR1 to the batch shell checkpoints and stops the trainer; `scontrol requeue` resumes the job
  to the metrics of the uninterrupted one.
- Faults: a trainer node that crashes (`slurm_testbed.sh crash`: its slurmd and every process on it killed)
  fails the job within a bounded time, named in the job's output; SLURM requeues it and, the node back, it
  resumes from the last checkpoint to the uninterrupted job's metrics. An SGLang server that dies on its
  rollout node is started again through srun, and the trainer reloads its weights into it and goes on.

The module skips where the test bed cannot run: not root (its daemons run as root), or no SLURM and no apt-get
to install it. Both nodes are this machine, so every process of a job shares its two cores; the jobs run with
one OpenMP thread (OMP_NUM_THREADS, which sbatch passes on), as the trainer gives itself beside its own servers.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gvpo.utils.distributed import free_port
from tests.processes import assert_same_run, metrics_records

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "tools" / "slurm_testbed.sh"
CONFIG = "configs/addition_gvpo.yaml"
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment that reaches the test bed (SLURM_CONF); the cluster is torn down after the module."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test bed's daemons run as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("no SLURM installed and no apt-get to install it")
    pytest.importorskip("sglang")
    bed = tmp_path_factory.mktemp("slurm") / "testbed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # pytest may itself run in a job
    # Its own directory and ports: a test bed a user brought up stays as it is.
    env.update(SLURM_TESTBED_DIR=str(bed), SLURM_CONF=str(bed / "slurm.conf"), SLURM_TESTBED_PORT=str(free_port()))
    install = subprocess.run(["bash", str(TESTBED), "install"], env=env, capture_output=True, text=True, timeout=600)
    if install.returncode:
        pytest.skip(f"could not install SLURM: {install.stdout}{install.stderr}")
    up = subprocess.run(["bash", str(TESTBED), "up"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        pids = [int(p.read_text()) for p in bed.glob("*.pid")]
        down = subprocess.run(["bash", str(TESTBED), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert pids and not [p for p in pids if Path(f"/proc/{p}").exists()], "daemons left behind"
        assert not bed.exists()


def test_testbed_up_again_is_the_same_cluster(slurm):
    again = subprocess.run(["bash", str(TESTBED), "up"], env=slurm, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=slurm, capture_output=True, text=True,
                           check=True).stdout.split("\n")
    assert sorted(line.split()[0] for line in nodes if line) == ["gvpo-n1", "gvpo-n2"]
    hosts = subprocess.run(["srun", "-N2", "bash", "-c", "echo $SLURMD_NODENAME"], env=slurm, capture_output=True,
                           text=True, timeout=60)
    assert sorted(hosts.stdout.split()) == ["gvpo-n1", "gvpo-n2"], hosts.stderr


def test_what_a_step_leaves_behind_dies_with_it(slurm):
    """Where the machine lets root make cgroups, the test bed tracks a job's processes in them, as real clusters
    do: a process a step daemonized (an orphan, out of reach of parent-pid tracking) dies when the step ends."""
    if "ProctrackType=proctrack/cgroup" not in Path(slurm["SLURM_CONF"]).read_text():
        pytest.skip("no writable cgroup v1 freezer here: the test bed tracks processes by parent pid")
    seconds = f"{1000 + free_port() % 1000}.5"  # names this test's orphan
    step = subprocess.run(["srun", "-N1", "-w", "gvpo-n2", "bash", "-c",
                           f"setsid nohup sleep {seconds} >/dev/null 2>&1 & cat /proc/self/cgroup"], env=slurm,
                          capture_output=True, text=True, timeout=60)
    assert "freezer:/slurm_gvpo-n2/" in step.stdout, step.stdout + step.stderr
    orphan = ["pgrep", "-f", f"^sleep {seconds}$"]
    wait_for("the orphan outlived its step", lambda: subprocess.run(orphan).returncode == 1, timeout_s=30)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_gvpo.data.addition import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, digits=2, train_prompts=64, heldout_prompts=8, online_prompts=64)
    return out


def tiny_run(assets) -> list[str]:
    """The tiny online GVPO run both shapes and their local twins train (6 steps, a checkpoint after each, a
    seeded rollout, an evaluation every 2 steps, a reward the random policy's groups disagree on)."""
    return [f"model.path={REPO / 'configs/models/tiny_llama.json'}", f"model.tokenizer={assets / 'tokenizer'}",
            f"prompts.path={assets / 'train_prompts.jsonl'}", f"prompts.eval_path={assets / 'heldout_prompts.jsonl'}",
            "train.steps=6", "run.save_interval=1", "algo.group_size=4", "train.global_batch_size=16",
            "train.micro_batch_size=8", "rollout.max_new_tokens=6", "rollout.max_total_tokens=2048",
            "rollout.eval_interval=2", "model.seq_length=16", "prompts.max_prompt_tokens=8", "reward.kind=function",
            "reward.function=tests.test_online:response_length", "train.lr=1e-2"]


def run_env(base: dict, run_dir: Path) -> dict:
    return {**base, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "CONFIG": CONFIG, "GVPO_RUN_DIR": str(run_dir)}


def sbatch(slurm: dict, run_dir: Path, sets: list[str], dry_run: bool = False) -> str:
    """`sbatch --wait` of launch/gvpo_70b.sh on both nodes; the job's output. Fails, with the output and the
    tails of the node logs, when the job does."""
    out = run_dir.parent / f"{run_dir.name}{'.dry' if dry_run else ''}.out"
    env = {**run_env(slurm, run_dir), **({"DRY_RUN": "1"} if dry_run else {})}
    done = subprocess.run(["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", f"--output={out}",
                           "launch/gvpo_70b.sh", "--set", *sets], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    output = out.read_text() if out.exists() else ""
    if done.returncode:
        logs = "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])
                       for log in sorted((run_dir / "logs").glob("*.log")))
        pytest.fail(f"sbatch exited with {done.returncode}: {done.stderr}\n{output}{logs}")
    return output


SHAPE_A = ["cluster.nodes=2", "cluster.rollout_nodes=1"]
SHAPE_B = ["cluster.nodes=2", "cluster.rollout_nodes=0"]


def uninterrupted(slurm, assets, tmp_path_factory, name: str, shape: list[str]) -> tuple[Path, str]:
    """The tiny run in `shape` through sbatch: (its run directory, the job's output)."""
    run_dir = tmp_path_factory.mktemp(name) / "slurm"
    return run_dir, sbatch(slurm, run_dir, [*shape, *tiny_run(assets)])


@pytest.fixture(scope="module")
def shape_a(slurm, assets, tmp_path_factory) -> tuple[Path, str]:
    return uninterrupted(slurm, assets, tmp_path_factory, "shape_a", SHAPE_A)


@pytest.fixture(scope="module")
def shape_b(slurm, assets, tmp_path_factory) -> tuple[Path, str]:
    return uninterrupted(slurm, assets, tmp_path_factory, "shape_b", SHAPE_B)


def test_one_node_trains_and_one_serves_like_a_local_run(slurm, assets, shape_a, tmp_path):
    """Shape (a): the trainer on gvpo-n1 gets the SGLang server and the router the launcher starts on gvpo-n2
    (random weights, then the trainer's over the weight-sync group). The run equals the trainer starting its own
    server on one machine, and ran the commands its dry run prints."""
    run_dir, output = shape_a
    assert "launch: sglang-0 on gvpo-n2 healthy" in output and "launch: trainer exited with status 0" in output
    local = subprocess.run([sys.executable, "-m", "megatron_gvpo.train", "--config", CONFIG, "--set",
                            f"run.dir={tmp_path / 'local'}", *tiny_run(assets)], cwd=REPO,
                           env={**slurm, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert local.returncode == 0, local.stdout + local.stderr
    want = metrics_records(tmp_path / "local")
    assert [r["step"] for r in want] == [0, 1, 2, 3, 4, 5, 6]
    assert_same_run(want, metrics_records(run_dir), "sbatch, trainer and rollout nodes")
    assert_ran_as_planned(sbatch(slurm, run_dir, [*SHAPE_A, *tiny_run(assets)], dry_run=True))


def assert_ran_as_planned(dry_run: str) -> None:
    """Every command the dry run printed ran, on its node, wrapped as it says: each log's first line is the
    command that wrote it (megatron_gvpo/launch/runner.py). Job ids differ between the two jobs: they name the
    rendezvous only."""
    from tests.test_launch import _blocks

    blocks = _blocks(dry_run)
    roles = {(host, role): command for host, block in blocks.items() for role, command in block.items()
             if role != "kind" and not role.endswith(".log")}
    assert sorted(roles) == [("gvpo-n1", "trainer"), ("gvpo-n2", "router"), ("gvpo-n2", "sglang-0")]
    job = re.compile(r"--rdzv-id \d+")
    for (host, role), command in roles.items():
        ran = Path(blocks[host][f"{role}.log"]).read_text().splitlines()[0]
        argv = shlex.split(ran.removeprefix("launch: "))
        assert argv[:5] == ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap"], ran
        assert job.sub("", argv[-1]).endswith(job.sub("", command)), (role, ran, command)


def test_two_nodes_train_together_like_one_machine(slurm, assets, shape_b, tmp_path):
    """Shape (b): a torchrun on each node, one process each, the c10d rendezvous on gvpo-n1: data parallel over
    gloo across the nodes, rank 0 starting its own server. The run equals launch/local.sh's torchrun of two
    processes on one machine."""
    run_dir, output = shape_b
    assert "launch: trainer exited with status 0" in output
    logs = {log.name: log.read_text() for log in (run_dir / "logs").glob("gvpo-n*.trainer.log")}
    assert sorted(logs) == ["gvpo-n1.trainer.log", "gvpo-n2.trainer.log"]
    assert all("step 0 eval" in text for text in logs.values()), "both nodes train"
    local = subprocess.run(["bash", "launch/local.sh", "--set", "cluster.gpus_per_node=2", *tiny_run(assets)],
                           cwd=REPO, env={**run_env(slurm, tmp_path / "local"), "CONFIG": CONFIG},
                           capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert local.returncode == 0, local.stdout + local.stderr
    want = metrics_records(tmp_path / "local")
    assert [r["step"] for r in want] == [0, 1, 2, 3, 4, 5, 6]
    assert_same_run(want, metrics_records(run_dir), "sbatch, two trainer nodes")


def job_state(slurm: dict, job: str) -> str:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, f"scontrol show job {job}: {shown.stdout}{shown.stderr}"
    return re.search(r"JobState=(\S+)", shown.stdout).group(1)


_scontrol_errors: list[str] = []


def scontrol(slurm: dict, *args: str) -> bool:
    """Whether `scontrol ARGS` succeeded; its errors are kept for the failure message of a wait that gives up."""
    done = subprocess.run(["scontrol", *args], env=slurm, capture_output=True, text=True, timeout=60)
    if done.returncode:
        _scontrol_errors.append(f"scontrol {' '.join(args)}: {done.stdout}{done.stderr}".strip())
    return done.returncode == 0


def wait_for(what: str, ready, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f} s {_scontrol_errors[-3:]}"
        time.sleep(0.2)


def submit(slurm: dict, run_dir: Path, out: Path, sets: list[str]) -> str:
    """`sbatch` of launch/gvpo_70b.sh on both nodes, not waiting; the job id. Its output goes to `out`, appended
    to by a requeued job."""
    return subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--output={out}",
                           "--open-mode=append", "launch/gvpo_70b.sh", "--set", *sets], cwd=REPO,
                          env=run_env(slurm, run_dir), capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip().split(";")[0]


def wait_for_step(run_dir: Path, step: int) -> None:
    """Until metrics.jsonl holds training step `step` (after the record of step 0's evaluation)."""
    metrics = run_dir / "metrics.jsonl"
    wait_for(f"no step {step}", lambda: metrics.exists() and len(metrics.read_text().splitlines()) > step)


def start_requeued(slurm: dict, job: str) -> None:
    """Start a requeued job now. SLURM holds one two minutes; started in the second its old credential was
    revoked in, slurmd refuses it ("Job credential revoked": one-second resolution), so give it a few seconds,
    not two minutes."""
    time.sleep(3.0)
    assert scontrol(slurm, "update", f"JobId={job}", "StartTime=now")


def test_a_preempted_job_checkpoints_requeues_and_finishes_the_same_run(slurm, assets, shape_a, tmp_path):
    """Pre-emption for real: `scancel --signal=USR1 --batch` reaches the launcher (the batch shell), which
    forwards it through srun and torchrun to the trainer: it checkpoints and stops before its last step.
    `scontrol requeue` (and, a few seconds later, `scontrol update StartTime=now`, which shortens SLURM's two-minute
    hold on a requeued job) runs the same job again, which resumes from that checkpoint and ends where the uninterrupted
    job of shape (a) ended, metric by metric."""
    run_dir, out = tmp_path / "slurm", tmp_path / "job.out"
    job = submit(slurm, run_dir, out, [*SHAPE_A, *tiny_run(assets)])
    wait_for_step(run_dir, 1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for("the pre-empted job still runs", lambda: job_state(slurm, job) not in ("RUNNING", "COMPLETING"))
    first = out.read_text()
    assert "launch: SIGUSR1: forwarding it to the trainer" in first, (job_state(slurm, job), first)
    stopped_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert stopped_at < "step_0000006", "the job finished before the signal reached it"
    # SLURM refuses a requeue while the job's steps still complete on their nodes: ask again for a while.
    wait_for("scontrol requeue kept failing", lambda: scontrol(slurm, "requeue", job), timeout_s=60)
    start_requeued(slurm, job)
    wait_for("the requeued job did not finish", lambda: job_state(slurm, job) == "COMPLETED"
             and out.read_text().count("launch: trainer exited") == 2)
    assert "launch: trainer exited with status 0" in out.read_text().removeprefix(first)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert_same_run(metrics_records(shape_a[0]), metrics_records(run_dir), f"pre-empted at {stopped_at}")


def response_length_slowly(prompt: str, response: str, label) -> float:
    """tests.test_online's response_length, 50 ms a call: a step lasts long enough to crash a node in it."""
    from tests.test_online import response_length

    time.sleep(0.05)
    return response_length(prompt, response, label)


def test_a_crashed_node_fails_the_job_naming_it_and_the_requeued_job_resumes(slurm, assets, shape_b, tmp_path):
    """Shape (b), gvpo-n2 crashes after the first checkpoint (its slurmd and every process on it SIGKILLed): the
    trainer on gvpo-n1 fails at once (gloo sees its peer gone), SLURM finds the node dead within SlurmdTimeout and
    requeues the job (--requeue), and the launcher's output names the node and what ran there. With the node
    back, the job resumes from the last checkpoint and ends where the uninterrupted job of shape (b) ended."""
    run_dir, out = tmp_path / "slurm", tmp_path / "job.out"
    job = submit(slurm, run_dir, out, [*SHAPE_B, *tiny_run(assets), "reward.function=tests.test_slurm:"
                                                                     "response_length_slowly"])
    wait_for("no checkpoint", (run_dir / "checkpoints" / "latest").exists)
    crashed = time.monotonic()
    subprocess.run(["bash", str(TESTBED), "crash", "gvpo-n2"], env=slurm, check=True, capture_output=True)
    wait_for("the launcher did not end", lambda: "launch: trainer exited with status" in out.read_text(),
             timeout_s=180)
    failed_after = time.monotonic() - crashed
    print(f"the launcher reported the crash after {failed_after:.0f} s")  # SlurmdTimeout (30 s), a ping
    first = out.read_text()
    assert "launch: trainer on gvpo-n1 exited with code 1" in first, first
    assert re.search(r"launch: SLURM has node gvpo-n2 \S*DOWN\S*.*; it ran: trainer", first), first
    assert "launch: trainer exited with status 0" not in first
    stopped_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert "step_0000001" <= stopped_at < "step_0000006", "the crash came too late or before any checkpoint"
    wait_for("SLURM did not requeue the job", lambda: job_state(slurm, job) == "PENDING", timeout_s=60)
    up = subprocess.run(["bash", str(TESTBED), "up"], env=slurm, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    start_requeued(slurm, job)
    wait_for("the requeued job did not finish", lambda: job_state(slurm, job) == "COMPLETED"
             and out.read_text().count("launch: trainer exited") == 2)
    assert "launch: trainer exited with status 0" in out.read_text().removeprefix(first)
    assert_same_run(metrics_records(shape_b[0]), metrics_records(run_dir), f"crashed after {stopped_at}")


_REWARD_CALLS = [0]
KILL_AT_CALL = 120
"""In the evaluation after step 2: an evaluation scores 40 samples (8 held-out prompts, greedy and 4 sampled), a
step 32: 40 + 32 + 32 < 120 <= 40 + 32 + 32 + 40."""


def response_length_killing_the_rollout_server(prompt: str, response: str, label) -> float:
    """tests.test_online's response_length; its KILL_AT_CALL-th call SIGKILLs every process of this job's SGLang
    server on gvpo-n2, as a crash or the OOM killer would. The router there stays."""
    import signal

    from tests.test_online import response_length

    _REWARD_CALLS[0] += 1
    if _REWARD_CALLS[0] == KILL_AT_CALL:
        server = {b"SLURMD_NODENAME=gvpo-n2", f"SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}".encode()}
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if server <= set(environ.read_bytes().split(b"\0")) and \
                        b"sglang_router" not in (environ.parent / "cmdline").read_bytes():
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except OSError:  # gone already
                pass
    return response_length(prompt, response, label)


def test_a_dead_rollout_server_is_started_again_through_srun(slurm, assets, shape_a, tmp_path):
    """Shape (a), the SGLang server on gvpo-n2 killed while the evaluation after step 2 is scored: the launcher
    starts it again through srun; step 3's rollout fails, waits for the server to answer, loads the step-2
    weights into it over a new weight-sync group and runs again. The run ends where the uninterrupted job of
    shape (a) ended."""
    run_dir = tmp_path / "slurm"
    output = sbatch(slurm, run_dir, [*SHAPE_A, *tiny_run(assets), "reward.function=tests.test_slurm:"
                                                                  "response_length_killing_the_rollout_server"])
    assert ("launch: sglang-0 on gvpo-n2 was killed by SIGKILL (exit status 137); starting it again (1 of "
            "rollout.max_server_restarts=3)") in output, output
    assert "launch: trainer exited with status 0" in output
    server_log = (run_dir / "logs" / "gvpo-n2.sglang-0.log").read_text()
    assert server_log.count("launch: srun") == 2 and server_log.count("The server is fired up") == 2
    got, want = metrics_records(run_dir), metrics_records(shape_a[0])
    assert [r.get("server_restarts") for r in got] == [None, 0, 0, 1, 1, 1, 1]
    trainer_log = (run_dir / "logs" / "gvpo-n1.trainer.log").read_text()
    assert "restarted the dead SGLang server(s); reloading weights step-2" in trainer_log
    assert_same_run([{k: v for k, v in r.items() if k != "server_restarts"} for r in want],
                    [{k: v for k, v in r.items() if k != "server_restarts"} for r in got], "a server restarted")
