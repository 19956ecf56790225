"""Distributed tensor operations with custom autograd: they take their process group as an argument."""

from megatron_gvpo.ops.fused_linear_logprobs import fused_linear_logprobs
from megatron_gvpo.ops.vocab_parallel import DEFAULT_CHUNK_BYTES, vocab_parallel_logprobs

__all__ = ["DEFAULT_CHUNK_BYTES", "fused_linear_logprobs", "vocab_parallel_logprobs"]
