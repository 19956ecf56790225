"""Distributed tensor operations with custom autograd: they take their process group as an argument."""

from megatron_gvpo.ops.vocab_parallel import DEFAULT_CHUNK_BYTES, vocab_parallel_logprobs

__all__ = ["DEFAULT_CHUNK_BYTES", "vocab_parallel_logprobs"]
