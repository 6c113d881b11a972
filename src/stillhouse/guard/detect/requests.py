"""Per-request signals: what one request says about its sender, in a few microseconds.

Each signal is a number in [0, 1] computed from one :class:`TrafficRecord` alone:

- ``cot``        wording that elicits chain of thought or "internal reasoning" ("show your full
                 reasoning", "do not skip any step", "chain of thought", ...);
- ``step_by_step`` the everyday ask ("step by step", "show your work") that students and
                 benchmark prompts use too — kept apart so it cannot mask the strong markers;
- ``grader``     grader, rubric, judge or reward-model prompts;
- ``persona``    a long system prompt (a fixed persona is caught again by the template signals);
- ``max_tokens`` ``max_tokens`` at (>= 95% of) the served maximum;
- ``multi``      ``n > 1``, ``logprobs`` or ``top_logprobs`` requested;
- ``labelled``   the prompt asks for a labelled output template (two or more ``Label:`` fields,
                 or "respond in the following format"/JSON with named fields);
- ``first_turn`` the request opens a conversation (no earlier assistant turn in it).

``user_cot`` and ``user_grader`` are ``cot`` and ``grader`` in the user turn alone: the detector counts
those hits as evidence (``EVIDENCE_SIGNALS``). A system prompt is one choice repeated on every request
of an account (a tutor persona "for a 7th grader" would otherwise be a hit on every request), so only
the user turn, which changes from request to request, gives hits that can be counted.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple

from stillhouse.guard.detect.config import DetectConfig
from stillhouse.guard.events import TrafficRecord

REQUEST_SIGNALS = ("cot", "step_by_step", "grader", "persona", "max_tokens", "multi", "labelled", "first_turn")
QUERY_SIGNALS = ("cot", "step_by_step", "grader", "labelled")
"""The wording signals the detector counts on queries only (requests that open a conversation): what a
follow-up says ("explain every step", "continue") belongs to a conversation already under way."""
EVIDENCE_SIGNALS = ("cot", "grader")
"""Signals whose user-turn hits the detector can count."""
EVIDENCE_KEYS = tuple(f"user_{name}" for name in EVIDENCE_SIGNALS)
"""The ``request_signals`` keys of those user-turn hits, in ``EVIDENCE_SIGNALS`` order."""

# Literal phrases (lower case), matched with ``in`` on the lower-cased prompt: C-speed substring
# search is ~50x faster than a case-insensitive alternation regex on long system prompts.
COT_STRONG = ("internal reasoning", "chain of thought", "chain-of-thought", "reasoning trace", "reasoning process",
              "reasoning steps", "<think>", "thinking process", "full reasoning", "full derivation",
              "every step", "every intermediate step", "do not skip any step", "don't skip any step",
              "never skip steps", "think out loud", "think aloud", "reason carefully before",
              "reason thoroughly", "verbatim", "exhaustive, explicit reasoning", "explicit reasoning")
COT_WEAK = ("step by step", "step-by-step", "show your work", "show all your work", "show your reasoning",
            "show your steps", "explain your reasoning", "let's think", "lets think")
# Not the bare word "grader": it is in "a 7th grader", "the first graders" of everyday school questions.
GRADER = ("rubric", "expert grader", "a grader", "the grader", "as grader", "grader model", "reward model", "grade the response", "grade this response", "grade the answer",
          "grade each", "score the response", "score this response", "score the answer", "rate the response",
          "rate the answer", "judge the response", "evaluate the response", "evaluate the answer",
          "evaluate the assistant", "which response is better", "which answer is better",
          "which completion is better", "preference label", "preference pair")
_SCALE = re.compile(r"on a scale (?:of|from) \d+")
_LABEL_LINE = re.compile(
    r"^\s*(?:#+\s*)?(reasoning|answer|final answer|score|justification|explanation|thought|action|action input"
    r"|observation|critique|verdict|rationale|solution|steps?|confidence)\s*:", re.MULTILINE)
SCALE_PHRASE = "on a scale of <n>"
"""How :func:`user_phrases` names a match of the ``on a scale of/from N`` pattern."""
EVIDENCE_PHRASES: dict[str, tuple[str, ...]] = {"cot": COT_STRONG, "grader": (*GRADER, SCALE_PHRASE)}
"""The phrases whose user-turn hits each evidence signal counts (see :func:`user_phrases`)."""
FORMAT_ASK = ("the following format", "this format", "exactly this format", "output format", "respond with json",
              "respond in json", "respond with a json", "json only", "output a json", "json object with")


MATERIAL_NOUNS = frozenset((
    "question", "response", "answer", "reply", "assistant", "user", "human", "ai", "model", "chatbot", "bot",
    "completion", "output", "input", "text", "passage", "document", "context", "conversation", "dialogue", "chat",
    "transcript", "article", "essay", "email", "message", "review", "story", "excerpt", "snippet", "source",
    "reference", "candidate", "submission", "code", "generation", "summary"))
"""Words that name pasted material in a header line ("[Response]", "Response A:", "### Answer:", "[The Start of
Assistant's Answer]"): what follows such a header is someone else's text that the user quotes."""
_QUOTED_BLOCK = re.compile(r"```.*?(?:```|\Z)|\"\"\".*?(?:\"\"\"|\Z)|^[ \t]*>.*?$", re.DOTALL | re.MULTILINE)
_HEADER = re.compile(r"^[ \t]*(?:(?:\[|<\|)[ \t]*([a-z0-9' ]{1,60}?)[ \t]*(?:\]|\|>)"
                     r"|(?:#{1,6}[ \t]*|\*\*)?([a-z0-9']+(?: [a-z0-9']+){0,3})[ \t]*(?:\*\*)?[ \t]*:)", re.MULTILINE)
"""A header line: a bracketed title ("[Response]", "[The Start of Assistant's Answer]", "<|Answer|>") or a label of
at most four words before a colon ("Response A:", "### Answer:", "**Reply:**"); an instruction sentence that
ends in a colon ("Grade the answer below with this rubric:") is longer."""


def own_words(low: str) -> str:
    """The part of a lower-cased user turn written by the user, without the material it quotes.

    An LLM-as-judge prompt pastes a reply to grade, and replies say "chain of thought" or "every step" far more
    often than people asking for help do: counted as the user's ask, one judge run of a few hundred pasted
    replies earned 13-26 nats of count evidence on the test seed sets (docs/results.md, #16). Left out:
    fenced code and triple-quoted blocks, "> " quote lines, and everything from a header line that names
    material (``MATERIAL_NOUNS``: "[Response]", "Answer:", "Response A: ...") to the end of the turn; when the
    turn opens with such a header (a pasted text first, the ask after it), only up to the first blank line.
    What a campaign writes around its question stays; a campaign that puts its ask after a "Question:" header
    hides it from this count (the other signals still see it).
    """
    text = _QUOTED_BLOCK.sub(" ", low) if ("```" in low or '"""' in low or ">" in low) else low
    if ":" not in text and "]" not in text and "|>" not in text:
        return text
    for m in _HEADER.finditer(text):
        if MATERIAL_NOUNS.isdisjoint((m.group(1) or m.group(2)).split()):
            continue
        if text[:m.start()].strip():
            return text[:m.start()]
        gap = text.find("\n\n", m.end())
        return own_words(text[gap:]) if gap >= 0 else ""
    return text


def user_phrases(low: str) -> tuple[str, ...]:
    """Every phrase of ``EVIDENCE_PHRASES`` a lower-cased user turn contains (the scale pattern as
    ``SCALE_PHRASE``), in list order. Only called on a turn with a hit, so a plain scan is cheap enough.
    The caller passes :func:`own_words` of the turn to leave quoted material out."""
    found = [p for p in COT_STRONG if p in low] + [p for p in GRADER if p in low]
    if "scale" in low and _SCALE.search(low) is not None:
        found.append(SCALE_PHRASE)
    return tuple(found)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The content of the last user message (the query), as text."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def system_text(messages: list[dict[str, Any]]) -> str:
    """The concatenated system prompt(s)."""
    return "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def request_signals(record: TrafficRecord, cfg: DetectConfig, user: str | None = None,
                    system: str | None = None) -> dict[str, float]:
    """The per-request signals of one record (see the module docstring).

    ``user`` and ``system``: the record's :func:`last_user_text` and :func:`system_text`, when the
    caller already has them. The wording signals are those of the system prompt and the user turn
    joined by a newline. No phrase can match across that newline, so phrases are searched per part and
    or-ed, and the system part (a few prompts repeated on every request of an account) is cached; the
    output-label pattern can span the newline (a system prompt ending in "Answer", a user turn
    starting with ":"), so it runs on the joined text, and only when no format ask was found and
    some part has a colon.
    """
    messages = record.messages or []
    user = last_user_text(messages) if user is None else user
    system = system_text(messages) if system is None else system
    u = _text_facts(user.lower())
    s = _system_facts(system) if system else _NO_TEXT
    cot = 1.0 if s.cot or u.cot else 0.0
    step = 1.0 if not cot and (s.weak or u.weak) else 0.0
    grader = 1.0 if s.grader or u.grader else 0.0
    labelled = 1.0 if s.fmt or u.fmt else 0.0
    if not labelled and (s.colon or u.colon):
        labelled = 1.0 if len(set(_LABEL_LINE.findall(s.low + "\n" + u.low))) >= 2 else 0.0
    params = record.params or {}
    max_tokens = _as_int(params.get("max_tokens", params.get("max_completion_tokens")))
    at_max = 1.0 if max_tokens is not None and max_tokens >= 0.95 * cfg.max_tokens_limit else 0.0
    n = _as_int(params.get("n")) or 1
    top = _as_int(params.get("top_logprobs")) or 0
    multi = 1.0 if n > 1 or bool(params.get("logprobs")) or top > 0 else 0.0
    persona = 1.0 if len(system) >= cfg.long_system_chars else 0.0
    first = 0.0 if any(m.get("role") == "assistant" for m in messages) else 1.0
    return {"cot": cot, "step_by_step": step, "grader": grader, "persona": persona, "max_tokens": at_max, "multi": multi,
            "labelled": labelled, "first_turn": first,
            "user_cot": 1.0 if u.cot else 0.0, "user_grader": 1.0 if u.grader else 0.0}


class _Facts(NamedTuple):
    """The wording facts of one lower-cased text (one part of a prompt)."""

    low: str
    cot: bool
    weak: bool
    grader: bool
    fmt: bool
    colon: bool


# Every phrase contains one of these anchors (or is searched on every text, see ``_index``): a text
# without an anchor cannot contain the phrases filed under it, so those ~60 searches shrink to
# ~18 anchor searches plus the phrases of the anchors present. Same answers, a third of the work.
_ANCHORS = ("reason", "think", "step", "chain", "deriv", "verbatim", "show", "rubric", "grade", "reward",
            "score", "rate the", "judge", "evaluat", "better", "preferen", "format", "json")


def _index(phrases: tuple[str, ...]) -> tuple[tuple[tuple[int, tuple[str, ...]], ...], tuple[str, ...]]:
    """((anchor position in ``_ANCHORS``, its phrases), ...), phrases without an anchor)."""
    groups: dict[int, list[str]] = {}
    rest: list[str] = []
    for phrase in phrases:
        anchor = next((i for i, a in enumerate(_ANCHORS) if a in phrase), None)
        if anchor is None:
            rest.append(phrase)
        else:
            groups.setdefault(anchor, []).append(phrase)
    return tuple((i, tuple(g)) for i, g in groups.items()), tuple(rest)


_COT_STRONG, _COT_WEAK, _GRADER, _FORMAT_ASK = (_index(p) for p in (COT_STRONG, COT_WEAK, GRADER, FORMAT_ASK))


def _any_indexed(index: tuple[tuple[tuple[int, tuple[str, ...]], ...], tuple[str, ...]], text: str,
                 present: list[bool]) -> bool:
    """``_any(phrases, text)`` for an :func:`_index` of the phrases, given which anchors are in text."""
    groups, rest = index
    for anchor, phrases in groups:
        if present[anchor] and _any(phrases, text):
            return True
    return _any(rest, text) if rest else False


def _text_facts(low: str) -> _Facts:
    present = list(map(low.__contains__, _ANCHORS))
    grader_scale = "scale" in low and _SCALE.search(low) is not None
    if True not in present:  # most prompts: no anchor, so no phrase (unless one has no anchor)
        return _Facts(low=low, cot=_any(_COT_STRONG[1], low), weak=_any(_COT_WEAK[1], low),
                      grader=_any(_GRADER[1], low) or grader_scale, fmt=_any(_FORMAT_ASK[1], low),
                      colon=":" in low)
    return _Facts(low=low, cot=_any_indexed(_COT_STRONG, low, present), weak=_any_indexed(_COT_WEAK, low, present),
                  grader=_any_indexed(_GRADER, low, present) or grader_scale,
                  fmt=_any_indexed(_FORMAT_ASK, low, present), colon=":" in low)


@lru_cache(maxsize=4096)
def _system_facts(system: str) -> _Facts:
    return _text_facts(system.lower())


_NO_TEXT = _Facts(low="", cot=False, weak=False, grader=False, fmt=False, colon=False)


def _any(phrases: tuple[str, ...], text: str) -> bool:
    return any(map(text.__contains__, phrases))


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
