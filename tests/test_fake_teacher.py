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


def test_chat_all_answers_in_order_bounded_and_closes_the_teacher_even_on_failure():
    import asyncio

    from stillhouse.teacher.base import ChatResult, TeacherConnectionError, chat_all

    class Counting(FakeTeacher):
        """The fake teacher, recording how many chats run at once and whether it was resolved and closed."""

        def __init__(self, fail_on: str = "") -> None:
            super().__init__(error_rate=0.0)
            self.running = self.peak = 0
            self.resolved = self.closed = False
            self.fail_on = fail_on

        async def resolve(self) -> str:
            self.resolved = True
            return await super().resolve()

        async def chat(self, messages, params) -> ChatResult:  # type: ignore[no-untyped-def]
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.01)
            self.running -= 1
            if messages[0]["content"] == self.fail_on:
                raise TeacherConnectionError("gone")
            return await super().chat(messages, params)

        async def aclose(self) -> None:
            self.closed = True

    asks = [([{"role": "user", "content": f"What is {i} + {i}?"}], SamplingParams(max_tokens=8)) for i in range(7)]
    t = Counting()
    results = asyncio.run(chat_all(t, asks, concurrency=3))
    assert [r.completions[0].text for r in results] == [
        asyncio.run(FakeTeacher(error_rate=0.0).chat(m, p)).completions[0].text for m, p in asks]
    assert t.peak == 3 and t.resolved and t.closed
    bad = Counting(fail_on="What is 4 + 4?")
    with pytest.raises(TeacherConnectionError):
        asyncio.run(chat_all(bad, asks, concurrency=2))
    assert bad.closed
