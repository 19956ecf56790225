"""The launcher's command line (`python -m megatron_gvpo.launch`, package docstring): the allocation and the
config in; the dry run, the plan as JSON, or `runner.run` out.

Kept out of commands.py because it reads the config, which needs the project's dependencies (imported inside
`make_plan`), and runs the planner; with a container it gets the plan from `launch --json` inside the image.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from megatron_gvpo import launch
from megatron_gvpo.launch.commands import (
    DEFAULT_ENV,
    INTERFACE_VARS,
    Allocation,
    Container,
    Plan,
    Process,
    allocation_from_env,
    build_plan,
    container_from_env,
    local_allocation,
    render_plan,
    wrap,
)
from megatron_gvpo.launch.runner import run


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
    # prog: argparse would name the package's __main__.py; usage and errors read as they always have.
    parser = argparse.ArgumentParser(prog="launch.py", description=launch.__doc__.split("\n\n")[0])
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
