"""Patches to SGLang 0.5.23 for its CPU path, applied in every process of a CPU server (README.md here).

Python imports `sitecustomize` at start-up from the first directory of sys.path that has one; this directory is on
the PYTHONPATH of SGLang servers only on machines without CUDA (`megatron_gvpo.rollout.sglang.SGLangServer`),
so nothing here runs beside a GPU. Each patch waits for the module it mends to be imported and then changes one
attribute of it, so a process that never imports that module is untouched.

Patches:
- `sglang.srt.mem_cache.pool_host.common.ALLOC_MEMORY_FUNCS["cpu"]`: `--enable-return-routed-experts` records the
  routed experts in a host buffer that SGLang allocates pinned and registers with `cudaHostRegister` (for fast
  copies from the GPU), which raises "Torch not compiled with CUDA enabled" on a CPU build. With `--device cpu`
  the recording buffer is already in host memory: a plain CPU tensor is what the registered one stands in for.
"""

import importlib.abc
import sys


def _host_alloc_without_cuda(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
    import torch

    return torch.zeros(dims, dtype=dtype, device="cpu")


def _patch_host_alloc(module) -> None:
    module.ALLOC_MEMORY_FUNCS["cpu"] = _host_alloc_without_cuda


_PATCHES = {"sglang.srt.mem_cache.pool_host.common": _patch_host_alloc}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the other finders and runs their patch right after the module executes."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_patch(module, exec_module=exec_module):
                    exec_module(module)
                    _PATCHES[module.__name__](module)

                spec.loader.exec_module = exec_then_patch
                return spec
        return None


sys.meta_path.insert(0, _PatchAfterImport())
