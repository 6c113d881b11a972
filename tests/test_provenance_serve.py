"""Watermarking end to end on loopback: the guard picks the key id, ``stillhouse serve`` applies it,
the log records it, and the provenance test names the account from the answers alone.

A tiny random Llama serves (its near-uniform next-token distributions take the watermark easily);
the guard and serve are real servers on 127.0.0.1.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from stillhouse.provenance.candidates import Candidate, derive_all, from_log
from stillhouse.provenance.detect import score_keys, unique_tuples
from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from stillhouse.watermark.green import WatermarkParams
from stillhouse.watermark.keys import HEADER, derive_key, key_u64, sign_header
from test_guard import Clock, http, make_config, start_guard

SECRET = "integration-secret-0123456789"
PARAMS = WatermarkParams(gamma=0.25, delta=4.0, context=1, entropy=0.0)  # plain KGW: every token biased, scored


@pytest.fixture
def wm_serve(tiny_teacher: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    cfg = ServeConfig(teacher="hf:/tiny", served_name="tiny", watermark=True, watermark_delta=PARAMS.delta,
                      watermark_gamma=PARAMS.gamma, watermark_context=PARAMS.context, watermark_entropy=PARAMS.entropy)
    with ServerThread(create_app(tiny_teacher, cfg)) as srv:
        yield srv


def _ask(url: str, headers: dict[str, str] | None = None, **body: Any) -> tuple[int, dict[str, str], Any]:
    req = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48,
           "temperature": 0.0, **body}
    return http("POST", url + "/chat/completions", req, headers=headers)


def test_serve_refuses_unauthenticated_watermark_headers(wm_serve: Any) -> None:
    forged = sign_header(b"not-the-shared-secret-000", "account/mallory/0", "r1", __import__("time").time())
    status, _, body = _ask(wm_serve.base_url, headers={HEADER: forged})
    assert status == 401 and body["error"]["code"] == "watermark_unauthenticated"
    assert "mac does not verify" in body["error"]["message"]
    status, headers, _ = _ask(wm_serve.base_url)  # no header: the server's own key
    assert status == 200 and headers["x-stillhouse-watermark-applied"] == "server/tiny/0"
    assert headers["x-stillhouse-watermark-scheme"] == "kgw"
    good = sign_header(SECRET.encode(), "account/bob/4", "r2", __import__("time").time())
    status, headers, _ = _ask(wm_serve.base_url, headers={HEADER: good}, stream=True)
    assert status == 200 and headers["x-stillhouse-watermark-applied"] == "account/bob/4"
    assert headers["x-stillhouse-watermark-scheme"] == "kgw"  # streamed too: the guard logs it


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
def test_guard_keys_each_account_and_provenance_names_it(wm_serve: Any, tmp_path: Any, smol_tokenizer: Any,
                                                         client: str) -> None:
    clock = Clock(1_000_000.0)
    cfg = make_config(tmp_path, wm_serve.base_url[:-3], watermark=True, watermark_rotate_s=86_400.0,
                      upstream_client=client,
                      upstream_timeout_s=120.0)  # a loaded 2-core machine: a tiny model can take seconds
    g = start_guard(cfg, clock=clock)
    texts: dict[str, list[str]] = {"alice": [], "bob": []}
    seen_client_headers = []
    try:
        keys = {a: g.account_with_key(a) for a in texts}
        # a client that forges the header (even one signed with the real secret) is ignored: the guard
        # never forwards client headers and sets its own
        forged = sign_header(SECRET.encode(), "account/mallory/0", "x", __import__("time").time())
        for i in range(4):
            for account, key in keys.items():
                body = {"model": "tiny", "max_tokens": 64, "temperature": 1.0, "seed": i,
                        "messages": [{"role": "user", "content": f"Story number {i}, please."}]}
                status, headers, out = g.chat(key, body, headers={HEADER: forged})
                assert status == 200, out
                texts[account].append(out["choices"][0]["message"]["content"])
                seen_client_headers.append(headers)
        records = g.records()
    finally:
        g.stop()
    assert {r.account_id: r.watermark_key_id for r in records} == {"alice": "account/alice/11", "bob": "account/bob/11"}
    assert {r.watermark_scheme for r in records} == {"kgw"}  # as the upstream confirmed it
    assert all("x-stillhouse-watermark-applied" not in h for h in seen_client_headers)  # not relayed
    secret_forms = []
    for r in records:
        k = derive_key(SECRET.encode(), r.watermark_key_id)
        secret_forms += [k.hex(), str(key_u64(k)), SECRET]
    dumped = json.dumps([r.__dict__ for r in records]) + json.dumps(texts) + json.dumps(seen_client_headers)
    assert not any(s in dumped for s in secret_forms)  # keys never in log rows or responses

    candidates = from_log(cfg.db_url)
    assert {c.key_id: c.accounts for c in candidates} == {"account/alice/11": {"alice"}, "account/bob/11": {"bob"}}
    candidates += [Candidate(f"account/decoy{i}/11") for i in range(14)]  # 16 keys in all
    keymap = derive_all(SECRET.encode(), candidates)
    for account, answers in texts.items():
        tuples = unique_tuples([smol_tokenizer(t, add_special_tokens=False)["input_ids"] for t in answers], 1)
        ranked = score_keys(tuples, keymap, PARAMS)
        assert ranked[0].key_id == f"account/{account}/11", ranked[:3]
        assert ranked[0].p_holm < 1e-6 and ranked[1].p_holm > 1e-3, ranked[:2]


def test_guard_keys_each_request_under_its_account(wm_serve: Any, tmp_path: Any) -> None:
    """--watermark-per-request: every request its own key id (account/ID/EPOCH/REQUEST), applied by serve as the
    log says, so the counterfactual test can rank each answer independently; the account stays in the id."""
    from stillhouse.provenance.texts import load_samples
    from stillhouse.watermark.keys import KeyId

    cfg = make_config(tmp_path, wm_serve.base_url[:-3], watermark=True, watermark_rotate_s=86_400.0,
                      watermark_per_request=True, upstream_timeout_s=120.0)
    g = start_guard(cfg, clock=Clock(1_000_000.0))
    leaked: list[dict[str, Any]] = []
    try:
        keys = {a: g.account_with_key(a) for a in ("alice", "bob")}
        for i in range(3):
            for key in keys.values():
                body = {"model": "tiny", "max_tokens": 24, "temperature": 1.0,
                        "messages": [{"role": "user", "content": f"Story number {i}, please."}]}
                status, _, out = g.chat(key, body)
                assert status == 200, out
                leaked.append({"messages": [*body["messages"], out["choices"][0]["message"]]})
        records = g.records()
    finally:
        g.stop()
    ids = [KeyId.parse(r.watermark_key_id) for r in records]
    assert len(records) == 6 and len({str(k) for k in ids}) == 6  # one key per request
    for r, k in zip(records, ids):  # the id serve applied names the account, the epoch and this very request
        assert (k.scope, k.subject, k.epoch, k.request) == ("account", r.account_id, 11, r.request_id)
    samples = load_samples(cfg.db_url)  # what the counterfactual test reads: each answer's key and recipe
    assert {s.key_id for s in samples} == {r.watermark_key_id for r in records}
    assert all(s.params.get("max_tokens") == 24 and s.temperature == 1.0 for s in samples)
    # a leaked dataset (no key ids in it): each text is matched to its request in the log by its prompt and scored
    # under that request's key, pooled per account
    from stillhouse.provenance.run import ProvenanceConfig, SuspectConfig, model_provenance, text_provenance

    src = tmp_path / "leaked-alice.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in leaked[0::2]))  # alice asked first in each round
    report = text_provenance(ProvenanceConfig(source=str(src), log=cfg.db_url, gamma=PARAMS.gamma, delta=PARAMS.delta,
                                              context=PARAMS.context, entropy=0.0, score="count"))
    assert report["matched"] == 3 and report["unmatched"] == 0 and report["keys"] == "per request"
    # bob asked the same prompts: his keys are tried on the same texts, and only alice's fit
    assert [s["key_id"] for s in report["scores"]] == ["account:alice", "account:bob"]
    assert report["named"] and report["scores"][0]["p_holm"] < 1e-6 and report["scores"][1]["p_holm"] > 1e-3
    with pytest.raises(ValueError, match="keys per request"):  # no single key to try on a suspect's text
        model_provenance(SuspectConfig(source=str(src), log=cfg.db_url, suspect="hf:/nonexistent", mode="open"))
