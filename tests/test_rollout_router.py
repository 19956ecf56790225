"""Contract of the sglang-router front end (megatron_gvpo/rollout/router.py) against real processes.

The session's SGLang server (conftest.py: `python -m sglang.launch_server`, CPU path, a tiny random Llama built
at test time with a locally trained tokenizer) with a supervised `SGLangRouter` in front of it. Pinned:
`SGLangClient` pointed at the router gets what it gets from the server itself (greedy token ids and log-probs),
grouped sampling through the router returns n samples per prompt in prompt order (also when the client sends
one request per worker);
`worker_urls` lists the server behind the router (what the weight sync talks to); a router whose only worker is
dead gives a RolloutError rather than a hang or a timeout, and one whose worker never registers fails its start-up
deadline with the router's log.
"""

import re

import pytest

from megatron_gvpo.rollout.base import RolloutError, SamplingParams
from megatron_gvpo.rollout.client import SGLangClient
from megatron_gvpo.rollout.http import request_json
from megatron_gvpo.rollout.router import SGLangRouter, SGLangRouterConfig, worker_urls
from megatron_gvpo.utils.distributed import free_port

pytest.importorskip("sglang", reason="SGLang is installed by `tools/setup_venv.sh --test`")
pytest.importorskip("sglang_router", reason="sglang-router is installed by `tools/setup_venv.sh --test`")


@pytest.fixture(scope="module")
def server(sglang_server):
    return sglang_server


@pytest.fixture(scope="module")
def router(server):
    with SGLangRouter(SGLangRouterConfig(worker_urls=(server.url,), startup_timeout_s=30)) as r:
        yield r


def test_greedy_through_the_router_equals_the_server(router, server, addition_prompts):
    ps = addition_prompts
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    # Both from an empty prefix cache: a cached prefix takes another kernel path (log-probs differ by ~2e-7).
    # The router sends /flush_cache to every worker (one here).
    assert request_json(f"{router.url}/flush_cache", {}, 30)["workers_flushed"] == 1
    direct = SGLangClient([server.url], timeout_s=60).generate(ps, greedy)
    assert request_json(f"{router.url}/flush_cache", {}, 30)["workers_flushed"] == 1
    routed = SGLangClient([router.url], timeout_s=60).generate(ps, greedy)
    assert [[x.token_ids for x in g] for g in routed] == [[x.token_ids for x in g] for g in direct]
    for g_routed, g_direct in zip(routed, direct, strict=True):
        assert max(abs(a - b) for a, b in zip(g_routed[0].logprobs, g_direct[0].logprobs, strict=True)) < 1e-5
    assert [[x.finish_reason for x in g] for g in routed] == [[x.finish_reason for x in g] for g in direct]
    assert any(len(g[0].token_ids) > 1 for g in routed)  # not only immediate EOS: the comparison has content


def test_grouped_sampling_through_the_router_is_ordered(router, addition_prompts):
    """n samples per prompt, in prompt order, whether the client sends the batch as one request or as one
    request per worker ([router.url] * 2, how a batch is spread over the router's workers)."""
    ps = addition_prompts
    n, max_new = 3, 5
    for urls in ([router.url], [router.url] * 2):
        groups = SGLangClient(urls, timeout_s=60).generate(ps, SamplingParams(n=n, temperature=1.0,
                                                                              max_new_tokens=max_new))
        assert [len(g) for g in groups] == [n] * len(ps)
        assert all(x.prompt_index == i for i, g in enumerate(groups) for x in g)
        for x in (x for g in groups for x in g):
            assert 1 <= len(x.token_ids) <= max_new and len(x.logprobs) == len(x.token_ids)
            assert all(lp <= 0 for lp in x.logprobs) and x.finish_reason in ("stop", "length")
        assert len({(i, tuple(x.token_ids)) for i, g in enumerate(groups) for x in g}) > len(ps)  # not n copies


def test_worker_urls_lists_the_server_behind_the_router(router, server):
    assert worker_urls(router.url) == [server.url]
    assert worker_urls(router.url + "/", healthy_only=True) == [server.url]
    with pytest.raises(RolloutError, match="cannot list the workers"):
        worker_urls(f"http://127.0.0.1:{free_port()}", timeout_s=5)


def test_a_router_whose_only_worker_is_dead_errors_clearly(addition_prompts):
    """The worker URL has nothing behind it: the router comes up (wait_for_workers=False), never registers the
    worker, and answers /generate with an error that the client reports as a RolloutError (not a timeout).
    With wait_for_workers=True the same router fails its start-up deadline, showing its log."""
    dead = f"http://127.0.0.1:{free_port()}"
    with SGLangRouter(SGLangRouterConfig(worker_urls=(dead,), wait_for_workers=False)) as r:
        assert worker_urls(r.url) == []
        with pytest.raises(RolloutError, match="failed on every server"):
            SGLangClient([r.url], timeout_s=20, retries=0).generate(addition_prompts, SamplingParams(n=2))
    never = SGLangRouter(SGLangRouterConfig(worker_urls=(dead,), startup_timeout_s=3))
    tail = (r"(?s)not ready after 3 s \(startup_timeout_s; healthy workers \[\]"
            rf".*health checks failed for {re.escape(dead)}")
    with pytest.raises(RolloutError, match=tail):  # the tail of the router's log says why
        never.start()
    assert not never.alive()


def test_what_the_router_does_not_forward_is_refused_clearly(router, addition_prompts):
    """Abort and per-request seeds need the servers themselves: through a router the client says so instead of
    silently aborting nothing or sending a seed that would be ignored."""
    client = SGLangClient([router.url], timeout_s=30)
    with pytest.raises(RolloutError, match="abort on its workers"):
        client.abort_all()
    with pytest.raises(ValueError, match="does not forward /server_info"):
        client.generate(addition_prompts, SamplingParams(n=2, seed=3))
