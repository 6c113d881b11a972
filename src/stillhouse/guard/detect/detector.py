"""The detector: online per request, offline over a log, one code path.

:class:`WindowDetector` implements the :class:`~stillhouse.guard.events.Detector`
protocol. ``observe`` does the incremental work for one request (per-request
signals, MinHash keys, one embedding, the account's window sums, link keys) and
scores the account; every ``cluster_every`` requests it recomputes cross-account
links and clusters and scores each cluster on its members' pooled sums. An
account's score is the larger of its own and its cluster's. Offline scoring
(:mod:`stillhouse.guard.detect.offline`) replays a log through the same
``observe`` in the log's order, so both give identical scores on the same log.

Calibration (``fit``) uses benign traffic only: benign accounts are split by a
seeded hash into halves A and B. From A: topic centroids (k-means on prompt
embeddings), the benign reference of the MMD test, the user-turn wording common enough among
benign accounts that it is nobody's template and links no one (``common_template_accounts``), the
evidence phrases common among benign accounts (``common_phrase_accounts``), and the benign distribution
of every feature (each account's feature vector after each of its requests, and each benign cluster's
pooled vector at each refresh). A feature's surprisal is ``-ln p`` of its benign upper tail. The rare asks
(``evidence_signals``: chain-of-thought elicitation, grader prompts, in wording benign accounts do not
commonly use) are also counted: k hits in the user turns of n requests earn ``-ln P(X >= k)``,
X ~ Binomial(n, p0) with p0 their benign per-request rate in half A, capped at ``asks_cap`` (the "asks"
family: cover traffic that dilutes the rate does not hide the count). Only a request that opens a
conversation is a query: follow-up turns ("continue", a prompt edited and resent) add nothing to the
query statistics (wording rates, templates, duplicates, embeddings, topics). The score sums, over eight
families of correlated features (``account.FAMILIES``), each family's largest surprisal, and the
``top_signals`` largest surprisals are the verdict's reasons. From B (accounts never used to build the
tables): each account's *maximum* score over its whole replay; thresholds are the benign quantiles at
``throttle_fpr`` and ``block_fpr`` (``stats.benign_threshold``: split-conformal, and for a target below a
few calibration accounts also an exponential tail fitted to the largest scores), so the per-account
false-positive rate over a replay of that length is a known, held-out quantity.

A cluster is scored on its members' pooled sums (``pooled_sums``), its count of rare asks being the number
of members that made one, so one member's asks are not poured onto its colleagues; an account's score is
the larger of its own and its cluster's.

Errors: ``NotFittedError(RuntimeError)`` — scoring asked of an unfitted detector
where the caller needs thresholds (``save``); ``ValueError`` — bad input to ``fit``.

Run: ``stillhouse detect --help``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stillhouse.guard.detect.account import (
    FAMILIES,
    FAMILY_INDEX,
    FEATURES,
    AccountState,
    Entry,
    Layout,
    feature_values,
    features,
)
from stillhouse.guard.detect.config import DetectConfig
from stillhouse.guard.detect.embed import Embedder, make_embedder
from stillhouse.guard.detect.links import (
    TEMPLATE_REPEATS,
    LinkIndex,
    clusters,
    link_matrix,
    subnet_of,
    template_need,
    top_link_kinds,
)
from stillhouse.guard.detect.requests import (
    EVIDENCE_KEYS,
    EVIDENCE_PHRASES,
    EVIDENCE_SIGNALS,
    QUERY_SIGNALS,
    REQUEST_SIGNALS,
    last_user_text,
    own_words,
    request_signals,
    system_text,
    user_phrases,
)
from stillhouse.guard.detect.stats import (
    TailTables,
    benign_threshold,
    binomial_tail_surprisal,
    combine_families,
    quantile_threshold,
    rff,
    rff_params,
    tail_scale,
)
from stillhouse.guard.detect.supervised import weighted_families
from stillhouse.guard.detect.text import (
    band_keys,
    minhash,
    pair_hashes,
    shingle_hashes,
    stable_hash,
    text_word_hashes,
)
from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict

_FIRST_TURN = REQUEST_SIGNALS.index("first_turn")


class NotFittedError(RuntimeError):
    """The detector has no calibration yet: call ``fit`` on benign traffic, or ``load`` a fitted one."""


class WindowDetector:
    """Sliding-window, benign-calibrated distillation detector (see the module docstring)."""

    def __init__(self, config: DetectConfig | None = None, embedder: Embedder | None = None):
        self.config = config or DetectConfig()
        self.embedder = embedder
        self.centroids_: np.ndarray | None = None
        self.rff_w_: np.ndarray | None = None
        self.rff_b_: np.ndarray | None = None
        self.mu_ref_: np.ndarray | None = None
        self.ref_sq_: float = 0.0
        self.tables_: list[np.ndarray] | None = None
        self.tail_scales_: list[float] | None = None
        self.thresholds_: dict[str, float] | None = None
        self.common_templates_: frozenset[int] = frozenset()
        """User-turn shingles too common among benign accounts to link anyone (fit on half A)."""
        self.signal_rates_: dict[str, float] = {}
        """Benign per-request rate p0 of each of ``config.evidence_signals`` (fit on half A)."""
        self.common_phrases_: frozenset[str] = frozenset()
        """Evidence phrases ``config.common_phrase_accounts`` or more benign accounts sent (fit on half A):
        their hits are not count evidence."""
        self.calibration_: dict[str, Any] = {}
        self.family_weights_: np.ndarray | None = None
        """Supervised mode: the family weights fitted on labels (``supervised.py``); None = the plain sum."""
        self._evidence: list[tuple[int, int, float | None]] = []
        """(feature index, sums slot, ln p0 or None when off) per evidence signal; rebuilt with the tail tables."""
        self._layout: Layout | None = None
        self._tails: TailTables | None = None
        self._system_cache: dict[str, int | None] = {}
        self.reset()

    # ----------------------------------------------------------------- state
    @property
    def embedder_(self) -> Embedder:
        if self.embedder is None:
            self.embedder = make_embedder(self.config.embedder, self.config.embed_dim)
        return self.embedder

    @property
    def layout(self) -> Layout:
        lay = self._layout
        if lay is None or lay.d != self.embedder_.dim:
            lay = self._layout = Layout(d=self.embedder_.dim, rff=self.config.rff_dim, k=self.config.topics)
        return lay

    @property
    def fitted(self) -> bool:
        return self.tables_ is not None and self.thresholds_ is not None

    def reset(self) -> None:
        """Forget all traffic (keep the calibration)."""
        self.accounts_: dict[str, AccountState] = {}
        self.infos_: dict[str, AccountInfo] = {}
        self.links_ = LinkIndex(self.config.sync_session_s)
        self.cluster_of_: dict[str, str] = {}
        self.clusters_: dict[str, dict[str, Any]] = {}
        self.own_: dict[str, tuple[float, list[tuple[str, float]]]] = {}
        self.max_score_: dict[str, float] = defaultdict(float)
        self.n_observed_ = 0
        self.on_refresh: Callable[[WindowDetector], None] | None = None  # called after each cluster refresh

    # --------------------------------------------------------------- observe
    def observe(self, record: TrafficRecord, account: AccountInfo | None = None) -> None:
        """Take one finished request into account: update the window, links and the account's score.

        Refused requests (status >= 400: blocked, rate-limited, malformed) returned nothing
        and are not counted.
        """
        if record.status >= 400:
            return
        cfg = self.config
        lay = self.layout
        aid = record.account_id
        if account is not None:
            self.infos_[aid] = account
            self.links_.add("payment", account.payment_fingerprint, aid)
        st = self.accounts_.get(aid)
        if st is None:
            st = self.accounts_[aid] = AccountState(lay)
        st.evict(record.ts, cfg.window_s, cfg.window_max_requests - 1)

        messages = record.messages or []
        user = last_user_text(messages)
        system = system_text(messages)
        signals = request_signals(record, cfg, user, system)
        sys_key = self._system_key(system) if system else None
        counts = st.shingle_counts  # a Counter holds no zero or negative counts (evict deletes them)
        query = signals["first_turn"] > 0
        if not query:  # the wording rates are rates of queries (a follow-up's "explain every step" is chat)
            for name in QUERY_SIGNALS:
                signals[name] = 0.0
        # Only a request that opens a conversation is a query: its user turn feeds the query statistics
        # (template, duplicates, embedding, topics). A follow-up ("continue", a prompt edited and resent)
        # is part of a conversation, not a new query.
        sampled: tuple[int, ...] = ()
        dup_keys: tuple[int, ...] = ()
        template = dup = 0.0
        emb = phi = None
        topic = -1
        user_sh = None
        if query:
            user_wh = text_word_hashes(user)
            user_pairs = pair_hashes(user_wh)  # shared by the shingles and the hashed embedding
            user_sh = shingle_hashes(None, hashes=user_wh, pairs=user_pairs)
            keep = user_sh if cfg.shingle_sample == 1 else user_sh[user_sh % np.uint32(cfg.shingle_sample) == 0]
            common = self.common_templates_
            # wording benign accounts share (a public template, a benchmark's phrasing) is not this account's template
            sampled = tuple(sorted({h for h in keep.tolist() if h not in common}))
            template = sum(map(counts.__contains__, sampled)) / len(sampled) if sampled else 0.0
            dup_keys = band_keys(minhash(user_sh, cfg.minhash_perm, cfg.seed), cfg.minhash_bands, "f") \
                if user_sh.size else ()
            dup = 1.0 if any(map(st.dup_counts.__contains__, dup_keys)) else 0.0
            emb = self.embedder_.embed(user, hashes=user_wh, pairs=user_pairs).astype(np.float16)
            emb32 = emb.astype(np.float32)
            if self.rff_w_ is not None and self.rff_b_ is not None:
                phi = rff(emb32, self.rff_w_, self.rff_b_).astype(np.float16)
            else:
                phi = np.zeros(cfg.rff_dim, dtype=np.float16)
            topic = int((self.centroids_ @ emb32).argmax()) if self.centroids_ is not None else 0

        row = [0.0] * lay.HOURS  # filled as Python numbers, converted once
        row[lay.COUNT] = 1.0
        row[lay.COMPLETION] = max(int(record.completion_tokens or 0), 0)
        row[lay.PROMPT] = max(int(record.prompt_tokens or 0), 0)
        row[lay.SIGNALS: lay.SIGNALS + len(REQUEST_SIGNALS)] = [signals[k] for k in REQUEST_SIGNALS]
        row[lay.TEMPLATE] = template
        row[lay.DUP] = dup
        if self._asks_counted(signals, query):  # rare: find which phrases, and keep the uncommon ones
            row[lay.EVIDENCE: lay.EVIDENCE + len(EVIDENCE_KEYS)] = self._evidence_hits(user)
        if st.last_ts is not None:
            gap = float(np.log1p(max(record.ts - st.last_ts, 0.0)))
            row[lay.GAP_N] = 1.0
            row[lay.GAP_SUM] = gap
            row[lay.GAP_SQ] = gap * gap
        scalars = np.array(row, dtype=np.float64)
        hour = int(record.ts // 3600) % 24
        st.add(Entry(ts=record.ts, scalars=scalars, hour=hour, emb=emb, phi=phi, topic=topic,
                     shingles=sampled, dup_keys=dup_keys))
        st.last_ts = record.ts if st.last_ts is None else max(st.last_ts, record.ts)

        links = self.links_
        if sampled:
            # A template key: a shingle in at least TEMPLATE_REPEATS and ``template_share`` of the account's
            # queries in the window (user-turn, uncommon shingles only: the system prompt has its own key).
            # The share keeps a busy account's ordinary wording out: a judge run pasting 400 real replies
            # repeats "don't hesitate to" a few times by chance, which is no template.
            need = template_need(st.sums[lay.SIGNALS + _FIRST_TURN], cfg.template_share)
            now = list(map(counts.__getitem__, sampled))  # every sampled shingle is counted by now
            if max(now) >= need:
                for h, c in zip(sampled, now):
                    if c >= need:
                        links.add("template", h, aid)
        if record.client_ip:
            links.add("ip", record.client_ip, aid)
            links.add("subnet", subnet_of(record.client_ip), aid)
        if record.user_agent or record.header_fingerprint:
            links.add("ua_headers", stable_hash(f"{record.user_agent}|{record.header_fingerprint}"), aid)
        if sys_key is not None:
            links.add("system_prompt", sys_key, aid)
        links.add("timing", int(record.ts // cfg.sync_bucket_s), aid)
        links.count_request(aid, record.ts)

        self.n_observed_ += 1
        self.own_[aid] = self._score(feature_values(st.sums, lay, cfg.rate_prior_weight, self.mu_ref_,
                                                    self.ref_sq_, full=cfg.rate_full_requests), st.sums) if self.tables_ is not None else (0.0, [])
        if self.n_observed_ % cfg.cluster_every == 0:
            self.refresh_clusters()
        self._track(aid)

    def _evidence_hits(self, user: str) -> list[float]:
        """Per evidence signal (``EVIDENCE_SIGNALS`` order): 1.0 when the user turn holds one of its phrases
        that is not common among benign calibration accounts (``common_phrases_``), else 0.0."""
        rare = set(self._phrases(user)) - self.common_phrases_
        return [1.0 if rare.intersection(EVIDENCE_PHRASES[name]) else 0.0 for name in EVIDENCE_SIGNALS]

    def _asks_counted(self, signals: dict[str, float], opens: bool) -> bool:
        """Whether a request's user turn can hold count evidence: it has an evidence phrase somewhere, and it opens
        a conversation (a follow-up's asks count only with ``config.asks_in_followups``)."""
        return bool(signals["user_cot"] or signals["user_grader"]) and (opens or self.config.asks_in_followups)

    def _phrases(self, user: str) -> tuple[str, ...]:
        """The evidence phrases of a user turn that count: in the user's own words (quoted material left out,
        :func:`~.requests.own_words`) unless ``config.count_quoted_asks``."""
        low = user.lower()
        return user_phrases(low if self.config.count_quoted_asks else own_words(low))

    def _system_key(self, system: str) -> int | None:
        """The system-prompt link key of a system prompt (None when shorter than 40 characters), cached: an
        account sends the same few system prompts on every request."""
        cache = self._system_cache
        if system in cache:
            return cache[system]
        if len(cache) >= 4096:
            cache.clear()
        key = cache[system] = stable_hash(" ".join(system.lower().split())) if len(system) >= 40 else None
        return key

    def _score(self, f: np.ndarray | list[float], sums: np.ndarray | None = None) -> tuple[float, list[tuple[str, float]]]:
        """(score, reasons) of a feature vector; ``sums`` (the account's or cluster's) adds the count evidence."""
        if self.tables_ is None:
            return 0.0, []
        values = self._surprisals(f, sums)
        k = self.config.top_signals
        if not any(map(math.isnan, values)):  # largest first, ties in feature order: combine_top's stable argsort
            order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        else:
            order = np.argsort(-np.array(values), kind="stable")[:k].tolist()
        w = self.family_weights_
        score = combine_families(values, FAMILY_INDEX) if w is None else weighted_families(values, w)
        return score, [(FEATURES[i], round(values[i], 4)) for i in order if values[i] > 0]

    def _surprisals(self, f: np.ndarray | list[float], sums: np.ndarray | None = None) -> list[float]:
        """Each feature's surprisal against the benign tables; the "asks" features (counts of rare asks) earn
        their binomial count evidence from ``sums`` (capped at ``config.asks_cap``), or nothing without it."""
        if self.tables_ is None:
            raise NotFittedError("no benign tables: fit() the detector first")
        tails = self._tails
        if tails is None or tails.source[0] is not self.tables_ or tails.source[1] is not self.tail_scales_:
            tails = self._tails = TailTables(self.tables_, self.tail_scales_)
            self._evidence = [(FEATURES.index(f"{name}_asks"), self.layout.EVIDENCE + EVIDENCE_SIGNALS.index(name),
                               math.log(p0) if name in self.signal_rates_ and (p0 := self.signal_rates_[name]) > 0
                               else None) for name in EVIDENCE_SIGNALS]
        values = tails.surprisal_list(f.tolist() if isinstance(f, np.ndarray) else f)
        n = round(float(sums[self.layout.COUNT])) if sums is not None else 0
        cap = self.config.asks_cap
        for j, slot, log_p0 in self._evidence:
            k = round(float(sums[slot])) if sums is not None else 0
            values[j] = min(binomial_tail_surprisal(n, k, log_p0), cap) if k > 0 and log_p0 is not None else 0.0
        return values

    def pooled_sums(self, group: Sequence[str]) -> tuple[np.ndarray, int]:
        """(the pooled sums a cluster of accounts is scored on, its members' total requests).

        The members' sums added, except the count of rare asks: a cluster's is the number of members that
        made a rare ask, not the number of asks, so one member's asks stay that member's evidence and do
        not become every colleague's (a hydra's asks are spread over its members, and still add up).
        """
        lay = self.layout
        ev = slice(lay.EVIDENCE, lay.EVIDENCE + len(EVIDENCE_SIGNALS))
        pooled = np.zeros(lay.size, dtype=np.float64)
        askers = np.zeros(len(EVIDENCE_SIGNALS), dtype=np.float64)
        requests = 0
        for aid in group:
            st = self.accounts_[aid]
            pooled += st.sums
            askers += st.sums[ev] > 0
            requests += st.total_requests
        pooled[ev] = askers
        return pooled, requests

    def _effective(self, aid: str) -> tuple[float, list[tuple[str, float]], str | None, int, bool]:
        """(score, reasons, cluster id, requests behind it, whether the score is the cluster's)."""
        own, reasons = self.own_.get(aid, (0.0, []))
        st = self.accounts_.get(aid)
        volume = st.total_requests if st else 0
        cid = self.cluster_of_.get(aid)
        cluster = self.clusters_.get(cid) if cid else None
        if cluster is not None:
            volume = max(volume, cluster["requests"])
            if cluster["score"] > own:
                reasons = [("cluster:" + k, v) for k, v in cluster["reasons"]] + \
                    [("link:" + k, round(v, 3)) for k, v in cluster["links"][:2]]
                return cluster["score"], reasons, cid, volume, True
        return own, reasons, cid, volume, False

    def _block_backed(self, aid: str, cid: str | None, from_cluster: bool) -> bool:
        """Whether a block score has the evidence ``config.block_requires`` asks for (see there)."""
        needs = self.config.block_requires
        if not needs or (from_cluster and "cluster" in needs):
            return True
        if "asks" in needs:
            if from_cluster and cid is not None:
                return bool(self.clusters_[cid]["asks"])
            lay = self.layout
            return bool(self.accounts_[aid].sums[lay.EVIDENCE: lay.EVIDENCE + len(EVIDENCE_SIGNALS)].any())
        return False

    def _track(self, aid: str) -> None:
        score, _, _, volume, _ = self._effective(aid)
        if volume >= self.config.min_requests and score > self.max_score_[aid]:
            self.max_score_[aid] = score

    # -------------------------------------------------------------- clusters
    def refresh_clusters(self) -> None:
        """Recompute links and clusters now, and score every cluster on its pooled sums."""
        cfg = self.config
        lay = self.layout
        accounts, weights, per_kind = link_matrix(self.links_, cfg)
        self.cluster_of_ = clusters(accounts, weights, cfg.link_threshold)
        members: dict[str, list[str]] = defaultdict(list)
        for aid, cid in self.cluster_of_.items():
            members[cid].append(aid)
        self.clusters_ = {}
        for cid, group in members.items():
            group.sort()
            pooled, requests = self.pooled_sums(group)
            f = features(pooled, lay, cfg.rate_prior_weight, self.mu_ref_, self.ref_sq_, members=len(group),
                         full=cfg.rate_full_requests)
            score, reasons = self._score(f, pooled)
            self.clusters_[cid] = {"members": group, "score": score, "reasons": reasons, "features": f,
                                   "requests": requests, "asks": bool(pooled[lay.EVIDENCE: lay.EVIDENCE +
                                                                             len(EVIDENCE_SIGNALS)].any()),
                                   "links": top_link_kinds(per_kind, accounts, group)}
        for aid in self.cluster_of_:
            self._track(aid)
        if self.on_refresh is not None:
            self.on_refresh(self)

    # --------------------------------------------------------------- verdict
    def verdict(self, account_id: str) -> Verdict | None:
        """The current verdict for an account, or None when it has sent nothing."""
        if account_id not in self.own_:
            return None
        score, reasons, cid, volume, from_cluster = self._effective(account_id)
        suggested = "allow"
        fpr = None
        note = ""
        if self.thresholds_ is not None and volume >= self.config.min_requests:
            if score > self.thresholds_["block"]:
                suggested, fpr = "block", self.config.block_fpr
                if not self._block_backed(account_id, cid, from_cluster):
                    suggested = "degrade"
                    note = ("degraded for review, not blocked: no rare ask and no coordinated cluster behind the "
                            "block score (an eval runner, a judge run or a batch service looks like this)")
            elif score > self.thresholds_["throttle"]:
                suggested, fpr = "throttle", self.config.throttle_fpr
        return Verdict(account_id=account_id, score=round(score, 6), flagged=suggested != "allow",
                       suggested=suggested, cluster_id=cid, reasons=reasons, fpr_at_threshold=fpr,  # type: ignore[arg-type]
                       note=note)

    def features_of(self, account_id: str) -> dict[str, float]:
        """The account's current feature values by name (for inspection and tests)."""
        st = self.accounts_[account_id]
        f = features(st.sums, self.layout, self.config.rate_prior_weight, self.mu_ref_, self.ref_sq_,
                     full=self.config.rate_full_requests)
        return dict(zip(FEATURES, map(float, f)))

    # ------------------------------------------------------------------- fit
    def fit(self, benign: Iterable[TrafficRecord], accounts: dict[str, AccountInfo] | None = None,
            progress: Any = None, labels: dict[str, int] | None = None,
            labelled: Iterable[TrafficRecord] | None = None) -> WindowDetector:
        """Calibrate on benign traffic only (see the module docstring); returns self.

        Supervised mode (``config.mode == "supervised"``) also needs ``labels`` (account -> 1 campaign /
        0 benign) and the traffic of the labelled accounts (``labelled``; default: ``benign`` itself):
        the family weights are fitted on them (``supervised.py``) before the thresholds are set, and
        accounts labelled 1 never enter calibration."""
        records = sorted(benign, key=lambda r: r.ts)
        if not records:
            raise ValueError("fit() needs benign traffic: got no records")
        accounts = accounts or {}
        cfg = self.config
        if cfg.mode == "supervised":
            if not labels:
                raise ValueError("DetectConfig.mode='supervised' needs labels: `stillhouse detect --fit --labels "
                                 "FILE` (the console's labels.jsonl)")
            pool = list(labelled) if labelled is not None else records
            campaign = {a for a, y in labels.items() if y == 1}
            records = [r for r in records if r.account_id not in campaign]
        elif labels:
            raise ValueError("labels were given but DetectConfig.mode='calibrated' ignores them: set "
                             "mode='supervised'")
        self.family_weights_ = None
        self.calibration_ = {}
        half_a = [r for r in records if self._half(r.account_id) == 0]
        half_b = [r for r in records if self._half(r.account_id) == 1]
        n_a = len({r.account_id for r in half_a})
        n_b = len({r.account_id for r in half_b})
        if n_a < 2 or n_b < 2:
            raise ValueError(f"fit() needs benign traffic from more accounts (got {n_a} + {n_b} in the two "
                             "calibration halves); give it at least a few hundred benign accounts")
        self._fit_embedding(half_a)
        self._tails = None  # the evidence table is rebuilt with the new rates
        self.common_phrases_, phrase_accounts = self._common_phrases(half_a)
        self.signal_rates_ = self._signal_rates(half_a)
        self.common_templates_ = self._common_templates(half_a)

        # Stage 1: benign feature distributions from half A (accounts and pooled clusters).
        collector = self._clone_unscored()
        snapshots: list[np.ndarray] = []
        collector.on_refresh = lambda d: snapshots.extend(c["features"] for c in d.clusters_.values())
        for r in _progress(half_a, progress, "calibrate: benign features (half A)"):
            collector.observe(r, accounts.get(r.account_id))
            snapshots.append(features(collector.accounts_[r.account_id].sums, collector.layout,
                                      cfg.rate_prior_weight, collector.mu_ref_, collector.ref_sq_,
                                      full=cfg.rate_full_requests))
        matrix = np.vstack(snapshots)
        self.tables_ = [np.sort(matrix[:, j]) for j in range(matrix.shape[1])]
        self.tail_scales_ = [tail_scale(t) for t in self.tables_]

        if cfg.mode == "supervised":
            from stillhouse.guard.detect.supervised import fit_family_weights, labelled_vectors

            x, y, ids = labelled_vectors(self, pool, accounts, labels or {})
            self.family_weights_ = fit_family_weights(x, y, cfg.label_prior)
            self.calibration_ = {"labelled_accounts": len(ids), "labelled_campaign": int(y.sum()),
                                 "labels_without_traffic": len(labels or {}) - len(ids)}

        # Stage 2: thresholds from the maximum score of each held-out benign account (half B).
        self.thresholds_ = {"throttle": 0.0, "block": 0.0}
        scorer = self._clone_unscored()
        scorer.tables_, scorer.tail_scales_ = self.tables_, self.tail_scales_
        scorer.family_weights_ = self.family_weights_
        for r in _progress(half_b, progress, "calibrate: benign thresholds (half B)"):
            scorer.observe(r, accounts.get(r.account_id))
        # Over the accounts with min_requests of their own, as check_window and the goals count them: with the
        # 1- and 2-request accounts (a third of a real population, scored 0 or at most their cluster's score)
        # in the denominator, a threshold set for FPR p realised about 1.4p among the accounts it can flag.
        sent = Counter(r.account_id for r in half_b if r.status < 400)
        b_accounts = sorted(a for a, n in sent.items() if n >= cfg.min_requests)
        if len(b_accounts) < 2:
            raise ValueError(f"fit() needs held-out benign accounts with at least {cfg.min_requests} requests (got "
                             f"{len(b_accounts)}); give it a longer window or more accounts")
        maxima = np.array([scorer.max_score_.get(a, 0.0) for a in b_accounts])
        self.thresholds_ = {"throttle": benign_threshold(maxima, cfg.throttle_fpr),
                            "block": benign_threshold(maxima, cfg.block_fpr)}
        self.calibration_ = {
            **self.calibration_,
            **({"family_weights": dict(zip(FAMILIES, map(float, self.family_weights_)))}
               if self.family_weights_ is not None else {}),
            "benign_records": len(records), "accounts_half_a": n_a, "accounts_half_b": n_b,
            "threshold_accounts": len(b_accounts),
            "feature_snapshots": int(matrix.shape[0]),
            "common_template_shingles": len(self.common_templates_),
            "evidence_phrase_accounts": phrase_accounts,
            "fpr_resolution": 1.0 / (len(b_accounts) + 1),  # the smallest target the conformal threshold can meet
            "benign_max_score_quantiles": {q: float(np.quantile(maxima, q)) for q in (0.5, 0.9, 0.99, 1.0)},
            "benign_max_score_top": sorted(map(float, maxima))[-20:][::-1],
            "conformal_thresholds": {"throttle": quantile_threshold(maxima, cfg.throttle_fpr),
                                     "block": quantile_threshold(maxima, cfg.block_fpr)},
            "span_days": (records[-1].ts - records[0].ts) / 86400.0,
        }
        self.reset()
        return self

    def _signal_rates(self, records: Sequence[TrafficRecord]) -> dict[str, float]:
        """Benign per-request rate of each evidence signal's count-evidence hits (user turn, phrases not in
        ``common_phrases_``: what ``observe`` counts), add-one smoothed: (hits + 1) / (requests + 2)."""
        names = self.config.evidence_signals
        hits = dict.fromkeys(names, 0)
        n = 0
        for r in records:
            if r.status >= 400:
                continue
            n += 1
            signals = request_signals(r, self.config)
            if self._asks_counted(signals, _opens(r)):
                got = dict(zip(EVIDENCE_SIGNALS, self._evidence_hits(last_user_text(r.messages or []))))
                for name in names:
                    hits[name] += got[name] > 0
        return {name: (hits[name] + 1) / (n + 2) for name in names}

    def _common_phrases(self, records: Sequence[TrafficRecord]) -> tuple[frozenset[str], dict[str, int]]:
        """(evidence phrases sent in a user turn by ``config.common_phrase_accounts`` or more benign accounts,
        phrase -> how many accounts sent it)."""
        holders: dict[str, set[str]] = defaultdict(set)
        for r in records:
            if r.status >= 400:
                continue
            signals = request_signals(r, self.config)
            if signals["user_cot"] or signals["user_grader"]:
                for phrase in self._phrases(last_user_text(r.messages or [])):
                    holders[phrase].add(r.account_id)
        counts = {p: len(a) for p, a in sorted(holders.items())}
        need = self.config.common_phrase_accounts
        return (frozenset(p for p, k in counts.items() if k >= need) if need else frozenset()), counts

    def _common_templates(self, records: Sequence[TrafficRecord]) -> frozenset[int]:
        """User-turn shingles that ``config.common_template_accounts`` or more benign accounts each sent
        ``TEMPLATE_REPEATS`` times (the rule that makes a template link key in ``observe``)."""
        need = self.config.common_template_accounts
        if need == 0:
            return frozenset()
        sample = np.uint32(self.config.shingle_sample)
        counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for r in records:
            if r.status >= 400 or not _opens(r):  # as observe(): only a query's user turn
                continue
            wh = text_word_hashes(last_user_text(r.messages or []))
            sh = shingle_hashes(None, hashes=wh, pairs=pair_hashes(wh))  # as observe() hashes them
            if sample != 1:
                sh = sh[sh % sample == 0]
            mine = counts[r.account_id]
            for h in set(sh.tolist()):
                mine[h] += 1
        holders: dict[int, int] = defaultdict(int)
        for mine in counts.values():
            for h, c in mine.items():
                if c >= TEMPLATE_REPEATS:
                    holders[h] += 1
        return frozenset(h for h, k in holders.items() if k >= need)

    def _half(self, account_id: str) -> int:
        return zlib.crc32(f"{self.config.seed}:{account_id}".encode()) & 1

    def _fit_embedding(self, records: Sequence[TrafficRecord]) -> None:
        from sklearn.cluster import KMeans

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        texts = [last_user_text(r.messages) for r in records if _opens(r)] or [last_user_text(r.messages) for r in records]
        if len(texts) > 5000:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), 5000, replace=False))]
        emb = np.vstack([self.embedder_.embed(t).astype(np.float16) for t in texts]).astype(np.float32)
        k = min(cfg.topics, len({t for t in texts}))
        km = KMeans(n_clusters=k, n_init=3, random_state=cfg.seed).fit(emb)
        cent = np.zeros((cfg.topics, emb.shape[1]), dtype=np.float32)
        cent[:k] = km.cluster_centers_
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        cent[k:] = 0.0
        self.centroids_ = cent
        self.rff_w_, self.rff_b_ = rff_params(emb.shape[1], cfg.rff_dim, cfg.rff_gamma, cfg.seed)
        phi = rff(emb, self.rff_w_, self.rff_b_).astype(np.float16).astype(np.float64)
        m = phi.shape[0]
        total = phi.sum(axis=0)
        self.mu_ref_ = total / m
        self.ref_sq_ = float((total @ total - (phi * phi).sum()) / (m * (m - 1))) if m > 1 else 0.0

    def _clone_unscored(self) -> WindowDetector:
        twin = WindowDetector(self.config, self.embedder_)
        twin.centroids_, twin.rff_w_, twin.rff_b_ = self.centroids_, self.rff_w_, self.rff_b_
        twin.mu_ref_, twin.ref_sq_ = self.mu_ref_, self.ref_sq_
        twin.signal_rates_ = self.signal_rates_
        twin.common_phrases_ = self.common_phrases_
        twin.common_templates_ = self.common_templates_
        return twin

    # ------------------------------------------------------------ save/load
    def save(self, directory: str | Path) -> Path:
        """Write ``detector.json`` (config, thresholds, calibration facts) and ``detector.npz``."""
        from stillhouse.config import atomic_write_text, config_to_dict

        if not self.fitted or self.centroids_ is None:
            raise NotFittedError("nothing to save: fit() the detector on benign traffic first")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"config": config_to_dict(self.config), "thresholds": self.thresholds_,
                "calibration": self.calibration_, "features": list(FEATURES), "ref_sq": self.ref_sq_,
                "tail_scales": self.tail_scales_, "signal_rates": self.signal_rates_,
                "common_phrases": sorted(self.common_phrases_),
                "family_weights": None if self.family_weights_ is None else self.family_weights_.tolist(),
                "embedder_dim": self.embedder_.dim}
        atomic_write_text(d / "detector.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tables = self.tables_ or []
        arrays: dict[str, Any] = {"centroids": self.centroids_, "rff_w": self.rff_w_, "rff_b": self.rff_b_,
                                  "mu_ref": self.mu_ref_, **{f"table_{i}": t for i, t in enumerate(tables)},
                                  "common_templates": np.array(sorted(self.common_templates_), dtype=np.int64)}
        np.savez(d / "detector.npz", **arrays)
        return d

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None = None) -> WindowDetector:
        """A fitted detector from a directory written by :meth:`save`."""
        from stillhouse.config import config_from_dict

        d = Path(directory)
        meta_path = d / "detector.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: fit a detector on benign traffic first "
                                    f"(`stillhouse detect --fit --log BENIGN_LOG --model {d}`), or point "
                                    "--model at the directory that holds detector.json")
        npz_path = d / "detector.npz"
        if not npz_path.exists():
            raise FileNotFoundError(f"{npz_path} not found next to {meta_path.name}: copy both files of a fitted "
                                    f"detector, or fit again (`stillhouse detect --fit --log BENIGN_LOG --model {d}`)")
        meta = json.loads(meta_path.read_text())
        cfg = config_from_dict(DetectConfig, meta["config"], source=str(meta_path))
        det = cls(cfg, embedder)
        arrays = np.load(npz_path)
        det.centroids_, det.rff_w_, det.rff_b_ = arrays["centroids"], arrays["rff_w"], arrays["rff_b"]
        det.mu_ref_, det.ref_sq_ = arrays["mu_ref"], float(meta["ref_sq"])
        if meta.get("features") != list(FEATURES):
            raise ValueError(f"{meta_path}: fitted with features {meta.get('features')}, this version scores "
                             f"{list(FEATURES)}: fit again (`stillhouse detect --fit --log BENIGN_LOG --model {d}`)")
        det.tables_ = [arrays[f"table_{i}"] for i in range(len(FEATURES))]
        if "common_templates" in arrays:  # a detector saved before the common-wording list has none
            det.common_templates_ = frozenset(arrays["common_templates"].tolist())
        det.tail_scales_ = [float(x) for x in meta["tail_scales"]]
        det.thresholds_ = {k: float(v) for k, v in meta["thresholds"].items()}
        det.calibration_ = meta["calibration"]
        det.signal_rates_ = {k: float(v) for k, v in meta.get("signal_rates", {}).items()
                             if k in cfg.evidence_signals}  # a detector saved before count evidence has none
        det.common_phrases_ = frozenset(meta.get("common_phrases", ()))  # none before the list existed
        if meta.get("family_weights") is not None:
            det.family_weights_ = np.array(meta["family_weights"], dtype=np.float64)
        return det


def _opens(record: TrafficRecord) -> bool:
    """Whether a request opens a conversation (no earlier assistant turn): the ``first_turn`` signal."""
    return not any(m.get("role") == "assistant" for m in record.messages or [])


def _progress(items: Sequence[TrafficRecord], progress: Any, label: str) -> Iterable[TrafficRecord]:
    if progress is None:
        return items
    task = progress.add_task(label, total=len(items))

    def gen() -> Iterable[TrafficRecord]:
        for i, item in enumerate(items):
            yield item
            if i % 200 == 199 or i == len(items) - 1:
                progress.update(task, completed=i + 1)
    return gen()
