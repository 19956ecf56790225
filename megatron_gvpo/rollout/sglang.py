"""SGLang as the rollout engine, its server side: supervised `sglang.launch_server` processes and the routes that
control a running server (weight version, pausing generation around a weight update).

`SGLangServer` starts one server (a `SupervisedProcess`, rollout/process.py), waits for `/health` with a deadline
and fails with the tail of the server's log, and stops it with its whole process group. On machines without CUDA
it adds the flags of SGLang's generic CPU path (`--device cpu --attention-backend torch_native --sampling-backend
pytorch`), one OpenMP thread, and the import-only stand-ins of `megatron_gvpo/rollout/cpu_stubs/` to PYTHONPATH; on
any machine PYTHONWARNINGS silences the known-harmless notices its processes print
(`utils.logging.KNOWN_NOTICES`). A server that dies says why: its exit status, and the process of the server that
died first (its launcher stops itself, with SIGKILL, when its scheduler dies). `server_budget` sizes a server's KV
cache and running requests from the run it serves: SGLang's own default takes most of the memory free at
start-up, which a trainer beside it on the same machine then runs out of. Clients: rollout/client.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.http import request_json
from megatron_gvpo.rollout.process import SupervisedProcess, describe_exit
from megatron_gvpo.utils.logging import known_notices_env

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_STUBS = Path(__file__).resolve().parent / "cpu_stubs"
"""Import-only stand-ins for modules SGLang imports but never calls on its CPU path (README inside)."""
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch")
TORCHRUN_VARS = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                           "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"})
IDLE_FLAGS = ("--sleep-on-idle",)
"""An idle scheduler waits on its sockets instead of spinning: without it every server pins a core at 100% between
requests (measured: an idle test server took 94% of one of CI's two cores for the rest of the session; the
trainer, stepping while its server idles, lost a core to it)."""
PROCESSOR_SEEDING_FLAGS = ("--enable-custom-logit-processor", "--disable-overlap-schedule")
"""Seeded sampling where deterministic inference is unavailable (`SGLangServerConfig.custom_logit_processor`)."""



@dataclass
class SGLangServerConfig:
    model_path: str
    """HF model directory (config, safetensors, tokenizer) the server loads."""
    host: str = "127.0.0.1"
    port: int | None = None
    """None: a free port."""
    tp: int = 1
    dtype: str = "auto"
    """SGLang's --dtype. On CPU 'auto' becomes float32: SGLang's own 'auto' runs an fp32 checkpoint in fp16."""
    random_seed: int = 0
    weight_version: str = "default"
    """The version the served weights start with (samples carry it until the first weight sync)."""
    deterministic: bool = False
    """--enable-deterministic-inference: SGLang honours per-request sampling seeds only with it (GPU)."""
    custom_logit_processor: bool = False
    """--enable-custom-logit-processor --disable-overlap-schedule, for seeded sampling where deterministic
    inference is unavailable (megatron_gvpo/rollout/seeded.py; with overlap scheduling a request's output_ids
    lag one token behind the token being sampled). Lets clients run code on the server: trusted networks only."""
    return_routed_experts: bool = False
    """--enable-return-routed-experts: the server records which experts a mixture-of-experts model routes every
    token to, and returns them to requests that ask (`SamplingParams.return_routed_experts`), for rollout routing
    replay. Costs a host buffer of max_total_tokens x layers x top_k int32."""
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    """--max-total-tokens: KV-cache tokens (`server_budget` derives one from a run); None: SGLang sizes the cache
    from the memory free at start-up."""
    max_running_requests: int | None = None
    """--max-running-requests: requests decoded at once, more wait in SGLang's queue; None: SGLang's default."""
    startup_timeout_s: float = 180.0
    log_path: str | None = None
    """Server stdout/stderr; None: a temp file."""
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------
# KV cache and running requests from the run
# ---------------------------------------------------------------------------------------------------------

KV_TOKENS_MARGIN = 1.25
"""Head-room of a server's KV cache over the most tokens the run has in flight on it: SGLang admits a request on
an estimate of how much of its max_new_tokens it will decode, and a request retried after another server failed
(`SGLangClient.retries`) lands on top of this server's own share. Past the budget SGLang queues or retracts
requests (slower, never wrong), so the margin buys speed in those moments, not correctness."""


@dataclass(frozen=True)
class ServerBudget:
    """What one server needs for a run: the requests it can have in flight and their KV-cache tokens."""

    max_running_requests: int
    max_total_tokens: int

    def kv_cache_bytes(self, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """Bytes of the KV cache these tokens take: K and V of every layer, all of the server's TP ranks."""
        return self.max_total_tokens * layers * 2 * kv_heads * head_dim * dtype_bytes


def server_budget(*, groups: int, group_size: int, eval_prompts: int, eval_k: int, servers: int,
                  max_prompt_tokens: int, max_new_tokens: int, margin: float = KV_TOKENS_MARGIN) -> ServerBudget:
    """The budget of each of `servers` servers: a rollout of `groups` prompts x `group_size` samples, or an
    evaluation of `eval_prompts` x `eval_k` (its greedy pass is the same prompts x 1), whichever is larger. The
    client deals prompts round-robin over the servers, so one server holds at most ceil(prompts / servers) of them,
    every sample one request of up to max_prompt_tokens + max_new_tokens tokens."""
    if min(group_size, eval_k, servers, max_prompt_tokens, max_new_tokens) < 1 or min(groups, eval_prompts) < 0:
        raise ValueError(f"server_budget needs positive sizes, got groups={groups}, group_size={group_size}, "
                         f"eval_prompts={eval_prompts}, eval_k={eval_k}, servers={servers}, "
                         f"max_prompt_tokens={max_prompt_tokens}, max_new_tokens={max_new_tokens}")
    share = lambda prompts: -(-prompts // servers)  # noqa: E731 - ceil
    requests = max(share(groups) * group_size, share(eval_prompts) * eval_k, 1)
    return ServerBudget(max_running_requests=requests,
                        max_total_tokens=math.ceil(requests * (max_prompt_tokens + max_new_tokens) * margin))


# ---------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------

class SGLangServer(SupervisedProcess):
    """One supervised `python -m sglang.launch_server` process (module docstring)."""

    name = "SGLang server"

    def __init__(self, cfg: SGLangServerConfig):
        self.cfg = cfg
        super().__init__(cfg.host, cfg.port, cfg.log_path, cfg.startup_timeout_s)

    def start(self, attempts: int = 3):
        check_servable(self.cfg.model_path)
        return super().start(attempts)

    def command(self) -> list[str]:
        c = self.cfg
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", c.model_path, "--host", c.host,
               "--port", str(self.port), "--tp-size", str(c.tp), "--random-seed", str(c.random_seed),
               "--weight-version", c.weight_version, *IDLE_FLAGS]
        if c.deterministic:
            cmd += ["--enable-deterministic-inference"]
        if c.custom_logit_processor:
            cmd += list(PROCESSOR_SEEDING_FLAGS)
        if c.return_routed_experts:
            cmd += ["--enable-return-routed-experts"]
        if c.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(c.mem_fraction_static)]
        if c.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(c.max_total_tokens)]
        if c.max_running_requests is not None:
            cmd += ["--max-running-requests", str(c.max_running_requests)]
        if not _cuda_available():
            cmd += list(CPU_FLAGS)
        dtype = "float32" if c.dtype == "auto" and not _cuda_available() else c.dtype
        cmd += ["--dtype", dtype]
        return cmd + list(c.extra_args)

    # SGLang's launcher watches its scheduler and detokenizer processes: when one dies it logs the first line,
    # when one raises the second, and either way it then kills its own process tree, itself with SIGKILL.
    _CHILD_DIED = re.compile(rb"Subprocess (\S+) \(pid=(\d+)\) crashed with exit code (-?\d+)")
    _CHILD_RAISED = re.compile(rb"(\w+) hit an exception")

    def failure(self) -> str | None:
        """Why the server died or is dying: the launcher's own exit status, or, when one of its processes died
        first (the launcher then kills itself: its SIGKILL says nothing), which process and how."""
        own = super().failure()
        log = self._log_since_start()
        if died := self._CHILD_DIED.search(log):
            name, pid, code = died[1].decode(errors="replace"), int(died[2]), int(died[3])
            child = f"its {name} process (pid {pid}) {describe_exit(code)}"
        elif raised := self._CHILD_RAISED.search(log):
            child = f"its {raised[1].decode(errors='replace')} raised an exception (the traceback is in the log)"
        else:
            return own
        if own is None:
            return f"is shutting down: {child}"
        return f"stopped (exit status {self.process.returncode}): {child}"

    def environment(self) -> dict[str, str]:
        return server_environment({**os.environ, **self.cfg.env}, cpu=not _cuda_available(),
                                  custom_logit_processor=self.cfg.custom_logit_processor)


def server_environment(env: dict[str, str], *, cpu: bool, custom_logit_processor: bool) -> dict[str, str]:
    """`env` as an SGLang server of this project runs with (also `megatron_gvpo.rollout.serve`, the launcher's)."""
    # torchrun's variables describe the trainer's world: a server the trainer starts under torchrun would join
    # that rendezvous (its agent's store, MASTER_ADDR/PORT) for its own process group and hang at start-up.
    env = {k: v for k, v in env.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    # The notices each of its processes prints at import (CPU platform, Megatron-FSDP without Apex), every
    # time it starts: silenced as in our own processes (utils/logging.py).
    env["PYTHONWARNINGS"] = known_notices_env(env, cpu=cpu)
    if custom_logit_processor:  # the seeded sampler is passed by reference (rollout/seeded.py)
        _prepend_path(env, REPO_ROOT)
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # torch_native attention stalls with 2 threads on 2 cores
        _prepend_path(env, CPU_STUBS)
    return env


def check_servable(model_path: str) -> None:
    """Refuse a local model that SGLang 0.5.23 would load without an error but serve wrong: its Qwen3-MoE
    (models/qwen3_moe.py) builds every layer as a mixture of experts, ignoring `mlp_only_layers` and
    `decoder_sparse_step`, so a dense layer's MLP weights are dropped and the layer runs experts that were never
    loaded. (Hub names and remote paths are not read.)"""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "qwen3_moe" and (config.get("mlp_only_layers") or
                                                    config.get("decoder_sparse_step", 1) != 1):
        raise ValueError(f"{model_path}: SGLang serves Qwen3-MoE with every layer a mixture of experts; this model "
                         f"has dense layers (mlp_only_layers={config.get('mlp_only_layers')}, decoder_sparse_step="
                         f"{config.get('decoder_sparse_step', 1)}), which SGLang would run wrongly")


def _prepend_path(env: dict[str, str], path) -> None:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH", "")) if p)


def weight_version(url: str, timeout_s: float = 5.0) -> str | None:
    """The weight version a server answers with (/model_info), None when it does not answer."""
    try:
        return request_json(f"{url}/model_info", None, timeout_s).get("weight_version")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, AttributeError):
        return None


def pause_generation(urls: list[str], timeout_s: float = 60.0) -> None:
    """Pause generation on every server for a weight update in flight (asynchronous rollout): unfinished
    requests go back to the server's queue with the tokens they have and their KV cache is freed (SGLang's
    'retract' mode), so the update can flush the old weights' cache; after `continue_generation` they are
    re-prefilled under the new weights and go on. Nothing is lost: each request returns once, complete."""
    for url in urls:
        try:
            request_json(f"{url}/pause_generation", {"mode": "retract"}, timeout_s)
        except OSError as e:  # urllib's errors are OSErrors
            raise RolloutError(f"{url}/pause_generation failed: {e}") from e


def continue_generation(urls: list[str], timeout_s: float = 60.0) -> None:
    """Resume generation after `pause_generation` on every server (all are tried; the first failure raised)."""
    errors = []
    for url in urls:
        try:
            request_json(f"{url}/continue_generation", {}, timeout_s)
        except OSError as e:
            errors.append(f"{url}/continue_generation failed: {e}")
    if errors:
        raise RolloutError("; ".join(errors))
