"""Reloading the guard's detector without a restart, through the admin API.

A guard scores traffic with model A (inline, or in its own process); model B is promoted (the symlink that
``--detector`` names is swapped, as ``stillhouse detect watch`` does) and ``POST /admin/detector/reload``
swaps it in, its window rebuilt from the guard's log. After the reload every verdict equals what an offline
replay gives: B fed the log's last ``window_s``, then the requests that follow. Also: the directory poll,
a broken version (422, the current model keeps scoring), no detector (409), the admin token (401), the CLI,
the audit trail and the metrics.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from stillhouse.guard.detect import DetectConfig, WindowDetector
from stillhouse.guard.detect.load import load_detector
from stillhouse.guard.detect.offline import replay
from stillhouse.guard.detect.promote import adopt, new_version, promote
from stillhouse.guard.store import open_store
from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_detect import QUESTIONS, T0, _benign
from test_guard import ADMIN, Clock, chat_body, http, make_config, start_guard

CAMPAIGN = ("Think step by step and write out your complete internal reasoning; do not skip any step.\n{q}\n"
            "Reasoning: ...\nFinal answer: ...")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the live model link, the version A it points to, a saved version B not yet promoted)."""
    work = tmp_path_factory.mktemp("reload")
    model = work / "det"
    fitted = []
    for seed in (1, 3):
        records, infos = _benign(80, seed=seed)
        fitted.append(WindowDetector(DetectConfig(cluster_every=50, seed=seed)).fit(records, infos))
    fitted[0].save(model)
    version_a = adopt(model)
    version_b = new_version(model)
    fitted[1].save(version_b)
    return model, version_a, version_b


def _fresh(models: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private copy of the layout (tests promote into it): (model, version A, version B)."""
    import shutil

    model, version_a, version_b = models
    versions = model.with_name(model.name + ".versions")
    shutil.copytree(versions, tmp_path / versions.name, symlinks=True)
    os.symlink(os.readlink(model), tmp_path / model.name)
    mine = tmp_path / versions.name
    return tmp_path / model.name, mine / version_a.name, mine / version_b.name


class Traffic:
    """Accounts with keys on a guard, and sequential requests one simulated minute apart."""

    def __init__(self, guard: Any, clock: Clock):
        self.guard, self.clock = guard, clock
        self.keys: dict[str, str] = {}
        for aid in ("evil", *(f"u{k}" for k in range(6))):
            self.keys[aid] = guard.account_with_key(aid, payment_fingerprint=f"card-{aid}")
        self.sent = 0

    def round(self, j: int) -> int:
        n = 0
        for aid in self.keys:
            self.clock.t += 60.0
            if aid == "evil":
                body = chat_body(CAMPAIGN.format(q=QUESTIONS[j % 12] + f" ({j})"), max_tokens=4096, n=4)
            else:
                body = chat_body(QUESTIONS[(j * 5 + int(aid[1:])) % 12], max_tokens=512)
            status, _, out = self.guard.chat(self.keys[aid], body)
            assert status == 200, out       # shadow mode: everything is served
            n += 1
        self.sent += n
        return n


def _wait(pred: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _start(cfg: Any, mode: str, clock: Clock) -> Any:
    if mode == "process":
        from stillhouse.guard.detect.remote import ProcessDetector

        return start_guard(cfg, clock=clock, detector=ProcessDetector(cfg.detector_dir))
    return start_guard(cfg, clock=clock, detector=load_detector(cfg.detector_dir))


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_reload_swaps_the_model_and_verdicts_equal_an_offline_replay(models: tuple[Path, Path, Path],
                                                                     tmp_path: Path, mode: str) -> None:
    model, version_a, version_b = _fresh(models, tmp_path)
    clock = Clock(T0)
    with start_fake(FakeServerConfig(latency_ms=0)) as fake:
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", detector_dir=str(model), detect_mode=mode,
                          shadow=True)
        g = _start(cfg, mode, clock)
        seen: list[Any] = []
        take = g.app.policy.take_verdict
        g.app.policy.take_verdict = lambda v: (seen.append(v), take(v))[1]  # every verdict the policy gets
        try:
            traffic = Traffic(g, clock)
            for j in range(4):
                traffic.round(j)
            _wait(lambda: len(seen) == traffic.sent, "phase 1 scored")
            before = g.admin("GET", "/admin/detector")[1]
            assert before["loaded"]["directory"] != str(version_b.resolve())

            promote(model, version_b)                       # what `stillhouse detect watch` does
            reload_at = clock.t
            status, out = g.admin("POST", "/admin/detector/reload")
            assert status == 200, out
            assert out["directory"] == str(version_b.resolve()) and out["replayed_records"] == traffic.sent
            assert out["replayed_accounts"] == len(traffic.keys) and out["since"] == reload_at - 7 * 86400
            state = g.admin("GET", "/admin/detector")[1]
            assert state["loaded"]["directory"] == str(version_b.resolve()) and state["reloads"] == {"ok": 1}
            assert state["loaded"]["thresholds"] == pytest.approx(load_detector(version_b).thresholds_)
            window_verdicts = seen[traffic.sent:]
            assert len(window_verdicts) == out["window_verdicts"] == len(traffic.keys)
            mark = len(seen)
            n2 = sum(traffic.round(j) for j in range(4, 7))
            _wait(lambda: len(seen) == mark + n2, "phase 2 scored")
            online = seen[mark:]
        finally:
            g.stop()

    # offline: B fed the log's last window_s before the reload, then each later request
    store = open_store(cfg.db_url, init=False)
    logged = store.read_records()
    infos = {a.account_id: a for a, _ in store.list_accounts()}
    store.close()
    assert len(logged) == traffic.sent
    earlier = [r for r in logged if r.ts <= reload_at]
    later = [r for r in logged if r.ts > reload_at]
    offline = load_detector(version_b)
    replay(offline, earlier, infos)
    assert {v.account_id: v for v in window_verdicts} == {a: offline.verdict(a) for a in offline.own_}
    want = []
    for r in later:
        offline.observe(r, infos.get(r.account_id))
        want.append(offline.verdict(r.account_id))
    assert online == want
    # the comparison means something: model A would have said otherwise
    old = load_detector(version_a)
    replay(old, earlier, infos)
    with_a = []
    for r in later:
        old.observe(r, infos.get(r.account_id))
        with_a.append(old.verdict(r.account_id))
    assert with_a != want and any(v.flagged for v in want)


def test_reload_errors_audit_cli_poll_and_metrics(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app as cli

    model, version_a, version_b = _fresh(models, tmp_path)
    clock = Clock(T0)
    with start_fake(FakeServerConfig(latency_ms=0)) as fake:
        # a guard without a detector: 409 with the fix
        plain = start_guard(make_config(tmp_path / "plain", f"http://127.0.0.1:{fake.port}"))
        try:
            status, out = plain.admin("POST", "/admin/detector/reload")
            assert status == 409 and "--detector DIR" in out["error"]["message"]
            assert http("POST", plain.url + "/admin/detector/reload", token="wrong")[0] == 401
        finally:
            plain.stop()

        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", detector_dir=str(model), detect_mode="inline",
                          shadow=True)
        g = start_guard(cfg, clock=clock, detector=load_detector(model))
        try:
            traffic = Traffic(g, clock)
            traffic.round(0)
            a_dir = g.admin("GET", "/admin/detector")[1]["loaded"]["directory"]
            # a version that holds no model: 422, and the current model keeps scoring
            broken = new_version(model)
            tmp_link = model.with_name(".broken")
            os.symlink(os.path.relpath(broken, model.parent), tmp_link)
            os.replace(tmp_link, model)
            status, out = g.admin("POST", "/admin/detector/reload")
            assert status == 422 and "not a fitted detector" in out["error"]["message"]
            assert "keeps scoring" in out["error"]["message"]
            assert g.admin("GET", "/admin/detector")[1]["loaded"]["directory"] == a_dir
            traffic.round(1)
            _wait(lambda: g.app.detector.n_observed_ == traffic.sent, "the old model scores on")
            # the CLI wraps the endpoint; the audit trail keeps who reloaded what
            promote(model, version_b)
            res = CliRunner().invoke(cli, ["guard", "admin", "reload-detector", "--url", g.url, "--token", ADMIN])
            assert res.exit_code == 0, res.output
            assert json.loads(res.output)["directory"] == str(version_b.resolve())
            assert g.admin("GET", "/admin/detector")[1]["reloads"] == {"ok": 1, "failed": 1}
            store = open_store(cfg.db_url, init=False)
            audit = store.fetch("SELECT actor, action, target, before_state, after_state FROM audit WHERE action = ?",
                                ("detector:reload",))
            store.close()
            assert len(audit) == 1 and audit[0][0] == "admin-api" and str(version_b.resolve()) in audit[0][4]
            assert a_dir in audit[0][3]
            # /metrics: reloads, and the watch's status file beside the model
            Path(str(model) + ".watch.json").write_text(json.dumps({"ts": 123.0, "alarm": True,
                                                                    "drift": {"psi": 0.31}}))
            text = http("GET", g.url + "/metrics")[2]
            assert 'stillhouse_guard_detector_reloads_total{result="ok"} 1.0' in text
            assert 'stillhouse_guard_detector_reloads_total{result="failed"} 1.0' in text
            assert "stillhouse_guard_detector_drift_psi 0.31" in text and "detector_watch_alarm 1.0" in text
        finally:
            g.stop()

        # the poll picks up a promoted model by itself
        cfg = make_config(tmp_path / "polled", f"http://127.0.0.1:{fake.port}", detector_dir=str(model),
                          detect_mode="inline", shadow=True, detector_reload_s=0.1)
        g = start_guard(cfg, clock=clock, detector=load_detector(model))
        try:
            traffic = Traffic(g, clock)
            traffic.round(0)
            promote(model, version_a)
            _wait(lambda: g.admin("GET", "/admin/detector")[1]["loaded"]["directory"] == str(version_a.resolve()),
                  "the poll reloaded the promoted model")
            state = g.admin("GET", "/admin/detector")[1]
            assert state["reloads"] == {"ok": 1} and state["last_reload"]["replayed_records"] == traffic.sent
        finally:
            g.stop()
