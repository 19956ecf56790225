"""Megatron-Core integration: the only package that touches megatron.core."""

import warnings

# Megatron-Core announces at import, once per module and per rank, each fused kernel it falls back from when
# Transformer Engine and Apex are absent (eight lines per process on CPU). Which layer implementation a run
# uses is decided and reported by model.transformer_impl (megatron/model.py), so these notices are noise;
# every other warning still shows.
for _notice in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)
