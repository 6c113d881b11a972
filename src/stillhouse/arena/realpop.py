"""A benign population of real people: ShareGPT conversations with their real replies, and hard negatives.

Every account carries one archetype (``SimAccount.kind == 'benign:<archetype>'``); shares are
``RealPopulationConfig.mix`` (exact counts, largest remainder), plus two fixed groups:

- ``casual``     real ShareGPT conversations (a prefix of up to ``max_session_turns`` turns), the full
                 prior conversation sent with each turn, heavy-tailed (Pareto) sessions per week, a daily
                 rhythm in one of the world's time zones, browser and SDK clients;
- ``power``      the same at ``power_scale`` sessions a week, some with a long persona system prompt,
                 some asking for the maximum ``max_tokens``;
- ``chatapp``    users of one popular chat app: its long system prompt, its user agent and header order,
                 their own home addresses;
- ``office``     casual users behind their company's NAT address, paying with its card;
- ``vpn``        casual users whose sessions leave from a commercial VPN's shared exit subnets (the same
                 ``PROXY_SUBNETS`` a hydra campaign uses);
- ``mobile``     casual users behind a carrier's NAT (a few dozen addresses shared by all of them);
- ``continue``   people who type "continue" again and again: real conversations with repeated "continue"
                 turns, or real conversations they extend with a few (filler replies);
- ``template``   one template reused all day over real paragraphs ("Rewrite ... professional tone: ...");
- ``nonenglish`` writers in seven other languages: the pool's real non-English conversations in their
                 language, else generated requests (:mod:`.archetypes`);
- ``student``    GSM8K and HumanEval questions with follow-ups (the synthetic population's casual user);
- ``bench``      benchmark runners: hundreds of GSM8K questions in one "Let's think step by step" template;
- ``judge``      LLM-as-judge runs over real (question, reply) pairs: "rate ... on a scale of 1 to 10",
                 pairwise preference, rubrics; greedy, some with logprobs;
- ``batch``      services: one fixed system prompt with a labelled or JSON output over real openers
                 (or GSM8K), machine-regular, around the clock;
- ``startup``    ``startup_size`` employees of one company: one card, one office address, one SDK version;
                 two of them build an eval and send rubric prompts among their chats;
- ``classroom``  ``classroom_size`` students: one school address in class hours, the week's assignments
                 in their own words ("explain every step", "make it longer"), homework from home.

Conversations come from one ShareGPT pool (``pool``, see :mod:`.sharegpt`): a calibration
population and an evaluation population use disjoint pools, so no conversation is both
calibrated on and scored. Within a population, conversations are dealt without replacement
and reshuffled only when the pool runs out.

Run: this module is a library; ``stillhouse arena --population real`` uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stillhouse.arena import archetypes as ar
from stillhouse.arena.population import (
    PROXY_SUBNETS,
    START_TS,
    _batch,
    _bench,
    _casual,
    _diurnal_ts,
    _home_ip,
)
from stillhouse.arena.traffic import SDK_HEADERS, USER_AGENTS, SimAccount, Turn, fingerprint
from stillhouse.guard.events import AccountInfo

ARCHETYPES = ("casual", "power", "chatapp", "office", "vpn", "mobile", "continue", "template", "nonenglish",
              "student", "bench", "judge", "batch", "startup", "classroom")
DEFAULT_MIX: tuple[tuple[str, float], ...] = (
    ("casual", 0.46), ("power", 0.05), ("chatapp", 0.12), ("office", 0.10), ("vpn", 0.04), ("mobile", 0.04),
    ("continue", 0.03), ("template", 0.03), ("nonenglish", 0.04), ("student", 0.04), ("bench", 0.012),
    ("judge", 0.012), ("batch", 0.016),
)
CGNAT = tuple(f"100.64.{a}.{b}" for a in (17, 18, 19) for b in (3, 9, 21, 40, 77, 102, 130, 166, 201, 240))
"""A mobile carrier's NAT addresses (RFC 6598 space), shared by every ``mobile`` user."""
TIME_ZONES = ((-8.0, 0.22), (-6.0, 0.06), (-5.0, 0.22), (0.0, 0.08), (1.0, 0.14), (2.0, 0.04), (5.5, 0.10),
              (8.0, 0.07), (9.0, 0.04), (10.0, 0.03))
"""(hours from UTC, share of users)."""
_CONTINUE = frozenset(w.lower() for w in ar.CONTINUE_WORDS) | {"continue.", "please continue", "next"}


@dataclass(frozen=True)
class RealPopulationConfig:
    accounts: int = 2100
    """Benign accounts in all, the two fixed groups included."""
    days: float = 7.0
    """Simulated span."""
    pool: str = "dev-eval"
    """ShareGPT pool the conversations come from (``sharegpt.POOLS``)."""
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX
    """(archetype, share) of the accounts outside the fixed groups; normalised, counts by largest remainder."""
    startup_size: int = 30
    """Employees of the startup that shares one card and one office address (0: none)."""
    classroom_size: int = 35
    """Students of the classroom behind one school address (0: none)."""
    casual_scale: float = 0.6
    """Pareto scale (tail index 1.3) of a casual user's sessions per week: median about 1 + 0.7 x this."""
    power_scale: float = 8.0
    """The same for power users."""
    office_size: int = 12
    """Mean accounts per office NAT address."""
    max_session_turns: int = 16
    """A session takes at most this many turns of its conversation."""
    max_user_chars: int = 12_000
    """A session ends before a human turn longer than this (a pasted document no chat model would take)."""
    context_chars: int = 24_000
    """The chat client's context budget: older exchanges are dropped to fit (``Turn.context_chars``)."""
    max_tokens_limit: int = 4096
    """The served maximum (some power users ask for it)."""
    seed: int = 0
    """Different seeds give disjoint account ids and independent draws."""
    start_ts: float = START_TS

    def __post_init__(self) -> None:
        from stillhouse.arena.sharegpt import POOLS

        if self.accounts < self.startup_size + self.classroom_size + 1:
            raise ValueError(f"RealPopulationConfig.accounts={self.accounts}: must exceed startup_size + "
                             f"classroom_size ({self.startup_size + self.classroom_size})")
        if self.days <= 0:
            raise ValueError(f"RealPopulationConfig.days={self.days}: must be > 0")
        if self.pool not in dict(POOLS):
            raise ValueError(f"RealPopulationConfig.pool={self.pool!r}: use one of {[p for p, _ in POOLS]}")
        names = [k for k, _ in self.mix]
        bad = set(names) - set(ARCHETYPES) | ({"startup", "classroom"} & set(names))
        if bad or len(set(names)) != len(names):
            raise ValueError(f"RealPopulationConfig.mix: unknown, repeated or fixed-group archetype(s) {sorted(bad)}; "
                             f"use each of {[a for a in ARCHETYPES if a not in ('startup', 'classroom')]} at most once")
        if any(s < 0 for _, s in self.mix) or sum(s for _, s in self.mix) <= 0:
            raise ValueError("RealPopulationConfig.mix: shares must be >= 0 with a positive sum")
        for name in ("casual_scale", "power_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RealPopulationConfig.{name}={getattr(self, name)}: must be > 0")
        for name in ("startup_size", "classroom_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"RealPopulationConfig.{name}={getattr(self, name)}: must be >= 0")
        for name in ("office_size", "max_session_turns", "max_user_chars", "context_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"RealPopulationConfig.{name}={getattr(self, name)}: must be >= 1")


def archetype_counts(cfg: RealPopulationConfig) -> dict[str, int]:
    """Accounts per archetype: the fixed groups, then ``mix`` over the rest by largest remainder."""
    rest = cfg.accounts - cfg.startup_size - cfg.classroom_size
    total = sum(s for _, s in cfg.mix)
    exact = [(k, rest * s / total) for k, s in cfg.mix]
    counts = {k: int(np.floor(x)) for k, x in exact}
    order = sorted(exact, key=lambda kx: -(kx[1] - np.floor(kx[1])))
    for k, _ in order[: rest - sum(counts.values())]:
        counts[k] += 1
    return {**counts, "startup": cfg.startup_size, "classroom": cfg.classroom_size}


class Deck:
    """Items dealt without replacement in a seeded order, reshuffled when used up."""

    def __init__(self, items: Sequence[Any], rng: np.random.Generator):
        self.items = list(items)
        self.rng = rng
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def draw(self) -> Any:
        if not self._order:
            self._order = self.rng.permutation(len(self.items)).tolist()
        return self.items[self._order.pop()]


def session_turns(conv: Any, cfg: RealPopulationConfig) -> list[tuple[str, str]]:
    """The turns of ``conv`` one session sends: the first ``max_session_turns``, up to a too-long human turn."""
    out = []
    for user, reply in conv.turns[: cfg.max_session_turns]:
        if len(user) > cfg.max_user_chars:
            break
        out.append((user, reply))
    return out


class _Decks:
    """The population's conversations, by use: general (English), repeated-'continue', per other language."""

    def __init__(self, conversations: Sequence[Any], cfg: RealPopulationConfig, rng: np.random.Generator):
        general: list[list[tuple[str, str]]] = []
        cont: list[list[tuple[str, str]]] = []
        foreign: dict[str, list[list[tuple[str, str]]]] = {}
        for c in conversations:
            turns = session_turns(c, cfg)
            if not turns:
                continue
            lang = ar.guess_language(" ".join(u for u, _ in c.turns))
            if lang not in ("en", ""):
                foreign.setdefault(lang, []).append(turns)
                continue
            general.append(turns)
            if sum(u.strip().lower() in _CONTINUE for u, _ in turns) >= 2:
                cont.append(turns)
        if not general:
            raise ValueError(f"ShareGPT pool {cfg.pool!r} has no usable conversation")
        self.general = Deck(general, rng)
        self.cont = Deck(cont or general, rng)
        self.foreign = {lang: Deck(v, rng) for lang, v in foreign.items()}


def generate_real_population(cfg: RealPopulationConfig,
                             conversations: Sequence[Any] | None = None) -> tuple[list[SimAccount], list[Turn]]:
    """Benign accounts and their planned turns (unsorted). ``conversations``: the pool's
    :class:`~stillhouse.arena.sharegpt.Conversation` s (default: read from the installed package)."""
    from stillhouse.arena.prompts import prompt_pool
    from stillhouse.arena.sharegpt import pool as sharegpt_pool

    rng = np.random.default_rng([cfg.seed, 104_729])
    convs = sharegpt_pool(cfg.pool) if conversations is None else conversations
    gen = _Generator(cfg, rng, _Decks(convs, cfg, rng))
    counts = archetype_counts(cfg)
    kinds = [k for k in ARCHETYPES for _ in range(counts.get(k, 0))]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]  # ids do not give the archetype away
    if any(k in ("student", "bench", "batch") for k in kinds):
        gen.math = prompt_pool("benign")
    accounts: list[SimAccount] = []
    turns: list[Turn] = []
    for i, kind in enumerate(kinds):
        info, mine = gen.account(f"r{cfg.seed}-{i:05d}", kind)
        accounts.append(SimAccount(info=info, kind=f"benign:{kind}", planned=len(mine)))
        turns.extend(mine)
    return accounts, turns


class _Generator:
    """Per-population state (decks, the offices, the startup, the classroom) and one method per archetype."""

    def __init__(self, cfg: RealPopulationConfig, rng: np.random.Generator, decks: _Decks):
        self.cfg, self.rng, self.decks = cfg, rng, decks
        self.math: Any = None
        counts = archetype_counts(cfg)
        n_offices = max(1, round(counts.get("office", 0) / cfg.office_size))
        self.offices = [(f"org-r{cfg.seed}-{k}", _home_ip(rng), fingerprint(f"org-card-r{cfg.seed}-{k}"),
                         int(rng.integers(0, len(USER_AGENTS)))) for k in range(n_offices)]
        self.startup = (f"startup-r{cfg.seed}", _home_ip(rng), fingerprint(f"startup-card-r{cfg.seed}"))
        self.school_ip = _home_ip(rng)
        self.startup_seen = 0

    # ---------------------------------------------------------------- plumbing
    def _tz(self) -> float:
        zones, shares = zip(*TIME_ZONES)
        return float(self.rng.choice(zones, p=np.array(shares) / sum(shares)))

    def _sessions(self, scale: float) -> int:
        return int(min(1 + self.rng.pareto(1.3) * scale * self.cfg.days / 7.0, 300 * self.cfg.days / 7.0))

    def _client(self) -> tuple[str, tuple[str, ...]]:
        i = int(self.rng.integers(0, len(USER_AGENTS)))
        return USER_AGENTS[i], SDK_HEADERS[i % len(SDK_HEADERS)]

    def _chat(self, common: dict[str, Any], sid: str, ts: float, turns: list[tuple[str, str | None]],
              system: str = "", params: dict[str, Any] | None = None, ip: Any = None) -> list[Turn]:
        """One session: each turn after the time it takes to read the reply and type the next message."""
        out = []
        c = dict(common, client_ip=ip()) if callable(ip) else common  # a VPN or carrier NAT: one exit per session
        for t, (user, reply) in enumerate(turns):
            out.append(Turn(ts=ts, session_id=sid, user_text=user, system=system, params=dict(params or {}),
                            followup=t > 0, reply=reply, context_chars=self.cfg.context_chars, **c))
            read = len(reply or "x" * 600) / 50.0
            nxt = len(turns[t + 1][0]) if t + 1 < len(turns) else 0
            ts += min((8.0 + read + min(nxt / 6.0, 120.0)) * float(self.rng.lognormal(0.0, 0.5)), 1800.0)
        return out

    def _chat_user(self, aid: str, common: dict[str, Any], scale: float, system: str = "",
                   params: dict[str, Any] | None = None, spread: float = 1.0, ip: Any = None,
                   continues: float = 0.0) -> list[Turn]:
        out: list[Turn] = []
        tz = self._tz()
        for s in range(self._sessions(scale)):
            turns: list[tuple[str, str | None]]
            if continues and self.rng.random() < 0.6:
                turns = list(self.decks.cont.draw())
            else:
                turns = list(self.decks.general.draw())
                if continues:
                    turns += [(ar.CONTINUE_WORDS[int(self.rng.integers(0, len(ar.CONTINUE_WORDS)))], None)
                              for _ in range(int(self.rng.integers(1, 5)))]
            out += self._chat(common, f"{aid}-s{s}", _diurnal_ts(self.rng, self.cfg, tz, spread), turns, system,
                              params, ip)
        return out

    def _casual_params(self) -> tuple[str, dict[str, Any]]:
        r = self.rng
        system = ar.SHORT_SYSTEMS[int(r.integers(0, len(ar.SHORT_SYSTEMS)))] if r.random() < 0.15 else ""
        params: dict[str, Any] = {}
        if r.random() < 0.25:
            params["temperature"] = float(r.choice([0.2, 0.5, 0.7, 1.0]))
        if r.random() < 0.1:
            params["max_tokens"] = int(r.choice([2048, 3000]))
        return system, params

    # -------------------------------------------------------------- archetypes
    def account(self, aid: str, kind: str) -> tuple[AccountInfo, list[Turn]]:
        r, cfg = self.rng, self.cfg
        ua, headers = self._client()
        common: dict[str, Any] = {"account_id": aid, "client_ip": _home_ip(r), "user_agent": ua,
                                  "header_names": headers}
        info = AccountInfo(account_id=aid, signup_path="web", payment_fingerprint=fingerprint(f"card-{aid}"),
                           created_at=cfg.start_ts - float(r.uniform(0, 500)) * 86400)
        system, params = self._casual_params()
        if kind in ("casual", "vpn", "mobile"):
            ip = None
            if kind == "vpn":
                ip = lambda: f"{PROXY_SUBNETS[int(r.integers(0, len(PROXY_SUBNETS)))]}.{r.integers(1, 255)}"
            elif kind == "mobile":
                ip = lambda: CGNAT[int(r.integers(0, len(CGNAT)))]
                common["user_agent"] = "OpenAI/JS 4.67.1" if r.random() < 0.5 else common["user_agent"]
            return info, self._chat_user(aid, common, cfg.casual_scale, system, params, ip=ip)
        if kind == "office":
            org, ip_addr, card, ua_i = self.offices[int(r.integers(0, len(self.offices)))]
            info.org, info.payment_fingerprint = org, card
            common["client_ip"] = ip_addr
            if r.random() < 0.7:  # the company's standard client
                common["user_agent"], common["header_names"] = USER_AGENTS[ua_i], SDK_HEADERS[ua_i % len(SDK_HEADERS)]
            return info, self._chat_user(aid, common, cfg.casual_scale, system, params)
        if kind == "power":
            if r.random() < 0.35:
                system = ar.PERSONAS[int(r.integers(0, len(ar.PERSONAS)))]
            if r.random() < 0.2:
                params["max_tokens"] = cfg.max_tokens_limit
            return info, self._chat_user(aid, common, cfg.power_scale, system, params, spread=1.6)
        if kind == "chatapp":
            common["user_agent"] = ar.APP_USER_AGENTS[int(r.integers(0, len(ar.APP_USER_AGENTS)))]
            common["header_names"] = ar.APP_HEADERS
            return info, self._chat_user(aid, common, cfg.casual_scale * 1.5, ar.APP_SYSTEM,
                                         {"temperature": 0.7, "max_tokens": 2048})
        if kind == "continue":
            return info, self._chat_user(aid, common, cfg.casual_scale * 2, system, params, continues=1.0)
        if kind == "template":
            return info, self._template(aid, common)
        if kind == "nonenglish":
            return info, self._foreign(aid, common)
        if kind == "student":
            return info, _casual(r, cfg, self.math, common, self._tz(), scale=cfg.casual_scale * 2)
        if kind == "bench":
            return info, _bench(r, cfg, self.math, common)
        if kind == "judge":
            return info, self._judge(aid, common, runs=int(r.integers(1, 4)))
        if kind == "batch":
            if r.random() < 0.3:
                return info, _batch(r, cfg, self.math, common)
            return info, self._batch(aid, common)
        if kind == "startup":
            return self._startup(aid, info, common)
        if kind == "classroom":
            return self._classroom(aid, info, common)
        raise ValueError(f"unknown archetype {kind!r}")

    def _template(self, aid: str, common: dict[str, Any]) -> list[Turn]:
        r, cfg = self.rng, self.cfg
        template = ar.TEMPLATES[int(r.integers(0, len(ar.TEMPLATES)))]
        tz = self._tz()
        out = []
        for day in range(int(np.ceil(cfg.days))):
            if r.random() > 0.7:
                continue
            ts = cfg.start_ts + day * 86400 + ((float(r.uniform(8.5, 12)) - tz) % 24) * 3600
            for k in range(int(r.integers(3, 31))):
                turns = self.decks.general.draw()
                text = ar.paragraph(r, turns[int(r.integers(0, len(turns)))][1])
                out.append(Turn(ts=ts, session_id=f"{aid}-d{day}-{k}", user_text=template.format(text=text),
                                context_chars=cfg.context_chars, **common))
                ts += float(r.lognormal(np.log(240), 0.8))
        return [t for t in out if t.ts < cfg.start_ts + cfg.days * 86400]

    def _foreign(self, aid: str, common: dict[str, Any]) -> list[Turn]:
        r = self.rng
        lang = ar.FOREIGN_LANGUAGES[int(r.integers(0, len(ar.FOREIGN_LANGUAGES)))]
        zones = ar.LANGUAGE_TZ[lang]
        tz = float(zones[int(r.integers(0, len(zones)))])
        deck = self.decks.foreign.get(lang)
        out: list[Turn] = []
        for s in range(self._sessions(self.cfg.casual_scale)):
            turns: list[tuple[str, str | None]]
            if deck is not None and r.random() < 0.5:
                turns = list(deck.draw())
            else:
                turns = [(ar.foreign_request(r, lang, followup=t > 0), None) for t in range(int(r.geometric(0.5)))]
            out += self._chat(common, f"{aid}-s{s}", _diurnal_ts(r, self.cfg, tz), turns)
        return out

    def _judge_turn(self, sid: str, ts: float, template: str, common: dict[str, Any], params: dict[str, Any],
                    system: str) -> Turn:
        turns = self.decks.general.draw()
        q, a = turns[0]
        text = template.format(q=q[:2000], a=a[:3000], b=a[: max(len(a) // 2, 1)][:3000])
        return Turn(ts=ts, session_id=sid, user_text=text, system=system, params=dict(params),
                    context_chars=self.cfg.context_chars, **common)

    def _judge(self, aid: str, common: dict[str, Any], runs: int) -> list[Turn]:
        r, cfg = self.rng, self.cfg
        system = ar.JUDGE_SYSTEM if r.random() < 0.5 else ""
        templates = [ar.JUDGE_TEMPLATES[int(i)] for i in r.choice(len(ar.JUDGE_TEMPLATES), 2, replace=False)]
        out = []
        for run in range(runs):
            template = templates[run % 2]
            params: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16 if "just the number" in template else 512}
            if r.random() < 0.25:
                params.update(logprobs=True, top_logprobs=5)
            ts = cfg.start_ts + float(r.uniform(0, cfg.days * 86400 * 0.95))
            for k in range(int(r.integers(50, 401))):
                out.append(self._judge_turn(f"{aid}-r{run}-{k}", ts, template, common, params, system))
                ts += float(r.exponential(1.5))
        return out

    def _batch(self, aid: str, common: dict[str, Any]) -> list[Turn]:
        r, cfg = self.rng, self.cfg
        system = ar.BATCH_SYSTEMS[int(r.integers(0, len(ar.BATCH_SYSTEMS)))]
        interval = float(r.uniform(300, 3600))
        ts, end = cfg.start_ts + float(r.uniform(0, interval)), cfg.start_ts + cfg.days * 86400
        out: list[Turn] = []
        while ts < end:
            text = self.decks.general.draw()[0][0][:1500]
            out.append(Turn(ts=ts, session_id=f"{aid}-j{len(out)}", user_text=text, system=system,
                            params={"max_tokens": int(r.choice([64, 128])), "temperature": 0.0}, **common))
            ts += interval * float(r.uniform(0.9, 1.1))
        return out

    def _startup(self, aid: str, info: AccountInfo, common: dict[str, Any]) -> tuple[AccountInfo, list[Turn]]:
        r, cfg = self.rng, self.cfg
        org, ip, card = self.startup
        info.org, info.payment_fingerprint, info.signup_path = org, card, "api"
        common["client_ip"] = ip
        if r.random() < 0.6:
            common["user_agent"], common["header_names"] = "OpenAI/Python 1.54.3", SDK_HEADERS[0]
        system, params = self._casual_params()
        out = self._chat_user(aid, common, 3.0, system, params)
        self.startup_seen += 1
        if self.startup_seen <= 2:  # the two who build the company's eval set
            template = ar.JUDGE_TEMPLATES[2]
            for k in range(int(r.integers(10, 41))):
                ts = cfg.start_ts + float(r.uniform(0, cfg.days * 86400))
                out.append(self._judge_turn(f"{aid}-e{k}", ts, template, common,
                                            {"temperature": 0.0, "max_tokens": 512}, ""))
        return info, out

    def _classroom(self, aid: str, info: AccountInfo, common: dict[str, Any]) -> tuple[AccountInfo, list[Turn]]:
        r, cfg = self.rng, self.cfg
        info.payment_fingerprint, info.org = "", ""  # free accounts
        school = dict(common, client_ip=self.school_ip, user_agent=USER_AGENTS[4], header_names=SDK_HEADERS[3])
        tz = -5.0
        out: list[Turn] = []
        for day in range(0, int(np.ceil(cfg.days)), 2):  # class every other day, 10:00-10:50
            if r.random() > 0.85:
                continue
            topic = ar.ASSIGNMENTS[(day // 2 + cfg.seed) % len(ar.ASSIGNMENTS)]
            ask = ar.ASK_PHRASES[int(r.integers(0, len(ar.ASK_PHRASES)))].format(t=topic)
            follow = [ar.CLASS_FOLLOWUPS[int(i)] for i in r.choice(len(ar.CLASS_FOLLOWUPS), int(r.integers(1, 5)))]
            turns: list[tuple[str, str | None]] = [(ask, None), *((f, None) for f in follow)]
            ts = cfg.start_ts + day * 86400 + ((10.0 + float(r.uniform(0, 0.7)) - tz) % 24) * 3600
            out += self._chat(school, f"{aid}-c{day}", ts, turns)
            if r.random() < 0.4:  # homework in the evening, from home
                ts = cfg.start_ts + day * 86400 + ((19.0 + float(r.uniform(0, 3)) - tz) % 24) * 3600
                out += self._chat(common, f"{aid}-h{day}", ts, [(ask, None), ("explain every step", None)])
        return info, [t for t in out if t.ts < cfg.start_ts + cfg.days * 86400]

