"""Labels into detection: non-negative family weights fitted on analysts' labels (supervised mode), thresholds
still from held-out benign traffic, saved and loaded with the detector, and `stillhouse detect --fit --labels`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stillhouse.guard.detect import DetectConfig, WindowDetector
from stillhouse.guard.detect.account import FAMILIES
from stillhouse.guard.detect.offline import records_to_jsonl, replay
from stillhouse.guard.detect.supervised import LabelError, fit_family_weights, read_labels
from stillhouse.guard.store import ReviewRow, open_store
from test_detect import _benign, _campaign

K = len(FAMILIES)


def test_family_weights_follow_the_labels_and_default_to_equal():
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, size=(200, K))
    y = (rng.random(200) < 0.3).astype(float)
    x[:, 2] += 4.0 * y                                    # only family 2 separates the classes
    w = fit_family_weights(x, y, prior=1.0)
    assert (w >= 0).all() and w.mean() == pytest.approx(1.0)
    assert int(np.argmax(w)) == 2 and w[2] > 2.0
    w_strong = fit_family_weights(x, y, prior=1e7)        # a strong prior keeps the weights equal
    assert np.allclose(w_strong, 1.0, atol=0.05)
    w_few = fit_family_weights(x[:12], y[:12], prior=10.0)
    assert abs(w_few[2] - 1.0) < abs(w[2] - 1.0)          # fewer labels move the weights less
    with pytest.raises(LabelError, match="both classes"):
        fit_family_weights(x[y == 0], y[y == 0], prior=1.0)


def test_read_labels_from_jsonl_and_from_a_guard_store(tmp_path):
    good = tmp_path / "labels.jsonl"
    good.write_text('{"account_id": "a", "label": 1, "verdict": "confirmed"}\n\n{"account_id": "b", "label": 0}\n')
    assert read_labels(good) == {"a": 1, "b": 0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"account_id": "a", "label": 1}\n{"account_id": "b", "label": "yes"}\n')
    with pytest.raises(LabelError, match="bad.jsonl:2"):
        read_labels(bad)
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "nope.jsonl")
    url = f"sqlite:///{tmp_path}/g.db"
    store = open_store(url)
    store.add_review(ReviewRow("r1", "d1", "a", "confirmed", 1, "x", "ann", 1.0))
    store.add_review(ReviewRow("r2", "d2", "a", "dismissed", 0, "appeal", "bo", 2.0))   # the latest review wins
    store.add_review(ReviewRow("r3", "d3", "c", "evaluator", 0, "lab", "ann", 1.5))
    store.close()
    assert read_labels(url) == {"a": 0, "c": 0}


@pytest.fixture(scope="module")
def world():
    records, infos = _benign(160, seed=1)
    labelled_benign, more = _benign(40, seed=9)
    camp = _campaign(100_000)
    labels = {aid: 0 for aid in more} | {"evil": 1}
    return records, infos | more, labelled_benign + camp, labels


def test_supervised_fit_weights_families_keeps_campaigns_out_and_round_trips(world, tmp_path):
    records, infos, labelled, labels = world
    cfg = DetectConfig(cluster_every=200, seed=0, mode="supervised")
    det = WindowDetector(cfg).fit(records + [r for r in labelled if r.account_id == "evil"], infos,
                                  labels=labels, labelled=labelled)
    w = det.family_weights_
    assert w is not None and (w >= 0).all() and w.mean() == pytest.approx(1.0)
    cal = det.calibration_
    assert cal["labelled_accounts"] == 41 and cal["labelled_campaign"] == 1
    assert cal["accounts_half_a"] + cal["accounts_half_b"] == 160      # the campaign never calibrates
    assert set(cal["family_weights"]) == set(FAMILIES)
    assert det.thresholds_["block"] >= det.thresholds_["throttle"] > 0
    det.save(tmp_path / "d")
    again = WindowDetector.load(tmp_path / "d")
    assert np.array_equal(again.family_weights_, w)
    v1 = replay(det, labelled, infos)
    v2 = replay(again, labelled, infos)
    assert v1 == v2 and v1["evil"].score > det.thresholds_["block"]
    with pytest.raises(ValueError, match="needs labels"):
        WindowDetector(cfg).fit(records, infos)
    with pytest.raises(ValueError, match="ignores them"):
        WindowDetector(DetectConfig(cluster_every=200)).fit(records, infos, labels=labels)


def test_detect_cli_fits_on_labels(world, tmp_path):
    from typer.testing import CliRunner

    from stillhouse.cli import app

    records, _, labelled, labels = world
    records_to_jsonl(records, tmp_path / "benign.jsonl")
    records_to_jsonl(labelled, tmp_path / "labelled.jsonl")
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({"account_id": a, "label": y}) + "\n"
                                                   for a, y in labels.items()))
    res = CliRunner().invoke(app, ["detect", "--fit", "--log", str(tmp_path / "benign.jsonl"), "--labels",
                                   str(tmp_path / "labels.jsonl"), "--labelled-log", str(tmp_path / "labelled.jsonl"),
                                   "--model", str(tmp_path / "det")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert meta["config"]["mode"] == "supervised" and len(meta["family_weights"]) == K
    (tmp_path / "one.jsonl").write_text('{"account_id": "evil", "label": 1}\n')
    res = CliRunner().invoke(app, ["detect", "--fit", "--log", str(tmp_path / "benign.jsonl"), "--labels",
                                   str(tmp_path / "one.jsonl"), "--labelled-log", str(tmp_path / "labelled.jsonl"),
                                   "--model", str(tmp_path / "det2")])
    assert res.exit_code == 2 and "both classes" in res.output
