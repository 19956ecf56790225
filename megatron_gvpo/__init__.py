"""megatron_gvpo: GVPO post-training on Megatron-Core with SGLang rollouts.

Map of the package, in its layer order (a module imports only from its layer and the ones below; CONTRIBUTING.md,
checked by tests/test_layout.py):
    experiments/, launch/   the main job and experiments; the cluster launcher
    train.py, plan.py       the training loop; the resource planner
    config.py               the typed schema, assembled from the sections beside their readers, + YAML + `--set`
    rollout/                SGLang servers, rollout producers, weight updates, evaluation, the online source
    megatron/               everything that touches Megatron-Core (model, engine, forward_step, checkpoints, converter)
    rewards/                rewards and their failure policy
    data/                   file formats, prompts and chat templates, groups and the trainer's batch
    models/                 architectures from HF configs, HF <-> Megatron name maps, safetensors
    algo/, ops/             GVPO and baselines as pure tensor functions; distributed ops with custom autograd
    utils/                  logging, files, processes, torch.distributed start-up
"""

from megatron_gvpo.utils.logging import silence_known_notices

__version__ = "0.1.0"

silence_known_notices()  # in every process of ours, before any library can print them (utils/logging.py)
