"""Cross-account linking: shared evidence -> weighted links -> clusters.

Every account collects keys of seven kinds (``LINK_KINDS``): its client IPs, their
/24 (IPv4) or /48 (IPv6) subnets, user-agent + header-order fingerprints, payment
fingerprints, long system prompts, template shingles (word 3-grams of its *user turns* it
repeated at least 3 times; a system prompt's words are the system-prompt key's evidence, so they
are not counted twice; wording that two or more benign calibration accounts repeated is common
language, not a template, and is skipped: ``DetectConfig.common_template_accounts``) and the time
buckets it was active in.

:func:`link_matrix` turns them into one weighted, symmetric account x account
matrix: for each kind, ``A_k A_k^T`` counts the keys two accounts share (keys shared
by more than ``link_max_key_accounts`` accounts, or — for time buckets — more than
``sync_max_bucket_accounts``, are too common to be evidence and are dropped); each
count becomes ``weight_k * min(1, shared / need_k)``. Timing needs
``sync_min_events`` co-timed buckets *and* at least 5x the co-timed buckets two
independent accounts with the same activity would share by chance (:func:`expected_cotimed`: each
account's requests uniform within each ``sync_session_s`` period it was active in, not over the whole
span, so a judge run's burst and a person chatting through it are not "synchronised"); its weight
doubles (so timing alone can link two accounts) at twice that many. :func:`clusters` takes
the connected components of links at or above ``link_threshold``.

An address lies inside its subnet, so the two are one piece of evidence at two strengths: a pair
that shares an IP gets the IP's weight, not the IP's plus the subnet's (``per_kind["subnet"]`` keeps
only what the subnet adds over the IP). Counted twice, a commercial proxy's egress address plus a
common SDK user-agent reached the link threshold and tied unrelated customers of the proxy together
(docs/results.md, "Linking", has the measurement that led to both rules).
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter, defaultdict
from functools import lru_cache
from typing import Any

import numpy as np

from stillhouse.guard.detect.config import LINK_KINDS, DetectConfig

TEMPLATE_REPEATS = 3
"""The fewest times an account must send a shingle before it can be a template key."""


def template_need(queries: float, share: float) -> int:
    """How many of an account's ``queries`` (in its window) must hold a shingle for it to be a template key:
    ``TEMPLATE_REPEATS``, or ``share`` of the queries when that is more. A template's fixed wording is in
    most of the prompts sent with it; ordinary wording recurs in a small share of any busy account's."""
    return max(TEMPLATE_REPEATS, math.ceil(share * queries - 1e-9))


_NEED = {"template": 3}


@lru_cache(maxsize=1 << 16)
def subnet_of(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address, or '' when it does not parse.

    Cached: parsing costs ~40 us and clients send from few addresses."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def expected_cotimed(a: np.ndarray, b: np.ndarray, buckets: float) -> np.ndarray:
    """Expected co-timed buckets of two independent accounts, per pair: ``sum_p B (1 - e^(-a_p / B))
    (1 - e^(-b_p / B))`` over periods p, with ``a_p``, ``b_p`` the two accounts' requests in period p
    (rows of ``a`` and ``b``, one pair per row) and B ``buckets`` per period.

    Each account's requests are taken to fall uniformly at random in the periods it was active in (a
    bucket is occupied with probability ``1 - (1 - 1/B)^a_p``, about ``1 - e^(-a_p / B)``): two people
    chatting in the same hour share buckets by chance, and an account busy in every bucket of an hour shares
    one with anyone active then. The uniform-over-the-whole-span baseline (one period) undercounts both.
    """
    return buckets * (occupancy(np.asarray(a, dtype=np.float64), buckets) *
                      occupancy(np.asarray(b, dtype=np.float64), buckets)).sum(axis=1)


def occupancy(requests: np.ndarray, buckets: float) -> np.ndarray:
    """The chance that a period's ``requests``, uniform over its ``buckets`` buckets, occupy a given bucket."""
    return -np.expm1(-requests / buckets)


class LinkIndex:
    """key -> accounts per kind, and per-account requests in each period of ``session_s`` seconds (the
    accounts that sent any, and the timing baseline)."""

    def __init__(self, session_s: float = 3600.0) -> None:
        self.keys: dict[str, dict[object, set[str]]] = {k: defaultdict(set) for k in LINK_KINDS}
        self.session_s = session_s
        self.periods: dict[str, Counter[int]] = defaultdict(Counter)

    def add(self, kind: str, key: object, account_id: str) -> None:
        if key == "" or key is None:
            return
        self.keys[kind][key].add(account_id)

    def count_request(self, account_id: str, ts: float) -> None:
        self.periods[account_id][int(ts // self.session_s)] += 1

    def occupancy_matrix(self, accounts: list[str], buckets: float) -> object:
        """accounts x periods CSR matrix of :func:`occupancy` (rows in ``accounts`` order): a pair's
        :func:`expected_cotimed` is ``buckets`` times the dot product of its two rows."""
        from scipy import sparse

        cols: dict[int, int] = {}
        rows: list[int] = []
        idx: list[int] = []
        vals: list[float] = []
        for i, a in enumerate(accounts):
            for p, k in self.periods.get(a, {}).items():
                rows.append(i)
                idx.append(cols.setdefault(p, len(cols)))
                vals.append(float(k))
        occ = occupancy(np.array(vals, dtype=np.float64), buckets)
        return sparse.csr_matrix((occ, (rows, idx)), shape=(len(accounts), max(len(cols), 1)))


def link_matrix(index: LinkIndex, cfg: DetectConfig) -> tuple[list[str], object, dict[str, object]]:
    """(account ids, total link weight as a scipy CSR matrix, per-kind weight matrices)."""
    from scipy import sparse

    accounts = sorted(index.periods)
    row = {a: i for i, a in enumerate(accounts)}
    n = len(accounts)
    total = sparse.csr_matrix((n, n), dtype=np.float64)
    per_kind: dict[str, Any] = {}  # scipy has no type hints: to mypy its matrices are Any, not object
    for kind in LINK_KINDS:
        weight = cfg.link_weight(kind)
        if weight <= 0:
            continue
        cap = cfg.sync_max_bucket_accounts if kind == "timing" else cfg.link_max_key_accounts
        rows: list[int] = []
        cols: list[int] = []
        col = 0
        for key in index.keys[kind]:  # insertion order: deterministic for a given stream
            members = index.keys[kind][key]
            if len(members) < 2 or len(members) > cap:
                continue
            for a in members:
                rows.append(row[a])
                cols.append(col)
            col += 1
        if not col:
            continue
        incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, col))
        shared = (incidence @ incidence.T).tocoo()
        keep = shared.row != shared.col
        r, c, v = shared.row[keep], shared.col[keep], shared.data[keep]
        if kind == "timing":
            few = v >= cfg.sync_min_events  # fewer co-timed buckets never link: skip their baseline
            r, c, v = r[few], c[few], v[few]
            buckets = index.session_s / cfg.sync_bucket_s
            involved = np.unique(np.concatenate([r, c]))  # rows for these accounts only: cheap per refresh
            occ = index.occupancy_matrix([accounts[i] for i in involved], buckets)
            ri, ci = np.searchsorted(involved, r), np.searchsorted(involved, c)
            expected = buckets * np.asarray(occ[ri].multiply(occ[ci]).sum(axis=1)).ravel()  # type: ignore[index]
            need = np.maximum(float(cfg.sync_min_events), 5.0 * expected)
        else:
            need = np.full(v.shape, float(_NEED.get(kind, 1)))
        if kind == "timing":  # grows to 2x the weight at twice the needed co-timed buckets
            strength = np.where(v >= need, weight * np.minimum(2.0, v / need), 0.0)
        else:
            strength = weight * np.minimum(1.0, v / need)
        m = sparse.csr_matrix((strength, (r, c)), shape=(n, n))
        m.eliminate_zeros()
        per_kind[kind] = m
    if "ip" in per_kind and "subnet" in per_kind:  # nested evidence: the larger of the two, not the sum
        per_kind["subnet"] = (per_kind["subnet"] - per_kind["ip"]).maximum(0).tocsr()
        per_kind["subnet"].eliminate_zeros()
    for m in per_kind.values():
        total = total + m
    return accounts, total.tocsr(), per_kind


def clusters(accounts: list[str], weights: object, threshold: float) -> dict[str, str]:
    """account id -> cluster id (the smallest member id) for clusters of two or more accounts."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if not accounts:
        return {}
    w = sparse.csr_matrix(weights)
    strong = sparse.csr_matrix(((w.data >= threshold).astype(np.float64), w.indices, w.indptr), shape=w.shape)
    strong.eliminate_zeros()
    _, labels = connected_components(strong, directed=False)
    groups: dict[int, list[str]] = defaultdict(list)
    for account, label in zip(accounts, labels):
        groups[int(label)].append(account)
    out: dict[str, str] = {}
    for members in groups.values():
        if len(members) >= 2:
            cid = "c-" + min(members)
            for m in members:
                out[m] = cid
    return out


def top_link_kinds(per_kind: dict[str, object], accounts: list[str], members: list[str]) -> list[tuple[str, float]]:
    """Total link weight per kind inside a cluster, largest first (the cluster's explanation)."""
    idx = {a: i for i, a in enumerate(accounts)}
    rows = [idx[m] for m in members if m in idx]
    out = []
    for kind, m in per_kind.items():
        sub = m[rows][:, rows]  # type: ignore[index]
        total = float(sub.sum()) / 2.0
        if total > 0:
            out.append((kind, total))
    return sorted(out, key=lambda kv: -kv[1])
