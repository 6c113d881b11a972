"""Simulated distillation campaigns (the attacker's side; kept apart from the detector's code).

These exist only to test the guard: they run against our own gateway on loopback
and have no features for evading real providers. Shapes (``SHAPES``):

- ``cot``        reasoning traces: strong chain-of-thought / "internal reasoning" wording,
                 ``max_tokens`` at the maximum, labelled output, 24/7 Poisson arrivals;
- ``rubric``     grader / rubric / reward-model prompts over question + candidate answer;
- ``agentic``    coding with a long tool-use persona, multi-step tool loops (multi-turn);
- ``hydra``      hundreds of small accounts on shared proxy subnets and client fingerprints,
                 a handful of payment cards, synchronized waves, paraphrased templates;
- ``slow``       slow-and-low: a dozen requests a day in waking hours, paraphrased wording,
                 some follow-ups, moderate ``max_tokens``;
- ``paraphrase`` every request re-worded from a combinatorial pool, no system prompt;
- ``mixed``      the ``cot`` shape diluted with benign-looking cover traffic, so that only
                 ``attacker_fraction`` of the account's requests are distillation;
- ``harvest``    the distill pipeline's own harvest as a scripted client sends it: generated
                 additions in the one fixed template ``stillhouse.distill.tasks`` uses (train
                 split), greedy, ``max_tokens`` 32, no system prompt, no logprobs (an SFT
                 harvest needs only text), Poisson arrivals around the clock. The capability
                 stage (:mod:`.capability`) runs it against the real teacher and trains on it.

Topics (``CampaignConfig.topics``, :mod:`.campaign_text`): math and code (the default), general chat
(real ShareGPT openers from a campaign-only pool; a rubric campaign grades their real replies), or both.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from stillhouse.arena.campaign_text import CHAT_COT_TEMPLATES, CHAT_FOLLOWUPS, TOPICS, Asker
from stillhouse.arena.population import FOLLOWUPS, PROXY_SUBNETS, START_TS
from stillhouse.arena.prompts import code_request, prompt_pool
from stillhouse.arena.traffic import SDK_HEADERS, USER_AGENTS, SimAccount, Turn, fingerprint
from stillhouse.guard.events import AccountInfo

SHAPES = ("cot", "rubric", "agentic", "hydra", "slow", "paraphrase", "mixed", "harvest")
HARVEST_MAX_TOKENS = 32

COT_TEMPLATES = (
    "Solve the following problem. Think step by step and write out your complete internal reasoning before "
    "answering; do not skip any steps.\n\nProblem: {q}\n\nFormat:\nReasoning: <your full reasoning>\n"
    "Final answer: <number>",
    "You must show your full chain of thought.\n\n{q}\n\nRespond in the following format:\nThought: ...\n"
    "Answer: ...",
)
COT_SYSTEM = ("You are a meticulous reasoning engine. For every task you produce an exhaustive, explicit "
              "reasoning trace that a student model can learn from. Never summarize; never skip steps. Expose "
              "every intermediate calculation, every assumption, and every check you perform, in order. After "
              "the reasoning, restate the final answer on its own line. Your output will be used as training "
              "data, so completeness matters more than brevity. Use plain text, no markdown tables.")
RUBRIC_TEMPLATE = (
    "You are an expert grader. Using the rubric below, evaluate the response to the question.\n\nRubric:\n"
    "- correctness (0-5)\n- reasoning quality (0-3)\n- clarity (0-2)\n\nQuestion: {q}\n\nResponse: {a}\n\n"
    "Score the response on a scale of 0 to 10 and explain.\nFormat:\nScore: <0-10>\nJustification: <text>\n"
    "Verdict: <pass/fail>"
)
AGENT_SYSTEM = (
    "You are DevAgent, an autonomous software engineering agent. You have these tools:\n"
    "- run_python(code: str) -> stdout/stderr of the code in a sandbox\n- read_file(path: str) -> contents\n"
    "- write_file(path: str, content: str) -> ok\n- run_tests(path: str) -> pytest summary\n"
    "- search_docs(query: str) -> top documentation snippets\n\nWork in a loop. At each step respond in exactly "
    "this format:\nThought: <what you are thinking, in full detail>\nAction: <tool name>\nAction Input: <JSON "
    "arguments>\nWhen the task is complete respond with:\nThought: <final reasoning>\nFinal Answer: <the "
    "complete code>\nAlways think through edge cases explicitly before writing code, and verify with tests "
    "before giving the final answer. Never ask the user for clarification; make reasonable assumptions and "
    "state them in your thoughts."
)
PARA_OPEN = ("Here's a problem for you.", "Take a look at this question.", "I need help with the following.",
             "Consider this.", "Work on this task:", "Problem below.", "Try this one:", "Please solve:")
PARA_ASK = ("Walk through your thinking in detail before the answer.",
            "Reason it out thoroughly, showing each intermediate step.",
            "Lay out every step of your reasoning, then give the result.",
            "Think out loud as you solve it and explain each move.",
            "Give a detailed derivation, then the final number.",
            "Before answering, explain how you get there, step by step.",
            "Show all of the working that leads to the answer.",
            "Describe your full reasoning process, then answer.")
PARA_FORMAT = ("", "End with the final answer on its own line.", "Finish with 'Answer: <value>'.",
               "Put the result last.", "")


@dataclass(frozen=True)
class CampaignConfig:
    shape: str
    """One of ``SHAPES``."""
    accounts: int = 1
    """Accounts the campaign operates (hydra: hundreds)."""
    requests_per_account: int = 600
    """Planned requests per account (without enforcement)."""
    days: float = 7.0
    """Span the campaign spreads its plan over."""
    attacker_fraction: float = 1.0
    """'mixed': share of the account's requests that are distillation (the rest is cover traffic)."""
    max_tokens_limit: int = 4096
    seed: int = 100
    start_ts: float = START_TS
    name: str = ""
    """Campaign id (default: shape and seed)."""
    topics: str = "math"
    """What it asks (:mod:`.campaign_text`): 'math' (GSM8K; HumanEval for agentic and some paraphrase requests),
    'chat' (real ShareGPT openers of ``chat_pool``), or 'both' (a coin per question). ``harvest`` always asks
    the distill pipeline's additions and ``agentic`` always codes."""
    chat_pool: str = "dev-campaign"
    """ShareGPT pool of the general-chat questions (``dev-campaign`` or ``test-campaign``)."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"CampaignConfig.shape={self.shape!r}: use one of {SHAPES}")
        if self.accounts < 1 or self.requests_per_account < 1:
            raise ValueError("CampaignConfig.accounts and requests_per_account must be >= 1")
        if not 0 < self.attacker_fraction <= 1:
            raise ValueError(f"CampaignConfig.attacker_fraction={self.attacker_fraction}: must be in (0, 1]")
        if self.days <= 0:
            raise ValueError(f"CampaignConfig.days={self.days}: must be > 0")
        if self.topics not in TOPICS:
            raise ValueError(f"CampaignConfig.topics={self.topics!r}: use one of {TOPICS}")
        if self.chat_pool not in ("dev-campaign", "test-campaign"):
            raise ValueError(f"CampaignConfig.chat_pool={self.chat_pool!r}: use 'dev-campaign' or 'test-campaign' "
                             "(the benign populations' pools must never be asked by a campaign)")

    @property
    def campaign_id(self) -> str:
        return self.name or f"{self.shape}-{self.seed}"


def _system(base: str, cfg: CampaignConfig) -> str:
    """Each campaign operator keeps its own copy of a persona (tagged with its job name)."""
    return f"{base} Job: {cfg.campaign_id}."


def _dc_ip(rng: np.random.Generator, campaign_id: str, k: int) -> str:
    """A data-centre address: one /16 per campaign operator, one /24 per account."""
    return f"10.{zlib.crc32(campaign_id.encode()) % 250}.{k % 250}.{rng.integers(1, 255)}"


MATH_PARA = (PARA_OPEN, PARA_ASK, PARA_FORMAT)


def generate_campaign(cfg: CampaignConfig) -> tuple[list[SimAccount], list[Turn]]:
    """The campaign's accounts and planned turns (unsorted)."""
    rng = np.random.default_rng(cfg.seed)
    ask = Asker(cfg.topics, rng, cfg.chat_pool)
    pool = ask.pool
    cid = cfg.campaign_id
    span = cfg.days * 86400
    accounts: list[SimAccount] = []
    turns: list[Turn] = []

    if cfg.shape == "hydra":
        return _hydra(cfg, rng, ask)
    harvest_items: list[str] = []
    if cfg.shape == "harvest":
        from stillhouse.distill.tasks import arithmetic

        harvest_items = [str(it.messages[-1]["content"])
                         for it in arithmetic(cfg.accounts * cfg.requests_per_account, "train", seed=cfg.seed)]
    for k in range(cfg.accounts):
        aid = f"x-{cid}-{k:04d}"
        ua_i = int(rng.integers(0, 4))
        common: dict[str, Any] = {"account_id": aid, "client_ip": _dc_ip(rng, cid, k),
                  "user_agent": USER_AGENTS[ua_i], "header_names": SDK_HEADERS[ua_i % len(SDK_HEADERS)]}
        info = AccountInfo(account_id=aid, signup_path="api", payment_fingerprint=fingerprint(f"card-{aid}"),
                           created_at=cfg.start_ts - float(rng.uniform(1, 30)) * 86400)
        n = cfg.requests_per_account
        mine: list[Turn] = []
        if cfg.shape in ("cot", "mixed"):
            times = np.sort(cfg.start_ts + rng.uniform(0, span, size=n))
            for i, ts in enumerate(times):
                if cfg.shape == "mixed" and rng.random() > cfg.attacker_fraction:
                    mine.append(_cover(rng, aid, i, float(ts), common, ask))
                    continue
                params = {"max_tokens": cfg.max_tokens_limit, "temperature": 0.7}
                if rng.random() < 0.3:
                    params["n"] = 4
                q, chat = ask.question()
                text = (CHAT_COT_TEMPLATES if chat else COT_TEMPLATES)[i % 2].format(q=q)
                mine.append(Turn(ts=float(ts), session_id=f"{aid}-{i}", system=_system(COT_SYSTEM, cfg) if k % 2 else "",
                                 user_text=text, params=params, **common))
        elif cfg.shape == "rubric":
            times = np.sort(cfg.start_ts + rng.uniform(0, span, size=n))
            for i, ts in enumerate(times):
                if ask.chat_turn():
                    q, a = ask.opener()
                    a = a[:1500]
                else:
                    q = ask.math()
                    a = f"The answer is {int(rng.integers(1, 500))}."
                mine.append(Turn(ts=float(ts), session_id=f"{aid}-{i}", user_text=RUBRIC_TEMPLATE.format(q=q, a=a),
                                 params={"max_tokens": 1024, "temperature": 0.0, "logprobs": True,
                                         "top_logprobs": 5}, **common))
        elif cfg.shape == "agentic":
            i = 0
            ts = cfg.start_ts + float(rng.uniform(0, 600))
            while len(mine) < n:
                task = code_request(pool.code[int(rng.integers(0, len(pool.code)))])
                sid = f"{aid}-t{i}"
                for step in range(int(rng.integers(3, 7))):
                    text = task if step == 0 else (
                        f"Observation: {'tests passed' if rng.random() < 0.3 else 'AssertionError in test_case_'}"
                        f"{int(rng.integers(1, 9))}\nContinue.")
                    mine.append(Turn(ts=ts, session_id=sid, system=_system(AGENT_SYSTEM, cfg), user_text=text, followup=step > 0,
                                     params={"max_tokens": cfg.max_tokens_limit, "temperature": 0.2}, **common))
                    ts += float(rng.uniform(2, 12))
                ts += float(rng.exponential(span / max(n / 4.5, 1)))
                i += 1
            mine = mine[:n]
        elif cfg.shape == "slow":
            tz = float(rng.choice([-5, 1, 8]))
            per_day = max(1, int(n / cfg.days))
            for day in range(int(np.ceil(cfg.days))):
                for j in range(per_day):
                    hour = float(rng.uniform(9, 22))
                    ts = cfg.start_ts + day * 86400 + ((hour - tz) % 24) * 3600
                    sid = f"{aid}-d{day}-{j}"
                    q, chat = ask.question()
                    mine.append(Turn(ts=ts, session_id=sid, user_text=ask.paraphrase(q, chat, MATH_PARA),
                                     params={"max_tokens": 2048}, **common))
                    if rng.random() < 0.3:
                        follow = CHAT_FOLLOWUPS if chat else FOLLOWUPS
                        mine.append(Turn(ts=ts + float(rng.uniform(30, 200)), session_id=sid, followup=True,
                                         user_text=follow[int(rng.integers(0, len(follow)))], **common))
            mine = [t for t in mine if t.ts < cfg.start_ts + span][:n]
        elif cfg.shape == "harvest":
            times = np.sort(cfg.start_ts + rng.uniform(0, span, size=n))
            for i, ts in enumerate(times):
                mine.append(Turn(ts=float(ts), session_id=f"{aid}-{i}", user_text=harvest_items[k * n + i],
                                 params={"max_tokens": HARVEST_MAX_TOKENS, "temperature": 0.0}, **common))
        elif cfg.shape == "paraphrase":
            times = np.sort(cfg.start_ts + rng.uniform(0, span, size=n))
            for i, ts in enumerate(times):
                chat = ask.chat_turn()
                if chat:
                    q = ask.opener()[0]
                else:
                    q = ask.math() if rng.random() < 0.7 else code_request(pool.code[int(rng.integers(0, len(pool.code)))])
                mine.append(Turn(ts=float(ts), session_id=f"{aid}-{i}", user_text=ask.paraphrase(q, chat, MATH_PARA),
                                 params={"max_tokens": int(rng.choice([2048, 3000, cfg.max_tokens_limit]))}, **common))
        accounts.append(SimAccount(info=info, kind=f"campaign:{cfg.shape}", campaign=cid, planned=len(mine)))
        turns.extend(mine)
    return accounts, turns


def _cover(rng: np.random.Generator, aid: str, i: int, ts: float, common: dict, ask: Asker) -> Turn:  # type: ignore[type-arg]
    """A benign-looking question: a GSM8K train question, or (topics 'chat'/'both') a real opener of the campaign pool."""
    if ask.topics != "math" and ask.chat_turn():
        q = ask.opener()[0]
    else:
        pool = prompt_pool("benign")
        q = pool.math[int(rng.integers(0, len(pool.math)))]
    return Turn(ts=ts, session_id=f"{aid}-c{i}", user_text=q, params={"temperature": 0.7}, cover=True, **common)


def _hydra(cfg: CampaignConfig, rng: np.random.Generator, ask: Asker) -> tuple[list[SimAccount], list[Turn]]:
    cid = cfg.campaign_id
    span = cfg.days * 86400
    cards = [fingerprint(f"hydra-card-{cid}-{i}") for i in range(max(2, cfg.accounts // 25))]
    subnets = list(PROXY_SUBNETS[:6])
    accounts = []
    for k in range(cfg.accounts):
        aid = f"x-{cid}-{k:04d}"
        info = AccountInfo(account_id=aid, signup_path="api", payment_fingerprint=cards[k % len(cards)],
                           created_at=cfg.start_ts - float(rng.uniform(1, 10)) * 86400)
        accounts.append(SimAccount(info=info, kind="campaign:hydra", campaign=cid, planned=0))
    total = cfg.accounts * cfg.requests_per_account
    wave_size = max(5, cfg.accounts // 10)
    waves = int(np.ceil(total / wave_size))
    wave_times = cfg.start_ts + np.sort(rng.uniform(0, span, size=waves))
    turns: list[Turn] = []
    remaining = {a.info.account_id: cfg.requests_per_account for a in accounts}
    ids = [a.info.account_id for a in accounts]
    for w, wt in enumerate(wave_times):
        live = [a for a in ids if remaining[a] > 0]
        if not live:
            break
        chosen = rng.choice(len(live), size=min(wave_size, len(live)), replace=False)
        for j in chosen:
            aid = live[int(j)]
            k = int(aid.rsplit("-", 1)[1])
            remaining[aid] -= 1
            ua_i = (k // 3) % 2
            q, chat = ask.question()
            turns.append(Turn(ts=float(wt + rng.uniform(0, 3)), account_id=aid, session_id=f"{aid}-w{w}",
                              user_text=ask.paraphrase(q, chat, MATH_PARA), system=_system(COT_SYSTEM, cfg) if rng.random() < 0.5 else "",
                              params={"max_tokens": cfg.max_tokens_limit, "temperature": 0.7},
                              client_ip=f"{subnets[k % 5]}.{rng.integers(1, 255)}",
                              user_agent=USER_AGENTS[ua_i], header_names=SDK_HEADERS[ua_i]))
    for a in accounts:
        a.planned = cfg.requests_per_account - remaining[a.info.account_id]
    return accounts, turns
