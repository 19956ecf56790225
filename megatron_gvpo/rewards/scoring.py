"""Score a batch of responses: the reward step of the online loop, with failures recorded instead of fatal.

    result = score(prompts, responses, labels, group_ids, RewardConfig(kind="math", on_error="drop_group"))
    result.rewards, result.keep, result.metrics()

Four reward kinds (`RewardConfig.kind`):
    math      rule-based answer check of megatron_gvpo/rewards/math.py (GSM8K `####`, \\boxed{} or a final
              number);
    function  a user function `fn(prompt: str, response: str, label) -> float`, named "package.module:attr";
    http      a reward model behind an HTTP endpoint (protocol in megatron_gvpo/rewards/remote.py);
    addition  exact match for the toy addition task (megatron_gvpo/data/addition.py); labels are unused.

Per data source. A dataset that mixes sources (verl's `data_source` column: "openai/gsm8k", "lighteval/MATH",
a code set, ...) scores each row with the reward of its source: `reward.by_source` maps a source to a kind or
to a function path ("package.module:attr"); sources it does not name get `reward.kind`. Pass the samples'
sources to `score(..., sources=...)`.

A sample fails when its reward raises, exceeds the time limit, or is not a finite number. Every failure is
recorded (`RewardResult.errors`, counted in `metrics()`) and handled by `RewardConfig.on_error`:
    raise       RewardError naming the first failed sample (index, group) and its exception: stops the run;
    zero        the failed sample gets `error_value` and is trained on like any other;
    drop_group  every sample of a failed sample's group gets keep=False: the trainer leaves those groups out.
drop_group is the default because it leaves training unbiased: GVPO's objective is a sum over groups, so
leaving a group out only shrinks the batch, while a made-up reward would push the policy towards or away from
a response for no reason. The trainer must tolerate a batch in which every group was dropped.

Time limits. math and function rewards run in `workers` daemon threads; each call has timeout_s from the
moment it starts. A Python thread cannot be killed, so a call past its limit is recorded as a timeout and left
running; a fresh thread takes its place so the rest of the batch goes on, and `score` never waits for it.
Daemon threads, not a ThreadPoolExecutor: the executor's threads are joined at interpreter exit, so one hung
call would hang the trainer's exit. A call that never returns keeps its thread (and, if it computes, a share
of the GIL) for the life of the process. For http, one request carries the whole batch and timeout_s bounds
it (per socket operation); a failed request fails every sample in it.

Configuration errors (an unknown kind, a function path that does not import) raise ValueError, never go
through on_error: no sample can succeed with them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from megatron_gvpo.rewards.remote import RewardError, RewardTimeout, request_rewards

RewardKind = Literal["math", "function", "http", "addition"]
OnError = Literal["raise", "zero", "drop_group"]
FailureKind = Literal["exception", "timeout", "non_finite"]


@dataclass
class RewardConfig:
    kind: RewardKind = "math"
    """'math' (GSM8K/boxed answer checked by math-verify), 'function' (a user function), 'http' (a reward-model
    endpoint) or 'addition' (exact match for the toy addition task)."""
    function: str = ""
    """kind='function': the reward function as "package.module:attr", called as fn(prompt, response, label)
    and returning a number; the module must be importable (on sys.path) by the trainer."""
    url: str = ""
    """kind='http': the endpoint receiving POST {"prompts", "responses", "labels"} and answering {"rewards"}."""
    timeout_s: float = 30.0
    """Time limit of one reward call (math, function) or of the batch's request (http); past it the sample
    fails with kind 'timeout'."""
    workers: int = 4
    """Threads computing math and function rewards. Threads help functions that wait (I/O, subprocesses);
    pure-Python rewards like 'math' share one core because of the GIL."""
    retries: int = 2
    """kind='http': retries after a connection failure (refused, reset), with exponential back-off."""
    on_error: OnError = "drop_group"
    """What a failed sample (exception, timeout, NaN or infinite reward) does: 'raise' stops the run with a
    RewardError naming the sample, 'zero' gives it error_value, 'drop_group' leaves its whole group out of
    training (unbiased; see megatron_gvpo/rewards/scoring.py). Failures are counted in every case."""
    error_value: float = 0.0
    """The reward a failed sample gets with on_error='zero' (and the placeholder in `rewards` otherwise)."""
    by_source: dict[str, str] = field(default_factory=dict)
    """Reward per data source (a row's prompts.data_source_key): source -> a kind ('math', 'addition', 'http')
    or a function path 'package.module:attr'. Sources not listed get `kind`."""

    def validate(self) -> None:
        if self.kind not in ("math", "function", "http", "addition"):
            raise ValueError(f"reward.kind must be one of math, function, http, addition, got {self.kind!r}")
        for source, value in self.by_source.items():
            if value not in ("math", "http", "addition") and not _split_function_path(value)[0]:
                raise ValueError(f"reward.by_source.{source} must be 'math', 'http', 'addition' or a function "
                                 f"'package.module:attr', got {value!r}")
        if "http" in self.by_source.values() and not self.url.startswith(("http://", "https://")):
            raise ValueError("reward.by_source uses 'http': it needs reward.url starting with http:// or https://")
        if self.kind == "function" and not _split_function_path(self.function)[0]:
            raise ValueError(
                f"reward.kind='function' needs reward.function as 'package.module:function', got {self.function!r}"
            )
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward.kind='http' needs reward.url starting with http:// or https://, got {self.url!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.workers < 1:
            raise ValueError(f"reward.workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ValueError(f"reward.retries must be >= 0, got {self.retries}")
        if self.on_error not in ("raise", "zero", "drop_group"):
            raise ValueError(f"reward.on_error must be one of raise, zero, drop_group, got {self.on_error!r}")
        if not math.isfinite(self.error_value):
            raise ValueError(f"reward.error_value must be a finite number, got {self.error_value}")

    def for_source(self, source: str) -> RewardConfig:
        """The configuration that scores samples of this data source (`by_source`, else this one)."""
        value = self.by_source.get(source)
        if value is None:
            return self
        if value in ("math", "http", "addition"):
            return dataclasses.replace(self, kind=value, by_source={})
        return dataclasses.replace(self, kind="function", function=value, by_source={})

    def needs_label(self, source: str) -> bool:
        """Whether samples of this source cannot be scored without a label (the math check compares with one)."""
        return self.for_source(source).kind == "math"


@dataclass
class RewardFailure:
    index: int
    """Position of the sample in the batch."""
    group_id: int
    """The group (prompt) the sample belongs to, as passed to `score`."""
    kind: FailureKind
    """'exception' (it raised, returned a non-number, or the HTTP request failed), 'timeout' or 'non_finite'."""
    message: str
    """What went wrong, e.g. "ZeroDivisionError: division by zero"."""


@dataclass
class RewardResult:
    rewards: list[float]
    """One per sample; a failed sample holds RewardConfig.error_value."""
    keep: list[bool]
    """False for the samples to leave out of training (every sample of a dropped group)."""
    errors: list[RewardFailure] = field(default_factory=list)
    """Every failed sample, in batch order, whatever the on_error policy."""
    dropped_groups: list[int] = field(default_factory=list)
    """Group ids left out (on_error='drop_group'), ascending."""

    def metrics(self) -> dict[str, int]:
        """Counts for the metrics record: samples, failures by kind, failed samples kept with error_value,
        dropped groups and samples."""
        kinds = Counter(f.kind for f in self.errors)
        return {
            "reward_samples": len(self.rewards),
            "reward_failed": len(self.errors),
            "reward_exceptions": kinds["exception"],
            "reward_timeouts": kinds["timeout"],
            "reward_non_finite": kinds["non_finite"],
            "reward_zeroed": sum(self.keep[f.index] for f in self.errors),
            "reward_dropped_groups": len(self.dropped_groups),
            "reward_dropped_samples": self.keep.count(False),
        }


def _split_function_path(path: str) -> tuple[str, str]:
    module, sep, attr = path.partition(":")
    module, attr = module.strip(), attr.strip()
    return (module, attr) if sep and module and attr else ("", "")


def load_reward_function(path: str) -> Callable[..., Any]:
    """Resolve "package.module:attr" (attr may be dotted, "module:Class.method") to a callable.

    Raises ValueError saying what to fix: a malformed path, a module that cannot be found (or fails to
    import), a missing attribute, or one that is not callable.
    """
    module_name, attr_path = _split_function_path(path)
    if not module_name:
        raise ValueError(f"reward function {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"reward function {path!r}: no module named {e.name!r} (is its directory on PYTHONPATH, or the "
                "package installed?)"
            ) from e
        raise ValueError(f"reward function {path!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(f"reward function {path!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ValueError(
                f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}; it has {public}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        # ValueError, like every other configuration error here, so callers catch one exception type.
        raise ValueError(f"reward function {path!r} is a {type(obj).__name__}, not callable")  # noqa: TRY004
    return obj


def _sample_function(cfg: RewardConfig) -> Callable[[str, str, Any], Any]:
    """The per-sample reward of cfg.kind as fn(prompt, response, label)."""
    if cfg.kind == "function":
        return load_reward_function(cfg.function)
    if cfg.kind == "math":
        from megatron_gvpo.rewards.math import math_reward

        return lambda prompt, response, label: math_reward(response, label)
    if cfg.kind == "addition":
        from megatron_gvpo.data.addition import reward

        return lambda prompt, response, label: reward(prompt, response)
    raise ValueError(f"reward.kind={cfg.kind!r} has no per-sample function")


# An outcome is ("ok", value), ("exception", exc) or ("timeout", None).
Outcome = tuple[str, Any]


def run_with_deadlines(calls: Sequence[Callable[[], Any]], timeout_s: float, workers: int) -> list[Outcome]:
    """Run calls on `workers` daemon threads; each gets timeout_s from the moment it starts.

    Returns one outcome per call, in order, as soon as every call has returned or timed out. A timed-out call
    is abandoned (its thread finishes on its own; its result is discarded) and a new thread replaces it.
    """
    outcomes: list[Outcome | None] = [None] * len(calls)
    running: dict[int, float] = {}  # index -> monotonic start time
    abandoned: set[int] = set()
    queue = iter(range(len(calls)))
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                i = next(queue, None)
                if i is None:
                    return
                running[i] = time.monotonic()
            try:
                outcome: Outcome = ("ok", calls[i]())
            # BaseException: a reward calling sys.exit() must fail its sample, not silently end this thread.
            except BaseException as e:  # noqa: BLE001
                outcome = ("exception", e)
            with cond:
                if i in abandoned:
                    return  # a replacement thread already took this one's place
                del running[i]
                outcomes[i] = outcome
                cond.notify()

    def start_worker() -> None:
        threading.Thread(target=worker, name="reward-worker", daemon=True).start()

    for _ in range(min(workers, len(calls))):
        start_worker()
    with cond:
        while any(o is None for o in outcomes):
            now = time.monotonic()
            for i, start in list(running.items()):
                if now - start >= timeout_s:
                    del running[i]
                    abandoned.add(i)
                    outcomes[i] = ("timeout", None)
                    start_worker()
            if any(o is None for o in outcomes):
                next_deadline = min(running.values(), default=now) + timeout_s
                cond.wait(timeout=max(next_deadline - now, 0.001))
    return outcomes  # type: ignore[return-value]


def _http_outcomes(prompts: list[str], responses: list[str], labels: list, cfg: RewardConfig) -> list[Outcome]:
    try:
        rewards = request_rewards(cfg.url, prompts, responses, labels, timeout_s=cfg.timeout_s, retries=cfg.retries)
    except RewardTimeout:
        return [("timeout", None)] * len(responses)
    except RewardError as e:
        return [("exception", e)] * len(responses)
    return [("ok", r) for r in rewards]


def _failure(outcome: Outcome, cfg: RewardConfig) -> tuple[float, FailureKind | None, str]:
    """(reward, failure kind or None, message) of one outcome."""
    status, value = outcome
    if status == "timeout":
        where = "the request" if cfg.kind == "http" else "the call (left running in a background thread)"
        return cfg.error_value, "timeout", f"no reward within timeout_s={cfg.timeout_s:g}: {where}"
    if status == "exception":
        return cfg.error_value, "exception", f"{type(value).__name__}: {value}"
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return cfg.error_value, "exception", f"the reward must be a number, got {value!r}"
    if not math.isfinite(reward):
        return cfg.error_value, "non_finite", f"the reward is {reward}"
    return reward, None, ""


def _outcomes(prompts: list[str], responses: list[str], labels: list, cfg: RewardConfig) -> list[Outcome]:
    if cfg.kind == "http":
        return _http_outcomes(prompts, responses, labels, cfg)
    fn = _sample_function(cfg)
    calls = [partial(fn, p, r, lab) for p, r, lab in zip(prompts, responses, labels, strict=True)]
    return run_with_deadlines(calls, cfg.timeout_s, cfg.workers)


def score(
    prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any], group_ids: Sequence[int],
    cfg: RewardConfig, sources: Sequence[str] | None = None,
) -> RewardResult:
    """Rewards of a batch (one entry per response; prompts and labels repeated per response), with failures
    handled by cfg.on_error (see the module docstring). group_ids says which group each sample belongs to;
    sources, each sample's data source, choose its reward through cfg.by_source (None: cfg.kind for all)."""
    n = len(responses)
    sources = [""] * n if sources is None else list(sources)
    if not len(prompts) == len(labels) == len(group_ids) == len(sources) == n:
        raise ValueError(
            f"score needs one prompt, label, group id and source per response: got {len(prompts)} prompts, "
            f"{n} responses, {len(labels)} labels, {len(group_ids)} group ids, {len(sources)} sources"
        )
    cfg.validate()
    prompts, responses, labels, group_ids = list(prompts), list(responses), list(labels), list(group_ids)
    if n == 0:
        return RewardResult(rewards=[], keep=[])
    # Samples are scored per reward (one HTTP request, one thread pool each), then put back in batch order.
    by_reward: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_reward.setdefault(cfg.by_source.get(source, ""), []).append(i)
    outcomes: list[Outcome] = [("timeout", None)] * n
    for indices in by_reward.values():
        part_cfg = cfg.for_source(sources[indices[0]])
        part = _outcomes([prompts[i] for i in indices], [responses[i] for i in indices],
                         [labels[i] for i in indices], part_cfg)
        for i, outcome in zip(indices, part, strict=True):
            outcomes[i] = outcome

    rewards, errors = [], []
    for i, outcome in enumerate(outcomes):
        reward, kind, message = _failure(outcome, cfg)
        rewards.append(reward)
        if kind is not None:
            errors.append(RewardFailure(index=i, group_id=group_ids[i], kind=kind, message=message))
    if errors and cfg.on_error == "raise":
        first = errors[0]
        status, value = outcomes[first.index]
        cause = value if status == "exception" else None
        raise RewardError(
            f"{cfg.for_source(sources[first.index]).kind} reward failed for sample {first.index} "
            f"(group {first.group_id}): {first.kind}: "
            f"{first.message} ({len(errors)} of {n} samples failed; reward.on_error='raise')"
        ) from cause
    dropped = sorted({f.group_id for f in errors}) if cfg.on_error == "drop_group" else []
    dropped_set = set(dropped)
    keep = [g not in dropped_set for g in group_ids]
    return RewardResult(rewards=rewards, keep=keep, errors=errors, dropped_groups=dropped)
