"""A short supervised warm start on the addition task, so online GVPO starts from a policy with some reward.

A randomly initialised model almost never writes a correct 9-digit sum, so every group's rewards would be
equal (all 0) and carry no signal. This trains the Hugging Face model of `model_config` (transformers' own
Llama code, plain PyTorch, CPU) on freshly generated problems (never the held-out ones) with cross-entropy on
the answer and <eos>, and stops as soon as greedy accuracy on held-out prompts reaches `target_accuracy`: a
weak start on purpose, so the RL gain that follows is visible. The result is an HF model directory (weights,
config, tokenizer) that `model.path` can point at.

`python -m megatron_gvpo.experiments.addition` runs it (into runs/assets/tiny/warm_start, ~1 min on 2 cores)
when the main job's warm start is missing.

With `init_from` and no target it is also the supervised baseline of the evidence benchmarks: continued
supervised training from the warm start for a fixed number of steps (benchmarks/stability.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch


@dataclass
class WarmStartConfig:
    model_config: str = "configs/models/tiny_llama.json"
    tokenizer: str = "runs/assets/tiny/tokenizer"
    heldout_prompts: str = "runs/assets/tiny/heldout_prompts.jsonl"
    digits: int = 8
    target_accuracy: float | None = 0.15
    """Stop once held-out greedy accuracy reaches this; None: train max_steps steps."""
    init_from: str = ""
    """Start from this HF model directory's weights instead of a random initialisation of model_config."""
    batch_size: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After the linear warm-up: cosine decay to 0 at max_steps, or constant."""
    max_steps: int = 2000
    eval_every: int = 25
    eval_size: int = 256
    seed: int = 0


def _encode(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor([tok.encode(t, add_special_tokens=False) for t in texts])


@torch.no_grad()
def greedy_accuracy(model, tok, prompts: list[str], answers: list[str]) -> float:
    """Fraction of prompts whose greedy continuation is exactly the answer followed by <eos>."""
    model.eval()
    ids = _encode(tok, prompts)  # every prompt of the task has the same length: no padding
    want = _encode(tok, answers)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=want.shape[1] + 1, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    model.train()
    eos = torch.full((len(prompts), 1), tok.eos_token_id)
    target = torch.cat([want, eos], 1)
    if out.shape[1] < target.shape[1]:  # every row stopped early: none can be the whole answer
        return 0.0
    return float((out[:, : target.shape[1]] == target).all(1).float().mean())


def warm_start(out_dir: str | Path | None, cfg: WarmStartConfig | None = None, log=print) -> dict:
    """Train, evaluate every `eval_every` steps (and at step 0 when starting from `init_from`), save the model
    to `out_dir` (None: keep nothing); returns the summary with the evaluation history. `cfg` None: the defaults."""
    import transformers

    from megatron_gvpo.data.addition import make_problems

    cfg = cfg if cfg is not None else WarmStartConfig()
    torch.manual_seed(cfg.seed)
    tok = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer)
    if cfg.init_from:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.from_pretrained(cfg.model_config)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heldout = [json.loads(line) for line in Path(cfg.heldout_prompts).read_text().splitlines() if line.strip()]
    heldout = heldout[: cfg.eval_size]
    eval_prompts, eval_answers = [r["prompt"] for r in heldout], [r["label"] for r in heldout]
    exclude = {r["prompt"] for r in heldout}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    decay = ((lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.max_steps))) if cfg.lr_schedule == "cosine"
             else (lambda s: 1.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * decay(s))
    start, accuracy, step, history = time.perf_counter(), 0.0, 0, []
    if cfg.init_from:
        accuracy = greedy_accuracy(model, tok, eval_prompts, eval_answers)
        history.append({"step": 0, "heldout_greedy": accuracy})
    for step in range(1, cfg.max_steps + 1):
        problems = make_problems(cfg.batch_size, cfg.digits, seed=cfg.seed * 1_000_003 + step, exclude=exclude)
        prompt = _encode(tok, [p for p, _ in problems])
        answer = torch.cat([_encode(tok, [a for _, a in problems]),
                            torch.full((len(problems), 1), tok.eos_token_id)], 1)
        tokens = torch.cat([prompt, answer], 1)
        labels = tokens.clone()
        labels[:, : prompt.shape[1]] = -100  # learn the answer, not the prompt
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0:
            accuracy = greedy_accuracy(model, tok, eval_prompts, eval_answers)
            history.append({"step": step, "loss": loss.item(), "heldout_greedy": accuracy})
            log(f"warm start step {step}: loss {loss.item():.3f}, held-out greedy accuracy {accuracy:.3f} "
                f"({time.perf_counter() - start:.0f} s)")
            if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy:
                break
    summary = {"steps": step, "heldout_greedy": accuracy, "seconds": time.perf_counter() - start,
               "reached_target": cfg.target_accuracy is None or accuracy >= cfg.target_accuracy, "history": history}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        (out_dir / "warm_start.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
