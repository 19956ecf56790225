"""Import-only stand-in for `torchvision.io` (see cpu_stubs/torchvision/__init__.py):
decode_image raises NotImplementedError."""
import enum

from torchvision import _unavailable


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = RGB_ALPHA


decode_image = _unavailable("io.decode_image")
