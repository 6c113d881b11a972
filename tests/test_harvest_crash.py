"""Crash test: kill -9 the harvester at random points, rerun, and nothing is lost or duplicated.

A real harvester process (the ``stillhouse harvest`` console script) talks to the
fake OpenAI server on loopback; it is killed with SIGKILL at random moments at least 10
times, rerun each time, and finally run to completion. The store must then hold exactly one
ok record per (prompt, sample), each with the answer the server gives for that prompt.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from stillhouse.distill.store import HarvestStore
from stillhouse.testing.fakeserver import FakeServerConfig, answer_text, parse_faults, start_in_thread

PROMPTS, SAMPLES = 120, 2


def _count_ok(db: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM records WHERE status='ok'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_kill9_ten_times_then_finish(tmp_path):
    cfg = FakeServerConfig(latency_ms=20, faults=parse_faults("429=0.03,500=0.03"), retry_after_s=0.02)
    out = tmp_path / "run"
    rng = random.Random(1234)
    with start_in_thread(cfg) as server:
        cmd = [str(Path(sys.executable).parent / "stillhouse"), "harvest", "--prompts", f"builtin:arithmetic:{PROMPTS}",
               "--teacher", server.base_url, "--out", str(out), "--samples", str(SAMPLES), "--temperature", "0.5",
               "--seed", "3", "--concurrency", "2", "--no-progress"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        progress = []
        kills = 0
        while kills < 10:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            # Wait until this run has started writing (or a short random while), then kill at a random point.
            t0 = time.monotonic()
            before = _count_ok(str(out / "harvest.sqlite"))
            while time.monotonic() - t0 < 8 and _count_ok(str(out / "harvest.sqlite")) == before \
                    and p.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
            if p.poll() is not None:
                break  # it finished before we could kill it: the remaining work was too small
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            progress.append(_count_ok(str(out / "harvest.sqlite")))
        assert kills >= 10, f"the harvest finished after only {kills} kills; progress {progress}"
        assert progress[-1] < PROMPTS * SAMPLES, "every kill should have landed before the end"
        assert progress == sorted(progress), f"ok records never go down: {progress}"
        final = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert final.returncode == 0, final.stderr

    con = sqlite3.connect(out / "harvest.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with HarvestStore(out, readonly=True) as store:
        assert store.counts() == {"ok": PROMPTS * SAMPLES}
        recs = list(store.records(status="ok"))
    pairs = [(r.prompt_id, r.sample_index) for r in recs]
    assert len(set(pairs)) == len(pairs) == PROMPTS * SAMPLES
    assert {s for _, s in pairs} == set(range(SAMPLES))
    for r in recs:  # each record holds the answer to its own prompt
        assert r.text == answer_text(cfg, r.messages[-1]["content"], 0)
        assert r.params["seed"] == 3 + r.sample_index
