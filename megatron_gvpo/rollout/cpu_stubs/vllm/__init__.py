"""Import-only stand-in for the `vllm` package on CPU machines: only `vllm._custom_ops` exists (see there)."""
