"""An SGLang server as the launcher starts it on a rollout node: `python -m megatron_gvpo.rollout.serve ARGS`
runs `python -m sglang.launch_server ARGS` in this process (exec), adapted to the node it lands on.

The launcher plans on one machine (a login node, often without a GPU) the commands that run on others, and a dry
run must print exactly what runs. So the command names GPU flags, and this module, on the node itself, decides
what the machine needs. On a node with CUDA: ARGS unchanged. Without (a CPU cluster, the SLURM test bed of
tools/slurm_testbed.sh): SGLang's CPU flags added, seeded sampling by logit processor instead of deterministic
inference, and the CPU environment of `rollout.sglang.server_environment` (the import-only stand-ins, one OpenMP
thread), as the servers the trainer starts itself get them. Either way SGLang's known import notices are
silenced."""

from __future__ import annotations

import os
import sys

DETERMINISTIC_FLAG = "--enable-deterministic-inference"


def adapt(args: list[str], environ: dict[str, str], cuda: bool) -> tuple[list[str], dict[str, str]]:
    """(launch_server's arguments, its environment) on a machine with or without CUDA."""
    from megatron_gvpo.rollout.sglang import CPU_FLAGS, PROCESSOR_SEEDING_FLAGS, server_environment

    seeded_by_processor = not cuda and DETERMINISTIC_FLAG in args
    if not cuda:
        args = [a for a in args if a != DETERMINISTIC_FLAG] + list(CPU_FLAGS)
        if seeded_by_processor:
            args += list(PROCESSOR_SEEDING_FLAGS)
    return args, server_environment(environ, cpu=not cuda, custom_logit_processor=seeded_by_processor)


def main() -> None:
    import torch

    args, env = adapt(sys.argv[1:], dict(os.environ), torch.cuda.is_available())
    argv = [sys.executable, "-m", "sglang.launch_server", *args]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
