"""Import-only stand-in for `torchvision.transforms.v2.functional` (see cpu_stubs/torchvision/__init__.py):
empty, only imported."""
