"""Contract of the planner (`python -m megatron_gvpo.plan`): every trainer config in configs/ plans on its own
cluster section; crafted invalid layouts fail with exit status 2 and the reason; the parameter count it builds
its memory and FLOP model on equals Hugging Face transformers' for the same config (an independent count, on
the meta device); and its memory terms follow from that count and the layout."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gvpo.config import Config, load_config
from megatron_gvpo.plan import PlanError, model_params, plan

REPO = Path(__file__).resolve().parents[1]
# configs/ holds trainer configs and one experiment config with its own schema (experiments/tabular.py).
NOT_TRAINER_CONFIGS = {"tabular_optimum.yaml"}
TRAINER_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in NOT_TRAINER_CONFIGS)


def planning_overrides(name: str) -> list[str]:
    """The main job's model is its warm start's output (runs/..., absent in a fresh clone): plan with the
    architecture the warm start trains."""
    if name != "addition_gvpo.yaml":
        return []
    from megatron_gvpo.experiments.warm_start import WarmStartConfig

    return [f"model.path={REPO / WarmStartConfig().model_config}"]


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "megatron_gvpo.plan", *args], cwd=REPO, capture_output=True,
                          text=True)


def test_every_trainer_config_plans():
    assert {"gvpo_70b.yaml", "gvpo_70b_fp8.yaml", "gvpo_8b.yaml", "gvpo_8b_fp8.yaml", "tiny_cpu.yaml",
            "addition_gvpo.yaml"} <= set(TRAINER_CONFIGS)
    for name in TRAINER_CONFIGS:
        result = plan(load_config(Config, REPO / "configs" / name, planning_overrides(name)))
        assert result.trainer_memory_gb["total"] > 0 and result.seconds["step"] > 0, name
    out = run_plan("--config", "configs/gvpo_70b.yaml", "--nodes", "8", "--gpus-per-node", "8")
    assert out.returncode == 0, out.stderr
    for line in ("trainer: nodes 0-3, 32 ranks = TP 8 with sequence parallelism x CP 1 x DP 1 x PP 4",
                 "rollout: 4 SGLang servers x TP 8 on nodes 4-7", "## Memory per trainer GPU", "kv cache",
                 "MFU", "## Weight sync: 141 GB"):
        assert line in out.stdout, line


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=16"], r"parallel.tp \* parallel.cp = 16 exceeds the 8 GPUs of a node"),
    (["parallel.pp=3"], r"32 trainer GPUs .* are not a multiple of parallel.tp \* parallel.pp \* parallel.cp = 24"),
    (["parallel.vpp=3"], r"num_hidden_layers=80 must be divisible by parallel.pp \* parallel.vpp = 12"),
    (["train.micro_batch_size=4"], r"the trainer does not fit: .* GB per GPU"),
    (["parallel.sequence_parallel=false", "train.micro_batch_size=2"], r"the trainer does not fit: .* GB per GPU"),
    (["rollout.server_tp=3"], r"rollout.server_tp=3 must divide cluster.gpus_per_node=8"),
    (["rollout.server_tp=1"], r"an SGLang server with TP 1 does not fit"),
    (["cluster.gpu=TPU-v5"], r"cluster.gpu='TPU-v5' is not in the planner's table"),
    (["train.micro_batch_size=3"], r"train.global_batch_size=128 must be a multiple of train.micro_batch_size \* "
                                   r"DP = 3 \* 1"),
])
def test_invalid_layouts_fail_with_the_reason(overrides, message):
    import re

    with pytest.raises(PlanError, match=message):
        plan(load_config(Config, REPO / "configs/gvpo_70b.yaml", overrides))
    out = run_plan("--config", "configs/gvpo_70b.yaml", "--set", *overrides)
    assert out.returncode == 2 and re.search(message, out.stderr) and "plan: invalid:" in out.stderr, out.stderr


def test_nodes_that_do_not_match_the_layout_fail():
    out = run_plan("--config", "configs/gvpo_70b.yaml", "--nodes", "6")
    assert out.returncode == 2 and "16 trainer GPUs" in out.stderr and "multiple of" in out.stderr, out.stderr


@pytest.mark.parametrize("name", ["llama3_70b", "llama3_8b", "tiny_llama"])
def test_parameter_count_equals_transformers(name):
    import transformers

    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config

    path = REPO / "configs" / "models" / f"{name}.json"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    assert model_params(arch_from_hf(load_hf_config(path))) == sum(p.numel() for p in model.parameters())


def test_memory_terms_follow_from_the_layout():
    """70B at TP 8 x PP 4, bf16, distributed optimizer over DP 1: weights 2 bytes, fp32 gradients 4, Adam 12 per
    parameter of the first stage's shard (20 layers and the embedding, its 128256 rows padded to a multiple of
    128 x TP = 129024, over 8 ranks)."""
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config
    from megatron_gvpo.plan import layer_params

    cfg = load_config(Config, REPO / "configs/gvpo_70b.yaml", [])
    arch = arch_from_hf(load_hf_config(cfg.model.path))
    shard = (20 * layer_params(arch) + 129024 * 8192) / 8
    memory = plan(cfg).trainer_memory_gb
    assert memory["weights"] == pytest.approx(shard * 2 / 1e9)
    assert memory["gradients (fp32)"] == pytest.approx(shard * 4 / 1e9)
    assert memory["optimizer (Adam, fp32)"] == pytest.approx(shard * 12 / 1e9)
    fp8 = plan(load_config(Config, REPO / "configs/gvpo_70b_fp8.yaml", [])).trainer_memory_gb
    assert fp8["weights"] == pytest.approx(memory["weights"] / 2)

    def activations(sequence_parallel, recompute):
        overrides = [f"parallel.sequence_parallel={sequence_parallel}", f"train.recompute={recompute}",
                     "cluster.gpu=H200-SXM-141GB"]  # room for every variant
        return plan(load_config(Config, REPO / "configs/gvpo_70b.yaml", overrides)).trainer_memory_gb["activations"]

    for sp in ("true", "false"):  # full recomputation keeps one input per layer instead of ~a dozen tensors
        assert 4 < activations(sp, "none") / activations(sp, "full") < 15, sp
    # Sequence parallelism splits what TP alone replicates (the norms' and matmuls' inputs); the rest is split by
    # TP either way, so stored activations shrink by less than TP.
    assert activations("false", "none") / 8 < activations("true", "none") < activations("false", "none") / 2
    # Recomputation keeps each layer's input: replicated without sequence parallelism, split over TP with it.
    assert activations("false", "full") / 8 < activations("true", "full") < activations("false", "full") / 4
