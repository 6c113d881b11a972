"""Harvest runner: resume, keys, samples, budgets, rate limits, config replay, CLI."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stillhouse.cli import app
from stillhouse.config import ConfigError
from stillhouse.distill.harvest import (
    Budget,
    HarvestConfig,
    HarvestError,
    RateLimiter,
    backoff_delay,
    run_harvest,
)
from stillhouse.distill.prompts import PromptError, load_prompts
from stillhouse.distill.store import HarvestStore
from stillhouse.teacher.base import ChatResult, SamplingParams, ServerError
from stillhouse.teacher.fake import FakeTeacher


class Counting:
    """Wraps a teacher, counts calls, optionally fails some."""

    def __init__(self, inner=None, fail=None, revision="r1"):
        self.inner = inner or FakeTeacher()
        self.calls = 0
        self.fail = fail
        self._revision = revision
        self.seen_params: list[SamplingParams] = []

    @property
    def name(self):
        return self.inner.name

    @property
    def revision(self):
        return self._revision

    async def chat(self, messages, params) -> ChatResult:
        self.calls += 1
        self.seen_params.append(params)
        if self.fail is not None:
            self.fail(messages, self.calls)
        return await self.inner.chat(messages, params)

    async def resolve(self):
        return self.name

    async def chat_json(self, messages_json, params):
        return await self.chat(json.loads(messages_json), params)

    async def aclose(self):
        pass


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cfg_for(tmp_path, **kw) -> HarvestConfig:
    base = {"prompts": "builtin:arithmetic:20", "teacher": "fake", "out": str(tmp_path / "run"), "concurrency": 4}
    base.update(kw)
    return HarvestConfig(**base)


async def test_rerun_skips_finished_and_changed_params_make_new_keys(tmp_path):
    t = Counting()
    r1 = await run_harvest(cfg_for(tmp_path), teacher=t)
    assert (r1.stats.ok, t.calls) == (20, 20)
    r2 = await run_harvest(cfg_for(tmp_path), teacher=t)
    assert (r2.stats.ok, r2.stats.skipped, t.calls) == (0, 20, 20)
    r3 = await run_harvest(cfg_for(tmp_path, max_tokens=100), teacher=t)
    assert (r3.stats.ok, t.calls) == (20, 40)
    with HarvestStore(tmp_path / "run", readonly=True) as s:
        assert s.counts() == {"ok": 40}
        assert {r.params["max_tokens"] for r in s.records()} == {100, 256}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["max_tokens"] == 100 and (tmp_path / "run" / "config.prev-1.json").exists()


async def test_samples_get_their_own_seed_and_record(tmp_path):
    t = Counting()
    cfg = cfg_for(tmp_path, prompts="builtin:arithmetic:5", samples=3, temperature=0.9, seed=10)
    rep = await run_harvest(cfg, teacher=t)
    assert rep.stats.ok == 15
    assert sorted(p.seed for p in t.seen_params) == sorted([10, 11, 12] * 5)
    with HarvestStore(cfg.out, readonly=True) as s:
        recs = list(s.records())
    assert sorted({(r.prompt_id, r.sample_index) for r in recs}) == sorted(
        {(r.prompt_id, i) for r in recs for i in range(3)})
    assert all(r.params["seed"] == 10 + r.sample_index for r in recs)


async def test_request_budget_is_hard_and_says_so(tmp_path):
    t = Counting()
    rep = await run_harvest(cfg_for(tmp_path, max_requests=7), teacher=t)
    assert t.calls == 7 and rep.stats.ok == 7
    assert "max_requests=7" in rep.stats.stopped_reason
    assert not rep.complete
    rep2 = await run_harvest(cfg_for(tmp_path, max_requests=7), teacher=t)  # the cap covers the run dir
    assert t.calls == 7 and "max_requests=7" in rep2.stats.stopped_reason
    rep3 = await run_harvest(cfg_for(tmp_path, max_requests=100), teacher=t)
    assert t.calls == 20 and rep3.stats.stopped_reason is None and rep3.stats.skipped == 7


async def test_token_budget_never_exceeded(tmp_path):
    cfg = cfg_for(tmp_path, prompts="builtin:arithmetic:50", max_tokens=8, max_total_tokens=300)
    rep = await run_harvest(cfg, teacher=Counting())
    assert rep.stats.stopped_reason and "max_total_tokens=300" in rep.stats.stopped_reason
    with HarvestStore(cfg.out, readonly=True) as s:
        tot = s.totals()
    assert 0 < tot["prompt_tokens"] + tot["completion_tokens"] <= 300


async def test_cost_is_tracked_and_capped(tmp_path):
    cfg = cfg_for(tmp_path, price_prompt_per_1m=1e6, price_completion_per_1m=2e6, max_cost=200.0, max_tokens=8)
    rep = await run_harvest(cfg, teacher=Counting())
    assert 0 < rep.stats.cost <= 200.0
    assert "max_cost" in rep.stats.stopped_reason
    with HarvestStore(cfg.out, readonly=True) as s:
        for r in s.records():
            assert r.cost == pytest.approx(r.prompt_tokens * 1 + r.completion_tokens * 2)
    with pytest.raises(ConfigError, match="needs prices"):
        cfg_for(tmp_path, max_cost=1.0)


async def test_strict_fails_before_any_teacher_call(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, "{not json", {"prompt": "yo"}])
    t = Counting()
    with pytest.raises(PromptError, match=r"p\.jsonl:2"):
        await run_harvest(cfg_for(tmp_path, prompts=src, strict=True), teacher=t)
    assert t.calls == 0 and not (tmp_path / "run").exists()
    rep = await run_harvest(cfg_for(tmp_path, prompts=src), teacher=t)
    assert rep.stats.ok == 2 and len(rep.prompt_problems) == 1 and "p.jsonl:2" in rep.prompt_problems[0]


async def test_teacher_revision_change_is_refused(tmp_path):
    await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:3"), teacher=Counting(revision="a"))
    with pytest.raises(HarvestError, match="revision"):
        await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:4"), teacher=Counting(revision="b"))
    rep = await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:4", allow_revision_change=True),
                            teacher=Counting(revision="b"))
    assert rep.stats.ok == 1


async def test_retryable_then_ok_and_non_retryable_recorded(tmp_path):
    def fail(messages, n):
        text = messages[-1]["content"]
        if text == "What is 10 + 11?":
            raise ValueError("prompt too long for this model")
        if n % 3 == 1:
            raise ServerError(502, "bad gateway", body="<html>502</html>")

    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"What is {i} + {i + 1}?"}
                                             for i in range(12)])
    cfg = cfg_for(tmp_path, prompts=src, backoff_s=0.001, backoff_max_s=0.002, concurrency=1)
    t = Counting(fail=fail)
    rep = await run_harvest(cfg, teacher=t)
    with HarvestStore(cfg.out, readonly=True) as s:
        recs = {r.prompt_id: r for r in s.records(status=None)}
    assert recs["q10"].status == "error" and recs["q10"].attempts == 1 and "ValueError" in recs["q10"].error
    assert all(r.status == "ok" for k, r in recs.items() if k != "q10")
    assert rep.stats.retries > 0 and any(r.attempts == 2 for r in recs.values())


async def test_exhausted_retries_keep_the_body_and_rerun_retries(tmp_path):
    broken = {"on": True}

    def fail(messages, n):
        if broken["on"]:
            raise ServerError(500, "boom", body='{"error": "boom"}')

    cfg = cfg_for(tmp_path, prompts="builtin:arithmetic:3", max_attempts=2, backoff_s=0.001, backoff_max_s=0.001)
    t = Counting(fail=fail)
    rep = await run_harvest(cfg, teacher=t)
    assert rep.stats.errors == 3 and t.calls == 6
    with HarvestStore(cfg.out, readonly=True) as s:
        assert all(r.raw == '{"error": "boom"}' and r.attempts == 2 for r in s.records(status="error"))
    broken["on"] = False
    rep2 = await run_harvest(cfg, teacher=t)
    assert rep2.stats.ok == 3
    with HarvestStore(cfg.out, readonly=True) as s:
        assert s.counts() == {"ok": 3}
        assert all(r.attempts == 3 and r.error is None for r in s.records())


def test_rate_limiter_rpm_tpm_and_cool_down():
    now = [100.0]
    rl = RateLimiter(rpm=60, clock=lambda: now[0])
    assert [rl.delay_for(1) for _ in range(3)] == [0.0, 1.0, 2.0]
    tl = RateLimiter(tpm=600, clock=lambda: now[0])  # 10 tokens/s, bucket of 600
    assert tl.delay_for(500) == 0.0
    assert tl.delay_for(200) == pytest.approx(10.0)  # 100 short at 10 tokens/s
    tl.settle(200, 100)  # the request used only 100
    now[0] += 5
    assert tl.delay_for(0) == 0.0
    cl = RateLimiter(clock=lambda: now[0])
    cl.cool_down(2.5)
    assert cl.delay_for(1) == pytest.approx(2.5)


async def test_rpm_limit_paces_real_requests(tmp_path):
    t0 = time.monotonic()
    rep = await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:6", rpm=600), teacher=Counting())
    assert rep.stats.ok == 6
    assert time.monotonic() - t0 >= 0.45  # 5 gaps of 0.1 s


def test_backoff_and_budget_units():
    rng = random.Random(0)
    ds = [backoff_delay(a, 0.5, 4.0, rng) for a in (1, 2, 3, 4, 5, 6) for _ in range(200)]
    assert max(ds) <= 4.0 and min(ds) >= 0
    assert max(backoff_delay(1, 0.5, 4.0, rng) for _ in range(200)) <= 0.5
    b = Budget(max_requests=2)
    assert b.reserve(10, 0) is None and b.reserve(10, 0) is None
    assert "max_requests=2" in b.reserve(10, 0)


def test_config_validation_names_the_field(tmp_path):
    for kw, field in [({"samples": 0}, "samples"), ({"teacher": "nope"}, "teacher"),
                      ({"top_logprobs": 5}, "logprobs"), ({"concurrency": -1}, "concurrency"),
                      ({"max_attempts": 0}, "max_attempts")]:
        with pytest.raises((ConfigError, ValueError), match=field):
            cfg_for(tmp_path, **kw)


def test_cli_harvest_then_config_replay_then_export(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["harvest", "--prompts", "builtin:arithmetic:12", "--teacher", "fake", "--out", str(out),
                            "--no-progress", "--samples", "2", "--temperature", "0.5", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "24 ok" in r.output
    r2 = runner.invoke(app, ["harvest", "--config", str(out / "config.json"), "--no-progress"])
    assert r2.exit_code == 0 and "24 already done" in r2.output, r2.output
    r3 = runner.invoke(app, ["harvest", "--config", str(out / "config.json"), "--no-progress",
                             "--max-requests", "30", "--samples", "4"])
    assert r3.exit_code == 3 and "max_requests=30" in r3.output, r3.output
    r4 = runner.invoke(app, ["export", str(out), "--format", "jsonl", "--out", str(tmp_path / "exp")])
    assert r4.exit_code == 0, r4.output
    rows = [json.loads(x) for x in (tmp_path / "exp" / "train.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (tmp_path / "exp" / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    r5 = runner.invoke(app, ["harvest", "--teacher", "fake", "--out", str(out)])
    assert r5.exit_code != 0 and "--prompts" in r5.output


async def test_local_style_teacher_without_resolve_is_batched_concurrently(tmp_path):
    """Concurrency reaches the teacher: a local teacher sees many calls at once (and can batch them)."""

    class Slow(Counting):
        def __init__(self):
            super().__init__()
            self.active = 0
            self.peak = 0

        async def chat(self, messages, params):
            self.active += 1
            self.peak = max(self.peak, self.active)
            await asyncio.sleep(0.01)
            self.active -= 1
            return await super().chat(messages, params)

    t = Slow()
    await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:40", concurrency=8), teacher=t)
    assert t.peak == 8


async def test_local_teacher_harvest_stores_ids_and_topk(tmp_path, tiny_teacher):
    """A LocalTeacher (tiny random Llama) harvested with logprobs: ids and top-k come back decoded."""
    cfg = HarvestConfig(prompts="builtin:arithmetic:6", teacher="bundled", out=str(tmp_path / "run"), samples=2,
                        temperature=1.0, seed=0, max_tokens=5, logprobs=True, top_logprobs=4, concurrency=12)
    rep = await run_harvest(cfg, teacher=tiny_teacher)
    assert rep.stats.ok == 12
    with HarvestStore(cfg.out, readonly=True) as s:
        recs = list(s.records())
    assert {r.revision for r in recs} == {"tiny-0"}
    for r in recs:
        t = r.completion_tokens
        assert r.token_ids.dtype.name == "int32" and r.token_ids.shape == (t,)
        assert r.logprobs.shape == (t,) and r.top_ids.shape == (t, 4) and r.top_logprobs.shape == (t, 4)
        assert r.tokens is None and r.top_tokens is None  # ids, not strings, for a white-box teacher
        # top-1 logprob is at least the sampled token's (float16 storage: compare loosely)
        assert (r.top_logprobs[:, 0] >= r.logprobs - 1e-2).all()
        assert (r.top_logprobs[:, :-1] >= r.top_logprobs[:, 1:] - 1e-3).all()


async def test_stored_keys_are_the_documented_content_hash(tmp_path):
    import hashlib

    from stillhouse.distill.store import canonical_json, record_key

    cfg = cfg_for(tmp_path, prompts="builtin:arithmetic:4", samples=2, temperature=0.3, seed=1)
    await run_harvest(cfg, teacher=Counting())
    with HarvestStore(cfg.out, readonly=True) as s:
        for r in s.records():
            blob = canonical_json({"m": r.messages, "t": r.teacher, "p": r.params, "s": r.sample_index})
            assert r.key == hashlib.sha256(blob.encode()).hexdigest()
            assert r.key == record_key(r.messages, r.teacher, r.params, r.sample_index)


async def test_store_writes_never_overlap_and_all_land_before_the_store_closes(tmp_path, monkeypatch):
    """Slow SQLite writes: one writer at a time, and the last batch is committed before run_harvest returns."""
    import threading

    active, peak, lock = [0], [0], threading.Lock()
    real = HarvestStore.put_rows

    def slow_put_rows(self, rows):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            real(self, rows)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(HarvestStore, "put_rows", slow_put_rows)
    cfg = cfg_for(tmp_path, prompts="builtin:arithmetic:300", concurrency=32, flush_interval_s=0.01)
    rep = await run_harvest(cfg)
    assert rep.stats.ok == 300 and rep.store_counts == {"ok": 300}
    assert peak[0] == 1
    assert active[0] == 0  # no write still running after the run returned
    with HarvestStore(cfg.out, readonly=True) as store:
        assert store.counts() == {"ok": 300}


async def test_a_failed_store_write_stops_the_run_and_says_so(tmp_path, monkeypatch):
    def broken(self, rows):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(HarvestStore, "put_rows", broken)
    with pytest.raises(HarvestError, match="disk full"):
        await run_harvest(cfg_for(tmp_path, prompts="builtin:arithmetic:50", flush_interval_s=0.01))


def test_bench_config_systems_and_table():
    from stillhouse.bench.harvest import BenchConfig, markdown_table

    cfg = BenchConfig(n=10, concurrency=(64,), only=())
    assert cfg.wants("ours") and cfg.wants("bare") and not cfg.wants("anatomy")  # anatomy is opt-in
    assert BenchConfig(only=("anatomy",)).wants("anatomy") and not BenchConfig(only=("anatomy",)).wants("ours")
    with pytest.raises(ConfigError, match="server_engine"):
        BenchConfig(server_engine="nginx")
    with pytest.raises(ConfigError, match="unknown"):
        BenchConfig(only=("vllm",))
    rows = [{"system": "ours", "concurrency": 64, "n": 1000, "rate": 1216.0, "cpu_ms_per_req": 0.1,
             "rss_start_mb": 80, "rss_peak_mb": 81, "error": None,
             "extra": {"rate_requests": 1241.6, "server_cpu_ms_per_req": 0.07, "load_avg_start": 1.0}},
            {"system": "curator", "concurrency": 64, "n": 100, "rate": 304.0, "cpu_ms_per_req": 4.0,
             "rss_start_mb": 300, "rss_peak_mb": 310, "error": None, "extra": {}}]
    table = markdown_table({"rows": rows}, cfg)
    assert "| 64 | ours | 1,000 | 1,216 | 95.0% | 97.0% | 4.00× |" in table


async def test_local_greedy_harvest_runs_white_box_batches(tmp_path, tiny_model, smol_tokenizer):
    """Greedy from a local teacher: fixed white-box batches (local_batch) store the same answers under the same
    keys as continuous batching, plus the top-k of the stop position; a prompt too long fails alone; a rerun
    redoes nothing."""
    from stillhouse.teacher.local import LocalTeacher

    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {10 + i} + {30 - i}?"}],
             "answer": str(40)} for i in range(9)]
    rows.append({"id": "long", "messages": [{"role": "user", "content": "many words " * 40}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = LocalTeacher(tiny_model, smol_tokenizer, name="tiny", revision="tiny-0", max_context=70)
    stored = {}
    try:
        for batch in (4, 0):
            cfg = HarvestConfig(prompts=str(prompts), teacher="bundled", out=str(tmp_path / f"b{batch}"),
                                max_tokens=6, logprobs=True, top_logprobs=3, local_batch=batch)
            rep = await run_harvest(cfg, teacher=teacher)
            assert (rep.stats.ok, rep.stats.errors) == (9, 1)
            with HarvestStore(cfg.out, readonly=True) as s:
                stored[batch] = {r.key: r for r in s.records(status=None)}
            again = await run_harvest(cfg, teacher=teacher)
            assert again.stats.ok == 0 and again.stats.skipped == 9
        with pytest.raises(ValueError, match="greedy, without stop strings"):
            teacher.generate_batch([rows[0]["messages"]], SamplingParams(temperature=0.5))
    finally:
        teacher.close()
    assert stored[4].keys() == stored[0].keys()
    for key, r in stored[4].items():
        c = stored[0][key]
        if r.prompt_id == "long":
            assert r.status == c.status == "error" and "context limit" in r.error
            continue
        assert (r.text, r.finish_reason, r.token_ids.tolist()) == (c.text, c.finish_reason, c.token_ids.tolist())
        assert r.logprobs.tolist() == pytest.approx(c.logprobs.tolist(), abs=1e-4)
        extra = r.finish_reason == "stop"  # the stop position's top-k too
        assert r.top_ids.shape == (r.completion_tokens + extra, 3) and c.top_ids.shape == (c.completion_tokens, 3)
        assert r.top_ids[: c.completion_tokens].tolist() == c.top_ids.tolist()


async def test_shards_fill_one_run_and_export_restores_the_prompt_order(tmp_path):
    """Three shards run side by side into one directory: every prompt once, under the keys of an unsharded
    run; config.json names the whole run; export order=prompts gives the source order back."""
    from stillhouse.distill.export import ExportConfig, export_run

    cfgs = [cfg_for(tmp_path, prompts="builtin:arithmetic:30", samples=2, temperature=0.5, seed=1,
                    shard=f"{i}/3") for i in range(3)]
    reps = await asyncio.gather(*(run_harvest(c, teacher=Counting()) for c in cfgs))
    assert [r.stats.ok for r in reps] == [20, 20, 20]
    whole = cfg_for(tmp_path / "whole", prompts="builtin:arithmetic:30", samples=2, temperature=0.5, seed=1)
    await run_harvest(whole, teacher=Counting())
    with HarvestStore(cfgs[0].out, readonly=True) as a, HarvestStore(whole.out, readonly=True) as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a) == 60
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["shard"] == "" and not list((tmp_path / "run").glob("config.prev-*"))
    rerun = await run_harvest(cfgs[1], teacher=Counting())
    assert rerun.stats.ok == 0 and rerun.stats.skipped == 20
    res = export_run(ExportConfig(run_dir=cfgs[0].out, out=str(tmp_path / "x"), heldout=0.0, order="prompts"))
    rows = [json.loads(x) for x in Path(res.files["train"]).read_text().splitlines()]
    order = [p.id for p in load_prompts("builtin:arithmetic:30").prompts]
    assert [(r["id"], r["sample_index"]) for r in rows] == [(p, i) for p in order for i in (0, 1)]
    as_written = export_run(ExportConfig(run_dir=cfgs[0].out, out=str(tmp_path / "y"), heldout=0.0))
    written = [json.loads(x)["id"] for x in Path(as_written.files["train"]).read_text().splitlines()]
    assert sorted(written) == sorted(r["id"] for r in rows) and written != [r["id"] for r in rows]
    with pytest.raises(ConfigError, match="shard="):
        cfg_for(tmp_path, shard="2/2")
