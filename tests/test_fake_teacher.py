"""The fake teacher is deterministic and answers arithmetic with a known error rate."""

from __future__ import annotations

import re

import pytest

from stillhouse.teacher import SamplingParams, make_teacher
from stillhouse.teacher.fake import FakeTeacher


def ask(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}]


async def test_same_inputs_same_outputs():
    t1, t2 = make_teacher("fake:3"), make_teacher("fake:3")
    p = SamplingParams(temperature=0.8, n=4, logprobs=True, top_logprobs=2)
    r1, r2 = await t1.chat(ask(12, 30), p), await t2.chat(ask(12, 30), p)
    assert [c.text for c in r1.completions] == [c.text for c in r2.completions]
    assert [c.logprobs.logprobs for c in r1.completions] == [c.logprobs.logprobs for c in r2.completions]


async def test_error_rate_is_respected():
    teacher = FakeTeacher(seed=1, error_rate=0.3)
    right = 0
    for a in range(10, 60):
        for b in range(10, 14):
            text = (await teacher.chat(ask(a, b), SamplingParams())).completions[0].text
            right += int(re.search(r"= (-?\d+)$", text).group(1)) == a + b
    assert 0.55 < right / 200 < 0.85


async def test_max_tokens_truncates_with_length():
    r = await FakeTeacher().chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=2))
    c = r.completions[0]
    assert c.finish_reason == "length" and c.completion_tokens == 2


async def test_top_logprobs_are_sorted_and_contain_sampled_token():
    p = SamplingParams(logprobs=True, top_logprobs=3)
    c = (await FakeTeacher().chat(ask(1, 2), p)).completions[0]
    for tok, lp, tops, toplps in zip(c.logprobs.tokens, c.logprobs.logprobs, c.logprobs.top_tokens,
                                     c.logprobs.top_logprobs):
        assert tops[0] == tok and toplps[0] == lp
        assert toplps == sorted(toplps, reverse=True)


def test_bad_error_rate():
    with pytest.raises(ValueError, match="error_rate"):
        FakeTeacher(error_rate=1.5)
