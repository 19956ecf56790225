"""Rollout tokens/s: the SGLang server (megatron_gvpo's rollout engine) vs `transformers.generate`, same model.

What it measures: a Llama-style model of random fp32 weights (hidden 512, 8 layers, FFN 1408, 8 heads / 2 KV
heads, vocabulary 16000; ~40 M parameters) generates, for PROMPTS prompts of PROMPT_LEN random tokens,
GROUP samples each of exactly NEW_TOKENS tokens (EOS ignored, temperature 1, with per-token log-probs, as a
GVPO rollout needs):

    sglang        `SGLangClient.generate` against one `SGLangServer` on SGLang's CPU path (one request with
                  n=GROUP for all prompts; OMP_NUM_THREADS=1 in the server, as the rollout engine runs it)
    transformers  `model.generate` on the batch of PROMPTS x GROUP rows (do_sample, output_scores, log-probs
                  gathered from the processed scores), torch with one thread

Both run on the same machine, one after the other, REPEATS times after a warm-up; the table has the median
tokens/s and the ratio to transformers. Server start-up is not counted (it happens once per run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout_throughput.py           # writes benchmarks/results/...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout_throughput.py --quick   # smaller, prints only
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, publish  # before the project: puts the repository on sys.path

DEFAULT_OUT = RESULTS / "rollout_throughput.md"

from weight_sync import QUICK, build_model  # noqa: E402

FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=16000)
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 16, 8, 16, 64
REPEATS = 3


def transformers_rollout(model, prompts: list[list[int]], new_tokens: int):
    import torch

    batch = torch.tensor([p for p in prompts for _ in range(GROUP)])
    with torch.no_grad():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=2)
    tokens = out.sequences[:, batch.shape[1]:]
    logprobs = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    shape = QUICK if args.quick else FULL
    new_tokens = NEW_TOKENS // 4 if args.quick else NEW_TOKENS
    t_start = time.perf_counter()

    import torch
    import transformers

    from megatron_gvpo.rollout.base import SamplingParams
    from megatron_gvpo.rollout.client import SGLangClient
    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (PROMPTS, PROMPT_LEN), generator=g).tolist()
    generated = PROMPTS * GROUP * new_tokens
    work = Path(tempfile.mkdtemp(prefix="rollout_throughput_"))
    seconds: dict[str, list[float]] = {"sglang": [], "transformers": []}
    try:
        build_model(work / "hf", shape)
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        with SGLangServer(SGLangServerConfig(model_path=str(work / "hf"), max_total_tokens=32768)) as server:
            client = SGLangClient([server.url])
            sampling = SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)

            def sglang():
                groups = client.generate(prompts, sampling)
                assert sum(len(x.token_ids) for g in groups for x in g) == generated

            def hf():
                tokens, _ = transformers_rollout(model, prompts, new_tokens)
                assert tokens.numel() == generated

            for fn in (sglang, hf):
                fn()  # warm-up
            for _ in range(REPEATS):  # interleaved, so that a noisy stretch hits both
                for name, fn in (("sglang", sglang), ("transformers", hf)):
                    start = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - start)
                    print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {name: generated / statistics.median(s) for name, s in seconds.items()}
    lines = [
        "# Rollout throughput: SGLang server vs transformers.generate",
        "",
        f"Generated by `benchmarks/rollout_throughput.py{' --quick' if args.quick else ''}` on "
        f"{socket.gethostname()}, {datetime.date.today().isoformat()}, torch {torch.__version__}, one thread each, "
        f"total runtime {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Llama ({', '.join(f'{k}={v}' for k, v in shape.items())}, fp32). {PROMPTS} prompts of {PROMPT_LEN} "
        f"tokens x {GROUP} samples x {new_tokens} new tokens (EOS ignored), temperature 1, with log-probs: "
        f"{generated} generated tokens per rollout; median of {REPEATS} after a warm-up.",
        "",
        "| engine | seconds (runs) | tokens/s | vs transformers |",
        "|---|---|---|---|",
    ]
    for name, s in seconds.items():
        lines.append(f"| {name} | {', '.join(f'{x:.2f}' for x in s)} | {rate[name]:.0f} | "
                     f"{rate[name] / rate['transformers']:.2f}x |")
    lines += [
        "",
        "On CPU SGLang runs its generic torch_native attention path (a Python loop over sequences). On H100 it "
        "uses its CUDA attention kernels and CUDA graphs instead, so this ratio says nothing about GPU "
        "throughput; it shows that the CPU path the tests and the main job use costs no more than the obvious "
        "alternative.",
    ]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
