"""Extra peak memory and time of token log-probs (and entropy) from logits, forward + backward.

What it measures: for fp32 logits [T, V] and targets [T], the memory allocated *beyond the inputs* while
computing per-token log-probs (optionally the entropy), summing them into a loss and running backward,
expressed as a multiple of the logits' own size (T * V * 4 bytes). The gradient `logits.grad` (1.0x) is
allocated inside the measured region and therefore counted. Three implementations are compared:

    plain     torch.log_softmax + gather (+ entropy from the full log-softmax), autograd does the rest
    megatron  megatron.core.tensor_parallel.vocab_parallel_cross_entropy on a clone of the logits
    ours      megatron_gvpo.ops.vocab_parallel_logprobs (default chunking, and one larger chunk size)

at V = 32000 (a full vocabulary) and V = 64000 (one TP=2 shard of a 128k vocabulary, run single-process with
tp_group=None, so the all-reduces are excluded). It also reports fwd+bwd wall time as a ratio to `plain`,
the max abs difference of each method's log-probs / entropy / gradient against `plain`, and asserts that
`ours` leaves its input untouched.

How: peak memory comes from the allocator-level memory events of the PyTorch profiler (`profile_memory=True`).
Every CPU allocation and free inside the profiled region is a `[memory]` event in
`prof.profiler.kineto_results.events()` with a signed byte count and a timestamp; sorted by time, the maximum
of their running sum is the region's extra peak. Blocks allocated before the region (the inputs) are
invisible to it, which is exactly what "extra" means. Process RSS would instead be blurred by the C
allocator keeping freed pages. The method is checked against known allocation patterns at start-up.

Run from the repository root (about two minutes and ~8 GB of RAM at the defaults):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/logprob_memory.py                # writes the results file
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/logprob_memory.py --quick        # smoke test, prints only
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from _common import REPO_ROOT, RESULTS, publish  # before the project: puts the repository on sys.path
from torch._C._autograd import DeviceType, _KinetoEvent
from torch.profiler import ProfilerActivity, profile

DEFAULT_OUT = RESULTS / "logprob_memory.md"
MAX_ABS_DIFF = 1e-3
GOAL = "goal: ours <= 1.1x with entropy, input untouched"

from megatron_gvpo.ops import vocab_parallel_logprobs  # noqa: E402
from megatron_gvpo.utils.distributed import free_port  # noqa: E402

LogprobFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Method:
    name: str
    entropy: bool
    fn: LogprobFn
    """Returns (logp [T], entropy [T] or None), differentiable in the logits."""


@dataclass(frozen=True)
class Shape:
    vocab: int
    label: str


@dataclass
class Row:
    shape: Shape
    method: Method
    peak_bytes: int
    held_bytes: int
    seconds: float
    diffs: dict[str, float]
    logits_bytes: int


# --------------------------------------------------------------------------------------------------------------
# Measurement


def _memory_events(prof: profile) -> list[tuple[int, int]]:
    """(timestamp ns, signed bytes) of every allocator event the profiler saw, in time order."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if _is_cpu_memory(e)]
    # Stable sort: events sharing a timestamp keep the order in which they were recorded.
    return sorted(events, key=lambda ev: ev[0])


def _is_cpu_memory(event: _KinetoEvent) -> bool:
    return event.name() == "[memory]" and event.device_type() == DeviceType.CPU


def measure_memory(work: Callable[[], object]) -> tuple[int, int]:
    """Run `work` under the profiler; return (peak, net) bytes allocated relative to the region's start."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
        # Anything `work` left for the cycle collector would otherwise count as held at the end.
        gc.collect()
    running = peak = 0
    for _, nbytes in _memory_events(prof):
        running += nbytes
        peak = max(peak, running)
    return peak, running


def validate_memory_measurement() -> None:
    """The profiler-based measurement must reproduce the peaks of known allocation patterns exactly."""
    mib = 2**20

    def single() -> None:
        x = torch.empty(100 * mib, dtype=torch.uint8).fill_(1)
        del x

    def overlapping() -> None:
        a = torch.ones(100 * mib, dtype=torch.uint8)
        b = torch.ones(50 * mib, dtype=torch.uint8)
        del a
        c = torch.ones(80 * mib, dtype=torch.uint8)  # peak stays at 150 MiB: a was freed first
        del b, c

    def kept() -> torch.Tensor:
        return torch.ones(30 * mib, dtype=torch.uint8)

    held: list[torch.Tensor] = []
    checks = {
        "alloc+free 100 MiB": (single, 100 * mib, 0),
        "100, 50, free 100, 80": (overlapping, 150 * mib, 0),
        "keep 30 MiB": (lambda: held.append(kept()), 30 * mib, 30 * mib),
    }
    for label, (work, want_peak, want_net) in checks.items():
        peak, net = measure_memory(work)
        assert (peak, net) == (want_peak, want_net), f"{label}: got peak={peak} net={net}"
    held.clear()


def median_seconds(work: Callable[[], object], repeats: int, reset: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        reset()
        gc.collect()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    reset()
    return statistics.median(times)


def fwd_bwd(
    method: Method, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp, entropy = method.fn(logits, targets)
    loss = logp.sum() if entropy is None else logp.sum() + entropy.sum()
    loss.backward()
    return logp, entropy


def outputs(
    method: Method, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    logits.grad = None
    logp, entropy = fwd_bwd(method, logits, targets)
    grad = logits.grad
    logits.grad = None
    return logp.detach(), None if entropy is None else entropy.detach(), grad


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Methods


def plain(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, None]:
    lsm = torch.log_softmax(logits, -1)
    return lsm.gather(-1, targets[:, None]).squeeze(-1), None


def plain_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lsm = torch.log_softmax(logits, -1)
    return lsm.gather(-1, targets[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def megatron(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, None]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # It overwrites its input with the softmax; callers that still need the logits must pay for this clone.
    return -vocab_parallel_cross_entropy(logits.clone(), targets), None


def ours(chunk_size: int | None, entropy: bool) -> LogprobFn:
    def fn(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = vocab_parallel_logprobs(
            logits, targets, tp_group=None, chunk_size=chunk_size, return_entropy=entropy
        )
        return out if entropy else (out, None)

    return fn


def build_methods(big_chunk: int) -> list[Method]:
    return [
        Method("plain", False, plain),
        Method("plain", True, plain_entropy),
        Method("megatron (clone)", False, megatron),
        Method("ours (default chunk)", False, ours(None, False)),
        Method("ours (default chunk)", True, ours(None, True)),
        Method(f"ours (chunk_size={big_chunk})", True, ours(big_chunk, True)),
    ]


def init_megatron() -> None:
    """Megatron's cross entropy reads its TP group from parallel_state, which needs a process group."""
    with warnings.catch_warnings():
        # Its import warns about missing Transformer Engine / Apex, irrelevant here.
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    parallel_state.initialize_model_parallel(1, 1)


def shutdown_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Benchmark


def make_inputs(tokens: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Scale 3: a peaked but not degenerate softmax (entropies ~0.7 to 7 nats at V=32000).
    logits = (torch.randn(tokens, vocab, generator=gen) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return logits, targets


def check_against_plain(
    methods: list[Method], logits: torch.Tensor, targets: torch.Tensor
) -> dict[tuple[str, bool], dict[str, float]]:
    """Max abs differences of each method vs plain with the same entropy setting; asserts ours is pure."""
    refs = {m.entropy: outputs(m, logits, targets) for m in methods if m.name == "plain"}
    diffs: dict[tuple[str, bool], dict[str, float]] = {}
    for m in methods:
        if m.name == "plain":
            continue
        before = logits.detach().clone()
        logp, entropy, grad = outputs(m, logits, targets)
        if m.name.startswith("ours"):
            assert torch.equal(logits.detach(), before), f"{m.name} modified its input"
        del before
        ref_logp, ref_entropy, ref_grad = refs[m.entropy]
        d = {"logp": max_abs_diff(logp, ref_logp), "grad": max_abs_diff(grad, ref_grad)}
        if entropy is not None:
            d["entropy"] = max_abs_diff(entropy, ref_entropy)
        diffs[(m.name, m.entropy)] = d
        # A bug gives O(1) errors; fp32 rounding of reductions over V terms gives ~1e-4 at most (entropy ~ 7).
        assert max(d.values()) <= MAX_ABS_DIFF, f"{m.name} (entropy={m.entropy}) differs from plain: {d}"
        print(f"    {m.name:28s} entropy={m.entropy!s:5s} input untouched: "
              f"{'yes' if m.name.startswith('ours') else 'n/a (clone)'}  max|diff| vs plain: "
              + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    return diffs


def megatron_overwrites_input() -> bool:
    """Why the clone is needed: without it Megatron's forward replaces the logits by the softmax."""
    logits, targets = make_inputs(4, 16)
    before = logits.detach().clone()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with torch.no_grad():
        vocab_parallel_cross_entropy(logits.detach(), targets)
    return not torch.equal(logits.detach(), before)


def run_shape(shape: Shape, tokens: int, methods: list[Method], repeats: int) -> list[Row]:
    logits, targets = make_inputs(tokens, shape.vocab)
    logits_bytes = logits.numel() * logits.element_size()
    print(f"  V={shape.vocab}: logits {logits_bytes / 2**20:.0f} MiB")
    diffs = check_against_plain(methods, logits, targets)
    gc.collect()

    def reset() -> None:
        logits.grad = None

    rows = []
    for m in methods:
        reset()
        peak, held = measure_memory(functools.partial(fwd_bwd, m, logits, targets))
        seconds = median_seconds(functools.partial(fwd_bwd, m, logits, targets), repeats, reset)
        rows.append(Row(shape, m, peak, held, seconds, diffs.get((m.name, m.entropy), {}), logits_bytes))
        print(f"    {m.name:28s} entropy={m.entropy!s:5s} peak {peak / logits_bytes:.2f}x  "
              f"held {held / logits_bytes:.2f}x  {seconds:.3f} s")
    return rows


def format_table(rows: list[Row]) -> str:
    plain_seconds = {(r.shape.vocab, r.method.entropy): r.seconds for r in rows if r.method.name == "plain"}
    lines = [
        "| V | method | entropy | extra peak (x logits) | extra peak (MiB) | held after (x logits) "
        "| time fwd+bwd vs plain | max abs diff vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        entropy = "n/a" if r.method.name.startswith("megatron") else ("yes" if r.method.entropy else "no")
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r.diffs.items()) or "(reference)"
        ratio = r.seconds / plain_seconds[(r.shape.vocab, r.method.entropy)]
        lines.append(
            f"| {r.shape.label} | {r.method.name} | {entropy} | {r.peak_bytes / r.logits_bytes:.2f}x "
            f"| {r.peak_bytes / 2**20:.0f} | {r.held_bytes / r.logits_bytes:.2f}x "
            f"| {ratio:.2f} ({r.seconds:.3g} s) | {diffs} |"
        )
    return "\n".join(lines)


def format_header(tokens: int, repeats: int, quick: bool, megatron_overwrites: bool) -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# Log-prob memory benchmark",
        "",
        f"- date: {now}; torch {torch.__version__}; CPU, {torch.get_num_threads()} thread(s); "
        f"T = {tokens} tokens; fp32 logits" + (
            "; QUICK smoke-test sizes, not meaningful (ours' default chunk spans all T tokens here)"
            if quick
            else ""
        ),
        "- extra peak: bytes allocated beyond the inputs during forward + backward (profiler `[memory]` events, "
        "running-sum maximum), as a multiple of the logits' size T*V*4. It includes `logits.grad` (1.0x), "
        "which is what 'held after' shows remains.",
        *(
            []
            if quick
            else [
                "- V=64000 is one TP=2 shard of a 128k vocabulary, run single-process with tp_group=None: "
                "communication excluded."
            ]
        ),
        "- plain: `log_softmax(logits).gather(...)`, entropy `-(lsm.exp() * lsm).sum(-1)`; loss = sum of logp "
        "(+ sum of entropy).",
        "- megatron: `vocab_parallel_cross_entropy(logits.clone(), targets)`; the clone is part of its cost "
        f"because it overwrites its input (checked: overwrites = {megatron_overwrites}); it has no entropy.",
        "- ours: `megatron_gvpo.ops.vocab_parallel_logprobs`; default chunk fills "
        "`DEFAULT_CHUNK_BYTES` per fp32 work buffer; asserted to leave its input unchanged.",
        f"- time: median of {repeats} runs, as a ratio to plain with the same V and entropy setting "
        "(megatron vs plain without entropy).",
        f"- max abs diff: vs plain in fp32 (same V and entropy setting); asserted <= {MAX_ABS_DIFF:g}.",
        f"- {GOAL}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="T, tokens per batch (default 4096; 256 quick)")
    parser.add_argument(
        "--out", default=None, help=f"Markdown results file (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; "
        "in quick mode none, only printed)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test; prints only")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 256 if args.quick else 4096
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    validate_memory_measurement()
    print("memory measurement validated on known allocation patterns")

    if args.quick:
        shapes = [Shape(3200, "3200 (quick)"), Shape(6400, "6400 (quick)")]
        repeats = 2
    else:
        shapes = [Shape(32000, "32000 (full vocab)"), Shape(64000, "64000 (TP=2 shard of 128k, comm. excluded)")]
        repeats = 3
    big_chunk = min(1024, max(1, args.tokens // 4))
    methods = build_methods(big_chunk)

    start = time.perf_counter()
    init_megatron()
    try:
        overwrites = megatron_overwrites_input()
        rows = [row for shape in shapes for row in run_shape(shape, args.tokens, methods, repeats)]
    finally:
        shutdown_megatron()
    print(f"total {time.perf_counter() - start:.0f} s\n")

    report = format_header(args.tokens, repeats, args.quick, overwrites) + "\n\n" + format_table(rows) + "\n"
    publish(report, Path(args.out) if args.out is not None else None)


if __name__ == "__main__":
    main()
