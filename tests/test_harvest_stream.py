"""Streaming prompt loading: requests start after the first prompts, the rest load between them.

FIRST_PROMPTS and LOAD_CHUNK are made small so a few hundred rows take many loader turns.
"""

from __future__ import annotations

import json

import pytest

from stillhouse.distill import harvest as H
from stillhouse.distill.harvest import HarvestConfig, run_harvest
from stillhouse.distill.prompts import PromptError, load_prompts
from stillhouse.distill.store import HarvestStore
from stillhouse.teacher.fake import FakeTeacher


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(H, "FIRST_PROMPTS", 8)
    monkeypatch.setattr(H, "LOAD_CHUNK", 16)


class Watching:
    """A fake teacher that notes, at each call, whether the prompt set had been handed over yet."""

    def __init__(self):
        self.inner = FakeTeacher()
        self.name, self.revision = self.inner.name, self.inner.revision
        self.calls = 0
        self.calls_before_all_loaded = 0
        self.all_loaded = False

    async def chat(self, messages, params):
        self.calls += 1
        self.calls_before_all_loaded += not self.all_loaded
        return await self.inner.chat(messages, params)

    async def resolve(self):
        return self.name

    async def chat_json(self, messages_json, params):
        return await self.chat(json.loads(messages_json), params)

    async def aclose(self):
        pass


def write_rows(path, n, bad_every=0, dup_every=0):
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("{not json")
        elif dup_every and i % dup_every == dup_every - 1:
            lines.append(json.dumps({"prompt": "What is 1 + 1?"}))  # the same prompt again and again
        else:
            lines.append(json.dumps({"id": f"r{i}", "prompt": f"What is {i} + {i}?"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def test_requests_start_before_loading_ends_and_every_prompt_is_done(tmp_path):
    src = write_rows(tmp_path / "p.jsonl", 400, bad_every=37, dup_every=29)
    ref = load_prompts(src)
    t = Watching()
    seen = []

    def on_prompts(ps):
        t.all_loaded = True
        seen.append(ps)

    cfg = HarvestConfig(prompts=src, teacher="fake", out=str(tmp_path / "run"), samples=2, concurrency=4)
    rep = await run_harvest(cfg, teacher=t, on_prompts=on_prompts)
    assert t.calls_before_all_loaded > 0  # overlapped: some requests ran while rows were still being read
    assert len(seen) == 1 and [p.id for p in seen[0].prompts] == [p.id for p in ref.prompts]
    assert rep.prompt_problems == [str(p) for p in ref.problems] and rep.duplicates == ref.duplicates
    assert rep.stats.total == rep.stats.ok == t.calls == 2 * len(ref.prompts)
    with HarvestStore(cfg.out, readonly=True) as s:
        assert s.counts() == {"ok": 2 * len(ref.prompts)}
        assert {r.prompt_id for r in s.records()} == {p.id for p in ref.prompts}


async def test_strict_reads_everything_before_any_call(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}"}) for i in range(300)] + ["{late bad line"]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    t = Watching()
    cfg = HarvestConfig(prompts=str(src), teacher="fake", out=str(tmp_path / "run"), strict=True)
    with pytest.raises(PromptError, match="s.jsonl:301"):
        await run_harvest(cfg, teacher=t)
    assert t.calls == 0


async def test_budget_stop_mid_load_then_resume_finishes_exactly_once(tmp_path):
    src = write_rows(tmp_path / "p.jsonl", 300)
    t = Watching()
    base = {"prompts": src, "teacher": "fake", "out": str(tmp_path / "run"), "concurrency": 4}
    rep = await run_harvest(HarvestConfig(**base, max_requests=20), teacher=t)
    assert rep.stats.stopped_reason and "max_requests=20" in rep.stats.stopped_reason
    assert rep.stats.ok == 20
    rep2 = await run_harvest(HarvestConfig(**base), teacher=t)
    assert rep2.stats.skipped == 20 and rep2.stats.ok == 280 and rep2.complete
    with HarvestStore(base["out"], readonly=True) as s:
        assert s.counts() == {"ok": 300}
        assert len({r.key for r in s.records()}) == 300


async def test_limit_holds_while_streaming(tmp_path):
    src = write_rows(tmp_path / "p.jsonl", 300, bad_every=11)
    t = Watching()
    cfg = HarvestConfig(prompts=src, teacher="fake", out=str(tmp_path / "run"), limit=100, concurrency=4)
    rep = await run_harvest(cfg, teacher=t)
    assert rep.stats.ok == t.calls == 100
    with HarvestStore(cfg.out, readonly=True) as s:
        assert {r.prompt_id for r in s.records()} == {p.id for p in load_prompts(src, limit=100).prompts}


async def test_high_concurrency_streams_too(tmp_path):
    src = write_rows(tmp_path / "p.jsonl", 100)
    t = Watching()

    def on_prompts(ps):
        t.all_loaded = True

    cfg = HarvestConfig(prompts=src, teacher="fake", out=str(tmp_path / "run"), concurrency=256)
    rep = await run_harvest(cfg, teacher=t, on_prompts=on_prompts)
    assert t.calls == rep.stats.ok == 100 and t.calls_before_all_loaded > 0
