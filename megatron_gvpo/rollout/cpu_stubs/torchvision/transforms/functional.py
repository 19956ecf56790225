"""Import-only stand-in for `torchvision.transforms.functional` (see cpu_stubs/torchvision/__init__.py):
pil_to_tensor raises NotImplementedError."""
from torchvision import _unavailable
from torchvision.transforms import InterpolationMode  # noqa: F401  (re-exported, as in torchvision)

pil_to_tensor = _unavailable("transforms.functional.pil_to_tensor")
