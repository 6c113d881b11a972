"""Crash test for conversations: kill -9 a turn-by-turn harvest, rerun, and it resumes at the turn where it stopped.

A real harvester process (the ``stillhouse harvest`` console script) harvests multi-turn conversations
and tool prompts from the fake OpenAI server on loopback, whose answers carry reasoning in
``reasoning_content`` and tool calls; it is killed with SIGKILL at random moments, rerun each time,
and finally run to completion. The server keeps the bytes of every answer it sent, so the test checks:

- no run ever asks for a turn the store already held when the run started (it resumes at the turn
  where the conversation stopped, never from the start);
- kills landed in the middle of conversations (some had some turns stored, not all);
- the store ends with exactly one ok record per (conversation, sample, turn), each turn's context is
  the previous turn's context, the teacher's answer and the next user turn;
- every record, re-encoded, is byte for byte in the raw body the server sent for its request.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from stillhouse.distill.store import HarvestStore, canonical_json
from stillhouse.testing.fakeserver import FakeServerConfig, parse_faults, start_in_thread

CONVS, TURNS, TOOL_PROMPTS, SAMPLES = 24, 4, 8, 2
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"expr": {"type": "string"}}}}}]


def _rows() -> list[dict]:
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"What is {i} + {i + 1}? «{i}»"}],
             "turns": [f"And {i} * {k}?" for k in range(2, TURNS + 1)]} for i in range(CONVS)]
    rows += [{"id": f"t{i}", "prompt": f"Compute {i} * 9", "tools": TOOLS} for i in range(TOOL_PROMPTS)]
    return rows


def _stored(db: Path) -> set[tuple[str, int]]:
    """(canonical messages, seed) of every ok record in the store (empty when it does not exist yet)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT messages, params FROM records WHERE status='ok'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return set()
    return {(canonical_json(json.loads(m)), json.loads(p)["seed"]) for m, p in rows}


def _answered(server) -> dict[bytes, int]:
    return {req: len(b) for req, b in list(server.bodies.items())}


def _turns_by_conversation(db: Path) -> dict[tuple[str, int], int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {(pid, s): n for pid, s, n in con.execute(
            "SELECT prompt_id, sample_index, COUNT(*) FROM records WHERE status='ok' AND prompt_id LIKE 'c%' "
            "GROUP BY prompt_id, sample_index")}
    finally:
        con.close()


def test_kill9_mid_conversation_resumes_at_the_turn(tmp_path):
    src = tmp_path / "convs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()))
    cfg = FakeServerConfig(latency_ms=40, reasoning="reasoning_content", keep_bodies=True,
                           faults=parse_faults("429=0.03,500=0.03"), retry_after_s=0.02)
    out = tmp_path / "run"
    db = out / "harvest.sqlite"
    total = SAMPLES * (CONVS * TURNS + TOOL_PROMPTS)
    rng = random.Random(99)
    with start_in_thread(cfg) as server:
        cmd = [str(Path(sys.executable).parent / "stillhouse"), "harvest", "--prompts", str(src), "--teacher",
               server.base_url, "--out", str(out), "--samples", str(SAMPLES), "--temperature", "0.5", "--seed", "3",
               "--concurrency", "3", "--no-progress"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        kills, progress, partial = 0, [], 0
        while kills < 6:
            before, asked = _stored(db), _answered(server.server)
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8 and len(_stored(db)) == len(before) and p.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if p.poll() is not None:
                break
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            time.sleep(0.1)  # answers to requests the killed process had in flight
            kills += 1
            # this run asked for nothing the store held when it started
            for req, n in _answered(server.server).items():
                if n > asked.get(req, 0):
                    body = json.loads(req)
                    assert (canonical_json(body["messages"]), body["seed"]) not in before, "a stored turn asked again"
            done = _stored(db)
            progress.append(len(done))
            partial += sum(1 for n in _turns_by_conversation(db).values() if 0 < n < TURNS)
        assert kills >= 6, f"the harvest finished after only {kills} kills; progress {progress}"
        assert progress == sorted(progress) and progress[-1] < total, progress
        assert partial > 0, "no kill landed in the middle of a conversation"
        before, asked = _stored(db), _answered(server.server)
        final = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert final.returncode == 0, final.stderr
        for req, n in _answered(server.server).items():
            if n > asked.get(req, 0):
                body = json.loads(req)
                assert (canonical_json(body["messages"]), body["seed"]) not in before
        raws: dict[tuple[str, int], list[bytes]] = {}
        for req, bodies in server.server.bodies.items():
            body = json.loads(req)
            raws.setdefault((canonical_json(body["messages"]), body["seed"]), []).extend(bodies)

    with HarvestStore(out, readonly=True) as store:
        assert store.counts() == {"ok": total}
        recs = list(store.records())
    chains: dict[tuple[str, int], dict[int, object]] = {}
    for r in recs:
        turns = chains.setdefault((r.prompt_id, r.sample_index), {})
        assert r.turn not in turns, f"turn {r.turn} of {r.prompt_id}/{r.sample_index} stored twice"
        turns[r.turn] = r
        key = (canonical_json(r.messages), r.params["seed"])
        assert any(json.dumps(r.assistant()).encode() in b for b in raws[key]), (r.prompt_id, r.turn)
    for (pid, _s), turns in chains.items():
        if not pid.startswith("c"):
            assert set(turns) == {0} and turns[0].tool_calls
            continue
        assert set(turns) == set(range(TURNS))
        for k in range(1, TURNS):
            prev, cur = turns[k - 1], turns[k]
            assert cur.messages == [*prev.messages, {"role": "assistant", "content": prev.text},
                                    {"role": "user", "content": f"And {pid[1:]} * {k + 1}?"}]
            assert prev.reasoning is not None and "reasoning_content" not in cur.messages[-2]
