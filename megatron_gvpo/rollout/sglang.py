"""SGLang as the rollout engine: supervised `sglang.launch_server` processes and an HTTP client for them.

`SGLangServer` starts one server (or none: attach to a URL), waits for `/health` with a deadline and fails with
the tail of the server's log, and stops it with its whole process group. On machines without CUDA it adds the
flags of SGLang's generic CPU path (`--device cpu --attention-backend torch_native --sampling-backend pytorch`),
one OpenMP thread, and the import-only stand-ins of `megatron_gvpo/rollout/cpu_stubs/` to PYTHONPATH; on any machine
PYTHONWARNINGS silences the known-harmless notices its processes print (`utils.logging.KNOWN_NOTICES`).
A server that dies says why (`SupervisedProcess.failure`), in the start-up error or, found dead later, in a
warning when it is stopped: its exit status with the signal's name, and for SGLang the process of the server
that died first (its launcher stops itself, with SIGKILL, when its scheduler dies). A SIGKILL is named as the
likely work of the kernel's OOM killer. `server_budget` sizes a server's KV cache and running requests from
the run it serves: SGLang's own default takes most of the memory free at start-up, which a trainer beside it
on the same machine then runs out of.

`SGLangClient` sends grouped sampling requests (token ids in, token ids and log-probs out) to one or more
servers, spreads prompts over them, retries a request on another server when one is unreachable, and turns
every answer into `Sample`s with SGLang's finish reason ('stop' / 'length' / 'abort'); a malformed answer or a
deadline is a `RolloutError`, never a silently short batch. Asked for (`SamplingParams.return_routed_experts`,
servers with `SGLangServerConfig.return_routed_experts`), each sample carries the experts a mixture-of-experts
model routed its tokens to (`Sample.routed_experts`): SGLang sends them as base64 of a flat int32 buffer,
[len(prompt) + len(output) - 1, num_hidden_layers, num_experts_per_tok] in C order, which the client shapes with
the model's `routed_experts_shape`.

Reproducible sampling. `SamplingParams.seed` sends the group of a prompt as n requests with seeds
seed + (prompt index * n + j): distinct samples, reproducible for the same prompts, seed and weights (SGLang's
own `n` would give all n copies one seed). How a server honours the seed depends on how it runs:
- with deterministic inference (`SGLangServerConfig.deterministic`, GPU attention backends): SGLang's own
  `sampling_seed`;
- with custom logit processors enabled (`SGLangServerConfig.custom_logit_processor`, any device, the CPU path
  included): `megatron_gvpo.rollout.seeded.SeededGumbel`, exact seeded sampling whose samples carry NaN log-probs;
- otherwise the seed would be silently ignored, so the client refuses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gvpo.rollout.base import RolloutError, Sample, SamplingParams
from megatron_gvpo.utils.logging import get_logger, known_notices_env
from megatron_gvpo.utils.process import die_with_parent

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
# Supervised processes
# ---------------------------------------------------------------------------------------------------------

OOM_HINT = ("likely the kernel's OOM killer (check `dmesg`/the memory of the trainer and the server's KV cache, "
            "rollout.max_total_tokens)")


def describe_exit(returncode: int) -> str:
    """A process's exit status in words: 'exited with code 1'; a negative one (Popen's, multiprocessing's) is the
    signal that killed it: 'was killed by SIGKILL (exit status -9): likely the kernel's OOM killer (...)'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = f": {OOM_HINT}" if -returncode == signal.SIGKILL else ""
    return f"was killed by {name} (exit status {returncode}){hint}"


class _PortTaken(Exception):
    """The process could not bind its port: another program took it after it was chosen."""


class SupervisedProcess:
    """A child program with an HTTP readiness check: started in its own session with its output in a log file,
    awaited with a deadline (failing with the log's tail), and stopped with everything it spawned.
    Subclasses give `name`, `command()`, `environment()` and `ready()`."""

    name = "process"

    def __init__(self, host: str, port: int | None, log_path: str | None, startup_timeout_s: float):
        from megatron_gvpo.utils.distributed import free_port

        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._log_offset = 0  # where the current attempt's output starts in the log
        if log_path:
            self.log_path = Path(log_path)
        else:
            import tempfile

            prefix = re.sub(r"\W+", "_", self.name)  # "SGLang server" -> SGLang_server_*.log, no space to quote
            self.log_path = Path(tempfile.mkstemp(prefix=f"{prefix}_", suffix=".log")[1])

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> tuple[bool, str]:
        """(ready to serve, what is still missing, for the error message)."""
        return health(self.url, timeout_s=2.0), "no answer to /health"

    def start(self, attempts: int = 3):
        """Start and wait until ready. A free port can be taken by another program between choosing and
        binding it (busy test machines do it); then the process is restarted on another free port."""
        if self.process is not None and self.process.poll() is None:
            return self
        from megatron_gvpo.utils.distributed import free_port

        for attempt in range(attempts):
            with open(self.log_path, "ab") as log:
                self._log_offset = log.tell()
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                                env=self.environment(), start_new_session=True,
                                                preexec_fn=die_with_parent)
            try:
                self.wait_ready(self.startup_timeout_s)
                return self
            except _PortTaken:
                self.stop(report=False)
                if attempt == attempts - 1:
                    raise RolloutError(f"{self.name}: port {self.port} and {attempts - 1} others were taken "
                                       f"while it started; log {self.log_path}") from None
                self.port = free_port(self.host)
                self.url = f"http://{self.host}:{self.port}"
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        missing = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RolloutError(f"{self.name} {self.failure()} during start-up; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            ok, missing = self.ready()
            if ok:
                return
            if self._port_taken():
                raise _PortTaken
            time.sleep(0.5)
        self.stop(report=False)
        raise RolloutError(f"{self.name} at {self.url} not ready after {timeout_s:.0f} s "
                           f"(startup_timeout_s; {missing}); log {self.log_path}:\n{self.log_tail()}")

    def _port_taken(self) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return b"address already in use" in log.read().lower()
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _log_since_start(self, max_bytes: int = 1 << 20) -> bytes:
        """The current attempt's output, its last `max_bytes` at most (a long run's log grows without bound)."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - max_bytes))
                return log.read()
        except OSError:
            return b""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self) -> str | None:
        """Why the process died, in words ('exited with code 1', 'was killed by SIGKILL ...: likely the
        kernel's OOM killer ...'); None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        return describe_exit(self.process.returncode)

    def stop(self, grace_s: float = 15.0, report: bool = True) -> None:
        """Stop the process and every process it spawned. SIGTERM goes to the leader only, which drains and
        stops its children (signalling SGLang's whole group kills the scheduler first, which the leader treats
        as a crash: a diagnostics pause, then SIGKILL of itself); whatever is left after `grace_s` is killed.
        A process found dead (or dying) is reported with why (`failure`) as a warning, unless `report` is False."""
        if self.process is None:
            return
        if report and (reason := self.failure()) is not None:
            get_logger().warning(f"{self.name} at {self.url} {reason}; log {self.log_path}")
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(5.0)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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


def _http(url: str, payload: dict | None, timeout_s: float) -> dict | list:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = response.read()
    try:
        return json.loads(body) if body else {}
    except json.JSONDecodeError:
        return {"text": body.decode(errors="replace")}


def health(url: str, timeout_s: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=timeout_s).read()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def weight_version(url: str, timeout_s: float = 5.0) -> str | None:
    """The weight version a server answers with (/model_info), None when it does not answer."""
    try:
        return _http(f"{url}/model_info", None, timeout_s).get("weight_version")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, AttributeError):
        return None


def _routed_experts(encoded: str | None, tokens: int, shape: tuple[int, int], url: str):
    """SGLang's meta_info.routed_experts (base64 of int32 [tokens, layers, top_k], C order) as an int64 tensor."""
    import base64

    import numpy as np
    import torch

    if encoded is None:
        raise RolloutError(f"{url} returned no routed experts: start it with --enable-return-routed-experts "
                           "(SGLangServerConfig.return_routed_experts), on a mixture-of-experts model")
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    layers, top_k = shape
    if flat.size != tokens * layers * top_k:
        raise RolloutError(f"{url} returned {flat.size} routed expert ids, expected {tokens} tokens x {layers} layers "
                           f"x top-{top_k} (is routed_experts_shape the served model's?)")
    return torch.from_numpy(flat.astype(np.int64)).view(tokens, layers, top_k)


def pause_generation(urls: list[str], timeout_s: float = 60.0) -> None:
    """Pause generation on every server for a weight update in flight (asynchronous rollout): unfinished
    requests go back to the server's queue with the tokens they have and their KV cache is freed (SGLang's
    'retract' mode), so the update can flush the old weights' cache; after `continue_generation` they are
    re-prefilled under the new weights and go on. Nothing is lost: each request returns once, complete."""
    for url in urls:
        try:
            _http(f"{url}/pause_generation", {"mode": "retract"}, timeout_s)
        except OSError as e:  # urllib's errors are OSErrors
            raise RolloutError(f"{url}/pause_generation failed: {e}") from e


def continue_generation(urls: list[str], timeout_s: float = 60.0) -> None:
    """Resume generation after `pause_generation` on every server (all are tried; the first failure raised)."""
    errors = []
    for url in urls:
        try:
            _http(f"{url}/continue_generation", {}, timeout_s)
        except OSError as e:
            errors.append(f"{url}/continue_generation failed: {e}")
    if errors:
        raise RolloutError("; ".join(errors))


class SGLangClient:
    """Grouped sampling against SGLang servers (module docstring)."""

    def __init__(self, urls: list[str], timeout_s: float = 600.0, retries: int = 2,
                 routed_experts_shape: tuple[int, int] | None = None):
        """`routed_experts_shape`: (num_hidden_layers, num_experts_per_tok) of the served mixture-of-experts model,
        needed for `SamplingParams.return_routed_experts` (SGLang sends the routed experts without their shape)."""
        if not urls:
            raise ValueError("SGLangClient needs at least one server URL")
        self.urls, self.timeout_s, self.retries = list(urls), timeout_s, retries
        self.routed_experts_shape = routed_experts_shape
        self._seed_modes: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Sample]]:
        sampling.validate()
        if sampling.return_routed_experts and self.routed_experts_shape is None:
            raise ValueError("return_routed_experts needs the model's (num_hidden_layers, num_experts_per_tok): "
                             "pass SGLangClient(routed_experts_shape=...)")
        for i, p in enumerate(prompts):
            if not p or not all(isinstance(t, int) and t >= 0 for t in p):
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {p[:8]!r}...")
        if not prompts:
            return []
        mode = self._seed_mode() if sampling.seed is not None else None
        # Prompts dealt round-robin over the servers; each server gets its share as one batched request.
        parts = [list(range(len(prompts)))[s::len(self.urls)] for s in range(len(self.urls))]
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = [pool.submit(self._generate_on, s, [prompts[i] for i in idx], idx, sampling, mode)
                       for s, idx in enumerate(parts) if idx]
            groups: dict[int, list[Sample]] = {}
            for f in futures:
                groups.update(f.result())
        return [groups[i] for i in range(len(prompts))]

    def _generate_on(self, server: int, prompts: list[list[int]], indices: list[int],
                     sampling: SamplingParams, seed_mode: str | None) -> dict[int, list[Sample]]:
        payload = self._payload(prompts, indices, sampling, seed_mode)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            url = self.urls[(server + attempt) % len(self.urls)]
            try:
                answer = _http(f"{url}/generate", payload, self.timeout_s)
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                if isinstance(e, TimeoutError) or "timed out" in str(e):
                    raise RolloutError(f"rollout request to {url} timed out after {self.timeout_s:.0f} s") from e
                last = f"{url}: {e!r}"
                continue
            routed_shape = self.routed_experts_shape if sampling.return_routed_experts else None
            return self._parse(answer, indices, sampling.n, url, logprobs=seed_mode != "processor",
                               prompts=prompts, routed_shape=routed_shape)
        raise RolloutError(f"rollout request failed on every server ({self.retries + 1} attempts): {last}")

    @staticmethod
    def _payload(prompts: list[list[int]], indices: list[int], s: SamplingParams, seed_mode: str | None) -> dict:
        params = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                  "max_new_tokens": s.max_new_tokens, "stop": list(s.stop), "stop_token_ids": list(s.stop_token_ids),
                  "ignore_eos": s.ignore_eos}
        extra = {"return_routed_experts": True} if s.return_routed_experts else {}
        if seed_mode is None:
            return {"input_ids": prompts, "sampling_params": {**params, "n": s.n}, "return_logprob": True, **extra}
        # One request per sample, each with its own seed (see the module docstring).
        seeds = [s.seed + i * s.n + j for i in indices for j in range(s.n)]
        payload = {"input_ids": [p for p in prompts for _ in range(s.n)], "return_logprob": True, **extra}
        if seed_mode == "native":
            payload["sampling_params"] = [{**params, "sampling_seed": seed} for seed in seeds]
        elif s.temperature == 0:
            payload["sampling_params"] = [params] * len(seeds)  # greedy needs no seed
        else:
            from megatron_gvpo.rollout.seeded import processor_string

            if s.top_p < 1 or s.top_k > 0:
                raise ValueError("seeded sampling through SeededGumbel (servers without deterministic inference) "
                                 f"samples the full distribution: top_p={s.top_p}, top_k={s.top_k} are not supported")
            payload["sampling_params"] = [{**params, "temperature": 0.0, "custom_params": {
                "seed": seed, "temperature": s.temperature}} for seed in seeds]
            payload["custom_logit_processor"] = processor_string()
        return payload

    @staticmethod
    def _parse(answer, indices: list[int], n: int, url: str, logprobs: bool = True, prompts: list[list[int]] = (),
               routed_shape: tuple[int, int] | None = None) -> dict[int, list[Sample]]:
        outputs = answer if isinstance(answer, list) else [answer]
        if len(outputs) != len(indices) * n:
            raise RolloutError(f"{url} returned {len(outputs)} samples for {len(indices)} prompts x n={n}")
        groups: dict[int, list[Sample]] = {}
        for k, out in enumerate(outputs):
            try:
                meta = out["meta_info"]
                reason = meta["finish_reason"]
                kind = reason["type"] if isinstance(reason, dict) else reason
                token_ids = list(out["output_ids"])
                token_logprobs = [float(lp) for lp, _tok, *_ in meta["output_token_logprobs"]]
            except (KeyError, TypeError, ValueError) as e:
                raise RolloutError(f"{url} returned a malformed sample ({e!r}): {str(out)[:300]}") from None
            if kind not in ("stop", "length", "abort"):
                raise RolloutError(f"{url} returned unknown finish reason {reason!r}")
            if len(token_logprobs) != len(token_ids):
                raise RolloutError(f"{url} returned {len(token_logprobs)} log-probs for {len(token_ids)} tokens")
            if not logprobs:  # of the seeded sampler's rewritten logits, not the policy's (rollout/seeded.py)
                token_logprobs = [float("nan")] * len(token_ids)
            routed = None
            # An aborted request may end before SGLang collects its experts; it is not trained on either way.
            if routed_shape is not None and not (kind == "abort" and meta.get("routed_experts") is None):
                routed = _routed_experts(meta.get("routed_experts"), len(prompts[k // n]) + len(token_ids) - 1,
                                         routed_shape, url)
            prompt = indices[k // n]
            groups.setdefault(prompt, []).append(Sample(
                prompt_index=prompt, token_ids=token_ids, logprobs=token_logprobs, finish_reason=kind,
                weight_version=meta.get("weight_version"), text=out.get("text"), routed_experts=routed,
                info={"server": url, "finish_reason": reason, "e2e_latency": meta.get("e2e_latency"),
                      "cached_tokens": meta.get("cached_tokens")},
            ))
        return groups

    def _seed_mode(self) -> str:
        """How the servers honour a sampling seed: 'native' (deterministic inference) or 'processor' (custom
        logit processors, megatron_gvpo/rollout/seeded.py); a server that would ignore it is a ValueError."""
        for url in self.urls:
            if url not in self._seed_modes:
                try:
                    info = _http(f"{url}/server_info", None, 30.0)
                except (urllib.error.URLError, OSError) as e:
                    raise ValueError(
                        f"sampling seed given, but {url}/server_info does not say how the server samples ({e}); an "
                        "sglang-router does not forward /server_info (nor per-request seeds): send seeded requests "
                        "to the servers themselves") from None
                info = info if isinstance(info, dict) else {}
                self._seed_modes[url] = ("native" if info.get("enable_deterministic_inference") else
                                         "processor" if info.get("enable_custom_logit_processor")
                                         and info.get("disable_overlap_schedule") else "")
            if not self._seed_modes[url]:
                raise ValueError(
                    f"sampling seed given, but the SGLang server at {url} runs with neither "
                    "--enable-deterministic-inference (SGLangServerConfig.deterministic, GPU) nor "
                    "--enable-custom-logit-processor --disable-overlap-schedule "
                    "(SGLangServerConfig.custom_logit_processor), so it would ignore the seed")
        modes = {self._seed_modes[u] for u in self.urls}
        if len(modes) > 1:
            raise ValueError(f"sampling seed given, but the servers honour seeds differently: {self._seed_modes}; "
                             "the same seed would give different samples on different servers")
        return modes.pop()

    # ------------------------------------------------------------------------------------------------
    def health(self) -> bool:
        return all(health(u) for u in self.urls)

    def abort_all(self) -> None:
        """Abort every request on every server: their samples come back with finish_reason 'abort'. A server
        that is down has nothing to abort; one that refuses (an sglang-router has no /abort_request: abort on
        its workers, `router.worker_urls`) is a RolloutError."""
        for url in set(self.urls):
            try:
                _http(f"{url}/abort_request", {"abort_all": True}, 30.0)
            except urllib.error.HTTPError as e:
                raise RolloutError(f"{url}/abort_request: HTTP {e.code}; behind an sglang-router, abort on its "
                                   "workers (megatron_gvpo.rollout.router.worker_urls)") from None
            except (urllib.error.URLError, OSError):
                pass

    def shutdown(self) -> None:
        """The client owns no server; see SGLangServer.stop."""
