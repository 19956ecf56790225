"""Contract of the front door end to end, on a real pretrained instruct model (SmolLM2-135M-Instruct from
`tools/fetch_models.py`) and a dataset in verl's RL parquet format (`tools/make_math_prompts.py`):

- `python -m megatron_gvpo.train --config configs/smollm2_arithmetic.yaml` (the README's recipe, shortened)
  runs online GVPO: the SGLang server the trainer starts serves the checkpoint, prompts are rendered with its
  chat template, answers stop at its end-of-turn token (<|im_end|>, from generation_config.json) and the math
  reward scores them with no failures; the weights move (KL to the start policy > 0).
- `tools/convert_hf.py export` of the run's training checkpoint loads in transformers, and its greedy answers
  to held-out chat prompts are the trainer's: at every generated position the Megatron model loaded from the
  same checkpoint (the trainer's own weights, no conversion) puts its argmax on transformers' token, with
  logits equal within the tolerance of tests/test_real_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_real_checkpoint import ATOL, RTOL, real_logits_run

REPO = Path(__file__).resolve().parents[1]


def test_online_gvpo_on_a_real_checkpoint_then_export_generates_the_trainers_text(gloo, tmp_path, smollm2):
    pytest.importorskip("sglang")
    import transformers

    from megatron_gvpo.megatron.convert.to_hf import export_hf
    from tools.make_math_prompts import write

    train_file, heldout_file = write(tmp_path / "data", train=16, heldout=4, seed=1)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_gvpo.train", "--config", "configs/smollm2_arithmetic.yaml", "--set",
               f"run.dir={run}", f"model.path={smollm2}", f"prompts.path={train_file}",
               f"prompts.eval_path={heldout_file}", "train.steps=2", "algo.group_size=4",
               "train.global_batch_size=16", "train.micro_batch_size=8", "train.optimizer_steps_per_rollout=1",
               "train.lr_warmup_steps=0", "rollout.eval_interval=0", "rollout.eval_k=2",
               "prompts.eval_size=4",
               # Cooler sampling and cut answers kept as scored: the start policy then earns reward often enough
               # that 16 samples disagree within groups (at T=1 with cut answers zeroed it averages ~6%).
               "rollout.temperature=0.7", "rollout.on_truncated=keep"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["reward_failed"] == 0 and r["dropped_groups"] == 0 and r["server_restarts"] == 0
        assert r["tokens"] > 0
    assert max(r["grad_norm"] for r in steps) > 0  # a step whose groups all agree has no gradient (GVPO's weights)
    # Sampled at temperature 1 the model often rambles past 24 tokens, but some answers end at <|im_end|>.
    assert min(r["truncated_frac"] for r in steps) < 1
    assert records[-1]["kl_to_start"] > 0 and "eval_greedy" in records[0] and "eval_greedy" in records[-1]
    log = (run / "logs" / "sglang_0.log").read_text()
    assert log.count("POST /generate") >= 4  # rollouts and evaluations went through the server

    # The trainer's weights, exported, generate what the trainer's own model predicts.
    checkpoint = run / "checkpoints" / "step_0000002"
    export_hf(checkpoint, tmp_path / "export", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    questions = [row["prompt"] for row in _rows(heldout_file)][:2]
    sequences, prompt_lens = [], []
    for chat in questions:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()
        sequences.append(out)
        prompt_lens.append(len(ids))
    ids_BS = torch.full((len(sequences), max(map(len, sequences))), tokenizer.pad_token_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids_BS[i, : len(s)] = torch.tensor(s)
    (got_BSV,) = [r for r in gloo.run(1, real_logits_run, str(smollm2), str(checkpoint), 1, 1, ids_BS)
                  if r is not None]
    with torch.no_grad():
        want_BSV = model(ids_BS).logits
    for i, (s, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        generated = torch.tensor(s[p:])
        # The logits at position t predict token t + 1: positions p-1 .. len-2 predict the generated tokens.
        assert torch.equal(got_BSV[i, p - 1: len(s) - 1].argmax(-1), generated), tokenizer.decode(s[p:])
        torch.testing.assert_close(got_BSV[i, : len(s)], want_BSV[i, : len(s)], rtol=RTOL, atol=ATOL)


def _rows(path: Path) -> list[dict]:
    import datasets

    return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
