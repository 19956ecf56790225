"""Contract of the SGLang rollout engine (megatron_gvpo/rollout/sglang.py) against a real SGLang server.

The server is `python -m sglang.launch_server` on a tiny random Llama built here with a locally trained
tokenizer, converted to Megatron and back by tools/convert_hf.py (so SGLang serves an exported model), on
SGLang's CPU path. Pinned: greedy token ids and log-probs equal Hugging Face transformers'
(the independent oracle) on the same weights; grouped sampling returns n independent samples per prompt, in
prompt order, reproducible through the server's seed (a per-request seed the server would ignore is refused);
finish reasons are honest ('length' when cut by max_new_tokens);
a server that dies mid-way gives a RolloutError, and one that never becomes healthy fails within its deadline
with the server's log.
"""

import os
import signal

import pytest
import torch

from megatron_gvpo.rollout.base import RolloutError, SamplingParams
from megatron_gvpo.rollout.sglang import SGLangClient, SGLangServer, SGLangServerConfig

pytest.importorskip("sglang", reason="SGLang is installed by `tools/setup_venv.sh --test`")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(the HF model, the same model after tools/convert_hf.py import + export): the server loads the export,
    the transformers oracle the original, so equal outputs also show that SGLang loads what export writes."""
    import transformers

    from megatron_gvpo.data import addition
    from megatron_gvpo.megatron.convert import export_hf, import_hf

    root = tmp_path_factory.mktemp("tiny_llama")
    original = root / "hf"
    addition.build_tokenizer(original)
    tok = transformers.AutoTokenizer.from_pretrained(original)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(original)
    import_hf(original, root / "megatron", tp=2, progress=False)
    export_hf(root / "megatron", root / "export", progress=False)
    return original, root / "export"


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs[0]


@pytest.fixture(scope="module")
def server(model_dirs):
    with SGLangServer(SGLangServerConfig(model_path=str(model_dirs[1]), max_total_tokens=4096)) as s:
        yield s


def prompts(model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(p, add_special_tokens=False) for p in ("12+34=", "7+5=", "123+456=")]


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


def test_greedy_equals_transformers(server, model_dir):
    client = SGLangClient([server.url])
    ps = prompts(model_dir)
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


def test_grouped_sampling_is_distinct_and_ordered_and_refuses_an_ignored_seed(server, model_dir):
    client = SGLangClient([server.url])
    ps = prompts(model_dir)
    check_groups(client.generate(ps, SamplingParams(n=4, temperature=1.0, max_new_tokens=6)), 4, 6)
    with pytest.raises(ValueError, match="without --enable-deterministic-inference"):
        client.generate(ps, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=1))


def test_unreachable_server_is_retried_elsewhere_then_fails_clearly(server, model_dir):
    from megatron_gvpo.utils.distributed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([dead, server.url], retries=1)
    groups = client.generate(prompts(model_dir), SamplingParams(n=2, temperature=0.0, max_new_tokens=3))
    assert [len(g) for g in groups] == [2, 2, 2]
    with pytest.raises(RolloutError, match="failed on every server"):
        SGLangClient([dead], retries=1).generate(prompts(model_dir), SamplingParams(max_new_tokens=3))


def test_server_that_never_becomes_healthy_fails_within_its_deadline(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # no weights: start-up cannot succeed
    server = SGLangServer(SGLangServerConfig(model_path=str(tmp_path), startup_timeout_s=60))
    with pytest.raises(RolloutError, match=r"SGLang server (exited with code|at .* not healthy after)"):
        server.start()
    assert not server.alive()


def test_server_seed_reproduces_samples_and_a_killed_server_errors(model_dir):
    """Two fresh servers with the same random_seed give the same samples for the same requests (CPU has no
    per-request seeds); then the second one is killed and the next request is a RolloutError."""
    ps = prompts(model_dir)
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=6)
    runs = []
    for _ in range(2):
        server = SGLangServer(SGLangServerConfig(model_path=str(model_dir), max_total_tokens=4096, random_seed=11))
        server.start()
        try:
            client = SGLangClient([server.url], timeout_s=60, retries=0)
            runs.append(client.generate(ps, sampling))
            if len(runs) == 2:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                with pytest.raises(RolloutError):
                    client.generate(ps, sampling)
                assert not client.health()
        finally:
            server.stop()
    check_groups(runs[0], 4, 6)
    assert [[x.token_ids for x in g] for g in runs[0]] == [[x.token_ids for x in g] for g in runs[1]]


# ---------------------------------------------------------------------------------------------------------
# Weight sync: the trainer (TP2 x PP2) moves its weights, syncs them, and SGLang scores like the trainer
# ---------------------------------------------------------------------------------------------------------


def score_batch(url: str, batch: dict) -> list[float]:
    """Sequence log-probs of the batch's responses under the server's weights (prompt-scoring requests)."""
    from megatron_gvpo.megatron.seq_layout import scored_lengths
    from megatron_gvpo.rollout.sglang import _http

    out = []
    for row, n in enumerate(scored_lengths(batch["loss_mask"]).tolist()):
        ids = batch["tokens"][row, : n + 1].tolist()  # through the last scored position's target
        answer = _http(f"{url}/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                           "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}, 60)
        token_lp = [lp for lp, *_ in answer["meta_info"]["input_token_logprobs"]]  # [None, lp(ids[1]|ids[:1]), ...]
        mask = batch["loss_mask"][row, :n].tolist()
        out.append(sum(token_lp[t + 1] for t in range(n) if mask[t]))
    return out


def weight_sync_run(model_dir, url, sync_dir, method):
    """Every rank of a TP2 x PP2 trainer: take an optimizer step (weights move away from the served ones),
    score a batch before and after `sync_weights_from_disk`; rank 0 returns what it saw."""
    import torch.distributed as dist

    from megatron_gvpo.config import Config, config_from_dict
    from megatron_gvpo.data.batch import make_targets
    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.engine import MegatronEngine
    from megatron_gvpo.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_gvpo.models.arch import arch_from_hf, padded_vocab_size
    from megatron_gvpo.models.hf_io import hf_weights, load_hf_config
    from megatron_gvpo.rollout.weight_sync import sync_weights_from_disk, sync_weights_from_tensor

    apply_cpu_compat()
    cfg = config_from_dict(Config, {}, [
        f"model.path={model_dir}", "parallel.tp=2", "parallel.pp=2", "model.seq_length=12", "algo.group_size=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=0.05", "train.lr_warmup_steps=0",
    ])
    ctx = initialize_parallel(cfg.parallel, seed=cfg.run.seed)
    try:
        arch = arch_from_hf(load_hf_config(model_dir))
        engine = MegatronEngine(cfg, arch, ctx, hf_weights(model_dir, "pretrained", 0))
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
        else:  # small buckets, so that a sync takes several requests
            sync_weights_from_tensor(engine.chunks, arch, ctx, padded, [url], version="step-1", bucket_bytes=40_000)
        after = score_batch(url, batch) if dist.get_rank() == 0 else None
        return trainer, before, after
    finally:
        destroy_parallel()


@pytest.mark.parametrize("method", ["disk", "tensor"])
def test_weight_sync_makes_sglang_score_like_the_trainer(gloo, server, model_dirs, tmp_path, method):
    from megatron_gvpo.rollout.sglang import _http

    try:
        trainer, before, after = gloo.run(4, weight_sync_run, str(model_dirs[0]), server.url, str(tmp_path / "sync"),
                                          method)[0]
        sample = SGLangClient([server.url]).generate([[3, 4, 5]], SamplingParams(max_new_tokens=2, temperature=0.0))
        assert sample[0][0].weight_version == "step-1"
    finally:  # the module's other tests (and the next method) expect the served model to be the initial one
        answer = _http(f"{server.url}/update_weights_from_disk",
                       {"model_path": str(model_dirs[1]), "weight_version": "initial"}, 120)
        assert answer["success"]
    # The step moved the weights: the server (still on the initial ones) scores differently...
    assert max(abs(a - b) for a, b in zip(trainer, before, strict=True)) > 1e-2
    # ... and after the sync exactly like the trainer's Megatron model (independent implementations).
    assert max(abs(a - b) for a, b in zip(trainer, after, strict=True)) < 1e-4
