"""Contract of FP8 configuration (megatron_gvpo/megatron/fp8.py, checked on CPU; the GEMMs themselves need TE
and an FP8 GPU): config errors name the fields; asking for FP8 without Transformer Engine, without a GPU or on
a GPU without FP8 tensor cores for the recipe fails before any model is built, with the reason; the
TransformerConfig fields are what Megatron expects for each recipe, and Megatron accepts them; where TE imports,
Megatron builds TE's recipe object from them; `train` refuses FP8 here before it builds anything."""

from pathlib import Path

import pytest
import torch

from megatron_gvpo.config import Config, config_from_dict
from megatron_gvpo.megatron.config import ModelConfig
from megatron_gvpo.megatron.fp8 import check_fp8_support, fp8_transformer_kwargs, te_fp8_recipe
from megatron_gvpo.megatron.model import te_available, transformer_config

REPO = Path(__file__).resolve().parents[1]
FP8 = ["model.dtype=bfloat16", "model.fp8=hybrid"]


@pytest.mark.parametrize("overrides, message", [
    (["model.fp8=e4m3"], r"model\.fp8='e4m3' needs model\.dtype='bfloat16' \(got 'float32'\)"),
    ([*FP8, "model.transformer_impl=local"], r"Transformer Engine layers \(model\.transformer_impl is 'local'\)"),
    (["model.fp8_param_gather=true"], r"model\.fp8_param_gather needs model\.fp8"),
    ([*FP8, "model.fp8_param_gather=true"], r"set train\.distributed_optimizer=true"),
    ([*FP8, "model.fp8_recipe=nvfp4"], r"model\.fp8_recipe must be one of \['delayed', 'tensorwise'"),
])
def test_config_errors_name_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(Config, {}, overrides)


def test_support_is_checked_before_any_gpu_work():
    model = ModelConfig(dtype="bfloat16", fp8="hybrid", fp8_recipe="tensorwise")
    check_fp8_support(ModelConfig(), use_te=False, capability=None)  # bf16/fp32 runs anywhere
    with pytest.raises(ValueError, match=r"local layer spec .* NGC PyTorch container"):
        check_fp8_support(model, use_te=False, capability=(9, 0))
    with pytest.raises(ValueError, match=r"needs a CUDA GPU with FP8 tensor cores; none is visible"):
        check_fp8_support(model, use_te=True, capability=None)
    with pytest.raises(ValueError, match=r"'tensorwise' needs compute capability 8\.9 .* this GPU has 8\.0"):
        check_fp8_support(model, use_te=True, capability=(8, 0))  # A100
    check_fp8_support(model, use_te=True, capability=(9, 0))  # H100
    blockwise = ModelConfig(dtype="bfloat16", fp8="e4m3", fp8_recipe="blockwise")
    with pytest.raises(ValueError, match=r"'blockwise' needs compute capability 9\.0 .* has 8\.9"):
        check_fp8_support(blockwise, use_te=True, capability=(8, 9))  # L40S
    mxfp8 = ModelConfig(dtype="bfloat16", fp8="e4m3", fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match=r"MXFP8 is Blackwell-only.* has 9\.0"):
        check_fp8_support(mxfp8, use_te=True, capability=(9, 0))
    check_fp8_support(mxfp8, use_te=True, capability=(10, 0))  # B200


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_transformer_config_fields_per_recipe(recipe):
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config

    model = ModelConfig(dtype="bfloat16", fp8="hybrid", fp8_recipe=recipe, fp8_param_gather=True)
    kwargs = fp8_transformer_kwargs(model)
    assert {k: kwargs[k] for k in ("fp8", "fp8_recipe", "fp8_param")} == {"fp8": "hybrid", "fp8_recipe": recipe,
                                                                        "fp8_param": True}
    assert ("fp8_amax_history_len" in kwargs) == (recipe == "delayed")
    assert fp8_transformer_kwargs(ModelConfig()) == {}
    arch = arch_from_hf(load_hf_config(REPO / "configs/models/tiny_llama.json"))
    config = transformer_config(arch, params_dtype=torch.bfloat16, **kwargs)  # Megatron's own validation
    assert (config.fp8, config.fp8_recipe, config.fp8_param) == ("hybrid", recipe, True)
    if te_available():  # GPU machines: Megatron turns the fields into Transformer Engine's recipe object
        import transformer_engine.common.recipe as te_recipe

        want = {"delayed": te_recipe.DelayedScaling, "tensorwise": te_recipe.Float8CurrentScaling,
                "blockwise": te_recipe.Float8BlockScaling, "mxfp8": te_recipe.MXFP8BlockScaling}[recipe]
        assert isinstance(te_fp8_recipe(config), want)


def refuse_fp8_run(tmp_path):
    from megatron_gvpo.train import main

    main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--set", f"run.dir={tmp_path}", *FP8, "train.steps=1",
          "model.tokenizer="])  # none: the paths are checked first, and tiny_cpu.yaml's may not have been made


def test_training_with_fp8_where_it_cannot_run_fails_before_building(gloo, tmp_path):
    """On this CPU machine: Transformer Engine does not import, so the error names it (on a GPU without FP8
    tensor cores the same check names the compute capability)."""
    if te_available() and torch.cuda.is_available():
        pytest.skip("this machine can run FP8")
    with pytest.raises(Exception, match=r"model.fp8='hybrid' runs its GEMMs in Transformer Engine"):
        gloo.run(1, refuse_fp8_run, tmp_path)
