"""Verifiers: numeric answers (arithmetic, GSM8K) and HumanEval-style code checks."""

from __future__ import annotations

from decimal import Decimal

import pytest

from stillhouse.distill.verify import (
    Check,
    check_code,
    check_numeric,
    extract_answer,
    gsm8k_reference,
    parse_number,
    verify,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 30 = 42", "42"),
        ("12 + 30 = 42. The answer is 42.", "42"),  # after '=' wins
        ("The answer is 42.", "42"),
        ("Sum: 1,234", "1,234"),
        ("It costs $5.50 in total", "$5.50"),
        ("x is -7", "-7"),
        ("12 - 5 is 7", "7"),  # the minus between operands is not a sign
        ("first 3 then 9", "9"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_parse_number_tolerates_format() -> None:
    assert parse_number("$1,234.50") == Decimal("1234.50")
    assert parse_number("42.") == Decimal(42)
    assert parse_number("50%") == Decimal(50)
    assert parse_number("forty") is None


def test_check_numeric_accepts_right_and_rejects_wrong() -> None:
    assert check_numeric("12 + 30 = 42", 42) == Check(True, "correct")
    ok, reason = check_numeric("12 + 30 = 41", 42)
    assert not ok and reason.startswith("wrong") and "41" in reason and "42" in reason
    assert check_numeric("42.0", "42").ok  # decimals compare by value
    assert not check_numeric("the sum is 4.2", 42).ok
    assert check_numeric("", 42).reason.startswith("empty")
    assert check_numeric("I do not know", 42).reason.startswith("no_number")
    # a model that echoes and then keeps counting: the number after '=' decides
    assert not check_numeric("12 + 30 = 41, so 42", 42).ok


def test_gsm8k_reference_and_check() -> None:
    field = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"
    assert gsm8k_reference(field) == "1,072"
    assert check_numeric("So she sold $1,072.", field).ok
    assert not check_numeric("So she sold 1,071 clips.", field).ok
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no final line")


def test_bad_reference_is_an_error_not_a_verdict() -> None:
    with pytest.raises(ValueError, match="not a number"):
        check_numeric("42", "forty-two")


PROBLEM = {
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_check_code_passes_and_fails() -> None:
    assert check_code("    return a + b\n", PROBLEM) == Check(True, "passed")
    ok, reason = check_code("    return a - b\n", PROBLEM)
    assert not ok and "AssertionError" in reason
    ok, reason = check_code("    return a +\n", PROBLEM)
    assert not ok and "SyntaxError" in reason


def test_verify_dispatch() -> None:
    assert verify("arithmetic2", "3 + 4 = 7", 7).ok
    assert verify("gsm8k", "#### 7", "#### 7").ok
    assert verify("humaneval", "    return a + b\n", PROBLEM).ok
    with pytest.raises(ValueError, match="no verifier"):
        verify("poetry", "x", "y")
    with pytest.raises(ValueError, match="problem dict"):
        verify("humaneval", "x", 3)


def test_check_code_accepts_a_chat_answer_with_a_code_block() -> None:
    answer = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert check_code(answer, PROBLEM).ok
    wrong = "```python\ndef add(a, b):\n    return 0\n```"
    assert not check_code(wrong, PROBLEM).ok


def test_word_problems_take_the_final_answer_not_the_last_equation() -> None:
    solution = "She buys 3 packs: 3 * 4 = 12 pens. Then 12 + 8 = 20. So the answer is 20 pens, minus 2 lost: 18."
    assert extract_answer(solution, "final") == "20"      # "answer is" wins over the last number
    marked = "3 * 4 = 12 pens, 12 + 8 = 20 pens\n#### 20"
    assert extract_answer(marked, "final") == extract_answer(marked, "equals") == "20"   # #### wins
    assert extract_answer("First 3 * 4 = 12, then add 8 to get 20", "final") == "20"
    # seen from the bundled teacher on GSM8K: the answer line is itself an equation
    assert extract_answer("So 20 * 2 = 40.\n\nSo, the answer is 60 + 40 = 100.", "final") == "100"
    assert extract_answer("The final answer is 20,000.", "final") == "20,000"
    assert extract_answer("First 3 * 4 = 12, then add 8 to get 20", "equals") == "12"
    assert verify("gsm8k", "3 * 4 = 12, then add 8 to get 20", "20").ok
    assert not verify("arithmetic", "3 * 4 = 12, then add 8 to get 20", "20").ok
