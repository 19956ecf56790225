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
            "addition_gvpo.yaml", "gvpo_qwen3_30b_a3b.yaml", "gvpo_qwen3_235b_a22b.yaml"} <= set(TRAINER_CONFIGS)
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


@pytest.mark.parametrize("name", ["llama3_70b", "llama3_8b", "tiny_llama", "qwen3_30b_a3b", "qwen3_235b_a22b"])
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


# ------------------------------------------------------------------------------------------------------------
# Mixture of experts

MOE_CONFIGS = {"gvpo_qwen3_30b_a3b.yaml": (30.5e9, 3.3e9), "gvpo_qwen3_235b_a22b.yaml": (235e9, 22e9)}
"""Total and activated parameters from Qwen's model cards."""


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_moe_configs_plan_with_published_parameter_counts(name):
    out = run_plan("--config", f"configs/{name}")
    assert out.returncode == 0, out.stderr
    for line in ("## Mixture of experts: 128 experts, top 8", "expert Adam (fp32)", "token dispatch (alltoall)",
                 "all-to-all", "assumed: balanced routing"):
        assert line in out.stdout, line
    result = plan(load_config(Config, REPO / "configs" / name))
    total, active = MOE_CONFIGS[name]
    assert result.params["total"] == pytest.approx(total, rel=0.02)
    assert result.params["active"] == pytest.approx(active, rel=0.03)
    assert result.trainer_memory_gb["total"] < 80 and result.experts["train_s"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["parallel.ep=3"], r"parallel.ep=3 must divide the 128 experts"),
    (["parallel.etp=5"], r"parallel.etp=5 \(default: tp\) must divide moe_intermediate_size=768"),
    (["parallel.ep=64"], r"parallel.etp \* parallel.ep = 1 \* 64 must divide the 16 ranks of a pipeline stage"),
    (["parallel.ep=16", "parallel.etp=2"], r"parallel.etp \* parallel.ep = 2 \* 16 must divide the 16 ranks"),
    (["parallel.sequence_parallel=false"],
     r"mixture-of-experts model at parallel.tp=4 needs parallel.sequence_parallel"),
    (["cluster.nodes=3"], r"the trainer does not fit: .* raise parallel.tp/pp/ep"),
])
def test_invalid_expert_layouts_fail_with_the_reason(overrides, message):
    import re

    with pytest.raises(PlanError, match=message):
        plan(load_config(Config, REPO / "configs/gvpo_qwen3_30b_a3b.yaml", overrides))
    out = run_plan("--config", "configs/gvpo_qwen3_30b_a3b.yaml", "--set", *overrides)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr


def test_expert_memory_follows_the_expert_layout():
    """Qwen3-30B-A3B on 16 trainer GPUs (TP 4 x DP 4): each of the 48 MoE layers' 128 experts (3 x 2048 x 768
    parameters) split over EP ranks; the distributed optimizer shards their Adam state over expert DP =
    16 / EP, so that part stays when EP doubles, while weights and gradients halve. The dense part does not
    change, and a dense layer count (an mlp_only layer) is never an expert's."""
    from megatron_gvpo.plan import expert_layer_params, layer_params

    def memory(*overrides):
        return plan(load_config(Config, REPO / "configs/gvpo_qwen3_30b_a3b.yaml", overrides)).trainer_memory_gb

    experts = 48 * 128 * 3 * 2048 * 768
    ep8, ep16 = memory(), memory("parallel.ep=16")
    assert ep8["expert weights"] == pytest.approx(experts / 8 * 2 / 1e9)
    assert ep8["expert grads (fp32)"] == pytest.approx(experts / 8 * 4 / 1e9)
    assert ep8["expert Adam (fp32)"] == pytest.approx(experts / 8 * 12 / 2 / 1e9)
    for key in ("expert weights", "expert grads (fp32)"):
        assert ep16[key] == pytest.approx(ep8[key] / 2), key
    assert ep16["expert Adam (fp32)"] == pytest.approx(ep8["expert Adam (fp32)"])
    for key in ("weights", "gradients (fp32)", "optimizer (Adam, fp32)"):
        assert ep16[key] == pytest.approx(ep8[key]), key
    # Without the distributed optimizer every expert rank keeps its experts' whole Adam state: all halves.
    replicated = [memory("train.distributed_optimizer=false", "cluster.gpu=H200-SXM-141GB", *ep)
                  for ep in ([], ["parallel.ep=16"])]
    expert_total = [sum(v for k, v in m.items() if k.startswith("expert")) for m in replicated]
    assert expert_total[1] == pytest.approx(expert_total[0] / 2)

    from dataclasses import replace

    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config

    arch = arch_from_hf(load_hf_config(REPO / "configs/models/qwen3_30b_a3b.json"))
    dense_first = replace(arch, moe_layers=(False,) + arch.moe_layers[1:])
    assert expert_layer_params(dense_first, 0) == 0 and expert_layer_params(dense_first, 1) == experts // 48
    assert layer_params(dense_first, 0) < layer_params(dense_first, 1)


def test_alltoall_crosses_the_network_when_the_ep_group_leaves_the_node():
    """The EP group is etp * ep consecutive ranks: inside a node of 8 the dispatch runs over NVLink; at EP 16 half
    of each rank's peers are on the other node, behind a NIC 9x slower than NVLink, for the same bytes."""
    def experts(*overrides):
        return plan(load_config(Config, REPO / "configs/gvpo_qwen3_30b_a3b.yaml", overrides)).experts

    inside, across = experts(), experts("parallel.ep=16")
    tokens = 4096 // 4  # a micro-batch's tokens on one rank: sequence parallelism splits them over TP 4
    assert inside["transfer_mb"] == pytest.approx(tokens * 8 * 2048 * 2 * 7 / 8 / 1e6)
    assert across["transfer_ms"] > 4 * inside["transfer_ms"]
    dense = plan(load_config(Config, REPO / "configs/gvpo_70b.yaml"))
    assert dense.experts == {} and dense.params["total"] == dense.params["active"]
