"""Self-contained experiments that check the algorithm against known answers; each is a `python -m` entry point."""
