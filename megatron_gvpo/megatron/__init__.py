"""Megatron-Core integration: the only package that touches megatron.core."""
