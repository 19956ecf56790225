"""Contract of online GVPO (megatron_gvpo/rollout/online.py inside megatron_gvpo/train.py's loop).

Pinned: prompt files load with path:line errors for bad rows (or counted skips); a group dropped by the
rollout (abort, failed reward) becomes singleton rows, which GVPO's loss ignores exactly (same loss and gradient
as the batch without them); a TP=2 trainer runs the whole loop against a real SGLang server it starts itself
(rollout -> reward -> log-probs -> two optimizer steps -> distributed weight sync -> held-out evaluation),
every evaluation reports the weight version of the last sync, and a second run in the same directory resumes
from the checkpoint, restarts the server on the checkpoint's weights and continues the step count.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_gvpo.algo import gvpo_loss
from megatron_gvpo.data.prompts import PromptDataConfig, load_prompts
from megatron_gvpo.rollout.online import _ungroup

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from megatron_gvpo.data import addition

    return addition.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_files_load_and_bad_rows_name_their_line(tmp_path, tok):
    good = [{"prompt": "12+34=", "label": "046"}, {"prompt_ids": [4, 5, 13, 6, 14], "id": 7}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    prompts, stats = load_prompts(path, PromptDataConfig(prompt_add_special_tokens=False), tok, vocab_size=16)
    assert [p.ids for p in prompts] == [tuple(tok.encode("12+34=", add_special_tokens=False)), (4, 5, 13, 6, 14)]
    assert prompts[0].label == "046" and prompts[1].text == "12+3=" and stats.kept == 2
    bad = [({"prompt": "1+2=", "extra": 1}, "extra: unknown key"), ({"label": 3}, "needs exactly one"),
           ({"prompt": ""}, "prompt: empty"), ({"prompt_ids": [1, 99]}, "token id 99 >= the model's vocab_size"),
           ({"prompt": "1" * 30}, "30 tokens > prompts.max_prompt_tokens=20"), ("[1", "not JSON")]
    for row, message in bad:
        path.write_text(json.dumps(good[0]) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        cfg = PromptDataConfig(max_prompt_tokens=20)
        with pytest.raises(ValueError, match=rf"p\.jsonl:2.*{message}"):
            load_prompts(path, cfg, tok, vocab_size=16)
        prompts, stats = load_prompts(path, PromptDataConfig(max_prompt_tokens=20, on_bad_row="skip"), tok, 16)
        assert len(prompts) == 1 and stats.skipped == 1 and message.split(":")[0] in stats.first_error


def test_a_dropped_group_carries_no_signal():
    """Rows of dropped groups become groups of one: the loss and its gradient equal those of the batch without
    them (they leave the normaliser too)."""
    g = torch.Generator().manual_seed(0)
    group_ids = torch.arange(4).repeat_interleave(3)
    logp = torch.randn(12, generator=g, requires_grad=True)
    ref, rewards = torch.randn(12, generator=g), torch.rand(12, generator=g)
    ungrouped = _ungroup(group_ids, {1, 3})
    assert len(set(ungrouped[3:6].tolist()) | set(ungrouped[9:].tolist())) == 6
    loss = gvpo_loss(logp, ref, rewards, ungrouped, beta=0.1)
    (grad,) = torch.autograd.grad(loss, logp)
    keep = torch.tensor([0, 1, 2, 6, 7, 8])
    want = gvpo_loss(logp[keep], ref[keep], rewards[keep], group_ids[keep], beta=0.1)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert torch.allclose(loss, want) and torch.allclose(grad, want_grad) and grad[[3, 4, 5, 9, 10, 11]].eq(0).all()
    assert torch.equal(_ungroup(group_ids, set()), group_ids)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_gvpo.data.addition import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, digits=2, train_prompts=64, heldout_prompts=8)
    return out


def response_length(prompt: str, response: str, label) -> float:
    """A reward a random policy's groups disagree on (the task's exact match is 0 for all of them)."""
    return len(response.split("<eos>")[0]) / 6


def online_run(run_dir, assets, steps):
    from megatron_gvpo.train import main
    from tests.gloo_pool import checkpoint_helpers_allowed

    with checkpoint_helpers_allowed():
            main(["--config", str(REPO / "configs/addition_gvpo.yaml"), "--set", f"run.dir={run_dir}",
              f"model.path={REPO / 'configs/models/tiny_llama.json'}", f"model.tokenizer={assets / 'tokenizer'}",
              f"prompts.path={assets / 'train_prompts.jsonl'}", f"prompts.eval_path={assets / 'heldout_prompts.jsonl'}",
              "parallel.tp=2", f"train.steps={steps}", "run.save_interval=2", "algo.group_size=4",
              "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.max_new_tokens=6",
              "rollout.max_total_tokens=2048", "rollout.eval_interval=2", "model.seq_length=16",
              "prompts.max_prompt_tokens=8", "reward.kind=function",
              "reward.function=tests.test_online:response_length",
              "train.lr=1e-2"])
    return True


def test_online_loop_with_a_real_server_resumes(gloo, assets, tmp_path):
    pytest.importorskip("sglang")
    gloo.run(2, online_run, str(tmp_path), assets, 2)
    gloo.run(2, online_run, str(tmp_path), assets, 4)  # resumes at step 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    for r in (r for r in records if "loss" in r):
        for key in ("reward_mean", "accuracy", "truncated_frac", "dropped_groups", "time_rollout_s",
                    "time_logprob_s", "time_train_s", "time_sync_s", "cov_reward_logp"):
            assert key in r, key
        assert r["reward_mean"] > 0 and r["time_sync_s"] > 0 and r["grad_norm"] > 0  # rewards differ in groups
    evals = [(r["step"], r["eval_weight_version"]) for r in records if "eval_greedy" in r]
    # Before training, after step 2, then on resume (the server restarted on the step-2 weights) and at the end.
    assert evals == [(0, "step-0"), (2, "step-2"), (2, "step-2"), (4, "step-4")]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert (tmp_path / "logs" / "sglang_0.log").is_file()
