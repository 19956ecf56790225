"""Contract of `tools/convert_hf.py` (megatron_gvpo/megatron/convert/).

- Round trip: HF -> import -> the trainer loads it at TP/PP in {1,2} x {1,2} and saves a training checkpoint
  (written by the sharded model) -> export -> HF is bitwise identical, tensor by tensor and in dtype, for
  Llama, Qwen2, Mistral and Qwen3 configs with tied and untied embeddings; HF -> import -> export is bitwise for
  Qwen3-MoE and Mixtral (per-expert tensors), and with or without the kernel's file-to-file copies; transformers
  loads the export, with the tokenizer and a generation config.
- The imported checkpoint's logits equal transformers' on the same weights (the independent oracle) at TP=2,
  PP=2 and TP=2 x PP=2, including a vocabulary padded for another TP than the one loading it.
- Bad input fails with a clear error naming the tensor, file or field, and leaves no output directory.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gvpo.megatron.convert.to_hf import export_hf
from megatron_gvpo.megatron.convert.to_megatron import import_hf
from megatron_gvpo.models.hf_io import SafetensorsCheckpoint
from tests.test_megatron_model import megatron_logits_run, tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
FAMILIES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False), ("mistral", True),
            ("qwen3", False), ("qwen3", True)]


def save_hf(tmp_path: Path, model_type: str, tied: bool, dtype=torch.float32) -> Path:
    """The tiny random HF model of test_megatron_model, saved with a locally built tokenizer."""
    from megatron_gvpo.data import addition

    out = tmp_path / f"hf_{model_type}_{tied}"
    tiny_hf_model(model_type, tied).to(dtype).save_pretrained(out)
    addition.build_tokenizer(out)
    return out


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = SafetensorsCheckpoint(a_dir), SafetensorsCheckpoint(b_dir)
    # A tied model may ship lm_head.weight; the export writes what the config needs.
    assert set(b) == set(a) - ({"lm_head.weight"} - set(b))
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def train_layout_checkpoint_run(hf_dir, megatron_dir, out_dir, tp, pp, layout=()):
    """Load the imported checkpoint into the trainer's engine at TP x PP (and `layout`'s overrides) and save a
    training checkpoint."""
    from megatron_gvpo.config import Config, config_from_dict
    from megatron_gvpo.megatron.checkpoint import save_checkpoint
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config
    from megatron_gvpo.train import build_engine
    from tests.gloo_pool import checkpoint_helpers_allowed

    apply_cpu_compat()
    cfg = config_from_dict(Config, {}, [
        f"model.path={hf_dir}", f"model.load={megatron_dir}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        "model.seq_length=16", "algo.group_size=2", "train.global_batch_size=4", "train.micro_batch_size=2",
        *layout,
    ])
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    try:
        engine = build_engine(cfg, arch_from_hf(load_hf_config(hf_dir)), ctx, None)
        with checkpoint_helpers_allowed():
            return str(save_checkpoint(engine, out_dir, 0, {}))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("model_type, tied", FAMILIES)
def test_round_trip_through_a_training_layout_is_bitwise(gloo, tmp_path, model_type, tied, tp, pp):
    hf_dir = save_hf(tmp_path, model_type, tied)
    summary = import_hf(hf_dir, tmp_path / "megatron", tp=tp, pp=pp, progress=False)
    assert summary.tensors > 0 and summary.bytes > 0
    ckpt = gloo.run(tp * pp, train_layout_checkpoint_run, str(hf_dir), str(tmp_path / "megatron"),
                    str(tmp_path / "run"), tp, pp)[0]
    export_hf(ckpt, tmp_path / "export", max_shard_bytes=64 * 1024, progress=False)
    assert_same_tensors(hf_dir, tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SafetensorsCheckpoint(tmp_path / "export"))
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "export" / name).is_file(), name


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_round_trip_is_bitwise(tmp_path, model_type):
    # save_pretrained writes one tensor per expert (transformers fuses them only in memory), as on the hub.
    hf_dir = save_hf(tmp_path, model_type, False)
    assert any(".experts.3." in name for name in SafetensorsCheckpoint(hf_dir))
    import_hf(hf_dir, tmp_path / "megatron", tp=2, progress=False)
    export_hf(tmp_path / "megatron", tmp_path / "export", max_shard_bytes=64 * 1024, progress=False)
    assert_same_tensors(hf_dir, tmp_path / "export")


@pytest.mark.parametrize("model_type, ep, layout", [
    ("qwen3_moe", 2, ["parallel.ep=2"]),
    ("mixtral", 2, ["parallel.sequence_parallel=true", "parallel.ep=2", "parallel.etp=1"]),
])
def test_moe_through_an_expert_parallel_training_layout(gloo, tmp_path, model_type, ep, layout):
    """Imported with --ep, loaded by the trainer with its experts split over EP ranks (logits equal
    transformers'), saved as a training checkpoint and exported: bitwise the original."""
    hf_dir = save_hf(tmp_path, model_type, False)
    tp = 2 if "parallel.sequence_parallel=true" in layout else 1
    import_hf(hf_dir, tmp_path / "megatron", tp=tp, ep=ep, progress=False)
    diffs = gloo.run(2, megatron_logits_run, model_type, False, tp, 1, str(tmp_path / "megatron"), ep,
                     1 if tp > 1 else None)
    assert max(diffs) < 1e-4
    ckpt = gloo.run(2, train_layout_checkpoint_run, str(hf_dir), str(tmp_path / "megatron"), str(tmp_path / "run"),
                    tp, 1, layout)[0]
    export_hf(ckpt, tmp_path / "export", max_shard_bytes=64 * 1024, progress=False)
    assert_same_tensors(hf_dir, tmp_path / "export")


def test_export_without_kernel_copies_is_the_same(tmp_path, monkeypatch):
    """Export copies stored bytes file to file with os.copy_file_range; where the kernel refuses (another file
    system), it reads and writes them instead, with the same result."""
    import errno
    import os

    hf_dir = save_hf(tmp_path, "qwen3", False)
    import_hf(hf_dir, tmp_path / "megatron", progress=False)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    export_hf(tmp_path / "megatron", tmp_path / "export", max_shard_bytes=64 * 1024, progress=False)
    assert len(calls) == 1  # refused once, not asked again
    assert_same_tensors(hf_dir, tmp_path / "export")


def test_export_copies_imported_tensors_without_loading_them(tmp_path, monkeypatch):
    """Export recognises the tensors the import stored (fp32 and bf16 alike) from their archives' index and
    pickle alone and copies their bytes: torch.load, the way for anything else, is never called."""
    hf_dirs = [save_hf(tmp_path / "fp32", "qwen3_moe", False),
               save_hf(tmp_path / "bf16", "qwen3", True, torch.bfloat16)]
    for hf_dir in hf_dirs:
        import_hf(hf_dir, hf_dir.parent / "megatron", progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    for hf_dir in hf_dirs:
        export_hf(hf_dir.parent / "megatron", hf_dir.parent / "export", progress=False)
        assert_same_tensors(hf_dir, hf_dir.parent / "export")


def test_output_is_written_back_while_it_is_written(tmp_path, monkeypatch):
    """Both directions have the disk write their files as they grow (utils.files.start_writeback), not only
    in the flush before publishing; the output is the same, and the garbage collector is left as it was."""
    import gc

    from megatron_gvpo.utils import files

    started = []
    real = files.start_writeback

    def start_writeback(fd: int, offset: int = 0) -> None:
        started.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd, offset)

    monkeypatch.setattr(files, "WRITEBACK_EVERY", 4096)
    monkeypatch.setattr(files, "start_writeback", start_writeback)
    hf_dir = save_hf(tmp_path, "qwen3_moe", False)
    import_hf(hf_dir, tmp_path / "megatron", progress=False)
    assert "__0_0.distcp" in started  # the tensors' file (the metadata's, written after, may be there too)
    started.clear()
    export_hf(tmp_path / "megatron", tmp_path / "export", max_shard_bytes=64 * 1024, progress=False)
    written = set(started)
    assert written == {f.name for f in (tmp_path / "export").glob("*.safetensors")} and len(written) > 1
    assert_same_tensors(hf_dir, tmp_path / "export")
    assert gc.get_freeze_count() == 0


def test_export_loads_in_transformers_with_the_same_logits_and_converts_dtype(tmp_path):
    import transformers

    hf_dir = save_hf(tmp_path, "qwen2", False)
    import_hf(hf_dir, tmp_path / "megatron", progress=False)
    export_hf(tmp_path / "megatron", tmp_path / "export", progress=False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    want = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(ids).logits
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()(ids).logits
    assert torch.equal(got, want)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.decode(tok.encode("12+34=", add_special_tokens=False)) == "12+34="
    # --dtype converts on the way out (and on the way in); bf16 there and back is exact from bf16.
    export_hf(tmp_path / "megatron", tmp_path / "bf16", dtype="bf16", progress=False)
    bf16 = SafetensorsCheckpoint(tmp_path / "bf16")
    assert all(bf16[n].dtype == torch.bfloat16 for n in bf16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import_hf(tmp_path / "bf16", tmp_path / "megatron_bf16", progress=False)
    export_hf(tmp_path / "megatron_bf16", tmp_path / "bf16_again", progress=False)
    assert_same_tensors(tmp_path / "bf16", tmp_path / "bf16_again")


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("model_type, tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_imported_checkpoint_logits_equal_transformers(gloo, tmp_path, model_type, tied, tp, pp):
    # Imported with the padding of TP=1 (128 rows), loaded at TP=2 (256 rows) too.
    hf_dir = save_hf(tmp_path, model_type, tied)
    import_hf(hf_dir, tmp_path / "megatron", tp=1, progress=False)
    diffs = gloo.run(tp * pp, megatron_logits_run, model_type, tied, tp, pp, str(tmp_path / "megatron"))
    last_stage = [d for d in diffs if d is not None]
    assert len(last_stage) == tp and max(last_stage) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def _rewrite_weights(hf_dir: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = hf_dir / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _no_output(tmp_path: Path, name: str) -> bool:
    return not (tmp_path / name).exists() and not (tmp_path / f"{name}.tmp").exists()


def test_bad_input_fails_naming_what_is_wrong_and_leaves_nothing(tmp_path):
    hf_dir = save_hf(tmp_path, "llama", False)
    out = tmp_path / "out"
    cases = []

    bad = tmp_path / "missing"
    shutil.copytree(hf_dir, bad)
    _rewrite_weights(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    cases.append((bad, {}, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"))

    bad = tmp_path / "extra"
    shutil.copytree(hf_dir, bad)
    _rewrite_weights(bad, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    cases.append((bad, {}, r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"))

    bad = tmp_path / "shape"
    shutil.copytree(hf_dir, bad)
    _rewrite_weights(bad, lambda t: t.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(64, 95)}))
    cases.append((bad, {}, r"model\.layers\.2\.mlp\.down_proj\.weight give decoder\.layers\.2\.mlp\.linear_fc2"
                           r"\.weight of shape \(64, 95\), the config \(llama\) needs \(64, 96\)"))

    bad = tmp_path / "gpt2"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    cases.append((bad, {}, r"model_type='gpt2' is not supported"))

    cases.append((hf_dir, {"tp": 3}, r"parallel\.tp=3 must divide num_attention_heads=4"))
    cases.append((hf_dir, {"pp": 3}, r"num_hidden_layers=4 must be divisible by parallel\.pp \* parallel\.vpp = 3"))
    cases.append((tmp_path / "nowhere", {}, r"nowhere' does not exist"))
    for source, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            import_hf(source, out, progress=False, **kwargs)
        assert _no_output(tmp_path, "out"), source

    with pytest.raises(ValueError, match=r"no hf/config\.json"):
        export_hf(hf_dir, out, progress=False)
    assert _no_output(tmp_path, "out")


def test_existing_output_needs_force_and_an_interrupted_run_leaves_the_old_one(tmp_path):
    hf_dir = save_hf(tmp_path, "llama", False)
    out = tmp_path / "megatron"
    import_hf(hf_dir, out, progress=False)
    with pytest.raises(ValueError, match="exists; pass --force"):
        import_hf(hf_dir, out, progress=False)
    # A run that fails half-way (a tensor of the last layer is corrupt) leaves the previous output untouched.
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    _rewrite_weights(bad, lambda t: t.update({"model.layers.3.mlp.down_proj.weight": torch.zeros(64, 95)}))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="shape mismatch"):
        import_hf(bad, out, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "megatron.tmp").exists()
    import_hf(hf_dir, out, force=True, progress=False)


def test_command_line(tmp_path):
    hf_dir = save_hf(tmp_path, "mistral", False)
    tool = [sys.executable, str(REPO / "tools" / "convert_hf.py")]
    run = subprocess.run(tool + ["import", "--hf", str(hf_dir), "--out", str(tmp_path / "m"), "--tp", "2",
                                 "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"import -> {tmp_path / 'm'}: ") and "tensors" in run.stdout
    run = subprocess.run(tool + ["export", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "e"),
                                 "--max-shard-size", "100KB", "--no-progress"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "e").glob("model-*-of-*.safetensors"))) > 1
    assert_same_tensors(hf_dir, tmp_path / "e")
    run = subprocess.run(tool + ["import", "--hf", str(hf_dir), "--out", str(tmp_path / "m"), "--no-progress"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "error: output directory" in run.stderr and "--force" in run.stderr
