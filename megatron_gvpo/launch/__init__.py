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

Modules. `commands`: the plan, functions without side effects from the allocation to the commands
(`expand_nodelist`, `build_plan`, `wrap`, `render_plan`), which the dry run and tests/test_launch.py exercise.
`runner`: `run` starts the plan's processes, supervises them, forwards signals and reports failures. `cli`:
`main`, the command line (`__main__` runs it), which reads the config, runs the planner and then prints the plan
or runs it. Only `main` and `run` start processes or write files. Module-level imports are the standard library
and these modules only (the host side of the container case); the config's and the servers' modules are
imported inside the functions that use them.
"""
