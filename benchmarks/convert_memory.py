"""Peak memory and throughput of `tools/convert_hf.py` on synthetic ~1-2 GB checkpoints.

What it measures: two HF checkpoints of random fp32 weights, written tensor by tensor in 1 GB safetensors
shards: a dense Llama (hidden 2048, 8 layers, FFN 5632, 16 heads / 4 KV heads, vocabulary 32000, untied;
about 2.0 GB in 51 large tensors) and a Qwen3-MoE (hidden 1024, 4 layers, 32 experts of FFN 512, 16 heads /
4 KV heads of 64, vocabulary 32000, untied; about 1.1 GB in 430 tensors, most of them 2 MB expert matrices).
For each, in a fresh process each:

    import     `megatron_gvpo.megatron.convert.to_megatron.import_hf` HF -> Megatron checkpoint (TP=1 padding)
    export     `to_hf.export_hf` Megatron checkpoint -> HF, into 512 MiB safetensors shards (streamed, no buffer)
    baseline   plain safetensors: `load_file` of each input shard and `save_file` of the same tensors, i.e.
               reading and writing the same bytes with no conversion (the whole shard in memory at once),
               flushed to the disk at the end as the converter's output is

Each process first runs its task on a tiny checkpoint of the same family, so imports and one-time set-up
(transformers, Megatron, the gloo group) count in neither peak nor time; their cost is a few seconds per run.
Two peaks, both relative to the moment before the measured task: 'allocated' is the peak of `RssAnon` (memory
the process allocated; sampled every 2 ms), the quantity the goal is about; 'resident' is the high-water mark
`VmHWM`, which also counts file pages that safetensors' mmap reads map into the process (page cache,
reclaimable). The goal (issue: converter) is a peak below 1.5x the largest tensor plus the configured buffer
(neither direction buffers). Throughput is bytes converted per second, reported as a ratio to the baseline's
on the same checkpoint. Every task runs twice (rounds alternate the three), after `os.sync()` so that no task
pays for writing back the previous one's dirty pages (nor, since none of the three syncs its own output, for
writing back its own); the table has the faster time and the higher peaks of the two. The page cache is not
dropped (no root), alike for all three: these are page-cache speeds, not disk speeds.

Vocabulary 32000 is a multiple of 128, so import adds no padding rows (padding zeroes the rows, in place).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert_memory.py          # writes benchmarks/results/...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert_memory.py --quick    # ~100 MB each, prints only
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

LLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
MOE = dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
           head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=2048,
           vocab_size=32000)
QUICK = {"llama": dict(LLAMA, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=16000),
         "qwen3_moe": dict(MOE, hidden_size=256, num_hidden_layers=2, num_experts=16, moe_intermediate_size=256,
                           vocab_size=16000)}
TINY = {"llama": dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256),
        "qwen3_moe": dict(MOE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=256)}
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


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes as saved on disk, from transformers' model on the meta device (no memory).
    transformers 5 keeps a MoE layer's experts fused in memory ([experts, 2 * FFN, hidden] gate_up_proj,
    [experts, hidden, FFN] down_proj) and saves them per expert, as checkpoints on the hub are."""
    import torch
    import transformers

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {}
    for name, p in meta.state_dict().items():
        prefix = name.removesuffix("gate_up_proj").removesuffix("down_proj")
        if name.endswith("experts.gate_up_proj"):
            for e in range(p.shape[0]):
                shapes[f"{prefix}{e}.gate_proj.weight"] = shapes[f"{prefix}{e}.up_proj.weight"] = (p.shape[1] // 2,
                                                                                                  p.shape[2])
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                shapes[f"{prefix}{e}.down_proj.weight"] = tuple(p.shape[1:])
        else:
            shapes[name] = tuple(p.shape)
    return shapes


def make_checkpoint(directory: Path, shape: dict) -> tuple[int, int, int]:
    """Random HF weights for `shape` (with its model_type), written tensor by tensor; returns (total bytes,
    largest tensor, number of tensors)."""
    import torch
    import transformers

    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import SafetensorsStreamWriter
    from megatron_gvpo.models.hf_maps import expected_hf_names

    config = transformers.AutoConfig.for_model(**shape, tie_word_embeddings=False, max_position_embeddings=4096)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    shapes = hf_shapes(config)
    assert set(shapes) == expected_hf_names(arch_from_hf(config))
    writer = SafetensorsStreamWriter(directory, [(n, s, torch.float32) for n, s in shapes.items()], 2**30)
    g = torch.Generator().manual_seed(0)
    total = largest = 0
    for name, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02
        total, largest = total + t.nbytes, max(largest, t.nbytes)
        writer.write(name, t)
    writer.close()
    return total, largest, len(shapes)


def child(task: str, src: str, dst: str, warm_src: str, warm_dst: str) -> None:
    """Run one task in this (fresh) process and print a JSON line with its seconds, bytes and peaks. The same
    task runs first on a tiny checkpoint, so that imports and one-time set-up (transformers, Megatron, gloo)
    count in neither the peaks nor the time."""
    run_task(task, warm_src, warm_dst)
    shutil.rmtree(dst, ignore_errors=True)  # the previous round's output: deleting it is no part of the task
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
    from megatron_gvpo.megatron.convert.to_hf import export_hf
    from megatron_gvpo.megatron.convert.to_megatron import import_hf
    from megatron_gvpo.utils.files import fsync_tree

    shutil.rmtree(dst, ignore_errors=True)
    if task == "import":
        return import_hf(src, dst, progress=False).bytes
    if task == "export":
        return export_hf(src, dst, progress=False, max_shard_bytes=EXPORT_SHARD).bytes
    else:
        from safetensors.torch import load_file, save_file

        Path(dst).mkdir()
        nbytes = 0
        for f in sorted(Path(src).glob("*.safetensors")):
            tensors = load_file(str(f))
            nbytes += sum(t.nbytes for t in tensors.values())
            save_file(tensors, str(Path(dst) / f.name))
            del tensors
        # The converter flushes its output to the disk before publishing it (convert.common.atomic_output_dir); a
        # baseline that left its bytes in the page cache would be measured doing less.
        fsync_tree(dst)
        return nbytes


def run_child(task: str, src: Path, dst: Path, warm: tuple[Path, Path]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", task, str(src), str(dst), str(warm[0]), str(warm[1])]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(work: Path, shape: dict, tiny: dict) -> tuple[dict[str, dict], dict]:
    """Both rounds of the three tasks on one synthetic checkpoint: ({task: best result}, checkpoint facts)."""
    name = shape["model_type"]
    total, largest, count = make_checkpoint(work / f"{name}_hf", shape)
    make_checkpoint(work / f"{name}_tiny_hf", tiny)
    warm = {"baseline": (work / f"{name}_tiny_hf", work / f"{name}_tiny_copy"),
            "import": (work / f"{name}_tiny_hf", work / f"{name}_tiny_megatron"),
            "export": (work / f"{name}_tiny_megatron", work / f"{name}_tiny_export")}
    print(f"synthetic {name} checkpoint: {total / 1e9:.2f} GB in {count} tensors, largest {largest / 2**20:.0f} MiB",
          flush=True)
    results: dict[str, dict] = {}
    for round_ in range(ROUNDS):
        for task, src, dst in (("baseline", "hf", "copy"), ("import", "hf", "megatron"),
                               ("export", "megatron", "export")):
            os.sync()  # no task pays for the previous one's dirty pages being written back
            r = run_child(task, work / f"{name}_{src}", work / f"{name}_{dst}", warm[task])
            print(f"[{name} round {round_ + 1}] {task}: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.2f} s, "
                  f"allocated {r['peak_anon'] / 2**20:.0f} MiB", flush=True)
            best = results.get(task)
            results[task] = {
                "bytes": r["bytes"], "seconds": min(r["seconds"], best["seconds"]) if best else r["seconds"],
                "peak": max(r["peak"], best["peak"]) if best else r["peak"],
                "peak_anon": max(r["peak_anon"], best["peak_anon"]) if best else r["peak_anon"],
            }
    from megatron_gvpo.models.hf_io import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(work / f"{name}_hf"), SafetensorsCheckpoint(work / f"{name}_export")
    identical = set(a) == set(b) and all(bool((a[n] == b[n]).all()) for n in a)
    for d in work.glob(f"{name}_*"):
        shutil.rmtree(d)
    return results, {"total": total, "largest": largest, "count": count, "identical": identical}


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
    shapes = [QUICK["llama"], QUICK["qwen3_moe"]] if args.quick else [LLAMA, MOE]
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        measured = [(shape, *measure(work, shape, TINY[shape["model_type"]])) for shape in shapes]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    buffers = {"baseline": 0, "import": 0, "export": 0}  # export streams into its 512 MiB shards
    lines = [
        "# tools/convert_hf.py: peak memory and throughput",
        "",
        f"Generated by `benchmarks/convert_memory.py{' --quick' if args.quick else ''}` on {socket.gethostname()}, "
        f"{datetime.date.today().isoformat()}, OMP_NUM_THREADS=1, total runtime {time.perf_counter() - t_start:.0f} s.",
        "",
        "Synthetic checkpoints of random fp32 weights, untied. Each task in a fresh process, after a warm-up on a "
        "tiny checkpoint of the same family; 'allocated' = peak RssAnon, 'resident' = VmHWM (includes mmap'd file "
        "pages), both minus their values before the task; the faster time and the higher peaks of two rounds. "
        "Goal: allocated < 1.5x the largest tensor + buffer, throughput >= 0.8x the baseline (a plain safetensors "
        "read and write of the same bytes). The page cache holds the files (page-cache speeds, not disk speeds).",
        "",
        "| checkpoint | task | GB | seconds | GB/s | vs baseline | peak allocated [MiB] | peak resident [MiB] | "
        "buffer [MiB] | allocated / (1.5 x largest + buffer) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, results, facts in measured:
        base_rate = results["baseline"]["bytes"] / results["baseline"]["seconds"]
        for task, r in results.items():
            rate = r["bytes"] / r["seconds"]
            bound = 1.5 * facts["largest"] + buffers[task]
            lines.append(f"| {shape['model_type']} | {task} | {r['bytes'] / 1e9:.2f} | {r['seconds']:.2f} | "
                         f"{rate / 1e9:.2f} | {rate / base_rate:.2f}x | {r['peak_anon'] / 2**20:.0f} | "
                         f"{r['peak'] / 2**20:.0f} | {buffers[task] / 2**20:.0f} | {r['peak_anon'] / bound:.2f} |")
    lines.append("")
    for shape, _, facts in measured:
        fields = ", ".join(f"{k}={v}" for k, v in shape.items() if k != "model_type")
        lines.append(f"- {shape['model_type']} ({fields}): {facts['total'] / 1e9:.2f} GB in {facts['count']} "
                     f"tensors, largest {facts['largest'] / 2**20:.0f} MiB; export after import is bitwise identical "
                     f"to the input: {facts['identical']}.")
    lines += [
        "",
        "The baseline maps whole 1 GB input shards (safetensors' mmap: resident, not allocated); import and "
        "export hold about one parameter at a time, in one buffer reused for every parameter.",
    ]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
