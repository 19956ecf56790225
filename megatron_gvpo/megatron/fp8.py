"""FP8 training through Transformer Engine: the checks that run before any GPU work, the TransformerConfig fields,
and the sequence padding FP8 GEMMs need.

`model.fp8` ('e4m3' or 'hybrid': E4M3 forward, E5M2 gradients) with `model.fp8_recipe`:
    delayed     per-tensor scales from an amax history (the original recipe)
    tensorwise  per-tensor scales from the current tensor ("current scaling"; NVIDIA's Llama-3 70B recipes)
    blockwise   a scale per 128-element block (Hopper and later)
    mxfp8       a power-of-two scale per 32 elements (Blackwell's MXFP8 tensor cores)
and `model.fp8_param_gather` (parameters kept in FP8: the distributed optimizer all-gathers half the bytes).

Megatron-Core builds Transformer Engine's recipe from these TransformerConfig fields itself
(`megatron.core.fp8_utils.get_fp8_recipe`) and runs the TE layer spec's GEMMs under `fp8_autocast`; this module
only decides the fields and refuses configurations that cannot work, naming the reason, before the model is
built: FP8 without Transformer Engine, on a CPU, or on a GPU without FP8 tensor cores for the recipe.
"""

from __future__ import annotations

from typing import Any

# Compute capability each recipe needs: FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0); TE's
# blockwise kernels need Hopper, MXFP8 needs Blackwell (10.0).
MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def check_fp8_support(model, *, use_te: bool, capability: tuple[int, int] | None) -> None:
    """Raise ValueError when `model.fp8` cannot run here. `capability` is the GPU's (major, minor), None
    without a GPU."""
    if not model.fp8:
        return
    recipe = model.fp8_recipe
    if not use_te:
        raise ValueError(
            f"model.fp8={model.fp8!r} runs its GEMMs in Transformer Engine, but the model uses Megatron's local "
            "layer spec (transformer_engine does not import, or model.transformer_impl='local'); use the NGC "
            "PyTorch container (Dockerfile), which ships Transformer Engine, or set model.fp8=''")
    if capability is None:
        raise ValueError(f"model.fp8={model.fp8!r} needs a CUDA GPU with FP8 tensor cores; none is visible here")
    need = MIN_CAPABILITY[recipe]
    if tuple(capability) < need:
        raise ValueError(
            f"model.fp8_recipe={recipe!r} needs compute capability {need[0]}.{need[1]} or later (FP8 tensor "
            f"cores{'; MXFP8 is Blackwell-only' if recipe == 'mxfp8' else ''}), this GPU has "
            f"{capability[0]}.{capability[1]}; use model.fp8='' (bf16){' or another recipe' if need > (8, 9) else ''}")


def fp8_transformer_kwargs(model) -> dict[str, Any]:
    """The TransformerConfig fields for `model.fp8` ({} without FP8)."""
    if not model.fp8:
        return {}
    kwargs: dict[str, Any] = {"fp8": model.fp8, "fp8_recipe": model.fp8_recipe, "fp8_param": model.fp8_param_gather}
    if model.fp8_recipe == "delayed":
        # Megatron-LM's defaults for the delayed recipe: the scale follows the largest amax of the last 1024 steps.
        kwargs.update(fp8_margin=0, fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return kwargs


def fp8_pad_multiple(model) -> int:
    """Every sequence (THD) or micro-batch width (padded rows) is padded to a multiple of this many tokens:
    FP8 GEMMs need 16-aligned token counts, 32 for MXFP8 blocks (Megatron's `get_fp8_align_size`)."""
    if not model.fp8:
        return 1
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return get_fp8_align_size(Fp8Recipe(model.fp8_recipe))


def te_fp8_recipe(transformer_config):
    """Transformer Engine's recipe object as Megatron builds it for `transformer_config` (needs TE)."""
    from megatron.core.fp8_utils import get_fp8_recipe

    return get_fp8_recipe(transformer_config)
