"""Benign population: thousands of accounts that look like real customers, hard negatives included.

Archetypes (shares are ``PopulationConfig`` fields):

- ``casual`` — heavy-tailed (Pareto) number of sessions, multi-turn sessions with
  follow-ups, daily rhythm in the user's time zone, GSM8K questions and HumanEval
  stubs pasted as real people do; a tenth ask for "step by step" explanations.
- ``power``  — ten times the volume of a casual user at ``casual_scale=2``, longer sessions, many keep one long persona
  system prompt, some ask for the maximum ``max_tokens``.
- ``batch``  — legitimate services: one fixed system prompt with a labelled JSON
  output format, single-turn, machine-regular, around the clock, short outputs.
- ``bench``  — benchmark runners: bursts of hundreds of distinct GSM8K questions in one
  fixed "Let's think step by step" template, some with ``n=5`` for pass@k.

Infrastructure: most users have their own home IP; ``corporate_share`` sit behind
their company's NAT (one IP per org) and pay with the org's card (shared payment
fingerprint); ``proxy_share`` come through a commercial proxy/VPN whose subnets
campaigns can also use (``proxy_subnets``). Calibration and evaluation use different
seeds, so thresholds are never set on the accounts that are scored.

Run: this module is a library; ``stillhouse arena`` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stillhouse.arena.prompts import code_request, prompt_pool
from stillhouse.arena.traffic import SDK_HEADERS, USER_AGENTS, SimAccount, Turn, fingerprint
from stillhouse.guard.events import AccountInfo

START_TS = 1_767_225_600.0  # 2026-01-01 00:00 UTC
PROXY_SUBNETS = tuple(f"198.51.{i}" for i in range(100, 112))
POWER_SCALE = 20.0
"""Pareto scale of a power user's weekly sessions (ten times the original casual default of 2)."""

FOLLOWUPS = (
    "Can you explain that part again more simply?", "Why did you multiply there?",
    "What if the numbers were doubled?", "Thanks! Could you check the answer another way?",
    "I got a different number, can you see where I went wrong?", "Can you write that as Python code?",
    "ok and what's the final answer in one line", "Can you make it shorter?",
    "Does this work for negative numbers too?", "great, now add a docstring and a test",
    "hmm that doesn't look right to me", "Can you give me a similar practice problem?",
)
OPENERS = ("", "", "", "", "Hi! ", "Can you help me with this? ", "quick question: ", "My homework: ",
           "Please solve: ", "I'm stuck on this one. ")
STEP_ASK = ("Explain step by step.", "Can you show your work?", "Please walk me through it step by step.")
SHORT_SYSTEM = ("You are a helpful assistant.", "You are a friendly math tutor for a 7th grader.",
                "Answer concisely.", "You are a senior Python developer. Keep answers short.")
PERSONAS = (
    "You are Professor Ada, a patient mathematics tutor at a community college. Your students are adults "
    "returning to education after many years away, and many of them are anxious about math. Always start by "
    "restating the problem in plain words, then identify what is being asked, then solve it with short, "
    "numbered steps. Use everyday examples (shopping, cooking, travel) when a concept is abstract. Never make "
    "the student feel slow. At the end, offer one similar practice problem and ask if they want a hint. Keep "
    "the tone warm and encouraging, and avoid jargon unless you define it first.",
    "You are CodeBuddy, the internal coding assistant of Northwind Traders' data team. The team writes Python "
    "3.11 with type hints, uses pytest for tests and black for formatting. When asked for code, give one "
    "complete, runnable function with a docstring, then a short pytest test. Point out edge cases (empty "
    "input, None, very large numbers). Prefer the standard library over new dependencies. If a request is "
    "ambiguous, state your assumption in one sentence before the code. Never include secrets, tokens or "
    "customer data in examples; use obviously fake values instead.",
    "You are a study companion for a high-school student preparing for a state mathematics competition. "
    "Treat every question as practice: first ask yourself which topic it belongs to (ratios, percentages, "
    "rates, combinatorics, geometry), mention it, and then solve it clearly. Show the arithmetic so it can be "
    "checked by hand. If the student's own attempt is included, find the first mistake and explain it "
    "kindly. Finish with a one-line summary of the key idea the problem tests, which the student can copy "
    "into their notebook of competition tricks.",
)
BATCH_SYSTEMS = (
    "You label customer-submitted word problems for our tutoring marketplace. Read the problem and respond "
    "with JSON only, with fields: topic (one of arithmetic, fractions, percent, rates, money, time, geometry), "
    "difficulty (1-5) and grade_level (integer). No prose.",
    "Extract the quantities mentioned in the text. Output format:\nQuantities: <comma-separated list>\n"
    "Units: <comma-separated list>\nQuestion: <what is asked, in under 12 words>",
    "Summarize the user's problem in one sentence for a support ticket title. Respond in JSON with fields "
    "title and category.",
)
BENCH_TEMPLATES = (
    "Question: {q}\nLet's think step by step.\nAnswer:",
    "Q: {q}\nA: Let's think step by step.",
    "Solve the following math problem. Put the final answer after '####'.\n\n{q}",
)


class Span(Protocol):
    """What the per-user generators read of a population's config (``PopulationConfig`` and
    :class:`~stillhouse.arena.realpop.RealPopulationConfig` both have it)."""

    @property
    def days(self) -> float: ...
    @property
    def start_ts(self) -> float: ...
    @property
    def max_tokens_limit(self) -> int: ...


@dataclass(frozen=True)
class PopulationConfig:
    accounts: int = 2000
    """Benign accounts."""
    casual_scale: float = 2.0
    """Pareto scale of a casual user's sessions per week (tail index 1.3): the median user has
    about 1 + 0.7 x this many sessions, the mean about 1 + 3.3 x this; lower it for a population
    of mostly light users (cheap accounts that still count toward the per-account FPR)."""
    days: float = 7.0
    """Simulated span."""
    power_share: float = 0.06
    """Share of power users."""
    batch_share: float = 0.015
    """Share of legitimate batch/service accounts."""
    bench_share: float = 0.015
    """Share of benchmark runners."""
    corporate_share: float = 0.12
    """Share of (casual and power) users behind a company NAT with the company's card."""
    proxy_share: float = 0.05
    """Share of users who come through the commercial proxy subnets ``PROXY_SUBNETS``."""
    max_tokens_limit: int = 4096
    """The served maximum (power users sometimes ask for it)."""
    seed: int = 0
    """Different seeds give disjoint account ids and independent draws."""
    start_ts: float = START_TS

    def __post_init__(self) -> None:
        if self.accounts < 1:
            raise ValueError(f"PopulationConfig.accounts={self.accounts}: must be >= 1")
        if self.days <= 0:
            raise ValueError(f"PopulationConfig.days={self.days}: must be > 0")
        if self.casual_scale <= 0:
            raise ValueError(f"PopulationConfig.casual_scale={self.casual_scale}: must be > 0 (e.g. 1.0)")
        shares = (self.power_share, self.batch_share, self.bench_share, self.corporate_share, self.proxy_share)
        if any(not 0 <= s <= 1 for s in shares) or self.power_share + self.batch_share + self.bench_share > 1:
            raise ValueError("PopulationConfig shares must be in [0, 1] and power+batch+bench <= 1")


def _home_ip(rng: np.random.Generator) -> str:
    a = int(rng.choice([24, 31, 46, 67, 73, 81, 98, 109, 151, 176, 185, 188, 212]))
    return f"{a}.{rng.integers(0, 256)}.{rng.integers(0, 256)}.{rng.integers(1, 255)}"


def _diurnal_ts(rng: np.random.Generator, cfg: Span, tz: float, spread: float = 1.0) -> float:
    day = rng.integers(0, max(int(np.ceil(cfg.days)), 1))
    hour = rng.normal(10.5, 2.0 * spread) if rng.random() < 0.5 else rng.normal(20.0, 2.2 * spread)
    ts = cfg.start_ts + day * 86400 + ((hour - tz) % 24) * 3600 + rng.uniform(0, 60)
    return float(min(ts, cfg.start_ts + cfg.days * 86400 - 1))


def generate_population(cfg: PopulationConfig) -> tuple[list[SimAccount], list[Turn]]:
    """Benign accounts and their planned turns (unsorted)."""
    rng = np.random.default_rng(cfg.seed + 7919)
    pool = prompt_pool("benign")
    accounts: list[SimAccount] = []
    turns: list[Turn] = []
    n_orgs = max(1, int(cfg.accounts * cfg.corporate_share / 12))
    orgs = [(f"org{cfg.seed}-{i}", _home_ip(rng), fingerprint(f"org-card-{cfg.seed}-{i}")) for i in range(n_orgs)]
    kinds = rng.choice(["casual", "power", "batch", "bench"], size=cfg.accounts,
                       p=[1 - cfg.power_share - cfg.batch_share - cfg.bench_share, cfg.power_share,
                          cfg.batch_share, cfg.bench_share])
    for i, kind in enumerate(kinds):
        aid = f"b{cfg.seed}-{i:05d}"
        ua_i = int(rng.integers(0, len(USER_AGENTS)))
        ua = USER_AGENTS[ua_i]
        headers = SDK_HEADERS[ua_i % len(SDK_HEADERS)]
        org, ip, pay = "", _home_ip(rng), fingerprint(f"card-{aid}")
        r = rng.random()
        if kind in ("casual", "power") and r < cfg.corporate_share:
            org, ip, pay = orgs[int(rng.integers(0, n_orgs))]
        elif kind in ("casual", "power") and r < cfg.corporate_share + cfg.proxy_share:
            ip = f"{PROXY_SUBNETS[int(rng.integers(0, len(PROXY_SUBNETS)))]}.{rng.integers(1, 255)}"
        info = AccountInfo(account_id=aid, org=org, signup_path="web", country="", payment_fingerprint=pay,
                           created_at=cfg.start_ts - float(rng.uniform(0, 400)) * 86400)
        common = {"account_id": aid, "client_ip": ip, "user_agent": ua, "header_names": headers}
        tz = float(rng.choice([-8, -5, 0, 1, 2, 5.5, 8, 9]))
        if kind == "casual":
            mine = _casual(rng, cfg, pool, common, tz, scale=cfg.casual_scale)
        elif kind == "power":
            mine = _casual(rng, cfg, pool, common, tz, scale=POWER_SCALE, power=True)
        elif kind == "batch":
            mine = _batch(rng, cfg, pool, common)
        else:
            mine = _bench(rng, cfg, pool, common)
        accounts.append(SimAccount(info=info, kind=f"benign:{kind}", planned=len(mine)))
        turns.extend(mine)
    return accounts, turns


def _question(rng: np.random.Generator, pool, math_pref: float) -> str:  # type: ignore[no-untyped-def]
    if rng.random() < math_pref:
        return pool.math[int(rng.integers(0, len(pool.math)))]
    return code_request(pool.code[int(rng.integers(0, len(pool.code)))])


def _casual(rng: np.random.Generator, cfg: Span, pool, common: dict, tz: float,  # type: ignore[no-untyped-def]
            scale: float, power: bool = False) -> list[Turn]:
    aid = common["account_id"]
    sessions = int(min(1 + rng.pareto(1.3) * scale * cfg.days / 7.0, 400 * cfg.days / 7.0))
    math_pref = float(rng.beta(2, 1.2))
    steppy = rng.random() < (0.3 if power else 0.1)
    system = ""
    r = rng.random()
    if power and r < 0.4:
        system = PERSONAS[int(rng.integers(0, len(PERSONAS)))]
    elif r < 0.25:
        system = SHORT_SYSTEM[int(rng.integers(0, len(SHORT_SYSTEM)))]
    max_tok = None
    if power and rng.random() < 0.2:
        max_tok = cfg.max_tokens_limit
    elif rng.random() < 0.4:
        max_tok = int(rng.choice([256, 512, 1024, 2048]))
    temp = rng.choice([None, 0.7, 1.0, 0.2])  # type: ignore[arg-type]  # (a list of objects; kept so seeds reproduce)
    out: list[Turn] = []
    for s in range(sessions):
        sid = f"{aid}-s{s}"
        ts = _diurnal_ts(rng, cfg, tz, spread=1.6 if power else 1.0)
        n_turns = int(min(rng.geometric(0.3 if power else 0.5), 12))
        for t in range(n_turns):
            if t == 0 or rng.random() < 0.3:
                text = OPENERS[int(rng.integers(0, len(OPENERS)))] + _question(rng, pool, math_pref)
                if steppy and rng.random() < 0.5:
                    text += " " + STEP_ASK[int(rng.integers(0, len(STEP_ASK)))]
            else:
                text = FOLLOWUPS[int(rng.integers(0, len(FOLLOWUPS)))]
            params: dict = {}
            if max_tok:
                params["max_tokens"] = max_tok
            if temp is not None:
                params["temperature"] = float(temp)
            out.append(Turn(ts=ts, session_id=sid, user_text=text, system=system, params=params,
                            followup=t > 0, **common))
            ts += float(np.exp(rng.normal(4.0, 0.9)))
    return out


def _batch(rng: np.random.Generator, cfg: Span, pool, common: dict) -> list[Turn]:  # type: ignore[no-untyped-def]
    aid = common["account_id"]
    system = BATCH_SYSTEMS[int(rng.integers(0, len(BATCH_SYSTEMS)))]
    interval = float(rng.uniform(600, 3600))
    ts = cfg.start_ts + float(rng.uniform(0, interval))
    end = cfg.start_ts + cfg.days * 86400
    out: list[Turn] = []
    i = 0
    while ts < end:
        q = pool.math[int(rng.integers(0, len(pool.math)))]
        out.append(Turn(ts=ts, session_id=f"{aid}-j{i}", user_text=q, system=system,
                        params={"max_tokens": int(rng.choice([64, 128])), "temperature": 0.0}, **common))
        ts += interval * float(rng.uniform(0.9, 1.1))
        i += 1
    return out


def _bench(rng: np.random.Generator, cfg: Span, pool, common: dict) -> list[Turn]:  # type: ignore[no-untyped-def]
    aid = common["account_id"]
    out: list[Turn] = []
    for run in range(int(rng.integers(1, 3))):
        template = BENCH_TEMPLATES[int(rng.integers(0, len(BENCH_TEMPLATES)))]
        size = int(rng.integers(100, 400))
        start = int(rng.integers(0, len(pool.math) - size))
        ts = cfg.start_ts + float(rng.uniform(0, cfg.days * 86400 * 0.9))
        params: dict = {"max_tokens": 512, "temperature": 0.0}
        if rng.random() < 0.3:
            params = {"max_tokens": 512, "temperature": 0.8, "n": 5}
        for k in range(size):
            out.append(Turn(ts=ts, session_id=f"{aid}-r{run}-{k}", user_text=template.format(q=pool.math[start + k]),
                            params=dict(params), **common))
            ts += float(rng.exponential(2.0))
    return out
