"""Contract of online GVPO (megatron_gvpo/rollout/online.py inside megatron_gvpo/train.py's loop).

Pinned: prompt files load with path:line errors for bad rows (or counted skips); a group dropped by the
rollout (abort, failed reward) becomes singleton rows, which GVPO's loss ignores exactly (same loss and gradient
as the batch without them); a TP=2 trainer runs the whole loop against a real SGLang server it starts itself
(rollout -> reward -> log-probs -> two optimizer steps -> distributed weight sync -> held-out evaluation),
every evaluation reports the weight version of the last sync, and a second run in the same directory resumes
from the checkpoint, restarts the server on the checkpoint's weights and continues the step count; with
source 'mix' half of each batch is replayed from a buffer that survives the resume; a server SIGKILLed
mid-run is restarted and reloaded, and the run finishes; KL to the start policy is measured on step 1's
samples at every evaluation.
"""

import json
import threading
import warnings
from pathlib import Path

import pytest
import torch

from megatron_gvpo.algo import gvpo_loss
from megatron_gvpo.data.groups import Group
from megatron_gvpo.data.prompts import PromptDataConfig, load_prompts
from megatron_gvpo.rollout.online import _ungroup
from megatron_gvpo.rollout.replay import ReplayBuffer
from tests.processes import metrics_records

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
    bad = [({"label": 3}, "prompt: missing; a row needs 'prompt', 'prompt_ids' or 'messages'"),
           ({"prompt": "1+2=", "prompt_ids": [1]}, "prompt: a row has either"),
           ({"prompt": ""}, "prompt: empty"), ({"prompt_ids": [1, 99]}, "token id 99 >= the model's vocab_size"),
           ({"prompt": "1" * 30}, "30 tokens > prompts.max_prompt_tokens=20"), ("[1", "not valid JSON")]
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


def test_replay_buffer_keeps_the_newest_and_resumes_its_draws():
    groups = [Group((i,), ((i, 1), (i, 2)), (0.0, 1.0), f"rollout:{i}") for i in range(10)]
    buffer = ReplayBuffer(capacity=6, seed=3)
    buffer.add(groups[:4])
    buffer.add(groups[4:])
    assert [g.prompt_ids for g in buffer.groups] == [(i,) for i in range(4, 10)]
    first = buffer.draw(3)
    assert len({g.prompt_ids for g in first}) == 3 and all(g in groups[4:] for g in first)
    state = buffer.state_dict()
    resumed = ReplayBuffer(capacity=6, seed=99)
    resumed.load_state_dict(state)
    assert resumed.draw(4) == buffer.draw(4)  # same groups, same generator position
    with pytest.raises(ValueError, match="draw of 7 groups from a buffer of 6"):
        buffer.draw(7)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_gvpo.data.addition import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, digits=2, train_prompts=64, heldout_prompts=8, online_prompts=64)
    return out


def response_length(prompt: str, response: str, label) -> float:
    """A reward a random policy's groups disagree on (the task's exact match is 0 for all of them)."""
    return len(response.split("<eos>")[0]) / 6


GENUINE_WARNING = "response_length_warning_once: a genuine warning, which every run must show"
_warned = threading.Lock()


def response_length_warning_once(prompt: str, response: str, label) -> float:
    """response_length, and at its first call in a process a warning of its own (scoring runs in threads: the lock
    makes it one), which the run's output must show among the silenced notices (tests.processes.assert_quiet)."""
    if _warned.acquire(blocking=False):
        warnings.warn(GENUINE_WARNING, UserWarning, stacklevel=1)
    return response_length(prompt, response, label)


_CRASH = {"at_call": 0, "calls": 0}


def response_length_crashing_the_server(prompt: str, response: str, label) -> float:
    """response_length; its `_CRASH['at_call']`-th call SIGKILLs the SGLang servers this process started, as a
    crash would (the trainer learns of it at its next request)."""
    import os
    import signal

    import psutil

    _CRASH["calls"] += 1
    if _CRASH["calls"] == _CRASH["at_call"]:
        for child in psutil.Process().children():
            if "sglang.launch_server" in " ".join(child.cmdline()):
                os.killpg(child.pid, signal.SIGKILL)
    return response_length(prompt, response, label)


def online_run(run_dir, assets, steps, crash_at_call=0):
    from megatron_gvpo.train import main
    from tests.gloo_pool import checkpoint_helpers_allowed

    _CRASH.update(at_call=crash_at_call, calls=0)
    with checkpoint_helpers_allowed():
        main(["--config", str(REPO / "configs/addition_gvpo.yaml"), "--set", f"run.dir={run_dir}",
              f"model.path={REPO / 'configs/models/tiny_llama.json'}", f"model.tokenizer={assets / 'tokenizer'}",
              f"prompts.path={assets / 'train_prompts.jsonl'}", f"prompts.eval_path={assets / 'heldout_prompts.jsonl'}",
              "parallel.tp=2", f"train.steps={steps}", "run.save_interval=2", "algo.group_size=4",
              "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.max_new_tokens=6",
              "rollout.max_total_tokens=2048", "rollout.eval_interval=2", "model.seq_length=16",
              "prompts.max_prompt_tokens=8", "reward.kind=function",
              "reward.function=tests.test_online:response_length_crashing_the_server",
              "rollout.source=mix", "rollout.replay_fraction=0.5", "train.lr=1e-2", "rollout.mode=sync"])
    return True


def test_online_loop_with_a_real_server_resumes_replays_and_survives_a_server_crash(gloo, assets, tmp_path):
    """TP=2 trainer, source 'mix' (half of each batch replayed once the buffer holds 4 groups). The second run
    resumes at step 2; the server it starts is SIGKILLed while step 3 is scored: the weight sync that follows
    fails, the server is restarted, reloaded with the step-3 weights, and the run finishes."""
    pytest.importorskip("sglang")
    gloo.run(2, online_run, str(tmp_path), assets, 2)
    gloo.run(2, online_run, str(tmp_path), assets, 4, 1)
    records = metrics_records(tmp_path)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("reward_mean", "accuracy", "truncated_frac", "dropped_groups", "time_rollout_s",
                    "time_logprob_s", "time_train_s", "time_sync_s", "cov_reward_logp"):
            assert key in r, key
        assert r["reward_mean"] > 0 and r["time_sync_s"] > 0 and r["grad_norm"] > 0  # rewards differ in groups
    assert [r["replay_groups"] for r in train] == [0, 4, 4, 4]
    assert [r["replay_buffer_groups"] for r in train] == [8, 12, 16, 20]
    assert [r["server_restarts"] for r in train] == [0, 0, 0, 1]  # step 3's record was made before its sync
    evals = [(r["step"], r["eval_weight_version"]) for r in records if "eval_greedy" in r]
    # Before training, after step 2 (the resumed run does not evaluate its start again), at the end.
    assert evals == [(0, "step-0"), (2, "step-2"), (4, "step-4")]
    kl = [r["kl_to_start"] for r in records if "kl_to_start" in r]
    assert len(kl) == 2 and kl[1] > 0  # measured at steps 2 and 4, on step 1's samples kept in the checkpoint
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    # Started by the first run, by the resumed one, and once more after the crash.
    log = (tmp_path / "logs" / "sglang_0.log").read_text()
    assert log.count("The server is fired up") == 3
    # The restarted server gets the retried step-3 sync and step 4's, one bucket each: the recovery itself
    # reloads nothing when the failed work was a sync.
    assert log.rsplit("The server is fired up", 1)[1].count("POST /update_weights_from_distributed") == 2


def online_command(run_dir, assets, steps):
    import sys

    return [sys.executable, "-m", "megatron_gvpo.train", "--config", str(REPO / "configs/addition_gvpo.yaml"),
            "--set", f"run.dir={run_dir}", f"model.path={REPO / 'configs/models/tiny_llama.json'}",
            f"model.tokenizer={assets / 'tokenizer'}", f"prompts.path={assets / 'train_prompts.jsonl'}",
            f"prompts.eval_path={assets / 'heldout_prompts.jsonl'}", f"train.steps={steps}", "run.save_interval=1",
            "algo.group_size=4", "train.global_batch_size=16", "train.micro_batch_size=8",
            "rollout.max_new_tokens=6", "rollout.max_total_tokens=2048", "rollout.eval_interval=2",
            "model.seq_length=16", "prompts.max_prompt_tokens=8", "reward.kind=function",
            "reward.function=tests.test_online:response_length_warning_once", "rollout.seeded=true", "train.lr=1e-2",
            "rollout.mode=sync"]


def test_sigkill_at_a_random_point_then_resume_reproduces_the_online_run(assets, tmp_path):
    """rollout.seeded: samples depend on (weights, prompts, step) only. A run SIGKILLed at a random point (after
    1-3 logged steps: mid-rollout, mid-checkpoint or mid-sync) and started again equals, step by step, a run
    that was never interrupted: rewards, losses, held-out accuracy, KL to the start policy.
    Both runs' terminal output (the start, the resume) and their SGLang logs are free of the known-harmless notices
    and repeat no line, and the reward function's own warning shows (tests.processes.assert_quiet)."""
    import os
    import random
    import subprocess

    from tests.processes import assert_no_known_notices, assert_quiet, assert_same_run, signal_after_lines

    pytest.importorskip("sglang")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = subprocess.run(online_command(whole, assets, 4), cwd=REPO, env=env, check=True, capture_output=True,
                         text=True)
    assert_quiet(run.stdout + run.stderr, GENUINE_WARNING)
    lines = random.Random().choice([2, 3, 4])  # the first line is the evaluation before step 1
    code, out = signal_after_lines(online_command(killed, assets, 4), killed / "metrics.jsonl", lines)
    assert code == -9, out
    run = subprocess.run(online_command(killed, assets, 4) + ["--resume"], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True)
    assert_quiet(run.stdout + run.stderr, GENUINE_WARNING)
    for run_dir in (whole, killed):
        assert_no_known_notices((run_dir / "logs" / "sglang_0.log").read_text())

    want, got = metrics_records(whole), metrics_records(killed)
    assert [r["step"] for r in want] == [0, 1, 2, 3, 4], lines
    assert_same_run(want, got, lines)
    assert want[2]["kl_to_start"] > 0 and want[4]["reward_mean"] != want[1]["reward_mean"]


def test_async_rollout_stays_within_its_staleness_loses_nothing_and_resumes_after_sigkill(assets, tmp_path):
    """rollout.mode 'async', max_staleness 2, the server decoding two requests at a time so that generation
    outlasts a training step and weight updates land while requests are in flight. Every step trains on its
    prompts' complete groups (none aborted or dropped, so no request lost across an update; a doubled one would
    break the group count), sampled from weights at most 2 versions old. A run SIGKILLed at a random point and
    resumed trains on the same prompts at the same steps as the uninterrupted one (the samples in flight at the
    kill are generated again, from the checkpoint's weights), within the same bound."""
    import os
    import random
    import subprocess

    from tests.processes import signal_after_lines

    pytest.importorskip("sglang")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps, bound = 5, 2

    def command(run):
        return online_command(run, assets, steps) + [
            "rollout.mode=async", f"rollout.max_staleness={bound}", "rollout.in_flight_updates=pause",
            "rollout.max_running_requests=2"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(whole), cwd=REPO, env=env, check=True, capture_output=True)
    lines = random.Random().choice([2, 3, 4])  # the first line is the evaluation before step 1
    code, out = signal_after_lines(command(killed), killed / "metrics.jsonl", lines)
    assert code == -9, out
    subprocess.run(command(killed) + ["--resume"], cwd=REPO, env=env, check=True, capture_output=True)

    def trained(run):
        return [r for r in metrics_records(run) if "loss" in r]

    want, got = trained(whole), trained(killed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1)), lines
    assert [r["prompts_crc32"] for r in got] == [r["prompts_crc32"] for r in want], lines
    assert len({r["prompts_crc32"] for r in want}) == steps
    for r in want + got:
        assert r["staleness"] <= bound and r["aborted_groups"] == r["dropped_groups"] == 0, (r, lines)
    assert want[0]["staleness"] == 0 and max(r["staleness"] for r in want) >= 1  # generation overlapped training
    assert sum(r["updated_in_flight"] for r in want) > 0  # samples that an update reached mid-way


def attached_run(run_dir, assets, url, overrides=()):
    from megatron_gvpo.train import main
    from tests.gloo_pool import checkpoint_helpers_allowed

    with checkpoint_helpers_allowed():
        _attached_main(main, run_dir, assets, url, overrides)
    return True


def _attached_main(main, run_dir, assets, url, overrides=()):
    main(["--config", str(REPO / "configs/addition_gvpo.yaml"), "--set", f"run.dir={run_dir}",
          f"model.path={REPO / 'configs/models/tiny_llama.json'}", f"model.tokenizer={assets / 'tokenizer'}",
          f"prompts.path={assets / 'train_prompts.jsonl'}", f"prompts.eval_path={assets / 'heldout_prompts.jsonl'}",
          "train.steps=1", "run.save_interval=0", "algo.group_size=4", "train.global_batch_size=16",
          "train.micro_batch_size=8", "rollout.max_new_tokens=6", "model.seq_length=16", "prompts.max_prompt_tokens=8",
          "rollout.seeded=false", f"rollout.urls=[{url}]", "rollout.mode=sync", *overrides])


def test_attached_servers_get_the_trainers_weights_before_the_first_request(gloo, assets, tmp_path):
    """A server the trainer attaches to (rollout.urls; the launcher starts them with random weights, SGLang's
    --load-format dummy) is loaded with the trainer's weights first: the evaluation before step 1 already sees
    version step-0 (the server's own 'default' would fail it)."""
    pytest.importorskip("sglang")
    import shutil

    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(REPO / "configs/models/tiny_llama.json", model / "config.json")
    config = SGLangServerConfig(model_path=str(model), max_total_tokens=2048,
                                extra_args=("--load-format", "dummy", "--tokenizer-path", str(assets / "tokenizer")))
    data = tmp_path / "groups.jsonl"
    prompts = [json.loads(line) for line in (assets / "train_prompts.jsonl").read_text().splitlines()][:8]
    data.write_text("".join(json.dumps({"prompt": p["prompt"], "responses": [
        {"text": p["label"] if j == 0 else f"{j}{j}", "reward": float(j == 0)} for j in range(4)]}) + "\n"
        for p in prompts))
    with SGLangServer(config) as server:
        gloo.run(1, attached_run, str(tmp_path / "run"), assets, server.url)
        # The same server evaluates an offline run (rollout.eval_offline): trained on the fixed groups only,
        # measured like an online run.
        gloo.run(1, attached_run, str(tmp_path / "offline"), assets, server.url,
                 ["rollout.source=offline", f"data.path={data}", "data.prompt_add_special_tokens=false",
                  "data.max_prompt_tokens=8", "data.max_response_tokens=8",
                  "rollout.eval_offline=true", "train.steps=2"])
    records = metrics_records(tmp_path / "run")
    assert [(r["step"], r.get("eval_weight_version")) for r in records] == [(0, "step-0"), (1, "step-1")]
    offline = metrics_records(tmp_path / "offline")
    assert [(r["step"], r.get("eval_weight_version")) for r in offline] == [(0, "step-0"), (1, None), (2, "step-2")]
    assert all("eval_greedy" in r for r in (offline[0], offline[2])) and "kl_to_start" not in offline[2]
    assert offline[1]["reward_mean"] == 0.25  # one rewarded response in each group of the file


def online_moe_run(run_dir, assets, routing_replay):
    from tests.gloo_pool import checkpoint_helpers_allowed

    with checkpoint_helpers_allowed():
        _online_moe_main(run_dir, assets, routing_replay)
    return True


def _online_moe_main(run_dir, assets, routing_replay):
    from megatron_gvpo.train import main

    main(["--config", str(REPO / "configs/addition_gvpo.yaml"), "--set", f"run.dir={run_dir}",
          f"model.path={REPO / 'configs/models/tiny_qwen3_moe.json'}", f"model.tokenizer={assets / 'tokenizer'}",
          f"prompts.path={assets / 'train_prompts.jsonl'}", "prompts.eval_path=", "parallel.ep=2", "train.steps=2",
          "run.save_interval=0", "algo.group_size=4", "train.global_batch_size=16", "train.micro_batch_size=8",
          "rollout.max_new_tokens=6", "rollout.max_total_tokens=2048", "rollout.eval_interval=0",
          "model.seq_length=16", "prompts.max_prompt_tokens=8", "reward.kind=function",
          "reward.function=tests.test_online:response_length", "train.lr=1e-2", "moe.aux_loss_coeff=0.01",
          f"rollout.routing_replay={str(routing_replay).lower()}", "rollout.mode=sync"])


def test_online_mixture_of_experts_with_routing_replay(gloo, assets, tmp_path):
    """A Qwen3-MoE trained online at EP 2: SGLang serves it from the trainer's weights, returns the experts it
    routed every token to, and the trainer replays them in its forwards (the router losses logged beside)."""
    pytest.importorskip("sglang")
    gloo.run(2, online_moe_run, str(tmp_path), assets, True)
    train = metrics_records(tmp_path)
    train = [r for r in train if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        # prompt + response - 1 positions of each of the 16 samples
        assert r["routed_positions"] >= 16 * 6 and r["grad_norm"] > 0 and r["moe_load_balancing_loss"] > 0
