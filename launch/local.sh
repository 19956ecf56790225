#!/usr/bin/env bash
# GVPO on this machine alone, without SLURM: the launcher of launch/gvpo_70b.sh with --local, which takes this
# host as a one-node allocation and runs each command with bash instead of srun. From the repository root:
#
#   launch/local.sh [--set key=value ...]
#   DRY_RUN=1 launch/local.sh                 # the role and commands; runs nothing
#
# --local makes this machine the whole cluster (cluster.nodes=1, cluster.rollout_nodes=0: the trainer starts its
# own SGLang servers on its GPUs); cluster.gpus_per_node is the number of trainer processes, e.g. on a CPU:
#   CONFIG=configs/addition_gvpo.yaml launch/local.sh --set cluster.gpus_per_node=1
# Environment (all optional): CONFIG (default configs/gvpo_8b.yaml), GVPO_RUN_DIR, MASTER_PORT, PYTHON and
# DRY_RUN=1, as in launch/gvpo_70b.sh.
set -euo pipefail

CONFIG=${CONFIG:-configs/gvpo_8b.yaml}
args=(--local --config "$CONFIG")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    args+=(--dry-run)
fi
if [[ -z ${PYTHON:-} ]]; then  # the repository's environment (tools/setup_venv.sh) where there is one
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m megatron_gvpo.launch "${args[@]}" "$@"
