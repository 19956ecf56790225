"""Import-only stand-in for `vllm._custom_ops` on CPU machines.

SGLang 0.5.23's RotaryEmbedding.__init__ runs `from vllm._custom_ops import rotary_embedding` on any
platform that is not CUDA/HIP (and SGLANG_USE_CPU_ENGINE is unset), but on `--device cpu` the rope
runs through forward_native and never calls it. That one name is the only attribute touched.
Calling it raises NotImplementedError.

Side effect to know: sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe does
`from vllm import _custom_ops as vllm_ops` in a try/except ImportError; with this stand-in present it
sets `_has_vllm_ops = True`, so its Triton fused-MoE path (GPU-only, never reached on CPU) would get
AttributeError for silu_and_mul / moe_sum instead of its native fallbacks.
"""


def rotary_embedding(*args, **kwargs):
    raise NotImplementedError(
        "vllm._custom_ops.rotary_embedding called, but vllm here is an import-only CPU stand-in "
        "(cpu_stubs/vllm); SGLang's CPU path should use RotaryEmbedding.forward_native"
    )
