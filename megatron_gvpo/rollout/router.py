"""sglang-router (SGLang's Rust load balancer) in front of SGLang servers: a supervised router and its worker list.

`SGLangRouter` starts the router for given worker URLs on a free port, waits until it answers and has registered
every worker (a deadline; the tail of its log on failure), and stops it with its process group. `worker_urls(url)`
lists the workers behind a router URL: the router forwards generation but no weight update, so the weight sync
(which must reach every worker) asks it for them and talks to each worker directly. For generation, point
`SGLangClient` at the router URL.

Measured with sglang-router 0.3.2 in front of SGLang 0.5.23 CPU servers (tests/test_rollout_router.py pins
/generate, /flush_cache, /workers and the error from a router without a live worker):
- Forwarded: POST /generate, batched `input_ids` with n > 1 and return_logprob included (the same token ids and
  log-probs as the server itself; B*n answers, all samples of prompt 0 first); the fields logprob_start_len,
  top_logprobs_num, rid, ignore_eos, stop_token_ids arrive unchanged. NOT accepted: a list of per-prompt
  sampling_params (HTTP 422 "sampling_params[0]: invalid type: map, expected f32"), which SGLangClient sends for
  per-request seeds; send those as one request per sample. The OpenAI routes (/v1/...) are forwarded too, and
  POST /flush_cache goes to every worker.
- Answered by the router itself: /health and /liveness (the router process is up, even with no worker left),
  /readiness (503 until a worker is healthy), GET /workers, /get_loads, /get_model_info, /v1/models, and
  /get_server_info, which describes the router, not a worker.
- 404: every weight route (/update_weights_from_disk, _from_tensor, _from_distributed, /begin_weight_update,
  /end_weight_update, /init_weights_update_group, /update_weight_version, /get_weights_by_name), /abort_request,
  /pause_generation, /continue_generation, /release_memory_occupation, /resume_memory_occupation, /server_info.
- One request goes whole to one worker: a batch is never split. To spread a batch over W workers use
  `SGLangClient([router.url] * W)` (one batched request per worker). SGLang's default policy `cache_aware` sent
  every token-id request to the same worker, so `round_robin` is the default here.
- A worker that dies is retried on another by the router; with none left /generate answers 500 or 503 within
  half a second, which SGLangClient turns into a RolloutError. A worker unreachable when the router starts is
  never registered (not listed, no traffic); one that dies later stays listed as healthy until the router's
  health check (every 60 s) notices, so a weight sync to the listed workers fails loudly instead of skipping it.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
from dataclasses import dataclass, field

from megatron_gvpo.rollout.base import RolloutError
from megatron_gvpo.rollout.http import health, request_json
from megatron_gvpo.rollout.process import SupervisedProcess

# `python -m sglang_router.launch_router` minus one import: launch_router imports sglang_router.mini_lb (a Python
# debug balancer), which imports all of sglang (torch, transformers) for its tracing hooks; that took 11-20 s of
# start-up on a busy 2-core machine, against 0.4 s for the Rust router itself. Same parser, same checks.
_LAUNCHER = """\
import argparse, sys
import setproctitle
from sglang_router.router import Router
from sglang_router.router_args import RouterArgs
setproctitle.setproctitle("sglang::router")
parser = argparse.ArgumentParser(prog="sglang_router.launch_router")
RouterArgs.add_cli_args(parser, use_router_prefix=False)
args = RouterArgs.from_cli_args(parser.parse_args(sys.argv[1:]), use_router_prefix=False)
args._validate_router_args()
Router.from_args(args).start()
"""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the router colours its log even when it goes to a file


@dataclass
class SGLangRouterConfig:
    worker_urls: tuple[str, ...]
    """SGLang servers (http://host:port) the router sends requests to."""
    host: str = "127.0.0.1"
    port: int | None = None
    """None: a free port."""
    policy: str = "round_robin"
    """random | round_robin | cache_aware | power_of_two. cache_aware (SGLang's default) matches text prefixes:
    with token-id requests it sent every request to one worker."""
    wait_for_workers: bool = True
    """start() returns once every worker is registered and healthy; False: as soon as the router answers."""
    startup_timeout_s: float = 60.0
    log_level: str = "warn"
    """debug | info | warn | error. 'info' logs two lines per HTTP request, which buries a failed start-up (a
    worker that cannot be registered is a 'warn' line) under the supervisor's own health polls."""
    log_path: str | None = None
    """Router stdout/stderr; None: a temp file."""
    extra_args: tuple[str, ...] = ()
    """More `launch_router` flags, e.g. ("--health-check-interval-secs", "5")."""
    env: dict[str, str] = field(default_factory=dict)


def _normalise(url: str) -> str:
    return url.rstrip("/")


class SGLangRouter(SupervisedProcess):
    """One supervised sglang-router process (module docstring); ready once every worker is registered."""

    name = "sglang-router"

    def __init__(self, cfg: SGLangRouterConfig):
        if not cfg.worker_urls:
            raise ValueError("SGLangRouterConfig.worker_urls is empty: a router needs at least one SGLang server")
        self.cfg = cfg
        super().__init__(cfg.host, cfg.port, cfg.log_path, cfg.startup_timeout_s)

    def command(self) -> list[str]:
        from megatron_gvpo.utils.distributed import free_port

        c = self.cfg
        # Its own Prometheus port: the default 29000 is shared, and a second router on the machine panics on it.
        self.metrics_port = free_port(c.host)
        return [sys.executable, "-c", _LAUNCHER, "--worker-urls", *map(_normalise, c.worker_urls), "--host", c.host,
                "--port", str(self.port), "--policy", c.policy, "--prometheus-host", c.host,
                "--prometheus-port", str(self.metrics_port), "--log-level", c.log_level, *c.extra_args]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.cfg.env}  # no CPU stand-ins or thread limits: the router is not torch

    def ready(self) -> tuple[bool, str]:
        if not health(self.url, timeout_s=2.0):
            return False, "no answer to /health"
        if not self.cfg.wait_for_workers:
            return True, ""
        want = {_normalise(u) for u in self.cfg.worker_urls}
        try:
            registered = set(worker_urls(self.url, healthy_only=True, timeout_s=5.0))
        except RolloutError:
            registered = set()
        return want <= registered, f"healthy workers {sorted(registered)}, expected {sorted(want)}"

    def log_tail(self, lines: int = 30) -> str:
        return _ANSI.sub("", super().log_tail(lines))


def worker_urls(router_url: str, healthy_only: bool = False, timeout_s: float = 30.0) -> list[str]:
    """The URLs of the SGLang workers registered with the router at `router_url` (GET /workers), in the router's
    order (not necessarily the order it was started with). Unhealthy ones are included unless `healthy_only`: a
    weight sync must reach every worker that may still get requests, and fail on one it cannot reach."""
    try:
        answer = request_json(f"{_normalise(router_url)}/workers", None, timeout_s)
        workers = answer["workers"]
        return [w["url"] for w in workers if w.get("is_healthy", True) or not healthy_only]
    except (urllib.error.URLError, OSError) as e:
        raise RolloutError(f"cannot list the workers of the router at {router_url}: {e}") from None
    except (KeyError, TypeError) as e:
        raise RolloutError(f"router at {router_url} returned a malformed /workers answer ({e!r}): "
                           f"{str(answer)[:300]}") from None
