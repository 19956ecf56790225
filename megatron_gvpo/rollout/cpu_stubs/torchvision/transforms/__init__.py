"""Import-only stand-in for `torchvision.transforms` (see cpu_stubs/torchvision/__init__.py):
only the InterpolationMode enum."""
import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"
