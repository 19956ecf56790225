"""What rollout routing replay (R3) is for: the trainer-vs-rollout log-prob mismatch per token, with and without
replay, on the same samples.

Set-up: a small random Qwen3-MoE (hidden 256, 4 layers, 32 experts top-4, every layer a mixture) exported by
the converter; SGLang serves it on this CPU and samples groups (temperature 1) returning each sample's token
log-probs and the experts it routed every token to. The trainer's Megatron model (fp32, the same weights)
scores the same tokens twice: routing by its own top-k, and replaying SGLang's experts
(`megatron_gvpo.megatron.routing_replay`). Per scored token: |trainer log-prob - rollout log-prob|.

Two rollout precisions, the same trainer: SGLang in fp32 (the kernels differ from Megatron's, the arithmetic
barely) and in bf16 (as rollouts run in production; the trainer's routers then see logits that differ in the
third digit, so near-tied experts flip). Also reported: the share of (token, MoE layer) pairs whose expert
set differs between the trainer's own top-k and SGLang's.

    .venv/bin/python benchmarks/routing_replay.py            # writes benchmarks/results/routing_replay.md
    .venv/bin/python benchmarks/routing_replay.py --quick    # fewer samples, prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
from pathlib import Path

from _common import RESULTS, publish  # before the project: puts the repository on sys.path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=32,
             num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)


def word_tokenizer(size: int):
    """A word-level tokenizer of `size` ids (<pad>, <eos>, <unk>, w3, w4, ...): the samples are token ids, but
    SGLang's start-up request and its detokenizer need a tokenizer that covers the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(root: Path) -> Path:
    """A random Qwen3-MoE through the converter (import + export), as the trainer would serve it."""
    import transformers

    from megatron_gvpo.megatron.convert.to_hf import export_hf
    from megatron_gvpo.megatron.convert.to_megatron import import_hf

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**MODEL, eos_token_id=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    word_tokenizer(MODEL["vocab_size"]).save_pretrained(root / "hf")
    import_hf(root / "hf", root / "megatron", progress=False)
    export_hf(root / "megatron", root / "export", progress=False)
    return root / "export"


def sample(model_dir: Path, dtype: str, prompts: list[list[int]], group: int, new_tokens: int):
    from megatron_gvpo.rollout.base import SamplingParams
    from megatron_gvpo.rollout.client import SGLangClient
    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    cfg = SGLangServerConfig(model_path=str(model_dir), dtype=dtype, max_total_tokens=8192,
                             return_routed_experts=True, random_seed=0)
    with SGLangServer(cfg) as server:
        client = SGLangClient([server.url], routed_experts_shape=(MODEL["num_hidden_layers"],
                                                                   MODEL["num_experts_per_tok"]))
        return client.generate(prompts, SamplingParams(n=group, temperature=1.0, max_new_tokens=new_tokens,
                                                       ignore_eos=True, return_routed_experts=True))


def trainer_scores(model_dir: Path, prompts, groups):
    """(token log-probs without replay, with replay, the trainer's own routes) [rows, s] / routes per layer,
    from a single-process Megatron model on the exported weights."""
    import torch.distributed as dist

    from megatron_gvpo.data.groups import Group, collate
    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.megatron.routing_replay import record_routes, recorded_routes
    from megatron_gvpo.megatron.step import LogprobSpec, compute_token_logprobs
    from megatron_gvpo.megatron.weights import load_hf_weights
    from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
    from megatron_gvpo.models.hf_io import SafetensorsCheckpoint, load_hf_config
    from megatron_gvpo.utils.distributed import free_port

    apply_cpu_compat()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ctx = initialize_parallel(ParallelConfig(), seed=0)
    try:
        arch = arch_from_hf(load_hf_config(model_dir))
        padded = padded_vocab_size(arch.vocab_size, 1)
        config = transformer_config(arch, routing_replay=True)
        model = build_gpt_model(arch, config, padded_vocab_size=padded, max_sequence_length=512).eval()
        load_hf_weights([model], arch, SafetensorsCheckpoint(model_dir), tp_rank=0, tp_size=1,
                        padded_vocab_size=padded)
        batch = collate([Group(tuple(p), tuple(tuple(x.token_ids) for x in g), (0.0,) * len(g), f"prompt {i}",
                               tuple(x.routed_experts.to(torch.int16) for x in g))
                         for i, (p, g) in enumerate(zip(prompts, groups, strict=True))])
        spec = LogprobSpec(tp_group=ctx.tp_group, vocab_size=arch.vocab_size)
        own_batch = {k: v for k, v in batch.items() if k != "routed_experts"}
        record_routes(model, True)
        own = compute_token_logprobs([model], own_batch, ctx, len(own_batch["tokens"]), spec)
        own_routes = recorded_routes(model)  # [s * rows, k] per layer, [s, rows] order
        record_routes(model, False)
        replayed = compute_token_logprobs([model], batch, ctx, len(batch["tokens"]), spec)
        return batch, own, replayed, own_routes
    finally:
        destroy_parallel()
        dist.destroy_process_group()


def measure(model_dir: Path, dtype: str, prompts, group: int, new_tokens: int) -> dict:
    groups = sample(model_dir, dtype, prompts, group, new_tokens)
    batch, own, replayed, own_routes = trainer_scores(model_dir, prompts, groups)
    rows, s = batch["tokens"].shape
    rollout = torch.zeros(rows, s)
    n = 0
    for p, g in zip(prompts, groups, strict=True):
        for x in g:  # log pi(token_t | prefix) sits at the column of the token before it
            rollout[n, len(p) - 1 : len(p) - 1 + len(x.token_ids)] = torch.tensor(x.logprobs)
            n += 1
    mask = batch["loss_mask"]
    gap_own, gap_replay = (own - rollout).abs()[mask], (replayed - rollout).abs()[mask]
    # Expert sets per (token, layer) on the tokens the rollout routed, trainer's own vs SGLang's.
    sglang = batch["routed_experts"].long()  # [rows, s, layers, k]
    routed = torch.zeros(rows, s, dtype=torch.bool)
    for row, length in enumerate((batch["tokens"] != 0).sum(1).tolist()):
        routed[row, : length - 1] = True
    differ = []
    for layer, r in enumerate(own_routes):
        mine = r.reshape(s, rows, -1).transpose(0, 1).sort(-1).values
        theirs = sglang[:, :, layer].sort(-1).values
        differ.append((mine != theirs).any(-1)[routed])
    differ = torch.cat(differ).float()
    return {"dtype": dtype, "tokens": int(mask.sum()), "flip": float(differ.mean()),
            "own_mean": float(gap_own.mean()), "own_p99": float(gap_own.quantile(0.99)),
            "own_max": float(gap_own.max()),
            "rep_mean": float(gap_replay.mean()), "rep_p99": float(gap_replay.quantile(0.99)),
            "rep_max": float(gap_replay.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "routing_replay.md")
    args = parser.parse_args()
    num_prompts, group, new_tokens = (4, 2, 8) if args.quick else (32, 4, 32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, MODEL["vocab_size"], (12,), generator=g).tolist() for _ in range(num_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        results = [measure(model_dir, dtype, prompts, group, new_tokens) for dtype in ("float32", "bfloat16")]
    lines = [
        "# Rollout routing replay: trainer-vs-rollout log-prob mismatch", "",
        f"{datetime.date.today()} on {socket.gethostname()}, CPU; `python benchmarks/routing_replay.py`. "
        f"Random Qwen3-MoE ({MODEL['num_hidden_layers']} layers, {MODEL['num_experts']} experts top-"
        f"{MODEL['num_experts_per_tok']}, hidden {MODEL['hidden_size']}), {num_prompts} prompts x {group} samples "
        f"x {new_tokens} tokens at temperature 1. Trainer: Megatron, fp32. |Δ| = |trainer log-prob - SGLang's "
        "log-prob| per sampled token; 'routes differ' = share of (token, MoE layer) pairs whose expert set "
        "differs between the trainer's own top-k and SGLang's.", "",
        "| SGLang dtype | tokens | routes differ | mean |Δ| own routing | p99 | max | mean |Δ| replayed | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['tokens']} | {100 * r['flip']:.2f}% | {r['own_mean']:.2e} | "
                     f"{r['own_p99']:.2e} | {r['own_max']:.2e} | {r['rep_mean']:.2e} | {r['rep_p99']:.2e} | "
                     f"{r['rep_max']:.2e} |")
    bf16 = results[-1]
    lines += ["", f"With a bf16 rollout, {100 * bf16['flip']:.1f}% of the (token, layer) routes differ and replay "
              f"lowers the mismatch {bf16['own_mean'] / bf16['rep_mean']:.1f}x on average, "
              f"{bf16['own_p99'] / bf16['rep_p99']:.1f}x at the 99th percentile and "
              f"{bf16['own_max'] / bf16['rep_max']:.1f}x at the worst token: the large gaps are the flipped "
              "experts; what remains is bf16 arithmetic. With an fp32 rollout no route differs and replay changes "
              "nothing: the two engines then compute the same network."]
    publish("\n".join(lines) + "\n", None if args.quick else args.out)


if __name__ == "__main__":
    main()
