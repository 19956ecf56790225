"""Contract of megatron_gvpo/rewards: answer extraction and math equivalence (math.py), the reward-model HTTP
client (remote.py), and `score` (scoring.py): every failure (exception, timeout, non-finite reward, bad endpoint
answer) is recorded and handled by on_error, and a hanging reward never holds `score` past its deadline.
The HTTP tests talk to a real ThreadingHTTPServer on 127.0.0.1."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from megatron_gvpo.config import config_from_dict
from megatron_gvpo.rewards import (
    RewardConfig,
    RewardError,
    RewardTimeout,
    extract_answer,
    load_reward_function,
    math_reward,
    request_rewards,
    score,
)

# ---------------------------------------------------------------------------------------------------------
# A user reward function, referenced by import path as "tests.test_rewards:fn"
# ---------------------------------------------------------------------------------------------------------

NOT_CALLABLE = 3


def fn(prompt, response, label):
    """Exact match, with responses that misbehave on request."""
    if response == "raise":
        raise ZeroDivisionError("division by zero in the reward")
    if response == "nan":
        return float("nan")
    if response == "inf":
        return float("inf")
    if response == "sleep":
        time.sleep(3.0)
    if response == "text":
        return "high"
    return 1.0 if response == label else 0.0


def _function_cfg(**kw):
    return RewardConfig(kind="function", function="tests.test_rewards:fn", **kw)


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and math equivalence
# ---------------------------------------------------------------------------------------------------------

GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "text, expected",
    [
        (GSM8K_SOLUTION, "72"),
        ("It costs $1,000 in total.\n#### $1,000", "1000"),
        ("#### 5\nOn second thought:\n#### 6.", "6"),  # the last #### line
        (r"So $x = \boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),  # nested braces kept
        (r"First \boxed{3}, then \boxed{4}.", "4"),  # the last box wins
        (r"\boxed{3} and finally \boxed{\frac{1", "3"),  # an unclosed (cut-off) box is skipped
        ("\\boxed{3}\n#### 4", "4"),  # the later marker wins
        ("#### 4\nso \\boxed{5}", "5"),
        ("3 + 4 = 7, so she has 1,234 apples.", "1234"),  # fallback: the last number
        ("I do not know.", None),
        ("####   \n", None),  # an empty #### line is no answer
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "response, label",
    [
        ("#### 1,000", "1000"),
        ("#### 1000", "1,000"),
        (r"\boxed{0.5}", "1/2"),
        (r"The answer is $\boxed{\frac{1}{2}}$.", "#### 0.5"),
        ("She sold 72 clips.\n#### 72", GSM8K_SOLUTION),
        (r"\boxed{x+1}", "1+x"),
        (r"\boxed{42}", 42),  # a numeric label
        ("So she has 14 apples.", "14"),  # no marker: math-verify reads the response itself
        (r"Therefore the ratio is $\frac{3}{4}$", "0.75"),
        (r"\boxed{71} wait, no: \boxed{72}", "72"),
    ],
)
def test_math_reward_equivalent(response, label):
    assert math_reward(response, label) == 1.0


@pytest.mark.parametrize(
    "response, label",
    [
        ("#### 71", "72"),
        (r"\boxed{1/3}", "0.5"),
        (r"\boxed{72} wait, no: \boxed{71}", "72"),  # only the last box counts
        ("I do not know.", "72"),
        ("", "#### 72"),
    ],
)
def test_math_reward_mismatch(response, label):
    assert math_reward(response, label) == 0.0


@pytest.mark.parametrize("label", ["", "   ", None])
def test_math_reward_needs_a_label(label):
    with pytest.raises(ValueError, match="non-empty label"):
        math_reward("#### 1", label)


def test_math_kind_scores_in_worker_threads():
    # math-verify's default SIGALRM timeouts would raise ValueError off the main thread: all must score.
    responses = [r"\boxed{\frac{1}{2}}", "#### 0.5", "#### 0.6", "#### 1,000"]
    labels = ["0.5", "1/2", "1/2", "#### 1000"]
    result = score(["q"] * 4, responses, labels, [0, 0, 1, 1], RewardConfig(kind="math", workers=2))
    assert result.rewards == [1.0, 1.0, 0.0, 1.0] and result.errors == [] and all(result.keep)


def test_math_verify_timeout_warning_is_not_printed_per_sample(caplog):
    """math-verify warns that its timeout is disabled, meaning to do it once per process, but its flag races
    between scoring threads (6 warnings for 20 samples, measured): math.py's filter drops it, scoring.py being
    what enforces the time limit."""
    import logging

    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = False  # as in a new process
    caplog.set_level(logging.WARNING)
    n = 20
    result = score(["q"] * n, [f"#### {i}" for i in range(n)], [str(i) for i in range(n)], [i // 4 for i in range(n)],
                   RewardConfig(kind="math", workers=4))
    assert result.rewards == [1.0] * n
    assert sum("Timeout is disabled" in r.getMessage() for r in caplog.records) <= 1


def test_addition_kind():
    prompts = ["00000012+00000034=", "00000012+00000034=", "12+3="]
    result = score(
        prompts,
        ["000000046<eos>", "000000047", "15"],
        [None] * 3,
        [0, 0, 1],
        RewardConfig(kind="addition", on_error="zero"),
    )
    assert result.rewards[:2] == [1.0, 0.0]
    # "12+3=" is not an addition prompt (operands of different lengths): a recorded exception, not a crash.
    assert [(f.index, f.kind) for f in result.errors] == [(2, "exception")]
    assert "not an addition prompt" in result.errors[0].message


# ---------------------------------------------------------------------------------------------------------
# Config and loading a user function
# ---------------------------------------------------------------------------------------------------------


def test_config_through_the_loader():
    cfg = config_from_dict(RewardConfig, {"kind": "http", "url": "http://rm:8000/score", "on_error": "zero"})
    assert (cfg.kind, cfg.on_error, cfg.error_value) == ("http", "zero", 0.0)
    with pytest.raises(ValueError, match="on_error must be one of"):
        config_from_dict(RewardConfig, {"on_error": "ignore"})


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"kind": "function"}, r"reward\.function as 'package\.module:function'"),
        ({"kind": "function", "function": "pkg.mod"}, r"reward\.function"),
        ({"kind": "http", "url": "rm:8000"}, r"reward\.url starting with http://"),
        ({"timeout_s": 0.0}, r"reward\.timeout_s must be > 0"),
        ({"workers": 0}, r"reward\.workers must be >= 1"),
        ({"retries": -1}, r"reward\.retries must be >= 0"),
        ({"error_value": float("nan")}, r"reward\.error_value must be a finite"),
        ({"kind": "rouge"}, r"reward\.kind must be one of"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kw).validate()


def test_load_reward_function():
    assert load_reward_function("tests.test_rewards:fn") is fn
    assert load_reward_function("math:isfinite") is math.isfinite


@pytest.mark.parametrize(
    "path, message",
    [
        ("tests.test_rewards", r"must look like 'package\.module:function'"),
        ("no_such_reward_pkg.mod:fn", r"no module named 'no_such_reward_pkg' \(is its directory on PYTHONPATH"),
        ("tests.test_rewards:missing", r"has no attribute 'missing'; it has \[.*'fn'"),
        ("tests.test_rewards:NOT_CALLABLE", r"is a int, not callable"),
    ],
)
def test_load_reward_function_errors(path, message):
    with pytest.raises(ValueError, match=message):
        load_reward_function(path)


# ---------------------------------------------------------------------------------------------------------
# Failures and on_error
# ---------------------------------------------------------------------------------------------------------

PROMPTS = ["p0", "p0", "p1", "p1"]
LABELS = ["a", "a", "b", "b"]
GROUPS = [0, 0, 1, 1]


def test_function_kind_scores():
    result = score(PROMPTS, ["a", "x", "b", "b"], LABELS, GROUPS, _function_cfg())
    assert result.rewards == [1.0, 0.0, 1.0, 1.0] and result.keep == [True] * 4 and result.errors == []
    assert result.metrics()["reward_failed"] == 0


def test_exception_raise():
    with pytest.raises(RewardError, match=r"sample 1 \(group 0\): exception: ZeroDivisionError") as info:
        score(PROMPTS, ["a", "raise", "b", "b"], LABELS, GROUPS, _function_cfg(on_error="raise"))
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_exception_zero():
    result = score(PROMPTS, ["a", "raise", "b", "b"], LABELS, GROUPS, _function_cfg(on_error="zero", error_value=-1.0))
    assert result.rewards == [1.0, -1.0, 1.0, 1.0] and result.keep == [True] * 4
    (failure,) = result.errors
    assert (failure.index, failure.group_id, failure.kind) == (1, 0, "exception")
    assert "ZeroDivisionError: division by zero in the reward" in failure.message
    m = result.metrics()
    assert (m["reward_failed"], m["reward_exceptions"], m["reward_zeroed"], m["reward_dropped_groups"]) == (1, 1, 1, 0)


def test_exception_drop_group():
    result = score(PROMPTS, ["a", "raise", "b", "b"], LABELS, GROUPS, _function_cfg(on_error="drop_group"))
    assert result.keep == [False, False, True, True] and result.dropped_groups == [0]
    assert result.rewards[2:] == [1.0, 1.0]
    m = result.metrics()
    assert (m["reward_dropped_groups"], m["reward_dropped_samples"], m["reward_zeroed"]) == (1, 2, 0)


def test_timeout_does_not_block():
    # One worker: the sleeping call must be abandoned at its deadline and a new thread must score the rest.
    cfg = _function_cfg(timeout_s=0.5, workers=1, on_error="drop_group")
    start = time.monotonic()
    result = score(PROMPTS, ["sleep", "a", "b", "b"], LABELS, GROUPS, cfg)
    elapsed = time.monotonic() - start
    assert elapsed < 0.5 + 1.0, f"score took {elapsed:.2f} s with a 0.5 s timeout"
    assert [(f.index, f.kind) for f in result.errors] == [(0, "timeout")]
    assert "timeout_s=0.5" in result.errors[0].message
    assert result.rewards[1:] == [1.0, 1.0, 1.0] and result.keep == [False, False, True, True]
    assert result.metrics()["reward_timeouts"] == 1


@pytest.mark.parametrize("bad, kind", [("nan", "non_finite"), ("inf", "non_finite"), ("text", "exception")])
def test_non_numeric_rewards_are_failures(bad, kind):
    result = score(PROMPTS, ["a", "a", bad, "b"], LABELS, GROUPS, _function_cfg(on_error="zero"))
    assert result.rewards == [1.0, 1.0, 0.0, 1.0] and all(math.isfinite(r) for r in result.rewards)
    assert [(f.index, f.group_id, f.kind) for f in result.errors] == [(2, 1, kind)]
    with pytest.raises(RewardError, match=rf"sample 2 \(group 1\): {kind}"):
        score(PROMPTS, ["a", "a", bad, "b"], LABELS, GROUPS, _function_cfg(on_error="raise"))


def test_length_mismatch_is_a_caller_error():
    with pytest.raises(ValueError, match="one prompt, label, group id and source per response"):
        score(PROMPTS, ["a"], LABELS, GROUPS, _function_cfg())


# ---------------------------------------------------------------------------------------------------------
# HTTP reward model
# ---------------------------------------------------------------------------------------------------------


class _RewardModel(BaseHTTPRequestHandler):
    """Reward = len(response); the path picks a misbehaviour."""

    requests: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _RewardModel.requests.append((self.path, body))
        rewards = [float(len(r)) for r in body["responses"]]
        if self.path == "/fail":
            return self._answer(500, b"CUDA out of memory while scoring")
        if self.path == "/short":
            rewards = rewards[:-1]
        if self.path == "/nan":
            rewards = [float("nan") if r == "nan" else x for r, x in zip(body["responses"], rewards, strict=True)]
        if self.path == "/words":
            rewards = ["good"] * len(rewards)
        if self.path == "/slow":
            time.sleep(2.0)
        self._answer(200, json.dumps({"rewards": rewards}).encode())  # json writes NaN for float('nan')

    def _answer(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test): nothing to report

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RewardModel)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    # urllib honours http_proxy; the test server must be reached directly wherever the tests run.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_rewards(server):
    _RewardModel.requests.clear()
    result = score(PROMPTS, ["a", "bb", "ccc", ""], LABELS, GROUPS, RewardConfig(kind="http", url=server + "/ok"))
    assert result.rewards == [1.0, 2.0, 3.0, 0.0] and result.errors == [] and all(result.keep)
    ((path, body),) = _RewardModel.requests
    assert path == "/ok" and body == {"prompts": PROMPTS, "responses": ["a", "bb", "ccc", ""], "labels": LABELS}


@pytest.mark.parametrize(
    "path, message",
    [
        ("/short", r"/short returned 3 rewards for 4 responses"),
        ("/fail", r"/fail answered HTTP 500 .*'CUDA out of memory while scoring'"),
        ("/words", r"/words: rewards\[0\] is 'good', not a number"),
    ],
)
def test_http_bad_answers(server, path, message):
    with pytest.raises(RewardError, match=message):
        request_rewards(server + path, PROMPTS, ["a", "b", "c", "d"], LABELS, timeout_s=5.0)
    # Through score, the failed request fails every sample and on_error decides.
    cfg = RewardConfig(kind="http", url=server + path, on_error="drop_group")
    result = score(PROMPTS, ["a", "b", "c", "d"], LABELS, GROUPS, cfg)
    assert result.keep == [False] * 4 and result.dropped_groups == [0, 1]
    assert {f.kind for f in result.errors} == {"exception"} and server + path in result.errors[0].message
    with pytest.raises(RewardError, match=r"sample 0 \(group 0\)"):
        score(
            PROMPTS,
            ["a", "b", "c", "d"],
            LABELS,
            GROUPS,
            RewardConfig(kind="http", url=server + path, on_error="raise"),
        )


def test_http_nan_is_a_sample_failure(server):
    cfg = RewardConfig(kind="http", url=server + "/nan", on_error="drop_group")
    result = score(PROMPTS, ["a", "bb", "nan", "cc"], LABELS, GROUPS, cfg)
    assert [(f.index, f.kind) for f in result.errors] == [(2, "non_finite")]
    assert result.keep == [True, True, False, False] and result.rewards[:2] == [1.0, 2.0]


def test_http_unreachable(server):
    url = f"http://127.0.0.1:{_free_port()}/score"
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"unreachable after 2 attempt\(s\): ConnectionRefusedError"):
        request_rewards(url, ["p"], ["r"], [None], timeout_s=2.0, retries=1, backoff_s=0.1)
    assert time.monotonic() - start >= 0.1  # it did wait before retrying
    result = score(
        PROMPTS,
        ["a", "b", "c", "d"],
        LABELS,
        GROUPS,
        RewardConfig(kind="http", url=url, retries=0, on_error="zero", error_value=-1.0),
    )
    assert result.rewards == [-1.0] * 4 and result.keep == [True] * 4
    assert result.metrics()["reward_zeroed"] == 4 and url in result.errors[0].message


def test_http_timeout(server):
    with pytest.raises(RewardTimeout, match=r"/slow did not answer within timeout_s=0.5"):
        request_rewards(server + "/slow", ["p"], ["r"], [None], timeout_s=0.5)
    result = score(["p"], ["r"], [None], [7], RewardConfig(kind="http", url=server + "/slow", timeout_s=0.5))
    assert [(f.group_id, f.kind) for f in result.errors] == [(7, "timeout")] and result.dropped_groups == [7]
