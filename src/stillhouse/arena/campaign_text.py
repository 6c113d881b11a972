"""What campaigns ask: math and code (GSM8K, HumanEval), general chat (real ShareGPT requests), or both.

:class:`Asker` draws a campaign's next question with the campaign's own ``rng``. With
``topics='math'`` it makes exactly the draws the campaigns always made (a seed gives the
same traffic as before general-chat topics existed). With ``'chat'`` the question is a
human turn of a real ShareGPT conversation of the campaign pool (an opener, or a later
turn long enough to stand alone)
(``dev-campaign`` or ``test-campaign``: disjoint from every benign population's pool, so
no campaign prompt is ever calibrated on as benign), dealt without replacement, and a
rubric campaign grades the real reply it got. ``'both'`` tosses a coin per question.

The chat templates say what the math ones say, without "problem" and "final number".

Run: this module is a library; :mod:`.campaigns` uses it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from stillhouse.arena.prompts import prompt_pool

Topics = Literal["math", "chat", "both"]
TOPICS = ("math", "chat", "both")

CHAT_COT_TEMPLATES = (
    ("Answer the request below. Think step by step and write out your complete internal reasoning before "
    "answering; do not skip any steps.\n\nRequest: {q}\n\nFormat:\nReasoning: <your full reasoning>\n"
    "Answer: <your answer>"),
    ("You must show your full chain of thought.\n\n{q}\n\nRespond in the following format:\nThought: ...\n"
    "Answer: ..."),
)
CHAT_PARA_OPEN = ("Here's a request for you.", "Take a look at this.", "I need help with the following.",
                  "Consider this.", "Work on this task:", "Request below.", "Try this one:", "Please answer:")
CHAT_PARA_ASK = ("Walk through your thinking in detail before the answer.",
                 "Reason it out thoroughly, showing each intermediate step.",
                 "Lay out every step of your reasoning, then give your answer.",
                 "Think out loud as you work on it and explain each choice.",
                 "Explain how you arrive at each point before you write the answer.",
                 "Before answering, explain how you get there, step by step.",
                 "Show all of the reasoning that leads to your answer.",
                 "Describe your full reasoning process, then answer.")
CHAT_PARA_FORMAT = ("", "End with your answer on its own line.", "Finish with 'Answer: <your answer>'.",
                    "Put the answer last.", "")
CHAT_FOLLOWUPS = ("Can you explain that part again more simply?", "Why is that?", "Can you give an example?",
                  "Can you make it shorter?", "What would change if the situation were reversed?",
                  "Are there any exceptions?", "Can you check that again another way?",
                  "ok and what's the answer in one line")
MIN_CHARS, MAX_CHARS = (20, 80), 2000
"""Human turns shorter (an opener, a later turn) or longer than this are left out: a greeting or a
context-bound follow-up ("make it shorter"); a pasted document."""


@lru_cache(maxsize=4)
def chat_openers(pool: str) -> tuple[tuple[str, str], ...]:
    """(human turn, the real reply) of the English conversations of a ShareGPT pool: every opener, and every
    later turn long enough to stand on its own (see ``MIN_CHARS``)."""
    from stillhouse.arena.archetypes import guess_language
    from stillhouse.arena.sharegpt import pool as sharegpt_pool

    out = []
    for conv in sharegpt_pool(pool):
        if guess_language(" ".join(u for u, _ in conv.turns)) not in ("en", ""):
            continue
        for t, (q, a) in enumerate(conv.turns):
            if MIN_CHARS[t > 0] <= len(q.strip()) <= MAX_CHARS and a.strip():
                out.append((q.strip(), a))
    if not out:
        raise ValueError(f"ShareGPT pool {pool!r} has no usable opener")
    return tuple(out)


class Asker:
    """A campaign's source of questions (see the module docstring)."""

    def __init__(self, topics: str, rng: np.random.Generator, chat_pool: str = "dev-campaign"):
        if topics not in TOPICS:
            raise ValueError(f"topics={topics!r}: use one of {TOPICS}")
        self.topics = topics
        self.rng = rng
        self.pool = prompt_pool("campaign")
        self.chat = chat_openers(chat_pool) if topics != "math" else ()
        self._order: list[int] = []

    def chat_turn(self) -> bool:
        """Whether the next question is general chat (draws from ``rng`` only when topics='both')."""
        return self.topics == "chat" or (self.topics == "both" and bool(self.rng.random() < 0.5))

    def math(self) -> str:
        return self.pool.math[int(self.rng.integers(0, len(self.pool.math)))]

    def opener(self) -> tuple[str, str]:
        """The next (question, real reply), dealt without replacement (reshuffled when all were dealt)."""
        if not self._order:
            self._order = self.rng.permutation(len(self.chat)).tolist()
        return self.chat[self._order.pop()]

    def question(self) -> tuple[str, bool]:
        """(question, is general chat)."""
        if self.chat_turn():
            return self.opener()[0], True
        return self.math(), False

    def paraphrase(self, q: str, chat: bool, math_parts: tuple[tuple[str, ...], ...]) -> str:
        """``q`` between a re-worded opening, reasoning ask and format line (the chat or the math wording)."""
        rng = self.rng
        opens, asks, formats = (CHAT_PARA_OPEN, CHAT_PARA_ASK, CHAT_PARA_FORMAT) if chat else math_parts
        o = opens[int(rng.integers(0, len(opens)))]
        a = asks[int(rng.integers(0, len(asks)))]
        f = formats[int(rng.integers(0, len(formats)))]
        parts = [o, q, a, f] if rng.random() < 0.5 else [o, a, q, f]
        return "\n\n".join(p for p in parts if p)
