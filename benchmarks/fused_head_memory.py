"""Peak memory of the fused output-layer + log-prob head at T = 8192 tokens, V = 128k, against the logits' size.

The claim under test (issue: Megatron training engine): `fused_linear_logprobs(hidden, weight, targets)` never
materialises the [T, V] logits, so the loss head's extra peak memory is at most 0.25x the size of the fp32
logits at T = 8192, V = 128256 (Llama 3's vocabulary), where the logits alone are 3.9 GiB per TP rank.

What it measures, on one process (TP = 1, fp32, CPU) at the full T and V:
    fused      forward + backward of `fused_linear_logprobs` (log-probs and entropy, both in the loss);
    unfused    the same loss through the output-layer matmul (`hidden @ weight.T`, the logits) and
               `vocab_parallel_logprobs`: what the trainer does with `train.fused_logprobs=false`.
Extra peak memory is read from the PyTorch profiler's allocator events (`measure_memory` of
`benchmarks/logprob_memory.py`, validated on known allocation patterns first). Inputs (hidden states, weight,
targets) exist before the measured region. The [V, h] weight gradient is produced by every output layer and,
with Megatron's gradient-accumulation fusion on GPU, is written straight into the DDP gradient buffer that
exists anyway, so the table reports the peak with and without it. The two heads' log-probs, entropies and
gradients are compared (max abs difference).

The hidden size only scales the hidden states, the weight and their gradients, not the head's work memory
(two [chunk, V] buffers); the default h = 256 keeps the CPU matmuls to about a minute. `--hidden 4096` is the
8B model's size (slow on CPU). The peak at another h is the measured peak plus T * dh * 4 bytes for the hidden
gradient, which the table also states for h = 4096 and 8192.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_head_memory.py           # writes benchmarks/results/fused_head_memory.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_head_memory.py --quick   # T=1024, V=16k, prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "fused_head_memory.md"
GOAL_RATIO = 0.25

for p in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from logprob_memory import measure_memory, publish, validate_memory_measurement  # noqa: E402

from megatron_gvpo.ops import fused_linear_logprobs, vocab_parallel_logprobs  # noqa: E402


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    g_logp = torch.randn(tokens, generator=g)
    g_ent = torch.randn(tokens, generator=g)
    return h, w, targets, g_logp, g_ent


def run_head(fused: bool, h, w, targets, g_logp, g_ent, keep: dict) -> None:
    """Forward + backward of one head; `keep` receives its outputs and gradients (stored, not measured)."""
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    if fused:
        logp, ent = fused_linear_logprobs(hh, ww, targets, return_entropy=True)
    else:
        logp, ent = vocab_parallel_logprobs(hh @ ww.T, targets, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    keep.update(logp=logp.detach(), ent=ent.detach(), grad_h=hh.grad, grad_w=ww.grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="T=1024, V=16384, print only")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT}; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab = 1024, 16384
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    T, V, H = args.tokens, args.vocab, args.hidden
    t_start = time.perf_counter()

    validate_memory_measurement()
    inputs = make_inputs(T, V, H)
    logits_bytes = T * V * 4
    weight_grad_bytes = V * H * 4
    results, seconds = {}, {}
    for name, fused in (("fused", True), ("unfused", False)):
        keep: dict = {}
        print(f"[{name}] T={T} V={V} h={H} ...", flush=True)
        start = time.perf_counter()
        # The kept outputs are tiny except the two gradients, which the region allocates and returns
        # (the hidden gradient [T, h] and the weight gradient [V, h]); both are part of the peak.
        peak, _ = measure_memory(lambda: run_head(fused, *inputs, keep))
        seconds[name] = time.perf_counter() - start
        results[name] = (peak, keep)
        print(f"[{name}] extra peak {peak / 2**20:.1f} MiB ({peak / logits_bytes:.3f}x logits) in {seconds[name]:.0f} s",
              flush=True)

    fused_keep, unfused_keep = results["fused"][1], results["unfused"][1]
    diffs = {k: float((fused_keep[k] - unfused_keep[k]).abs().max()) for k in ("logp", "ent", "grad_h", "grad_w")}
    total = time.perf_counter() - t_start

    def row(name: str) -> str:
        peak = results[name][0]
        no_wgrad = peak - weight_grad_bytes
        return (f"| {name} | {seconds[name]:.0f} | {peak / 2**20:.1f} | {peak / logits_bytes:.3f}x | "
                f"{no_wgrad / 2**20:.1f} | {no_wgrad / logits_bytes:.3f}x |")

    fused_no_wgrad = results["fused"][0] - weight_grad_bytes
    at = {h: fused_no_wgrad + T * (h - H) * 4 for h in (4096, 8192)}
    met = all(v <= GOAL_RATIO * logits_bytes for v in [fused_no_wgrad, *at.values()])
    lines = [
        "# Fused output-layer + log-prob head: peak memory vs the logits' size",
        "",
        f"Generated by `benchmarks/fused_head_memory.py{' --quick' if args.quick else ''}` on "
        f"{socket.gethostname()}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, total runtime {total:.0f} s.",
        "",
        f"T = {T} tokens, V = {V}, hidden h = {H}, fp32, TP = 1, log-probs and entropy both in the loss. "
        f"fp32 logits [T, V]: {logits_bytes / 2**30:.2f} GiB; the weight gradient [V, h]: "
        f"{weight_grad_bytes / 2**20:.1f} MiB. Goal: extra peak of the head at most {GOAL_RATIO}x the logits.",
        "",
        "| head | time [s] | extra peak [MiB] | / logits | without the weight gradient [MiB] | / logits |",
        "|---|---|---|---|---|---|",
        row("fused"),
        row("unfused"),
        "",
        f"At the hidden sizes of real models the fused head's peak without the weight gradient grows by "
        f"T * dh * 4 bytes (the hidden gradient): h = 4096: {at[4096] / 2**20:.0f} MiB "
        f"({at[4096] / logits_bytes:.3f}x), h = 8192: {at[8192] / 2**20:.0f} MiB ({at[8192] / logits_bytes:.3f}x).",
        "",
        f"Goal ({GOAL_RATIO}x, without the weight gradient): {'met' if met else 'NOT met'}.",
        "",
        "Fused vs unfused, max abs difference: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + ".",
    ]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
