"""Grouped sampling against SGLang servers: token ids in, token ids and log-probs out.

`SGLangClient` sends grouped sampling requests to one or more servers (or an sglang-router), spreads prompts over
them, retries a request on another server when one is unreachable, and turns every answer into `Sample`s with
SGLang's finish reason ('stop' / 'length' / 'abort'); a malformed answer or a deadline is a `RolloutError`, never a
silently short batch. Asked for (`SamplingParams.return_routed_experts`, servers with
`SGLangServerConfig.return_routed_experts`), each sample carries the experts a mixture-of-experts model routed its
tokens to (`Sample.routed_experts`): SGLang sends them as base64 of a flat int32 buffer,
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

import urllib.error
from concurrent.futures import ThreadPoolExecutor

from megatron_gvpo.rollout.base import RolloutError, Sample, SamplingParams
from megatron_gvpo.rollout.http import health, request_json


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
                answer = request_json(f"{url}/generate", payload, self.timeout_s)
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
                    info = request_json(f"{url}/server_info", None, 30.0)
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
                request_json(f"{url}/abort_request", {"abort_all": True}, 30.0)
            except urllib.error.HTTPError as e:
                raise RolloutError(f"{url}/abort_request: HTTP {e.code}; behind an sglang-router, abort on its "
                                   "workers (megatron_gvpo.rollout.router.worker_urls)") from None
            except (urllib.error.URLError, OSError):
                pass

    def shutdown(self) -> None:
        """The client owns no server; see SGLangServer.stop."""
