#!/usr/bin/env bash
# GVPO on a Llama-3-70B-class model, 8 nodes x 8 GPUs: configs/gvpo_70b.yaml's cluster: section says which nodes
# train and which serve SGLang rollouts. Submit from the repository root (launch/README.md):
#
#   sbatch launch/gvpo_70b.sh [--set key=value ...]
#   DRY_RUN=1 sbatch launch/gvpo_70b.sh       # each node's role and commands in the job's output; runs nothing
#
#SBATCH --job-name=gvpo_70b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Thin on purpose: environment in, `python -m megatron_gvpo.launch` out. The roles, the exact commands, the
# checks (config against allocation, then `python -m megatron_gvpo.plan`), waiting for the servers and signal
# forwarding are in megatron_gvpo/launch/. Environment (all optional):
#   CONFIG                  the run's config (default configs/gvpo_70b.yaml)
#   GVPO_RUN_DIR            replaces the config's run.dir; logs: $GVPO_RUN_DIR/logs/<host>.<role>.log. Keep it
#                           the same across submissions: runs resume from the newest checkpoint there
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME
#                           network interface of NCCL and gloo; unset, they choose one (the plan says so)
#   MASTER_PORT             the trainer's rendezvous port (default 29500)
#   CONTAINER_IMAGE         run every command in this image with pyxis (srun --container-image), e.g. the
#                           Dockerfile's image; CONTAINER_MOUNTS (default: this directory). srun does not exist
#                           inside a pyxis container, so the launcher stays on the host, where it needs only
#                           the standard library of PYTHON
#   PYTHON                  the launcher's interpreter, which runs every node's commands too (default: .venv/bin/python
#                           where tools/setup_venv.sh made it, else python3)
#   DRY_RUN=1               pass --dry-run
#
# Pre-emption and the time limit: SLURM sends SIGUSR1 300 s ahead to this batch shell, and `exec` makes the
# launcher that shell, so no trap is needed: the launcher forwards SIGUSR1 to the trainer, which checkpoints
# and stops (SIGTERM SLURM sends to the trainer's job step itself). --requeue brings a pre-empted job back and
# the trainer resumes from the newest checkpoint in run.dir; after the time limit, submit the same command again.
set -euo pipefail

CONFIG=${CONFIG:-configs/gvpo_70b.yaml}
args=(--config "$CONFIG")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    args+=(--dry-run)
fi
if [[ -z ${PYTHON:-} ]]; then  # the repository's environment (tools/setup_venv.sh) where there is one
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m megatron_gvpo.launch "${args[@]}" "$@"
