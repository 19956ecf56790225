"""Import-only stand-in for `torchvision` on CPU machines (PyPI's torchvision wheels are CUDA builds
that cannot load against torch 2.13.0+cpu).

SGLang 0.5.23 imports torchvision at module level in multimodal code it loads while serving a
text-only model (sglang.srt.configs: internvl_utils, deepseek_ocr), and transformers 5.19, which
takes any importable `torchvision` as available, then imports it too (image_utils,
image_processing_*, video_processing_utils). Those imports touch exactly: `__version__`,
`io.ImageReadMode`, `io.decode_image`, `transforms.InterpolationMode` (members NEAREST_EXACT, BOX,
BILINEAR, HAMMING, BICUBIC, LANCZOS), `transforms.functional.InterpolationMode`,
`transforms.functional.pil_to_tensor`, and the module `transforms.v2.functional`. Nothing here is
called on the text path; any function called raises NotImplementedError, any other name is missing.
Never put this directory on PYTHONPATH where a real torchvision is installed.
"""

# Below every real release: transformers' is_torchvision_greater_or_equal(...) is False, so where it
# has a choice it keeps the PIL image backend.
__version__ = "0.0.0+cpustub"


def _unavailable(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision.{name} called, but torchvision here is an import-only CPU stand-in "
            "(cpu_stubs/torchvision): image/video processing needs a real torchvision build"
        )

    fn.__name__ = fn.__qualname__ = name.rsplit(".", 1)[-1]
    return fn
