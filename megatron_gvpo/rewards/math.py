"""Rule-based math rewards: find the final answer in a response and check it against the gold label.

    math_reward("... so she has 1,000 apples.\\n#### 1,000", "#### 1000")   # 1.0
    math_reward("The answer is $\\\\boxed{\\\\frac{1}{2}}$.", "0.5")          # 1.0

Answers are marked the GSM8K way (a final line `#### 42`) or the MATH way (`\\boxed{...}`, braces may nest).
Equivalence is decided by the `math-verify` library (SymPy underneath): "1,000" equals "1000", "0.5" equals
"1/2" and "\\frac{1}{2}", "x+1" equals "1+x".

math-verify guards each parse and comparison with a SIGALRM timeout, which only works in the main thread; the
trainer scores in worker threads, so it is disabled here (`parsing_timeout=None`, `timeout_seconds=None`) and
megatron_gvpo/rewards/scoring.py enforces the time limit instead. math-verify warns that "Timeout is disabled
..., you must provide the logic for timeout interruption yourself"; scoring.py does, so a logging filter here
drops that warning (math-verify means to print it once per process, but its flag races between the scoring
threads: measured 6 warnings for a batch of 20 samples).
"""

from __future__ import annotations

import logging
import re

_GSM8K_MARK = "####"
_BOXED = re.compile(r"\\boxed\s*\{")
# A plain number, possibly signed, with thousands separators, decimals or a fraction bar: -1,234.5 or 3/4.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _boxed_contents(text: str) -> tuple[int, str] | None:
    """(start, contents) of the last complete \\boxed{...} in text, braces matched; None when there is none.

    An unclosed box (a response cut off mid-answer) is skipped in favour of the complete one before it.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    return match.start(), text[start:pos].strip()
    return None


def _gsm8k_answer(text: str) -> tuple[int, str] | None:
    """(start, answer) after the last `####` up to the end of its line; commas, `$` and a final period removed."""
    start = text.rfind(_GSM8K_MARK)
    if start < 0:
        return None
    line = text[start + len(_GSM8K_MARK) :].split("\n", 1)[0]
    answer = line.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    return (start, answer) if answer else None


def _marked_answer(text: str) -> str | None:
    """The answer behind the last marker (`####` line or \\boxed{}), whichever comes later in text."""
    found = [a for a in (_gsm8k_answer(text), _boxed_contents(text)) if a is not None]
    return max(found)[1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer in text: after the last `####` (GSM8K) or inside the last \\boxed{} (whichever comes
    later), else the last plain number in the text (commas removed), else None.

    `####` answers drop commas and `$` ("#### $1,000" -> "1000"); boxed contents are returned as written
    (nested braces kept: "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}").
    """
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


class _TimeoutDisabledFilter(logging.Filter):
    """Drops math-verify's 'Timeout is disabled' warning: scoring.py enforces the time limit (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):  # the two modules that warn
    logging.getLogger(_name).addFilter(_TimeoutDisabledFilter())


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def math_reward(response: str, label: str) -> float:
    """1.0 if the response's final answer is mathematically equal to the label's, else 0.0.

    The response's answer is its last `####` line or \\boxed{}; without either, math-verify looks for the last
    LaTeX or plain expression in the whole response. The label may be a GSM8K solution ("... #### 72"), a
    boxed answer, or the plain answer ("72", "\\frac{1}{2}"); a number is accepted too. Raises ValueError when
    the label is empty or holds nothing math-verify can read (a data error, not a wrong response).
    No time limit here: see the module docstring.
    """
    from math_verify import verify

    gold_text = str(label).strip() if label is not None else ""
    if not gold_text:
        raise ValueError(f"math reward needs a non-empty label, got {label!r}")
    gold_answer = _marked_answer(gold_text) or gold_text
    # Wrapping the bare answer in \boxed{} makes math-verify read it as LaTeX, the form that parses the most.
    gold = _parse(f"\\boxed{{{gold_answer}}}")
    if not gold:
        raise ValueError(f"math-verify cannot parse the label {label!r}")
    answer = _marked_answer(response)
    predicted = _parse(f"\\boxed{{{answer}}}" if answer is not None else response)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0
