"""The SGLang servers of a run, supervised from global rank 0: started from the trainer's weights or attached
(`rollout.urls`), the client that samples from them, and what is done when one dies.

    servers = RolloutServers(cfg.rollout, arch, load, seed=cfg.run.seed, log_dir=run_dir / "logs")
    urls = servers.start(hf_dir, "step-0")             # rank 0: start (or attach); servers.client samples
    urls, failure = servers.restart_dead(error, synced=True)   # after a failed rollout, sync or evaluation

Started servers get the KV cache and running requests of the run's load in flight (`RolloutLoad`,
`run_server_budget`), and the trainer's threads leave them their cores (`share_cores_with_servers`).

Supervision is `restart_dead`: it finds the dead servers (started ones: the process exited or /health fails;
attached ones: no /model_info answer, or, once this run has synced them, weights other than this run's, so they
were started again meanwhile), checks the restart budget (`rollout.max_server_restarts`), starts them again
(attached ones under `rollout.urls_supervised`: waits, within `rollout.startup_timeout_s`, for whoever started
them to do it) and rebuilds the client. Loading
the trainer's weights into them is the weight updates' part (rollout/updates.py); when to recover is the
coordinator's (rollout/online.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_gvpo.models.arch import Arch
from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.client import SGLangClient
from megatron_gvpo.rollout.config import RolloutConfig
from megatron_gvpo.rollout.http import health
from megatron_gvpo.rollout.sglang import (
    KV_TOKENS_MARGIN,
    ServerBudget,
    SGLangServer,
    SGLangServerConfig,
    server_budget,
    weight_version,
)
from megatron_gvpo.utils.logging import get_logger


@dataclass(frozen=True)
class RolloutLoad:
    """What a run asks of its servers at once: a rollout of `groups` prompts x `group_size` samples (0 groups: a
    run that only evaluates), or an evaluation of `eval_prompts` x rollout.eval_k, prompts of at most
    `max_prompt_tokens` tokens."""

    groups: int
    group_size: int
    eval_prompts: int
    max_prompt_tokens: int


class RolloutServers:
    """Rank 0's view of the run's servers: their URLs, a client over them, and their supervision (module
    docstring). Only global rank 0 calls its methods; the URLs reach the other ranks by broadcast."""

    def __init__(self, cfg: RolloutConfig, arch: Arch, load: RolloutLoad, *, seed: int, log_dir: Path):
        self.cfg, self.arch, self.load, self.seed, self.log_dir = cfg, arch, load, seed, log_dir
        self.started: list[SGLangServer] = []
        self.urls: list[str] = []
        self.client: SGLangClient | None = None
        self.restarts = 0
        """Servers started again (or awaited while their supervisor restarted them) in this process."""

    def start(self, hf_dir: Path, version: str) -> list[str]:
        """Start `rollout.servers` servers from `hf_dir` with weight version `version`, or attach to
        `rollout.urls`; their URLs."""
        r = self.cfg
        urls = list(r.urls)
        if not urls:
            share_cores_with_servers(r.servers)
            budget = run_server_budget(r, self.arch, self.load)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for i in range(r.servers):
                server = SGLangServer(SGLangServerConfig(
                    model_path=str(hf_dir), tp=r.server_tp, random_seed=self.seed + i,
                    deterministic=r.seeded and torch.cuda.is_available(),
                    custom_logit_processor=r.seeded and not torch.cuda.is_available(),
                    weight_version=version, max_total_tokens=budget.max_total_tokens,
                    max_running_requests=budget.max_running_requests, startup_timeout_s=r.startup_timeout_s,
                    return_routed_experts=r.routing_replay, log_path=str(self.log_dir / f"sglang_{i}.log")))
                self.started.append(server.start())
                urls.append(server.url)
        self._connect_client(urls)
        return urls

    def _connect_client(self, urls: list[str]) -> None:
        shape = (self.arch.num_layers, self.arch.moe_top_k) if self.cfg.routing_replay else None
        self.urls = list(urls)
        self.client = SGLangClient(urls, timeout_s=self.cfg.request_timeout_s, retries=self.cfg.retries,
                                   routed_experts_shape=shape)

    def restart_dead(self, error: RolloutError, synced: bool) -> tuple[list[str] | None, str | None]:
        """(the servers' URLs, None) once the dead ones answer again, or (None, why `error` stands). `synced`: this
        run has loaded its weights into the servers (attached ones start with someone else's)."""
        r = self.cfg
        attached = bool(r.urls)
        if attached and not r.urls_supervised:
            return None, (f"{error} (the servers in rollout.urls are not restarted by this run; with "
                          "rollout.urls_supervised=true it waits for whoever started them to start them again)")
        if attached:  # dead: no answer, or, once synced, weights other than this run's (started again already)
            dead = [url for url in self.urls
                    if (served := weight_version(url)) is None or (synced and not served.startswith("step-"))]
            none_died = "every server in rollout.urls answers with this run's weights: none died"
        else:
            dead = [s for s in self.started if not s.alive() or not health(s.url)]
            none_died = "no server this run started has died, so there is nothing to restart"
        if not dead:
            return None, f"{error} ({none_died})"
        if self.restarts + len(dead) > r.max_server_restarts:
            return None, (f"{error} ({len(dead)} dead server(s); rollout.max_server_restarts="
                          f"{r.max_server_restarts} restarts, {self.restarts} used)")
        failure = self._await_answers(dead) if attached else self._start_again(dead)
        if failure:
            return None, f"{error}; {failure}"
        self.restarts += len(dead)
        self._connect_client(self.urls if attached else [s.url for s in self.started])
        return self.urls, None

    @staticmethod
    def _start_again(servers: list[SGLangServer]) -> str | None:
        """Restart servers this run started; None, or what failed."""
        for server in servers:
            server.stop()
            server.cfg.weight_version = "restarted"  # until the trainer's weights arrive with their version
            try:
                server.start()
            except RolloutError as e:
                return f"restarting {server.url} failed too: {e}"
        return None

    def _await_answers(self, urls: list[str]) -> str | None:
        """Wait, within rollout.startup_timeout_s, until attached servers answer again; None, or which did not."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        for url in urls:
            while not health(url):
                if time.monotonic() > deadline:
                    return (f"{url} did not answer again within rollout.startup_timeout_s="
                            f"{self.cfg.startup_timeout_s:.0f} s (its launcher restarts it: see its log)")
                time.sleep(1.0)
        return None

    def abort_requests(self) -> None:
        """Abort every request in flight (the asynchronous pipeline's interrupt when the run closes)."""
        try:
            self.client.abort_all()
        except RolloutError:
            pass  # behind a router: the request in flight runs to its end, the pipeline waits for it

    def stop(self) -> None:
        for server in self.started:
            server.stop()


def share_cores_with_servers(servers: int) -> None:
    """On CPU the trainer and the servers it starts share this machine's cores. Each server runs one thread; the
    trainer processes of this node get the rest. Oversubscribed torch threads stall each other (measured 10-50x
    slower steps with 2 threads next to a server on 2 cores)."""
    if torch.cuda.is_available():
        return
    local_trainers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, ((os.cpu_count() or 1) - servers) // local_trainers)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def run_server_budget(cfg: RolloutConfig, arch: Arch, load: RolloutLoad) -> ServerBudget:
    """KV-cache tokens and running requests of each server this run starts: rollout.max_total_tokens and
    rollout.max_running_requests where set, else what the run's `load` puts in flight on one server
    (`rollout.sglang.server_budget`). Logs the KV cache's size and the memory free beside it."""
    import psutil

    r, max_prompt_tokens = cfg, load.max_prompt_tokens
    derived = server_budget(groups=load.groups, group_size=load.group_size, eval_prompts=load.eval_prompts,
                            eval_k=r.eval_k, servers=r.servers, max_prompt_tokens=max_prompt_tokens,
                            max_new_tokens=r.max_new_tokens)
    budget = ServerBudget(max_running_requests=r.max_running_requests or derived.max_running_requests,
                          max_total_tokens=r.max_total_tokens or derived.max_total_tokens)
    # SGLang's dtype 'auto' is float32 on CPU (SGLangServerConfig.dtype); on GPUs it serves the float32
    # checkpoint the trainer writes in float16.
    dtype_bytes = 2 if torch.cuda.is_available() else 4
    kv = budget.kv_cache_bytes(arch.num_layers, arch.num_query_groups, arch.head_dim, dtype_bytes)
    where = ("rollout.max_total_tokens" if r.max_total_tokens is not None else
             f"{derived.max_running_requests} requests in flight x (prompts.max_prompt_tokens "
             f"{max_prompt_tokens} + rollout.max_new_tokens {r.max_new_tokens}) x {KV_TOKENS_MARGIN}")
    available = None if torch.cuda.is_available() else psutil.virtual_memory().available
    free = "" if available is None else f"; {available / 2**30:.1f} GiB memory free"
    get_logger().info(
        f"SGLang server KV cache: {budget.max_total_tokens} tokens ({where}) = {kv / 2**30:.3g} GiB at "
        f"{dtype_bytes} bytes per value, up to {budget.max_running_requests} running requests, each of "
        f"{r.servers} server(s){free}")
    # The trainer has its model and optimizer by now, but its activations and log-prob passes come later, on the
    # same memory: caches that take more than half of what is left are the start of an OOM kill.
    if available is not None and kv * r.servers > available / 2:
        get_logger().warning(
            f"the SGLang servers' KV caches ({r.servers} x {kv / 2**30:.3g} GiB) take more than half of the "
            f"{available / 2**30:.1f} GiB memory free beside the trainer: lower rollout.max_total_tokens")
    return budget
