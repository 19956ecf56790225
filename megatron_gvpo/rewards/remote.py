"""A client for a reward model served over HTTP (standard library only).

Protocol: one POST per batch to the configured URL with the JSON body

    {"prompts": [str, ...], "responses": [str, ...], "labels": [any JSON, ...]}

and the answer `{"rewards": [number, ...]}`, one per response, in order. Anything else (an HTTP error status,
a body that is not that JSON, the wrong number of rewards, a reward that is not a number) raises RewardError
naming the URL and what was wrong. NaN and infinities (Python's json reads `NaN`/`Infinity`) are returned as
they are: the caller decides what a non-finite reward means (scoring.py treats it as a failed sample).

Connection failures (refused, reset, dropped) are retried with exponential back-off, since a reward server
restarting is common and scoring is idempotent; HTTP errors and timeouts are not retried (the server answered,
or retrying would only multiply the wait). The timeout bounds each blocking socket operation (connect, each
read), as urllib's does, not the whole exchange.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


class RewardError(RuntimeError):
    """A reward could not be computed (bad endpoint answer, failed sample under on_error='raise')."""


class RewardTimeout(RewardError):
    """The reward endpoint did not answer within the timeout."""


def _excerpt(raw: bytes | str, limit: int = 200) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def parse_rewards(url: str, raw: bytes, n: int) -> list[float]:
    """The `rewards` list of an endpoint's answer body, checked: a JSON object, n numbers (bools rejected)."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RewardError(f"reward endpoint {url} did not answer JSON: {_excerpt(raw)}") from None
    if not isinstance(body, dict) or "rewards" not in body:
        raise RewardError(f"reward endpoint {url} answered without a 'rewards' key: {_excerpt(raw)}")
    rewards = body["rewards"]
    if not isinstance(rewards, list):
        raise RewardError(f"reward endpoint {url}: 'rewards' must be a list, got {_excerpt(json.dumps(rewards))}")
    if len(rewards) != n:
        raise RewardError(f"reward endpoint {url} returned {len(rewards)} rewards for {n} responses")
    for i, value in enumerate(rewards):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardError(f"reward endpoint {url}: rewards[{i}] is {value!r}, not a number")
    return [float(v) for v in rewards]


def request_rewards(
    url: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    labels: Sequence[Any],
    *,
    timeout_s: float = 30.0,
    retries: int = 2,
    backoff_s: float = 0.5,
) -> list[float]:
    """POST one batch to the reward endpoint and return its rewards (see the module docstring for the protocol).

    Retries connection failures `retries` times, waiting backoff_s, 2 * backoff_s, ... in between. Raises
    RewardTimeout when the endpoint is too slow and RewardError for everything else that goes wrong.
    """
    n = len(responses)
    if not len(prompts) == len(labels) == n:
        raise ValueError(f"{len(prompts)} prompts, {n} responses and {len(labels)} labels: lengths must match")
    try:
        payload = {"prompts": list(prompts), "responses": list(responses), "labels": list(labels)}
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise RewardError(f"cannot send the batch to reward endpoint {url}: it is not JSON-serialisable ({e})") from e

    last_error: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                return parse_rewards(url, answer.read(), n)
        # HTTPError is a URLError: it must be caught first, and it is final (the server did answer).
        except urllib.error.HTTPError as e:
            body = e.read() if e.fp is not None else b""
            raise RewardError(f"reward endpoint {url} answered HTTP {e.code} {e.reason}: {_excerpt(body)}") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as e:
            if _is_timeout(e):
                raise RewardTimeout(f"reward endpoint {url} did not answer within timeout_s={timeout_s:g}") from e
            last_error = e
    reason = getattr(last_error, "reason", last_error)
    raise RewardError(
        f"reward endpoint {url} unreachable after {retries + 1} attempt(s): {type(reason).__name__}: {reason}"
    ) from last_error
