"""megatron_gvpo: GVPO post-training on Megatron-Core with SGLang rollouts.

Map of the package (see README.md):
    algo/         GVPO and baselines as pure tensor functions
    ops/          distributed ops with custom autograd (vocab-parallel log-probs); process groups passed in
    config.py     typed dataclass schema + YAML + `--set` overrides
    experiments/  self-contained experiments (the paper's optimum on tabular problems)
"""

from megatron_gvpo.utils.logging import silence_known_notices

__version__ = "0.1.0"

silence_known_notices()  # in every process of ours, before any library can print them (utils/logging.py)
