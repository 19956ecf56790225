"""Rollout engines: grouped sampling for GVPO (the interface in `base`, SGLang in `sglang`)."""
