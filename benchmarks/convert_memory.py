"""Peak memory and throughput of `tools/convert_hf.py` on a synthetic ~2 GB checkpoint.

What it measures: a Llama-style HF checkpoint of random fp32 weights (hidden 2048, 8 layers, FFN 5632, 16
heads / 4 KV heads, vocabulary 32000, untied; about 2.0 GB in 1 GB safetensors shards) is written tensor by
tensor, then, each in a fresh process:

    import     `megatron_gvpo.megatron.convert.import_hf` HF -> Megatron checkpoint (TP=1 padding)
    export     `export_hf` Megatron checkpoint -> HF, into 512 MiB safetensors shards (streamed, no buffer)
    baseline   plain safetensors: `load_file` of each input shard and `save_file` of the same tensors, i.e.
               reading and writing the same bytes with no conversion (the whole shard in memory at once)

Each process first runs its task on a tiny checkpoint, so imports and one-time set-up (transformers, Megatron,
the gloo group) count in neither peak nor time; their cost is a few seconds per run. Two peaks, both relative
to the moment before the measured task: 'allocated' is the peak of `RssAnon` (memory the process allocated;
sampled every 2 ms), the quantity the goal is about; 'resident' is the high-water mark `VmHWM`, which also
counts file pages that safetensors' mmap reads map into the process (page cache, reclaimable). The goal
(issue: converter) is a peak below 1.5x the largest tensor plus the configured buffer (neither direction
buffers). Throughput is bytes converted per second, reported as a ratio to the baseline's.
Every task runs twice (rounds alternate the three), after `os.sync()` so that no task pays for writing back
the previous one's dirty pages; the table has the faster time and the higher peaks of the two. The page cache
is not dropped (no root), alike for all three.

Vocabulary 32000 is a multiple of 128, so import adds no padding rows; a vocabulary that needs padding makes
import hold the embedding twice while it pads it (2x the largest tensor), which this benchmark does not cover.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert_memory.py          # writes benchmarks/results/...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert_memory.py --quick    # ~100 MB, prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, publish  # before the project: puts the repository on sys.path

DEFAULT_OUT = RESULTS / "convert_memory.md"

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000)
QUICK = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=16000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
EXPORT_SHARD = 512 * 2**20
ROUNDS = 2


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_checkpoint(directory: Path, shape: dict) -> tuple[int, int]:
    """Random HF Llama weights for `shape`, written tensor by tensor; returns (total bytes, largest tensor)."""
    import torch
    import transformers

    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import SafetensorsStreamWriter
    from megatron_gvpo.models.hf_maps import expected_hf_names

    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    # Shapes from the model on the meta device: no memory.
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {n: p.shape for n, p in meta.state_dict().items()}
    assert set(shapes) == expected_hf_names(arch_from_hf(config))
    writer = SafetensorsStreamWriter(directory, [(n, tuple(s), torch.float32) for n, s in shapes.items()], 2**30)
    g = torch.Generator().manual_seed(0)
    total = largest = 0
    for name, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02
        total, largest = total + t.nbytes, max(largest, t.nbytes)
        writer.write(name, t)
    writer.close()
    return total, largest


def child(task: str, src: str, dst: str, warm_src: str, warm_dst: str) -> None:
    """Run one task in this (fresh) process and print a JSON line with its seconds, bytes and peaks. The same
    task runs first on a tiny checkpoint, so that imports and one-time set-up (transformers, Megatron, gloo)
    count in neither the peaks nor the time."""
    run_task(task, warm_src, warm_dst)
    base, base_anon = rss_kib("VmRSS"), rss_kib("RssAnon")
    reset_peak()
    sampler = AnonSampler()
    start = time.perf_counter()
    nbytes = run_task(task, src, dst)
    seconds = time.perf_counter() - start
    peak = (rss_kib("VmHWM") - base) * 1024
    peak_anon = (sampler.stop() - base_anon) * 1024
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "peak": peak, "peak_anon": peak_anon}))


class AnonSampler:
    """Peak of RssAnon (memory the process allocated, without file pages mapped by safetensors' mmap), sampled
    every 2 ms on a thread; the kernel keeps no high-water mark of it."""

    def __init__(self):
        import threading

        self.peak = rss_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_kib("RssAnon"))


def run_task(task: str, src: str, dst: str) -> int:
    from megatron_gvpo.megatron import convert

    shutil.rmtree(dst, ignore_errors=True)
    if task == "import":
        return convert.import_hf(src, dst, progress=False).bytes
    if task == "export":
        return convert.export_hf(src, dst, progress=False, max_shard_bytes=EXPORT_SHARD).bytes
    else:
        from safetensors.torch import load_file, save_file

        Path(dst).mkdir()
        nbytes = 0
        for f in sorted(Path(src).glob("*.safetensors")):
            tensors = load_file(str(f))
            nbytes += sum(t.nbytes for t in tensors.values())
            save_file(tensors, str(Path(dst) / f.name))
            del tensors
        return nbytes


def run_child(task: str, src: Path, dst: Path, warm: tuple[Path, Path]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", task, str(src), str(dst), str(warm[0]), str(warm[1])]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    shape = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        total, largest = make_checkpoint(work / "hf", shape)
        make_checkpoint(work / "tiny_hf", TINY)
        warm = {"baseline": (work / "tiny_hf", work / "tiny_copy"),
                "import": (work / "tiny_hf", work / "tiny_megatron"),
                "export": (work / "tiny_megatron", work / "tiny_export")}
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB, largest tensor {largest / 2**20:.0f} MiB", flush=True)
        results: dict[str, dict] = {}
        for round_ in range(ROUNDS):
            for task, src, dst in (("baseline", work / "hf", work / "copy"), ("import", work / "hf", work / "megatron"),
                                   ("export", work / "megatron", work / "export")):
                os.sync()  # no task pays for the previous one's dirty pages being written back
                r = run_child(task, src, dst, warm[task])
                print(f"[round {round_ + 1}] {task}: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s, "
                      f"allocated {r['peak_anon'] / 2**20:.0f} MiB", flush=True)
                best = results.get(task)
                results[task] = {
                    "bytes": r["bytes"], "seconds": min(r["seconds"], best["seconds"]) if best else r["seconds"],
                    "peak": max(r["peak"], best["peak"]) if best else r["peak"],
                    "peak_anon": max(r["peak_anon"], best["peak_anon"]) if best else r["peak_anon"],
                }
        from megatron_gvpo.models.hf_io import SafetensorsCheckpoint

        a, b = SafetensorsCheckpoint(work / "hf"), SafetensorsCheckpoint(work / "export")
        identical = set(a) == set(b) and all(bool((a[n] == b[n]).all()) for n in a)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_rate = results["baseline"]["bytes"] / results["baseline"]["seconds"]
    buffers = {"baseline": 0, "import": 0, "export": 0}  # export streams into its 512 MiB shards
    lines = [
        "# tools/convert_hf.py: peak memory and throughput",
        "",
        f"Generated by `benchmarks/convert_memory.py{' --quick' if args.quick else ''}` on {socket.gethostname()}, "
        f"{datetime.date.today().isoformat()}, OMP_NUM_THREADS=1, total runtime {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Synthetic Llama checkpoint ({', '.join(f'{k}={v}' for k, v in shape.items())}, untied, fp32): "
        f"{total / 1e9:.2f} GB, largest tensor {largest / 2**20:.0f} MiB. Each task in a fresh process, after a "
        "warm-up on a tiny checkpoint; 'allocated' = peak RssAnon, 'resident' = VmHWM (includes mmap'd file "
        "pages), both minus their values before the task. Goal: allocated < 1.5x the largest tensor + buffer.",
        "",
        "| task | GB | seconds | GB/s | vs baseline | peak allocated [MiB] | peak resident [MiB] | buffer [MiB] | "
        "allocated / (1.5 x largest + buffer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        rate = r["bytes"] / r["seconds"]
        bound = 1.5 * largest + buffers[task]
        lines.append(f"| {task} | {r['bytes'] / 1e9:.2f} | {r['seconds']:.1f} | {rate / 1e9:.2f} | "
                     f"{rate / base_rate:.2f}x | {r['peak_anon'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} | "
                     f"{buffers[task] / 2**20:.0f} | {r['peak_anon'] / bound:.2f} |")
    lines += [
        "",
        f"Export after import is bitwise identical to the input: {identical}.",
        "",
        "The baseline maps whole 1 GB input shards (safetensors' mmap: resident, not allocated); import and "
        "export hold about one parameter at a time.",
    ]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
