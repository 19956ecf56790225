"""megatron_gvpo: GVPO post-training on Megatron-Core with SGLang rollouts.

Map of the package (see README.md):
    algo/         GVPO and baselines as pure tensor functions
    ops/          distributed ops with custom autograd (vocab-parallel log-probs); process groups passed in
    config.py     typed dataclass schema + YAML + `--set` overrides
    experiments/  self-contained experiments (the paper's optimum on tabular problems)
"""

__version__ = "0.1.0"
