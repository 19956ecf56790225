"""The HTTP the rollout side speaks with SGLang servers and routers: JSON requests and the health check.
Standard library only (urllib), so that anything may call it without a client library."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def request_json(url: str, payload: dict | None, timeout_s: float) -> dict | list:
    """GET `url` (payload None) or POST the payload as JSON; the answer's JSON (a body that is not JSON as
    {"text": body}). urllib's errors (OSErrors) propagate: callers decide what a failure means."""
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
