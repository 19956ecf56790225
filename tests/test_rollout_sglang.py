"""Contract of the SGLang rollout engine (megatron_gvpo/rollout/sglang.py) against a real SGLang server.

The server is `python -m sglang.launch_server` on a tiny random Llama built at test time with a locally trained
tokenizer, converted to Megatron and back by tools/convert_hf.py (so SGLang serves an exported model), on
SGLang's CPU path (fixtures in conftest.py). Pinned: greedy token ids and log-probs equal Hugging Face transformers'
(the independent oracle) on the same weights; grouped sampling returns n independent samples per prompt, in
prompt order; seeded sampling on CPU (SeededGumbel) reproduces samples exactly and matches a transformers replay
(a per-request seed the server would ignore is refused);
finish reasons are honest ('length' when cut by max_new_tokens);
a server that dies mid-way gives a RolloutError, and one that never becomes healthy fails within its deadline
with the server's log. A started server's KV cache and running requests come from the run (`server_budget`,
or the config where set) and SGLang holds exactly those; a server whose scheduler is SIGKILLed (as by the
kernel's OOM killer) says which process died, of which signal, and the likely cause. Mixtures of experts
(Qwen3-MoE, Mixtral) are served like transformers on SGLang's CPU MoE path, return the experts transformers' router
picks, and score like an expert-parallel trainer after a weight sync by each method.
"""

import dataclasses
import os
import signal

import pytest
import torch

from megatron_gvpo.rollout.base import RolloutError, SamplingParams, StaleWeightsError, require_weight_version
from megatron_gvpo.rollout.client import SGLangClient
from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

pytest.importorskip("sglang", reason="SGLang is installed by `tools/setup_venv.sh --test`")


@pytest.fixture(scope="module")
def model_dirs(sglang_model_dirs):
    return sglang_model_dirs


@pytest.fixture(scope="module")
def model_dir(sglang_model_dirs):
    return sglang_model_dirs[0]


@pytest.fixture(scope="module")
def server(sglang_server):
    return sglang_server


@pytest.fixture(scope="module")
def ps(addition_prompts):
    return addition_prompts


def hf_greedy(model_dir, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, out, logps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            out.append(t)
            logps.append(float(lp[t]))
            ids.append(t)
            if t == model.config.eos_token_id:
                break
    return out, logps


def test_greedy_equals_transformers(server, model_dir, ps):
    client = SGLangClient([server.url])
    groups = client.generate(ps, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    assert [len(g) for g in groups] == [1, 1, 1]
    for prompt, (sample,) in zip(ps, groups, strict=True):
        want_ids, want_lp = hf_greedy(model_dir, prompt, 8)
        assert sample.token_ids == want_ids
        assert max(abs(a - b) for a, b in zip(sample.logprobs, want_lp, strict=True)) < 1e-4
        assert sample.finish_reason == ("stop" if want_ids[-1] == EOS and len(want_ids) < 8 else "length")
        assert sample.prompt_index == ps.index(prompt)


EOS = 1  # the addition tokenizer's <eos>


def check_groups(groups, n: int, max_new_tokens: int) -> None:
    """n samples per prompt, in prompt order, independent draws, honest finish reasons: 'stop' ends on EOS
    within the budget, 'length' used the whole budget."""
    assert all(len(g) == n for g in groups)
    assert all(x.prompt_index == i for i, g in enumerate(groups) for x in g)
    # n independent draws, not n copies of one (two may still coincide, e.g. an immediate EOS).
    assert all(len({tuple(x.token_ids) for x in g}) > 1 for g in groups)
    assert len({(i, tuple(x.token_ids)) for i, g in enumerate(groups) for x in g}) >= n * len(groups) // 2
    for x in (x for g in groups for x in g):
        assert len(x.logprobs) == len(x.token_ids) and all(lp <= 0 for lp in x.logprobs)
        assert x.finish_reason in ("stop", "length")
        if x.finish_reason == "stop":
            assert x.token_ids[-1] == EOS and len(x.token_ids) <= max_new_tokens
        else:
            assert len(x.token_ids) == max_new_tokens


def test_grouped_sampling_is_distinct_and_ordered_and_refuses_an_ignored_seed(server, ps):
    client = SGLangClient([server.url])
    check_groups(client.generate(ps, SamplingParams(n=4, temperature=1.0, max_new_tokens=6)), 4, 6)
    with pytest.raises(ValueError, match="runs with neither --enable-deterministic-inference"):
        client.generate(ps, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=1))


def test_an_idle_server_costs_no_cpu(server, ps):
    """Between requests (the trainer's whole step, the rest of a test session) the server's processes wait on
    their sockets (`IDLE_FLAGS`): under 10% of a core all together, where the scheduler alone spun at 94%."""
    import time

    import psutil

    from tests.test_gloo_pool import cpu_seconds

    SGLangClient([server.url]).generate(ps, SamplingParams(n=2, temperature=1.0, max_new_tokens=4))
    tree = [server.process.pid] + [p.pid for p in psutil.Process(server.process.pid).children(recursive=True)]
    time.sleep(2.0)  # past the request's own tail (detokenizing, the scheduler's last loop)
    before = [cpu_seconds(pid) for pid in tree]
    time.sleep(2.0)
    cost = sum(cpu_seconds(pid) - b for pid, b in zip(tree, before)) / 2.0
    assert cost < 0.1, f"an idle server used {cost:.2f} cores"


def test_unreachable_server_is_retried_elsewhere_then_fails_clearly(server, ps):
    from megatron_gvpo.utils.distributed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([dead, server.url], retries=1)
    groups = client.generate(ps, SamplingParams(n=2, temperature=0.0, max_new_tokens=3))
    assert [len(g) for g in groups] == [2, 2, 2]
    with pytest.raises(RolloutError, match="failed on every server"):
        SGLangClient([dead], retries=1).generate(ps, SamplingParams(max_new_tokens=3))


def test_server_that_never_becomes_healthy_fails_within_its_deadline(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # no weights: start-up cannot succeed
    server = SGLangServer(SGLangServerConfig(model_path=str(tmp_path), startup_timeout_s=60))
    with pytest.raises(RolloutError, match=r"SGLang server (exited with code|at .* not ready after)"):
        server.start()
    assert not server.alive()


def test_seeded_sampling_is_reproducible_and_exact_then_a_killed_server_errors(model_dir, ps):
    """A server with custom logit processors samples seeded requests with SeededGumbel: the same seed gives the
    same samples whatever else is in the batch, another seed other samples, and every token is the Gumbel-max
    draw that transformers' logits give for its (seed, position), an independent replay; log-probs are NaN.
    Then the server is SIGKILLed and the next request is a RolloutError."""
    import transformers

    from megatron_gvpo.rollout.seeded import gumbel_max

    sampling = SamplingParams(n=4, temperature=0.9, max_new_tokens=6, seed=123)
    config = SGLangServerConfig(model_path=str(model_dir), max_total_tokens=4096, custom_logit_processor=True)
    with SGLangServer(config) as server:
        client = SGLangClient([server.url], timeout_s=60, retries=0)
        first = client.generate(ps, sampling)
        tokens = [[x.token_ids for x in g] for g in first]
        crowded = client.generate(ps + ps, sampling)  # other requests in the same batches
        assert [[x.token_ids for x in g] for g in crowded[:len(ps)]] == tokens
        other = client.generate(ps, dataclasses.replace(sampling, seed=7))
        assert [[x.token_ids for x in g] for g in other] != tokens
        assert all(lp != lp for g in first for x in g for lp in x.logprobs)  # NaN
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        with pytest.raises(RolloutError):
            client.generate(ps, sampling)
        assert not client.health()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, group in enumerate(tokens):
            assert len(set(map(tuple, group))) > 1
            for j, sample in enumerate(group):
                ids = list(ps[i])
                for position, token in enumerate(sample):
                    logits = model(torch.tensor([ids])).logits[0, -1:]
                    assert int(gumbel_max(logits, [123 + i * 4 + j], [position], [0.9])) == token, (i, j, position)
                    ids.append(token)


def generate_in_background(client, ps, sampling):
    """Start client.generate in a thread; returns (thread, out) where out gets 'groups' or 'error'."""
    import threading

    out = {}

    def run():
        try:
            out["groups"] = client.generate(ps, sampling)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


LONG = SamplingParams(n=2, temperature=1.0, max_new_tokens=600, ignore_eos=True)  # ~ seconds, no early EOS


def test_abort_marks_every_unfinished_sample(server, ps):
    """abort_all during a rollout: every sample comes back marked 'abort', none passes as complete."""
    import time

    client = SGLangClient([server.url], timeout_s=120)
    thread, out = generate_in_background(client, ps, SamplingParams(n=2, max_new_tokens=2000, ignore_eos=True))
    time.sleep(1.0)
    assert thread.is_alive(), "the rollout ended before the abort: make it longer"
    client.abort_all()
    thread.join(60)
    samples = [x for g in out["groups"] for x in g]
    assert len(samples) == 6
    assert all(x.finish_reason == "abort" and not x.complete and len(x.token_ids) < 2000 for x in samples)


def teacher_forced_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log model(token | prefix) of each of `tokens` after `prompt`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("in_flight_updates", ["pause", "drain"])
def test_a_weight_update_in_flight_loses_no_request_and_lands_where_its_mechanism_says(
        server, model_dirs, ps, tmp_path, in_flight_updates):
    """Asynchronous rollout's two ways of updating weights while a rollout runs (rollout/pipeline.py). Every
    request comes back once and complete either way.
    - pause: generation paused in SGLang's 'retract' mode, new weights loaded, generation continued. Each sample
      is under the new version, its log-probs the old weights' up to the pause and the new weights' from then
      on: its prefix is re-prefilled under the new weights, not decoded from the old weights' KV cache.
    - drain: the update waits for the requests in flight, which finish wholly under the old weights."""
    import time

    import transformers

    from megatron_gvpo.rollout.http import request_json
    from megatron_gvpo.rollout.sglang import continue_generation, pause_generation

    old = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[0], dtype=torch.float32).eval()
    new = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[0], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    new.save_pretrained(tmp_path / "new")
    budget = 300
    client = SGLangClient([server.url], timeout_s=120)
    thread, out = generate_in_background(client, ps, SamplingParams(n=2, max_new_tokens=budget, ignore_eos=True))
    pause = in_flight_updates == "pause"
    try:
        time.sleep(0.5)
        assert thread.is_alive(), "the rollout ended before the update: make it longer"
        if pause:
            pause_generation([server.url])
        try:
            answer = request_json(f"{server.url}/update_weights_from_disk",
                           {"model_path": str(tmp_path / "new"), "weight_version": "new", "flush_cache": True}, 120)
            assert answer["success"], answer
        finally:
            if pause:
                continue_generation([server.url])
        thread.join(120)
    finally:  # the module's other tests expect the served model to be the initial one
        thread.join(120)
        answer = request_json(f"{server.url}/update_weights_from_disk",
                       {"model_path": str(model_dirs[1]), "weight_version": "initial"}, 120)
        assert answer["success"]
    groups = out["groups"]
    assert [len(grp) for grp in groups] == [2, 2, 2]
    for prompt, grp in zip(ps, groups, strict=True):
        for x in grp:
            assert x.finish_reason == "length" and len(x.token_ids) == budget
            assert (x.weight_version == "new") == pause, x.weight_version
            got = torch.tensor(x.logprobs)
            before, after = (teacher_forced_logprobs(m, prompt, x.token_ids) for m in (old, new))
            if not pause:
                assert (got - before).abs().max() < 1e-3
                continue
            switch = int((got - before).abs().gt(1e-3).int().argmax())  # the first token the old weights did not score
            assert 0 < switch < budget, "the update did not land mid-sample"
            assert (got[:switch] - before[:switch]).abs().max() < 1e-3
            assert (got[switch:] - after[switch:]).abs().max() < 1e-3, switch


@pytest.mark.parametrize("retries", [1, 0])
def test_server_killed_mid_rollout_fails_over_or_errors(server, model_dirs, retries, ps):
    """Two servers share the prompts; one is SIGKILLed while it generates. With a retry its prompts are
    generated again on the other server: every group is whole and came from the live server (no partial
    samples of the dead one). Without, the call is a RolloutError and returns nothing."""
    import time

    doomed = SGLangServer(SGLangServerConfig(model_path=str(model_dirs[1]), max_total_tokens=4096)).start()
    try:
        client = SGLangClient([server.url, doomed.url], timeout_s=120, retries=retries)
        thread, out = generate_in_background(client, ps * 2, LONG)  # prompts 1, 3, 5 go to the doomed server
        time.sleep(0.5)
        assert thread.is_alive(), "the rollout ended before the kill: make it longer"
        os.killpg(doomed.process.pid, signal.SIGKILL)
        thread.join(120)
    finally:
        doomed.stop()
    if retries:
        groups = out["groups"]
        assert [len(g) for g in groups] == [2] * 6  # all 6 prompts, each whole
        assert all(x.info["server"] == server.url and x.finish_reason == "length" and len(x.token_ids) == 600
                   for g in groups for x in g)
    else:
        assert "groups" not in out and isinstance(out["error"], RolloutError)
        assert doomed.url in str(out["error"])


# ---------------------------------------------------------------------------------------------------------
# Resources from the run, and why a server died
# ---------------------------------------------------------------------------------------------------------


def test_server_budget_holds_the_largest_rollout_or_evaluation_on_one_server():
    """Requests in flight on one server = the larger of ceil(groups / servers) x k and ceil(eval prompts /
    servers) x eval_k; KV tokens = requests x (prompt + new tokens) x the margin; bytes = K and V of every layer."""
    import math

    from megatron_gvpo.rollout.sglang import KV_TOKENS_MARGIN, ServerBudget, server_budget

    main_job = dict(groups=32, group_size=8, eval_prompts=128, eval_k=4, max_prompt_tokens=20, max_new_tokens=12)
    assert server_budget(servers=1, **main_job) == ServerBudget(512, math.ceil(512 * 32 * KV_TOKENS_MARGIN))
    assert server_budget(servers=3, **main_job).max_running_requests == 43 * 4  # ceil(128 / 3) held-out prompts
    rollout_only = {**main_job, "eval_prompts": 0}
    assert server_budget(servers=3, **rollout_only).max_running_requests == 11 * 8  # ceil(32 / 3) groups
    assert server_budget(servers=1, **rollout_only, margin=1.0).max_total_tokens == 256 * 32
    # The server: 322,884 tokens of a 30-layer, 3 KV-head, head_dim 64 model in fp32 are SGLang's 13.9 GB.
    assert ServerBudget(1, 322_884).kv_cache_bytes(30, 3, 64, 4) / 2**30 == pytest.approx(13.86, abs=0.01)
    with pytest.raises(ValueError, match="servers=0"):
        server_budget(servers=0, **main_job)


def test_started_servers_get_the_runs_budget_unless_the_config_sets_one():
    """OnlineSource's servers: the main job's config with rollout.max_total_tokens unset gets its run's budget
    (logged with the KV cache's bytes); set fields win; both reach SGLang's command line."""
    import logging
    from pathlib import Path

    from megatron_gvpo.config import Config, load_config
    from megatron_gvpo.models.arch import arch_from_hf
    from megatron_gvpo.models.hf_io import load_hf_config
    from megatron_gvpo.rollout.servers import RolloutLoad, run_server_budget
    from megatron_gvpo.utils.logging import get_logger

    repo = Path(__file__).resolve().parents[1]
    arch = arch_from_hf(load_hf_config(repo / "configs/models/tiny_llama.json"))  # the main job's model
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    get_logger().addHandler(handler)

    def budget_of(cfg):  # as OnlineSource sizes the servers it starts, with 128 held-out prompts
        load = RolloutLoad(groups=cfg.groups_per_rollout, group_size=cfg.algo.group_size, eval_prompts=128,
                           max_prompt_tokens=cfg.prompts.max_prompt_tokens)
        return run_server_budget(cfg.rollout, arch, load)

    try:
        cfg = load_config(Config, repo / "configs/addition_gvpo.yaml", ["rollout.max_total_tokens=null"])
        budget = budget_of(cfg)
        assert (budget.max_total_tokens, budget.max_running_requests) == (20480, 512)
        # 20480 tokens x 4 layers x K,V x 2 KV heads x 32 x 4 bytes = 40 MiB
        assert "SGLang server KV cache: 20480 tokens" in lines[-1] and "= 0.0391 GiB" in lines[-1], lines
        cfg = load_config(Config, repo / "configs/addition_gvpo.yaml",
                          ["rollout.max_total_tokens=4096", "rollout.max_running_requests=64"])
        budget = budget_of(cfg)
        assert (budget.max_total_tokens, budget.max_running_requests) == (4096, 64)
        assert "4096 tokens (rollout.max_total_tokens)" in lines[-1]
        if not torch.cuda.is_available():  # 1e9 tokens x 2 KiB: more than half of any CPU machine's memory
            budget_of(load_config(Config, repo / "configs/addition_gvpo.yaml", ["rollout.max_total_tokens=1000000000"]))
            assert "take more than half of the" in lines[-1] and "lower rollout.max_total_tokens" in lines[-1]
    finally:
        get_logger().removeHandler(handler)
    command = " ".join(SGLangServer(SGLangServerConfig(model_path="m", max_total_tokens=4096,
                                                       max_running_requests=64)).command())
    assert "--max-total-tokens 4096" in command and "--max-running-requests 64" in command


def test_exit_status_in_words():
    from megatron_gvpo.rollout.process import describe_exit

    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-15) == "was killed by SIGTERM (exit status -15)"
    assert describe_exit(-9).startswith("was killed by SIGKILL (exit status -9): likely the kernel's OOM killer")
    assert describe_exit(-99) == "was killed by signal 99 (exit status -99)"


def test_a_server_whose_scheduler_is_sigkilled_says_so(model_dir, ps):
    """A server started with a run's budget holds exactly that (SGLang's log). Its scheduler process is then
    SIGKILLed, as the kernel's OOM killer would: the launcher stops itself (with SIGKILL, which says nothing), and
    the server's `failure()` and the warning `stop()` logs name the scheduler, its signal and the likely cause."""
    import logging
    import re
    import time

    import psutil

    from megatron_gvpo.rollout.sglang import server_budget
    from megatron_gvpo.utils.logging import get_logger

    budget = server_budget(groups=3, group_size=4, eval_prompts=3, eval_k=2, servers=1, max_prompt_tokens=8,
                           max_new_tokens=6)
    config = SGLangServerConfig(model_path=str(model_dir), max_total_tokens=budget.max_total_tokens,
                                max_running_requests=budget.max_running_requests)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    get_logger().addHandler(handler)
    server = SGLangServer(config).start()
    try:
        log = server.log_path.read_text()
        assert f"max_total_num_tokens={budget.max_total_tokens}," in log
        assert f"max_running_requests={budget.max_running_requests}," in log
        groups = SGLangClient([server.url]).generate(ps, SamplingParams(n=4, temperature=1.0, max_new_tokens=6))
        assert [len(g) for g in groups] == [4, 4, 4]
        assert server.failure() is None
        scheduler = next(p for p in psutil.Process(server.process.pid).children(recursive=True)
                         if "scheduler" in p.name())
        os.kill(scheduler.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.alive()
        want = rf"its scheduler\S* process \(pid {scheduler.pid}\) was killed by SIGKILL \(exit status -9\): likely " \
               r"the kernel's OOM killer"
        assert re.search(rf"^stopped \(exit status -?\d+\): {want}", server.failure()), server.failure()
    finally:
        server.stop()
        get_logger().removeHandler(handler)
    assert len(warnings) == 1 and re.search(rf"SGLang server at {server.url} stopped .*{want}", warnings[0]), warnings


# ---------------------------------------------------------------------------------------------------------
# Weight sync: the trainer (TP2 x PP2) moves its weights, syncs them, and SGLang scores like the trainer
# ---------------------------------------------------------------------------------------------------------


def score_batch(url: str, batch: dict) -> list[float]:
    """Sequence log-probs of the batch's responses under the server's weights (prompt-scoring requests)."""
    from megatron_gvpo.megatron.seq_layout import scored_lengths
    from megatron_gvpo.rollout.http import request_json

    out = []
    for row, n in enumerate(scored_lengths(batch["loss_mask"]).tolist()):
        ids = batch["tokens"][row, : n + 1].tolist()  # through the last scored position's target
        answer = request_json(f"{url}/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                           "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}, 60)
        token_lp = [lp for lp, *_ in answer["meta_info"]["input_token_logprobs"]]  # [None, lp(ids[1]|ids[:1]), ...]
        mask = batch["loss_mask"][row, :n].tolist()
        out.append(sum(token_lp[t + 1] for t in range(n) if mask[t]))
    return out


TP2_PP2 = ("parallel.tp=2", "parallel.pp=2")


def weight_sync_run(model_dir, url, sync_dir, method, layout=TP2_PP2):
    """Every rank of a 4-rank trainer at `layout` (config overrides; TP2 x PP2 by default): take an optimizer
    step (weights move away from the served ones), score a batch before and after a sync by `method`; rank 0
    returns what it saw."""
    import torch.distributed as dist

    from megatron_gvpo.config import Config, config_from_dict
    from megatron_gvpo.data.batch import make_targets
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
    from megatron_gvpo.models.hf_io import hf_weights, load_hf_config
    from megatron_gvpo.rollout.weight_sync import (
        DistributedWeightSync,
        sync_weights_from_disk,
        sync_weights_from_tensor,
    )
    from megatron_gvpo.train import build_engine

    apply_cpu_compat()
    cfg = config_from_dict(Config, {}, [
        f"model.path={model_dir}", *layout, "model.seq_length=12", "algo.group_size=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=0.05", "train.lr_warmup_steps=0",
    ])
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    try:
        arch = arch_from_hf(load_hf_config(model_dir))
        engine = build_engine(cfg, arch, ctx, hf_weights(model_dir, "pretrained", 0))
        g = torch.Generator().manual_seed(5)
        tokens = torch.randint(3, arch.vocab_size, (4, 12), generator=g)
        response = torch.zeros(4, 12, dtype=torch.bool)
        for i, (p, r) in enumerate([(4, 5), (3, 7), (5, 4), (4, 8)]):
            response[i, p:p + r] = True
        targets, loss_mask = make_targets(tokens, response)
        batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
                 "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0]), "group_ids": torch.tensor([0, 0, 1, 1])}
        batch["ref_seq_logp"] = engine.sequence_logprobs(batch)
        engine.train_step(batch)
        trainer = engine.sequence_logprobs(batch).tolist()
        before = score_batch(url, batch) if dist.get_rank() == 0 else None
        padded = padded_vocab_size(arch.vocab_size, ctx.tp_size)
        if method == "disk":
            sync_weights_from_disk(engine.chunks, arch, ctx, padded, [url], sync_dir, model_dir, version="step-1")
        elif method == "tensor":  # small buckets, so that a sync takes several requests
            sync_weights_from_tensor(engine.chunks, arch, ctx, padded, [url], version="step-1", bucket_bytes=40_000)
        else:
            sync = DistributedWeightSync(arch, ctx, padded, [url], bucket_bytes=40_000, timeout_s=120)
            sync.connect()
            try:
                sync.sync(engine.chunks, version="step-1")
            finally:
                sync.close()
        after = score_batch(url, batch) if dist.get_rank() == 0 else None
        return trainer, before, after
    finally:
        destroy_parallel()


@pytest.mark.parametrize("method", ["disk", "tensor", "distributed"])
def test_weight_sync_makes_sglang_score_like_the_trainer(gloo, server, model_dirs, tmp_path, method, ps):
    """Also: the samples carry the synced weight version, and a batch checked against another one is refused."""
    from megatron_gvpo.rollout.http import request_json

    try:
        trainer, before, after = gloo.run(4, weight_sync_run, str(model_dirs[0]), server.url, str(tmp_path / "sync"),
                                          method)[0]
        groups = SGLangClient([server.url]).generate(ps, SamplingParams(n=2, max_new_tokens=2))
        require_weight_version(groups, "step-1")
        with pytest.raises(StaleWeightsError, match=r"6 of 6 samples carry weight version\(s\) \['step-1'\], "
                                                    r"expected 'step-2'"):
            require_weight_version(groups, "step-2")
    finally:  # the module's other tests (and the next method) expect the served model to be the initial one
        answer = request_json(f"{server.url}/update_weights_from_disk",
                       {"model_path": str(model_dirs[1]), "weight_version": "initial"}, 120)
        assert answer["success"]
    # The step moved the weights: the server (still on the initial ones) scores differently...
    assert max(abs(a - b) for a, b in zip(trainer, before, strict=True)) > 1e-2
    # ... and after the sync exactly like the trainer's Megatron model (independent implementations).
    assert max(abs(a - b) for a, b in zip(trainer, after, strict=True)) < 1e-4


def unreachable_sync_run(url):
    """Both ranks of a TP2 trainer sync to a server that is not there; each returns the error it got."""
    from megatron_gvpo.megatron.config import ParallelConfig
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.rollout.weight_sync import DistributedWeightSync, sync_weights_from_tensor

    apply_cpu_compat()
    ctx = initialize_parallel(ParallelConfig(tp=2), seed=0)
    errors = []
    try:
        for sync in (lambda: DistributedWeightSync(None, ctx, 0, [url], timeout_s=10).connect(),
                     lambda: sync_weights_from_tensor([], None, ctx, 0, [url], version="v", timeout_s=10)):
            try:
                sync()
            except RolloutError as e:
                errors.append(str(e))
        return errors
    finally:
        destroy_parallel()


def test_weight_sync_to_an_unreachable_server_fails_on_every_rank(gloo):
    """A failed request on the sending rank becomes a RolloutError on every rank (none is left waiting in a
    collective), naming the server."""
    from megatron_gvpo.utils.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for errors in gloo.run(2, unreachable_sync_run, url):
        assert len(errors) == 2 and all(url in e for e in errors)


def test_gumbel_max_draws_from_the_tempered_softmax():
    """SeededGumbel's draw, without a server: over 20000 seeds the token frequencies match softmax(logits / T)
    within 4 standard errors, and a (seed, position) pair always gives the same token."""
    from megatron_gvpo.rollout.seeded import gumbel_max

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    draws = torch.cat([gumbel_max(logits.expand(1000, -1), list(range(s, s + 1000)), [3] * 1000, [0.7] * 1000)
                       for s in range(0, 20000, 1000)])
    want = torch.softmax(logits[0] / 0.7, -1).double()
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert ((freq - want).abs() <= 4 * (want * (1 - want) / len(draws)).sqrt() + 1e-12).all(), (freq, want)
    assert int(draws[4]) == int(gumbel_max(logits, [4], [3], [0.7]))
    assert not (gumbel_max(logits.expand(200, -1), [5] * 200, list(range(200)), [0.7] * 200) == 0).all()


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    """A tiny random Qwen3 (q/k norms, head_dim 24 != hidden / heads) and its export (`served_model_dirs`)."""
    from tests.conftest import served_model_dirs

    return served_model_dirs(tmp_path_factory.mktemp("tiny_qwen3"), "Qwen3Config", random_norms=True, head_dim=24)


def test_qwen3_is_served_like_transformers_and_synced_from_the_trainer(gloo, qwen3_dirs, tmp_path, ps):
    """Qwen3 through the whole rollout path: SGLang serves the export with transformers' greedy tokens, and
    after a TP2 x PP2 trainer step and a distributed weight sync it scores like the trainer's Megatron model."""
    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    with SGLangServer(SGLangServerConfig(model_path=str(qwen3_dirs[1]), max_total_tokens=4096)) as server:
        for prompt in ps:
            want_ids, want_lp = hf_greedy(qwen3_dirs[0], prompt, 4)
            (sample,) = SGLangClient([server.url]).generate([prompt], SamplingParams(temperature=0.0,
                                                                                    max_new_tokens=4))[0]
            assert sample.token_ids == want_ids
            assert max(abs(a - b) for a, b in zip(sample.logprobs, want_lp, strict=True)) < 1e-4
        trainer, before, after = gloo.run(4, weight_sync_run, str(qwen3_dirs[0]), server.url,
                                          str(tmp_path / "sync"), "distributed")[0]
    assert max(abs(a - b) for a, b in zip(trainer, before, strict=True)) > 1e-2
    assert max(abs(a - b) for a, b in zip(trainer, after, strict=True)) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Mixtures of experts: served like transformers, the routed experts returned, synced from an EP trainer
# ---------------------------------------------------------------------------------------------------------

MOE_FAMILIES = {
    # 4 experts top-2, renormalised. No dense layer: SGLang ignores mlp_only_layers (`check_servable`).
    "qwen3_moe": dict(config_class="Qwen3MoeConfig", random_norms=True, head_dim=24, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "mixtral": dict(config_class="MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def moe_served(request, tmp_path_factory):
    """(family, HF original, the export, a server of the export that returns routed experts); one server per
    family for all of its tests, which restore the served weights when they change them."""
    from tests.conftest import served_model_dirs

    fields = dict(MOE_FAMILIES[request.param])
    original, export = served_model_dirs(tmp_path_factory.mktemp(f"tiny_{request.param}"), fields.pop("config_class"),
                                         **fields)
    config = SGLangServerConfig(model_path=str(export), max_total_tokens=4096, return_routed_experts=True)
    with SGLangServer(config) as server:
        yield request.param, original, export, server


def test_moe_is_served_like_transformers_with_the_experts_its_router_picks(moe_served, ps):
    """Each family on SGLang's CPU MoE path (its per-expert torch loop): greedy tokens and log-probs equal
    transformers'; the routed experts of every prompt and generated token (`Sample.routed_experts`) are the top-k
    of transformers' router logits for the same tokens, layer by layer, wherever the k-th and (k+1)-th logits
    are not a near-tie."""
    import transformers

    from megatron_gvpo.models.arch import arch_from_hf

    family, original, _, server = moe_served
    model = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    arch = arch_from_hf(model.config)
    client = SGLangClient([server.url], routed_experts_shape=(arch.num_layers, arch.moe_top_k))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6, return_routed_experts=True)
    agree = total = ties = 0
    for prompt, (sample,) in zip(ps, client.generate(ps, sampling), strict=True):
        want_ids, want_lp = hf_greedy(original, prompt, 6)
        assert sample.token_ids == want_ids
        assert max(abs(a - b) for a, b in zip(sample.logprobs, want_lp, strict=True)) < 1e-4
        fed = prompt + sample.token_ids[:-1]  # every token the model ran on
        routed = sample.routed_experts
        assert routed.dtype == torch.int64 and routed.shape == (len(fed), arch.num_layers, arch.moe_top_k)
        with torch.no_grad():
            router_logits = model(torch.tensor([fed]), output_router_logits=True).router_logits  # MoE layers only
        assert len(router_logits) == arch.num_layers  # all MoE (see MOE_FAMILIES)
        for layer, logits in enumerate(router_logits):
            top = logits.float().topk(arch.moe_top_k + 1, dim=-1)
            clear = top.values[:, -2] - top.values[:, -1] > 1e-4  # else either choice is right
            same = torch.tensor([set(a.tolist()) == set(b.tolist())
                                 for a, b in zip(routed[:, layer], top.indices[:, :-1], strict=True)])
            assert same[clear].all(), (family, layer, routed[:, layer], top)
            agree, total, ties = agree + int(same.sum()), total + len(same), ties + int((~clear).sum())
    print(f"{family}: routed experts equal transformers' top-{arch.moe_top_k} for {agree}/{total} "
          f"(token, layer) pairs, {ties} near-ties")


EP2_PP2 = ("parallel.ep=2", "parallel.pp=2")  # experts over the 2 data-parallel ranks of each stage
TP2_SP_EP2 = ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2")  # expert TP = TP = 2
TP2_SP_EP2_ETP1 = (*TP2_SP_EP2, "parallel.etp=1")  # whole experts, two expert-data-parallel replicas

MOE_SYNCS = {  # every method once across the families, each from an expert-parallel trainer
    "qwen3_moe": [("distributed", EP2_PP2), ("tensor", TP2_SP_EP2)],
    "mixtral": [("disk", TP2_SP_EP2_ETP1)],
}


def test_moe_weight_sync_from_an_expert_parallel_trainer_makes_sglang_score_like_it(gloo, moe_served, tmp_path):
    """After a trainer step with the experts split over EP ranks (and TP / expert TP / PP), a sync by each method
    (`weight_sync_run`) makes SGLang's sequence log-probs equal the trainer's Megatron model's; before, they
    differ. The served weights are restored after each sync."""
    from megatron_gvpo.rollout.http import request_json

    family, original, export, server = moe_served
    for method, layout in MOE_SYNCS[family]:
        try:
            trainer, before, after = gloo.run(4, weight_sync_run, str(original), server.url,
                                              str(tmp_path / method), method, layout)[0]
        finally:
            answer = request_json(f"{server.url}/update_weights_from_disk",
                           {"model_path": str(export), "weight_version": "initial"}, 120)
            assert answer["success"]
        assert max(abs(a - b) for a, b in zip(trainer, before, strict=True)) > 1e-2, (method, layout)
        assert max(abs(a - b) for a, b in zip(trainer, after, strict=True)) < 1e-4, (method, layout)


def test_a_qwen3_moe_with_dense_layers_is_refused(tmp_path):
    """SGLang 0.5.23 would serve it with every layer a mixture of experts (`check_servable`): refused before start."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe", "mlp_only_layers": [1]}')
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*SGLang would run wrongly"):
        SGLangServer(SGLangServerConfig(model_path=str(tmp_path))).start()
