"""The planner's memory estimate (`megatron_gvpo.plan`) against the measured peak of the same training on CPU.

What it measures: configs/tiny_cpu.yaml (and wider / longer variants of it, so one lucky point proves nothing),
one process; the tensor-parallel variants in two, each measured, the larger peak reported. PyTorch's profiler
with `profile_memory` records every tensor allocation and free with its address, from before the engine is
built through the forward-only log-prob pass and the optimizer steps of the first rollout step (which also
allocate Adam's state); the running sum of the live blocks is the process's tensor memory over time, and its
maximum the measured peak. The profiler records only the frees of the threads it profiles, and gloo's worker
threads free the buffers of asynchronous collectives (sequence parallelism's all-gathers and reduce-scatters):
a block whose address is allocated again must have been freed in between, so it is counted as freed there, at
the latest (an upper bound on the peak). The estimate is the planner's total for the same config on
`cluster.gpu: cpu` (no reserve: there is no CUDA context). Goal: within 20%.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_memory.py    # ~1 min; writes benchmarks/results/...
"""

from __future__ import annotations

import datetime
import json
import socket
import tempfile
from pathlib import Path

from _common import REPO_ROOT, RESULTS, publish

DEFAULT_OUT = RESULTS / "plan_memory.md"

VARIANTS = {
    "tiny_cpu.yaml as shipped": [],
    "micro-batches of 32": ["train.micro_batch_size=32", "train.global_batch_size=64"],
    "sequences of 64 tokens": ["model.seq_length=64", "data.max_response_tokens=40"],
    "wider model (d=512, 8 layers)": ["model.path={assets}/wide.json"],
    "full recomputation": ["train.recompute=full"],
    # Two processes (gloo), each measured; the larger peak is reported.
    "TP 2, micro-batches of 32": ["parallel.tp=2", "cluster.gpus_per_node=2", "train.micro_batch_size=32",
                                  "train.global_batch_size=64"],
    "TP 2 with sequence parallelism, micro-batches of 32": [
        "parallel.tp=2", "parallel.sequence_parallel=true", "cluster.gpus_per_node=2", "train.micro_batch_size=32",
        "train.global_batch_size=64"],
}


def measured_peak(cfg) -> float:
    """Peak tensor bytes of building the engine and running one rollout step (module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_gvpo.megatron.parallel import destroy_parallel
    from megatron_gvpo.train import OfflineSource, build, mini_batches

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine, arch, tokenizer = build(cfg)
        batch, _ = OfflineSource(cfg, arch, tokenizer).next_batch()
        batch["ref_seq_logp"] = engine.sequence_logprobs(batch)
        for mb in mini_batches(batch, cfg.train.optimizer_steps_per_rollout):
            engine.train_step(mb)
    destroy_parallel()
    del engine
    torch.distributed.destroy_process_group()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")  # the only export that keeps each block's address
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    blocks = sorted((e["ts"], e["args"]["Ev Idx"], e["args"]["Addr"], e["args"]["Bytes"])
                    for e in trace if e.get("name") == "[memory]")
    live: dict[int, int] = {}
    current = peak = 0
    for _, _, addr, nbytes in blocks:
        if addr in live:  # freed (by this thread: nbytes < 0; unrecorded, by another: reallocated)
            current -= live.pop(addr)
        if nbytes > 0:
            live[addr] = nbytes
            current += nbytes
            peak = max(peak, current)
    return peak


def _rank_peak(rank: int, world: int, port: int, cfg, peaks) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    peaks[rank] = measured_peak(cfg)


def peak_over_ranks(cfg) -> float:
    """`measured_peak` in each of the config's processes (one per parallel rank); the largest."""
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp == 1:
        return measured_peak(cfg)
    import torch.multiprocessing as mp

    from megatron_gvpo.utils.distributed import free_port

    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    with mp.Manager() as manager:
        peaks = manager.dict()
        mp.spawn(_rank_peak, args=(world, free_port(), cfg, peaks), nprocs=world)
        return max(peaks.values())


def main() -> None:

    from megatron_gvpo.config import Config, load_config
    from megatron_gvpo.data.addition import make_tiny_assets
    from megatron_gvpo.plan import plan

    work = Path(tempfile.mkdtemp(prefix="plan_memory_"))
    make_tiny_assets(work, train_prompts=256, heldout_prompts=8)
    wide = json.loads((REPO_ROOT / "configs/models/tiny_llama.json").read_text())
    wide.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64)
    (work / "wide.json").write_text(json.dumps(wide))
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = load_config(Config, REPO_ROOT / "configs/tiny_cpu.yaml", [
            f"run.dir={work / 'run'}", f"model.tokenizer={work / 'tokenizer'}", f"data.path={work / 'train.jsonl'}",
            "run.resume=false", *(o.format(assets=work) for o in overrides)])
        estimate = plan(cfg).trainer_memory_gb
        peak = peak_over_ranks(cfg) / 1e9
        rows.append((name, estimate, peak))
        print(f"{name}: estimate {estimate['total'] * 1e3:.1f} MB, measured peak {peak * 1e3:.1f} MB")
    lines = [
        "# Planner memory estimate vs measured peak (CPU)",
        "",
        f"Generated by `benchmarks/plan_memory.py` on {socket.gethostname()}, {datetime.date.today().isoformat()}. "
        "Measured: the running sum of the live tensor blocks (PyTorch profiler, `profile_memory`, allocations and "
        "frees by address; a block whose address is reallocated counts as freed there, since gloo's threads free "
        "the buffers of asynchronous collectives unrecorded) from building the engine through the first rollout "
        "step (log-prob pass, optimizer steps); its maximum, on the rank with the largest. "
        "Estimate: `megatron_gvpo.plan` for the same config (`cluster.gpu: cpu`, Megatron's local layer spec, no "
        "reserve). Goal: estimate within 20% of the measured peak.",
        "",
        "| configs/tiny_cpu.yaml variant | weights | gradients | optimizer | activations | estimate | measured peak "
        "| estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e, peak in rows:
        lines.append(f"| {name} | {e['weights'] * 1e3:.2f} MB | {e['gradients (fp32)'] * 1e3:.2f} MB | "
                     f"{e['optimizer (Adam, fp32)'] * 1e3:.2f} MB | {e['activations'] * 1e3:.2f} MB | "
                     f"{e['total'] * 1e3:.2f} MB | {peak * 1e3:.2f} MB | {e['total'] / peak:.2f}x |")
    publish("\n".join(lines) + "\n", DEFAULT_OUT)


if __name__ == "__main__":
    main()
