"""The detector online inside the guard, through the command line a user runs:

    stillhouse detect --fit --log benign.jsonl --model DIR
    stillhouse guard --upstream URL --detector DIR [--shadow]

A detector is fitted (once per module) on a small benign set built the way the detector's
own tests build it, a real `stillhouse guard` process is started with it in front of the
fake upstream, and one account sends campaign-shaped traffic (CoT elicitation in a labelled
template, max_tokens at the maximum, n=4) while another sends a few everyday questions.
Enforcing (the CLI, a real process), the campaign account is blocked with 403 and the decision
is explained; in shadow mode (an in-process guard with the same detector) every request is
served and the would-be block is only recorded.
A missing or unfitted detector directory is a clear error that names the fix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_detect import QUESTIONS, _benign
from test_guard import ADMIN, chat_body, http

CAMPAIGN = ("Think step by step and write out your complete internal reasoning; do not skip any step.\n{q}\n"
            "Reasoning: ...\nFinal answer: ...")


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector fitted by `stillhouse detect --fit` on benign traffic only."""
    from stillhouse.guard.detect.offline import records_to_jsonl

    work = tmp_path_factory.mktemp("detector")
    records, infos = _benign(80, seed=1)
    records_to_jsonl(records, work / "benign.jsonl")
    (work / "accounts.jsonl").write_text("".join(json.dumps(vars(i)) + "\n" for i in infos.values()))
    res = _cli("detect", "--fit", "--log", str(work / "benign.jsonl"), "--accounts", str(work / "accounts.jsonl"),
               "--model", str(work / "det"))
    assert res.exit_code == 0, res.output
    assert (work / "det" / "detector.json").exists()
    return work / "det"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InProcess:
    """Admin and chat calls against a guard at ``url``."""

    url: str

    def __init__(self, url: str):
        self.url = url

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, _, out = http(method, self.url + path, body, token=ADMIN)
        assert status in (200, 201), (status, out)
        return out

    def key(self, account_id: str) -> str:
        self.admin("POST", "/admin/accounts", {"account_id": account_id, "payment_fingerprint": f"card-{account_id}"})
        return str(self.admin("POST", f"/admin/accounts/{account_id}/keys")["key"])

    def chat(self, key: str, body: dict[str, Any]) -> int:
        return http("POST", self.url + "/v1/chat/completions", body, token=key)[0]


class GuardProcess(InProcess):
    """`stillhouse guard ...` as its own process; waits for GET /health."""

    def __init__(self, tmp: Path, upstream: str, *flags: str):
        self.port = _free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log = tmp / "guard.log"
        env = {**os.environ, "STILLHOUSE_GUARD_ADMIN_TOKEN": ADMIN}
        cmd = [sys.executable, "-c", "from stillhouse.cli import app; app()", "guard", "--upstream", upstream,
               "--port", str(self.port), "--db", f"sqlite:///{tmp}/guard.db", "--spool-dir", str(tmp / "spool"),
               *flags]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"guard did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.log.read_text()


def _traffic(g: InProcess, rounds: int) -> tuple[list[int], list[int]]:
    """Interleave a campaign account and an everyday account; their status codes."""
    evil, good = g.key("evil"), g.key("good")
    evil_st, good_st = [], []
    for j in range(rounds):
        evil_st.append(g.chat(evil, chat_body(CAMPAIGN.format(q=QUESTIONS[j % 12] + f" ({j})"),
                                              max_tokens=4096, n=4)))
        if j < 3:  # a few ordinary questions (a burst of them would itself look like a bot)
            good_st.append(g.chat(good, chat_body(QUESTIONS[(5 * j + 1) % 12], max_tokens=512)))
        time.sleep(0.02)  # the guard scores a request just after answering it
    return evil_st, good_st


def _decisions(g: InProcess, target: str) -> list[dict[str, Any]]:
    return [d for d in g.admin("GET", f"/admin/decisions?target={target}")["data"] if d["source"] == "detector"]


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_guard_with_a_fitted_detector_blocks_a_campaign_account(detector_dir: Path, tmp_path: Path,
                                                                 mode: str) -> None:
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        g = GuardProcess(tmp_path, f"http://127.0.0.1:{fake.port}", "--detector", str(detector_dir),
                         "--detect-mode", mode)
        try:
            evil_st, good_st = _traffic(g, 10)
            assert good_st == [200, 200, 200]
            assert evil_st[0] == 200 and 403 in evil_st, evil_st
            first_block = evil_st.index(403)
            assert first_block <= 8 and set(evil_st[first_block:]) == {403}, evil_st
            [dec] = _decisions(g, "evil")
            assert dec["action"] in ("throttle", "block") and not dec["shadow"]
            assert "detector score" in dec["reason"]
            signals = {name for name, _ in dec["signals"]}
            assert {"cot", "max_tokens", "multi"} & signals, dec
            assert _decisions(g, "good") == []
            why = g.admin("GET", "/admin/accounts/evil")
            assert json.dumps(why).count("detector") >= 1
            blocked = [r for r in g.admin("GET", "/admin/traffic?account_id=evil")["data"] if r["status"] == 403]
            assert len(blocked) == evil_st.count(403) and all("detector score" in r["decision_reason"]
                                                              for r in blocked)
            health = g.admin("GET", "/healthz")
            if mode == "process":
                assert health["detector"]["sent"] == health["detector"]["applied"] > 0, health
                assert health["detector"]["lost"] == 0 and health["detector"]["restarts"] == 0
            else:
                assert "detector" not in health
        finally:
            out = g.stop()
    assert "detector:" in out and "enforced" in out and mode in out, out


def _scored_records() -> tuple[list[Any], dict[str, Any]]:
    from test_detect import _benign as benign
    from test_detect import _campaign

    records, infos = benign(12, seed=7)
    records = sorted(records + _campaign(10_000), key=lambda r: r.ts)
    from stillhouse.guard.events import AccountInfo

    infos["evil"] = AccountInfo("evil", payment_fingerprint="card-evil")
    return records, infos


async def test_process_detector_gives_exactly_the_inline_verdicts(detector_dir: Path) -> None:
    """Same records, same order: the child's verdicts equal an inline detector's, one per record."""
    from stillhouse.guard.detect.load import load_detector
    from stillhouse.guard.detect.remote import ProcessDetector

    records, infos = _scored_records()
    inline = load_detector(detector_dir)
    want = []
    for r in records:
        inline.observe(r, infos[r.account_id])
        want.append(inline.verdict(r.account_id))
    got: list[Any] = []
    det = ProcessDetector(detector_dir)
    await det.start(got.extend)
    for r in records:
        det.submit(r, infos[r.account_id])
    await det.stop()
    assert got == want
    assert any(v.flagged for v in want) and not all(v.flagged for v in want)  # the comparison means something
    assert det.stats()["sent"] == det.stats()["applied"] == len(records)


async def test_a_killed_detector_process_is_restarted(detector_dir: Path) -> None:
    import asyncio
    import signal

    from stillhouse.guard.detect.remote import ProcessDetector

    records, infos = _scored_records()
    got: list[Any] = []
    det = ProcessDetector(detector_dir, restart_s=0.05)
    await det.start(got.extend)
    first = det.pid
    for r in records[:5]:
        det.submit(r, infos[r.account_id])
    while len(got) < 5:
        await asyncio.sleep(0.01)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while det.stats()["restarts"] < 1 or det.pid == first:
        assert time.monotonic() < deadline, det.stats()
        await asyncio.sleep(0.05)
    while det._reader is None or det._reader.done():  # the new child is ready
        await asyncio.sleep(0.05)
    for r in records[5:10]:
        det.submit(r, infos[r.account_id])
    await det.stop()
    st = det.stats()
    assert st["restarts"] == 1 and st["lost"] == 0 and st["applied"] == 10 and len(got) == 10, st


def test_shadow_mode_records_the_would_be_block_without_enforcing(detector_dir: Path, tmp_path: Path) -> None:
    """Same traffic, in-process guard (config shadow=True, detector from load_detector): all served."""
    from stillhouse.guard.detect.load import load_detector
    from test_guard import make_config, start_guard

    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", shadow=True, detector_dir=str(detector_dir))
        guard = start_guard(cfg, detector=load_detector(cfg.detector_dir))
        g = InProcess(guard.url)
        try:
            evil_st, good_st = _traffic(g, 8)
            assert evil_st == [200] * 8 and good_st == [200] * 3
            [dec] = _decisions(g, "evil")
            assert dec["shadow"] and dec["action"] in ("throttle", "block")
            assert _decisions(g, "good") == []
            recs = g.admin("GET", "/admin/traffic?account_id=evil")["data"]
            would = [r for r in recs if r["decision_reason"].startswith("shadow: would")]
            assert would and all(r["decision"] == "allow" and r["status"] == 200 for r in recs)
            assert guard.app.upstream_calls == 8 + 3
        finally:
            guard.stop()


def test_missing_or_unfitted_detector_dir_names_the_fix(tmp_path: Path) -> None:
    env = {"STILLHOUSE_GUARD_ADMIN_TOKEN": "tok"}
    fix = "stillhouse detect --fit --log BENIGN_LOG --model"
    base = ["guard", "--upstream", "http://127.0.0.1:9", "--spool-dir", str(tmp_path / "spool"),
            "--db", f"sqlite:///{tmp_path}/g.db"]

    res = _cli(*base, "--detector", str(tmp_path / "nowhere"), env=env)
    assert res.exit_code == 2 and "does not exist" in res.output and fix in res.output, res.output

    (tmp_path / "empty").mkdir()
    res = _cli(*base, "--detector", str(tmp_path / "empty"), env=env)
    assert res.exit_code == 2 and "not a fitted detector" in res.output and fix in res.output, res.output

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "detector.json").write_text("{not json")
    (broken / "detector.npz").write_bytes(b"not a zip")
    res = _cli(*base, "--detector", str(broken), env=env)
    assert res.exit_code == 2 and "not a fitted detector" in res.output and fix in res.output, res.output

    # The config field works the same way, and --print-config shows it.
    res = _cli(*base, "--detector", str(tmp_path / "empty"), "--print-config", env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)["detector_dir"] == str(tmp_path / "empty")
    (tmp_path / "g.json").write_text(res.stdout)
    res = _cli("guard", "--config", str(tmp_path / "g.json"), env=env)
    assert res.exit_code == 2 and "not a fitted detector" in res.output, res.output


def test_load_detector_returns_a_fitted_detector(detector_dir: Path) -> None:
    from stillhouse.guard.detect.load import load_detector

    det = load_detector(detector_dir)
    assert det.fitted and det.thresholds_["block"] > 0
