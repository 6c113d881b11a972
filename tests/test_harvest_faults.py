"""Fault test: 429+Retry-After, 500, 503, timeouts, dropped connections, truncated JSON, empty choices.

The fake server's fault schedule is a pure function of (request body, attempt), so the
records that can never succeed (permanent faults) are computed here from the schedule
itself, independently of the harvester; every other record must end ok.
"""

from __future__ import annotations

import hashlib
import json

from stillhouse.distill.harvest import HarvestConfig, run_harvest
from stillhouse.distill.prompts import load_prompts
from stillhouse.distill.store import HarvestStore
from stillhouse.teacher.openai import OpenAITeacher
from stillhouse.testing.fakeserver import FakeServerConfig, choose_fault, parse_faults, start_in_thread

N = 120


async def test_every_recoverable_record_completes_and_the_rest_keep_raw_bodies(tmp_path):
    scfg = FakeServerConfig(
        latency_ms=2,
        faults=parse_faults("429=0.1,503=0.05,500=0.1,timeout=0.05,drop=0.05,truncated=0.1,empty=0.05"),
        fault_attempts=2,
        permanent_faults=parse_faults("truncated=0.04,empty=0.04,400=0.04"),
        retry_after_s=0.05,
        hang_s=3.0,
    )
    with start_in_thread(scfg) as server:
        cfg = HarvestConfig(prompts=f"builtin:arithmetic:{N}", teacher=server.base_url, out=str(tmp_path / "run"),
                            concurrency=16, timeout_s=0.5, max_attempts=4, backoff_s=0.01, backoff_max_s=0.05)
        report = await run_harvest(cfg)
        stats = dict(server.server.stats)

        # Which records can never succeed, by the server's own schedule.
        probe = OpenAITeacher(server.base_url, model=scfg.model)
        expected_fail = {}
        with HarvestStore(cfg.out, readonly=True) as store:
            recs = {r.prompt_id: r for r in store.records(status=None)}
        for prompt in load_prompts(cfg.prompts).prompts:  # the very messages JSON the harvester sent
            pid = prompt.id
            body = probe.chat_body(prompt.messages_json, cfg.params(0))
            kind = choose_fault(scfg, hashlib.sha1(body).hexdigest(), 99)
            if kind is not None:
                expected_fail[pid] = kind

    for kind in ("429", "503", "500", "timeout", "drop", "truncated", "empty", "400"):
        assert stats.get(f"fault_{kind}", 0) > 0, f"the schedule never injected {kind}: {stats}"
    assert len(recs) == N
    failed = {pid for pid, r in recs.items() if r.status == "error"}
    assert failed == set(expected_fail), (failed ^ set(expected_fail))
    assert report.stats.ok == N - len(expected_fail)
    assert 0 < len(expected_fail) < N // 3
    for pid in failed:
        r = recs[pid]
        assert r.raw, f"{pid}: an error record keeps the raw body"
        assert r.text is None and r.error
        kind = expected_fail[pid]
        if kind == "400":
            assert r.attempts == 1 and "BadRequest 400" in r.error  # not retried
            assert "injected" in r.raw
        else:
            assert r.attempts == cfg.max_attempts and "TeacherResponseError" in r.error
            if kind == "empty":
                assert json.loads(r.raw)["choices"] == []
            else:
                assert not r.raw.rstrip().endswith("}")  # cut off
    ok = [r for r in recs.values() if r.status == "ok"]
    assert any(r.attempts > 1 for r in ok), "some ok records needed retries"
    assert report.stats.retries > 0
