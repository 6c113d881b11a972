"""A deterministic fake teacher for tests and dry runs.

Answers depend only on (seed, messages, sampling params, completion index), so reruns
reproduce byte for byte. Arithmetic questions ("What is 12 + 30?") get the right sum
most of the time and a near miss otherwise, which gives verifiers something to reject.
Tokens are whitespace-separated words; logprobs are derived from a hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict

from stillhouse.teacher.base import (
    ChatResult,
    Completion,
    Message,
    Prompt,
    SamplingParams,
    ScoreResult,
    TokenLogprobs,
)

_SUM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")


def _digest(*parts: object) -> int:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


class FakeTeacher:
    """Deterministic teacher; ``error_rate`` of answers to arithmetic are off by one."""

    def __init__(self, seed: int = 0, error_rate: float = 0.3, name: str = "fake-teacher"):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate={error_rate}: must be between 0 and 1")
        self.seed = seed
        self.error_rate = error_rate
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def revision(self) -> str:
        return f"fake-{self.seed}"

    def answer(self, messages: list[Message], params: SamplingParams, index: int) -> str:
        """The text this teacher gives for one completion."""
        last = str(messages[-1].get("content", "")) if messages else ""
        h = _digest(self.seed, messages, asdict(params), index if params.temperature > 0 else 0)
        m = _SUM.search(last)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            value = a + b if op == "+" else a - b if op == "-" else a * b
            if (h % 1000) / 1000 < self.error_rate:
                value += 1 if h % 2 else -1
            return f"{a} {op} {b} = {value}"
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
        count = 3 + h % 8
        return " ".join(words[(h >> (3 * i)) % len(words)] for i in range(count))

    async def chat(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages) + 3 * len(messages)
        completions = []
        for i in range(params.n):
            words = self.answer(messages, params, i).split()
            finish = "stop"
            if len(words) > params.max_tokens:
                words, finish = words[: params.max_tokens], "length"
            lp = None
            if params.logprobs:
                h = _digest(self.seed, words, i)
                logprobs = [-((h >> j) % 50) / 100 for j in range(len(words))]
                k = params.top_logprobs
                lp = TokenLogprobs(
                    tokens=[w + " " for w in words],
                    logprobs=logprobs,
                    top_tokens=[[w + " "] + [f"alt{r} " for r in range(1, k)] for w in words] if k else [],
                    top_logprobs=[[x] + [x - r for r in range(1, k)] for x in logprobs] if k else [],
                )
            completions.append(
                Completion(
                    text=" ".join(words),
                    finish_reason=finish,  # type: ignore[arg-type]
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(words),
                    logprobs=lp,
                )
            )
        return ChatResult(completions=completions, model=self.name)

    async def resolve(self) -> str:
        return self.name

    async def chat_json(self, messages_json: str, params: SamplingParams) -> ChatResult:
        return await self.chat(json.loads(messages_json), params)

    async def score(self, prompt: Prompt, completion: list[int] | str, top_logprobs: int = 0) -> ScoreResult:
        """Deterministic logprobs from a hash of (seed, prompt, completion so far); tokens are the
        completion's words (text) or ids (``tok<ID>``)."""
        if not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs={top_logprobs}: must be between 0 and 20")
        tokens = completion.split() if isinstance(completion, str) else [f"tok{t}" for t in completion]
        if not tokens:
            raise ValueError("completion is empty: give at least one token to score")
        ids = None if isinstance(completion, str) else list(completion)
        lps = [-((_digest(self.seed, prompt, tokens[:j + 1]) % 400) / 100) - 0.01 for j in range(len(tokens))]
        lp = TokenLogprobs(tokens=tokens, logprobs=lps, token_ids=ids)
        if top_logprobs:  # the scored token first, then made-up alternatives, each less likely
            lp.top_tokens = [[t] + [f"alt{r}" for r in range(1, top_logprobs)] for t in tokens]
            lp.top_logprobs = [[x - 0.5 * r for r in range(top_logprobs)] for x in lps]
            if ids is not None:
                lp.top_ids = [[t] + [(t + r) % 50_000 for r in range(1, top_logprobs)] for t in ids]
        n_prompt = len(prompt) if prompt and isinstance(prompt[0], int) else \
            sum(len(str(m.get("content", "")).split()) for m in prompt) + 3 * len(prompt)  # type: ignore[union-attr]
        return ScoreResult(lp, n_prompt, self.name)

    async def aclose(self) -> None:
        return None
