"""The job pool (distill/jobs.py): order, parallelism, threads, resume, failures, and jobs dying with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillhouse.distill.jobs import Job, JobsFailed, is_done, run_jobs

PY = sys.executable


def _record(path: Path, tag: str, sleep: float = 0.3) -> tuple[str, ...]:
    """A command that appends 'tag start/end time threads' lines to ``path``."""
    code = (f"import os, time; f = open({str(path)!r}, 'a'); f.write('{tag} start %f %s\\n' % (time.time(), "
            f"os.environ['OMP_NUM_THREADS'])); f.flush(); time.sleep({sleep}); "
            f"f.write('{tag} end %f x\\n' % time.time())")
    return (PY, "-c", code)


def _spans(path: Path) -> dict[str, tuple[float, float, str]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    start = {r[0]: (float(r[2]), r[3]) for r in rows if r[1] == "start"}
    end = {r[0]: float(r[2]) for r in rows if r[1] == "end"}
    return {k: (start[k][0], end[k], start[k][1]) for k in start}


def test_costliest_first_two_at_a_time_with_their_threads(tmp_path):
    trace = tmp_path / "trace.txt"
    # 2 s each for the pair, so they overlap even when a loaded machine starts the second Python late
    jobs = [Job("small", (_record(trace, "small"),), cost=1), Job("big", (_record(trace, "big", 2.0),), cost=9),
            Job("mid", (_record(trace, "mid", 2.0),), cost=5)]
    lines: list[str] = []
    res = run_jobs(jobs, tmp_path / "logs", parallel=2, threads_each=3, log=lines.append, poll_s=0.05)
    spans = _spans(trace)
    assert {r.name: r.status for r in res} == {"big": "done", "mid": "done", "small": "done"}
    assert all(t == "3" for _, _, t in spans.values())
    assert lines[0].startswith("job big started") and lines[1].startswith("job mid started")
    assert spans["small"][0] >= min(spans["big"][1], spans["mid"][1]), "the third job waits for a free slot"
    assert spans["big"][0] < spans["mid"][1] and spans["mid"][0] < spans["big"][1], "two run side by side"
    done = json.loads((tmp_path / "logs" / "big.done").read_text())
    assert done["commands"] == [list(jobs[1].commands[0])] and done["seconds"] >= 2.0
    assert all(is_done(j, tmp_path / "logs") for j in jobs)


def test_commands_run_in_order_a_failure_stops_its_job_and_a_rerun_resumes(tmp_path):
    trace, flag = tmp_path / "trace.txt", tmp_path / "ok"
    gate = (PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)")
    jobs = [Job("a", (_record(trace, "a1", 0.05), gate, _record(trace, "a2", 0.05))),
            Job("b", (_record(trace, "b1", 0.05), _record(trace, "b2", 0.05)))]
    with pytest.raises(JobsFailed, match=r"\['a'\] failed") as err:
        run_jobs(jobs, tmp_path / "logs", parallel=1, poll_s=0.05)
    assert err.value.failed == ["a"]
    assert set(_spans(trace)) == {"a1", "b1", "b2"}, "a stopped at its gate; b ran to the end"
    assert _spans(trace)["b1"][1] <= _spans(trace)["b2"][0]
    assert "$ " in (tmp_path / "logs" / "a.log").read_text() and not (tmp_path / "logs" / "a.done").exists()
    flag.touch()
    res = run_jobs(jobs, tmp_path / "logs", parallel=2, poll_s=0.05)
    assert {r.name: r.status for r in res} == {"a": "done", "b": "skipped"}
    assert sorted(_spans(trace)) == ["a1", "a2", "b1", "b2"], "b was not run again"
    changed = [Job("b", (_record(trace, "b3", 0.05),))]
    assert [r.status for r in run_jobs(changed, tmp_path / "logs", poll_s=0.05)] == ["done"], "new commands rerun"


def test_bad_jobs_are_refused():
    with pytest.raises(ValueError, match="job name"):
        Job("a b", ((PY,),))
    with pytest.raises(ValueError, match="non-empty argv"):
        Job("a", ((),))
    with pytest.raises(ValueError, match="names repeat"):
        run_jobs([Job("a", ((PY, "-V"),)), Job("a", ((PY, "-V"),))], "/tmp/never")
    with pytest.raises(ValueError, match="parallel=0"):
        run_jobs([], "/tmp/never", parallel=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_jobs_die_with_their_parent(tmp_path):
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = (f"from stillhouse.distill.jobs import Job, run_jobs; "
              f"run_jobs([Job('sleeper', (({PY!r}, '-c', {child!r}),))], {str(tmp_path / 'logs')!r})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([PY, "-c", parent], env=env)
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the job outlived its killed parent")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (whoever adopted it may be slow to)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_run_stages_skips_finished_stages_touches_markers_and_times_the_rest(tmp_path):
    from stillhouse.distill.jobs import run_stages

    ran: list[str] = []

    def make(name, writes=None, result=None):
        def stage(args, out):
            ran.append(name)
            if writes:
                (out / writes).write_text("x")
            return result
        return stage

    funcs = {"split": make("split", writes="items.jsonl"), "teacher": make("teacher"),
             "noop": make("noop", result=False), "report": make("report")}
    done = {"split": "items.jsonl", "teacher": "evals/.teacher-done"}
    order = ("split", "teacher", "noop", "report")
    run_stages(tmp_path, order, funcs, None, done, touch=("teacher",), log=lambda _: None)
    assert ran == list(order)
    assert (tmp_path / "evals" / ".teacher-done").exists()
    timed = [json.loads(line)["stage"] for line in (tmp_path / "times.jsonl").read_text().splitlines()]
    assert timed == ["split", "teacher"], "a stage that did nothing, and the report, are not timed"
    ran.clear()
    run_stages(tmp_path, order, funcs, None, done, touch=("teacher",), log=lambda _: None)
    assert ran == ["noop", "report"], "finished stages are skipped on a rerun"
