"""Time and extra peak memory of a GVPO training step against a plain SFT step on the same Megatron model.

What it measures: on one process (TP = PP = DP = 1, fp32, CPU, Megatron's local layer spec), one randomly
initialised Megatron-Core `GPTModel` (a Llama-style config built here, Megatron's own init), wrapped in Megatron
DDP, and one fixed batch of tokens split into the same micro-batches, the forward + backward + loss of

    sft        the baseline: labels go into `GPTModel.forward`, which returns per-token losses from Megatron's
               `vocab_parallel_cross_entropy`; the loss is their masked mean over the response tokens;
    gvpo (fused head, default)  `megatron_gvpo.megatron.step.forward_backward_gvpo`, group_strategy
               `group_atomic` (`ref_seq_logp` given), with `train.fused_logprobs` (the default): the model
               returns hidden states and `fused_linear_logprobs` forms logits chunk by chunk for response
               tokens only (no [tokens, vocab] tensor);
    gvpo (logits head)  the same with `train.fused_logprobs=false`: the model returns logits and
               `vocab_parallel_logprobs` reads them;
    prepass    the fused head with group_strategy `prepass` (adds a forward-only pass over the batch first, so
               it is reported separately from the goal).

All of them go through Megatron's `get_forward_backward_func` schedule. The optimizer step is not in the
measured region (there is no optimizer); the DDP grad buffers are zeroed before each step, outside the region.
Timing: one warm-up step each, then `--repeats` rounds interleaved (sft, gvpo, ..., sft, ...) so machine
noise hits all methods alike; the median is reported, as a ratio to sft. Memory: the extra peak allocated inside
one step (activations, logits, gradients of the activations; the grad buffers are preallocated by DDP so
parameter gradients are not counted), from the PyTorch profiler's allocator events, exactly as in
`benchmarks/logprob_memory.py` (whose `measure_memory` is reused), also as a ratio to sft. A small breakdown
times the loss heads alone on one micro-batch of logits: Megatron's cross-entropy (including the logits
transpose it does internally) vs the GVPO head's `vocab_parallel_logprobs` (including the `[s,b,V] -> [b,s,V]`
contiguous copy the model does when no labels are given).

Everything is measured twice, each time in a fresh process: with glibc's default allocator, and with glibc
set to keep and reuse freed memory as PyTorch's CUDA caching allocator does (see `ALLOCATORS`).

Run from the repository root (about three minutes at the defaults):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py            # writes benchmarks/results/...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py --quick    # tiny sizes, 2 repeats, prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import socket
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _common import RESULTS, publish  # before the project: puts the repository on sys.path

DEFAULT_OUT = RESULTS / "step_overhead.md"
GOAL = "goal: gvpo <= 1.05x of sft; prepass reported separately"


from logprob_memory import measure_memory, validate_memory_measurement  # noqa: E402

FULL = dict(hidden=256, layers=4, heads=4, kv_heads=2, ffn=512, vocab=8192, rows=16, seq=256, mbs=4, group=4,
            repeats=5)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=1024, rows=8, seq=32, mbs=4, group=4,
             repeats=2)
BETA = 0.1


def setup(s: dict):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from transformers import LlamaConfig

    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config
    from megatron_gvpo.megatron.parallel import initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
    from megatron_gvpo.utils.distributed import init_distributed

    apply_cpu_compat()
    init_distributed()
    ctx = initialize_parallel(ParallelConfig(), seed=1234)
    hf = LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], vocab_size=s["vocab"],
        max_position_embeddings=s["seq"], tie_word_embeddings=False,
    )
    arch = arch_from_hf(hf)
    config = transformer_config(arch, params_dtype=torch.float32)
    model = build_gpt_model(arch, config, padded_vocab_size=padded_vocab_size(arch.vocab_size, 1),
                            max_sequence_length=s["seq"])
    ddp = DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    return ctx, arch, [ddp]


def make_batch(s: dict, vocab: int) -> dict:
    from megatron_gvpo.data.batch import make_targets

    g = torch.Generator().manual_seed(0)
    n, seq = s["rows"], s["seq"]
    tokens = torch.randint(1, vocab, (n, seq), generator=g)
    response = torch.zeros(n, seq, dtype=torch.bool)
    response[:, seq // 2:] = True
    targets, loss_mask = make_targets(tokens, response)
    group_ids = torch.arange(n) // s["group"]
    rewards = torch.rand(n, generator=g)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, rewards=rewards, group_ids=group_ids)


# ------------------------------------------------------------------------------------------------------------
# The three steps


def sft_forward_step(data_iterator, model):
    mb = next(data_iterator)
    token_loss = model(mb["tokens"], mb["position_ids"], None, labels=mb["targets"])  # [b, s]
    return token_loss, partial(sft_loss, mb)


def sft_loss(mb: dict, token_loss: torch.Tensor):
    mask = mb["loss_mask"].to(token_loss.dtype)
    loss = (token_loss * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach()}


def sft_step(chunks, micro):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=sft_forward_step, data_iterator=iter(micro), model=chunks, num_microbatches=len(micro),
        seq_length=micro[0]["tokens"].shape[1], micro_batch_size=micro[0]["tokens"].shape[0], forward_only=False,
    )


def gvpo_step(chunks, batch, ctx, mbs, spec, strategy):
    from megatron_gvpo.megatron.step import forward_backward_gvpo

    return forward_backward_gvpo(chunks, batch, ctx, micro_batch_size=mbs, beta=BETA, strategy=strategy,
                                 logprobs=spec)


# ------------------------------------------------------------------------------------------------------------
# Breakdown: the loss heads alone on one micro-batch of logits


def time_fn(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def head_breakdown(micro: dict, vocab: int, padded: int, repeats: int) -> dict[str, float]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gvpo.ops import vocab_parallel_logprobs

    b, s = micro["tokens"].shape
    g = torch.Generator().manual_seed(1)
    logits_sbv = torch.randn(s, b, padded, generator=g)
    targets, mask = micro["targets"], micro["loss_mask"].float()

    def megatron_ce():
        x = logits_sbv.detach().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, targets.transpose(0, 1).contiguous()).transpose(0, 1)
        ((loss * mask).sum() / mask.sum()).backward()

    def ours(copy: bool):
        x = logits_sbv.detach().requires_grad_()
        y = x.transpose(0, 1).contiguous() if copy else x.transpose(0, 1)
        logp = vocab_parallel_logprobs(y, targets, tp_group=None, vocab_size=vocab)
        (logp * mask).sum().backward()

    def transpose_copy():
        x = logits_sbv.detach().requires_grad_()
        x.transpose(0, 1).contiguous().sum().backward()

    return {
        "megatron cross-entropy (fwd+bwd)": time_fn(megatron_ce, repeats),
        "vocab_parallel_logprobs + [s,b,V]->[b,s,V] copy (fwd+bwd)": time_fn(lambda: ours(True), repeats),
        "vocab_parallel_logprobs on the strided view (fwd+bwd)": time_fn(lambda: ours(False), repeats),
        "transpose copy alone + sum (fwd+bwd)": time_fn(transpose_copy, repeats),
    }


# ------------------------------------------------------------------------------------------------------------


# Glibc settings under which freed CPU memory is kept and reused rather than returned to the OS: the
# behaviour of PyTorch's CUDA caching allocator, under which production runs. With glibc's defaults every
# large tensor is a fresh mmap whose pages fault on first touch, a cost a GPU step never pays and which
# falls unevenly on methods with different allocation patterns. Both are measured and reported.
ALLOCATORS = {
    "glibc default": {},
    "caching (as on GPU)": {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
                            "MALLOC_TOP_PAD_": str(2**30)},
}


def measure(s: dict) -> dict:
    """All measurements of one process (one allocator setting)."""
    from megatron_gvpo.megatron.model import return_hidden_states
    from megatron_gvpo.megatron.step import LogprobSpec, compute_sequence_logprobs, prepare_microbatches

    torch.manual_seed(0)
    validate_memory_measurement()
    ctx, arch, chunks = setup(s)
    padded = chunks[0].module.vocab_size
    spec = LogprobSpec(tp_group=ctx.tp_group, vocab_size=arch.vocab_size)
    batch = make_batch(s, arch.vocab_size)
    policy = compute_sequence_logprobs(chunks, batch, ctx, s["mbs"], spec)
    batch["ref_seq_logp"] = policy + 0.5 * torch.randn(policy.shape, generator=torch.Generator().manual_seed(2))
    micro = prepare_microbatches(batch, ctx, s["mbs"])

    fused_spec = dataclasses.replace(spec, fused=True, main_grad_accumulation=True)  # as the engine runs it

    def gvpo_fused(strategy: str):
        # The same model returning hidden states for this step only (the instance-level forward override of
        # return_hidden_states is removed again afterwards).
        return_hidden_states(chunks[0].module)
        try:
            gvpo_step(chunks, batch, ctx, s["mbs"], fused_spec, strategy)
        finally:
            del chunks[0].module.output_layer.forward

    methods = {
        "sft": lambda: sft_step(chunks, micro),
        "gvpo (fused head, default)": lambda: gvpo_fused("group_atomic"),
        "gvpo (logits head)": lambda: gvpo_step(chunks, batch, ctx, s["mbs"], spec, "group_atomic"),
        "prepass (fused head)": lambda: gvpo_fused("prepass"),
    }

    def reset():
        for c in chunks:
            c.zero_grad_buffer()
        gc.collect()

    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():  # warm-up
        reset()
        fn()
    for _ in range(s["repeats"]):
        for k, fn in methods.items():
            reset()
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    peaks = {}
    for k, fn in methods.items():
        reset()
        peaks[k], _ = measure_memory(fn)
    breakdown = head_breakdown(micro[0], arch.vocab_size, padded, s["repeats"])

    import torch.distributed as dist

    from megatron_gvpo.megatron.parallel import destroy_parallel

    destroy_parallel()
    dist.destroy_process_group()
    return dict(times=times, peaks=peaks, breakdown=breakdown, padded=padded, vocab=arch.vocab_size,
                num_micro=len(micro), params=sum(p.numel() for c in chunks for p in c.parameters()))


def run_child(allocator: str, args) -> dict:
    """`measure` in a fresh interpreter with the allocator's environment (glibc reads it at start-up)."""
    import json
    import subprocess

    env = {**os.environ, **ALLOCATORS[allocator], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
    cmd += ["--repeats", str(args.repeats)] if args.repeats else []
    print(f"[{allocator}] {' '.join(f'{k}={v}' for k, v in ALLOCATORS[allocator].items())} ...", flush=True)
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, print only")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {DEFAULT_OUT}; none with --quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    s = dict(QUICK if args.quick else FULL)
    if args.repeats:
        s["repeats"] = args.repeats
    if args.child:
        print(json.dumps(measure(s)))
        return
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    t_start = time.perf_counter()
    results = {a: run_child(a, args) for a in ALLOCATORS}
    total = time.perf_counter() - t_start

    first = next(iter(results.values()))
    methods = list(first["times"])
    padded = first["padded"]
    logits_mb = s["mbs"] * s["seq"] * padded * 4
    lines = [
        "# GVPO step overhead vs SFT",
        "",
        f"Generated by `benchmarks/step_overhead.py{' --quick' if args.quick else ''}` on {socket.gethostname()}, "
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, total runtime {total:.0f} s.",
        "",
        f"Megatron GPTModel (local spec, fp32, CPU, TP=PP=DP=1): hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']} heads / {s['kv_heads']} kv heads, ffn {s['ffn']}, vocab {first['vocab']} "
        f"({first['params'] / 1e6:.1f}M parameters). Batch {s['rows']} x {s['seq']} tokens (half prompt, half "
        f"response), groups of {s['group']}, micro-batch {s['mbs']} ({first['num_micro']} micro-batches); one "
        f"micro-batch of logits is {logits_mb / 2**20:.1f} MiB. Forward + backward + loss through Megatron's "
        f"schedule, no optimizer step; median of {s['repeats']} interleaved repeats after a warm-up. SFT is "
        "Megatron's own path (labels into `GPTModel`, `vocab_parallel_cross_entropy` over every token); the "
        "fused GVPO head forms logits only for response tokens, which is all GVPO needs.",
        "",
        "Each allocator setting runs in its own process. 'caching' sets glibc to keep and reuse freed memory, as "
        "PyTorch's CUDA caching allocator does on the GPUs production runs on; under glibc's defaults every "
        "large CPU tensor is a fresh mmap that page-faults on first touch.",
        "",
        f"| method ({GOAL}) | allocator | median time [s] | time / sft | extra peak memory [MiB] | memory / sft |",
        "|---|---|---|---|---|---|",
    ]
    for a, r in results.items():
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        for k in methods:
            lines.append(
                f"| {k} | {a} | {med[k]:.3f} | {med[k] / med['sft']:.3f}x | {r['peaks'][k] / 2**20:.1f} | "
                f"{r['peaks'][k] / r['peaks']['sft']:.3f}x |"
            )
    lines += ["", "All times [s]:", ""]
    for a, r in results.items():
        lines.append(f"- {a}: " + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v) for k, v in r["times"].items()))
    lines += ["", f"Loss heads alone on one micro-batch of logits [{s['seq']}, {s['mbs']}, {padded}] "
              f"(median of {s['repeats']}):", "", "| head | " + " | ".join(f"{a} [s]" for a in results) + " |",
              "|---|" + "---|" * len(results)]
    lines += [f"| {k} | " + " | ".join(f"{r['breakdown'][k]:.4f}" for r in results.values()) + " |"
              for k in first["breakdown"]]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
