"""Independent jobs side by side over the CPU cores, resumable: an experiment's many training runs.

    from stillhouse.distill.jobs import Job, run_jobs
    jobs = [Job("sft-n4000", (("stillhouse", "train", "--config", "sft.json"),
                              ("stillhouse", "eval", "--config", "eval-sft.json")), cost=4000), ...]
    run_jobs(jobs, "runs/exp/jobs", parallel=2, threads_each=1)

A job is a name and commands (argv lists, no shell) run one after another; it succeeds when every
command exits 0. Jobs start in decreasing ``cost`` (ties keep the list order), ``parallel`` at a
time, each with ``threads_each`` CPU threads (``OMP_NUM_THREADS``, torch's intra-op threads). On a
2-core machine two one-thread training processes made 1.35x the tokens/s of one two-thread process
(median per-step tokens/s, measured: 413 + 430 against 625): a 10-example step does not keep two
threads busy.

In ``log_dir``: ``<name>.log`` (its commands' stdout and stderr, appended) and, once it succeeded,
``<name>.done`` (JSON: the commands, start, end, seconds, load). Resume: a job whose ``.done`` holds
the same commands is skipped, so rerunning after a kill or a failure runs only the rest (each
command resumes on its own, as ``train`` does from its checkpoints). Children get SIGKILL when this
process dies (Linux ``PR_SET_PDEATHSIG``): a killed run leaves no job behind to race its rerun.

Errors: :class:`JobsFailed` (a RuntimeError) once every job has run, naming the failed ones.

An experiment's stages around those jobs (split, harvest, train, report, ...) run through
:func:`run_stages`: in order, each skipped once its output exists, with its wall time and the load
appended to ``OUT/times.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from stillhouse.config import atomic_write_text

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Job:
    """One job: commands run in order, in one slot of the pool."""

    name: str
    """Names its log and marker files: letters, digits, '.', '_' and '-'."""
    commands: tuple[tuple[str, ...], ...]
    """argv lists, run one after another; the job stops at the first that fails."""
    cost: float = 0.0
    """Expected run time in any unit: the costliest jobs start first, so the pool ends together."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"job name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.commands or any(not c or not all(isinstance(a, str) for a in c) for c in self.commands):
            raise ValueError(f"job {self.name}: commands must be non-empty argv lists of strings")


@dataclass
class JobResult:
    """How one job ended."""

    name: str
    status: Literal["done", "skipped", "failed"]
    seconds: float
    returncode: int = 0


class JobsFailed(RuntimeError):
    """Some jobs failed; the others ran to the end. Rerunning the same jobs resumes."""

    def __init__(self, failed: list[str], log_dir: Path):
        super().__init__(f"jobs {failed} failed: see {log_dir}/<job>.log; run the same jobs again to resume "
                         "(finished jobs are skipped)")
        self.failed = failed


def is_done(job: Job, log_dir: str | os.PathLike[str]) -> bool:
    """True when ``job`` finished before with the same commands."""
    try:
        return json.loads((Path(log_dir) / f"{job.name}.done").read_text())["commands"] == \
            [list(c) for c in job.commands]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_jobs(jobs: Sequence[Job], log_dir: str | os.PathLike[str], parallel: int = 2, threads_each: int = 1,
             env: Mapping[str, str] | None = None, log: Callable[[str], None] | None = None,
             poll_s: float = 0.2) -> list[JobResult]:
    """Run ``jobs`` (see the module docstring); one result per job, in the order they ended.

    ``env`` adds to the inherited environment; ``log`` gets one line when a job starts or ends."""
    if parallel < 1 or threads_each < 1:
        raise ValueError(f"parallel={parallel}, threads_each={threads_each}: both must be at least 1")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    out = Path(log_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    child_env = {**os.environ, **(env or {}), "TOKENIZERS_PARALLELISM": "false",
                 **{k: str(threads_each) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    results = [JobResult(j.name, "skipped", 0.0) for j in jobs if is_done(j, out)]
    pending = sorted((j for j in jobs if not is_done(j, out)), key=lambda j: -j.cost)
    running: dict[str, _Running] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                running[job.name] = _Running(job, out, child_env)
                say(f"job {job.name} started: log {out / job.name}.log")
            time.sleep(poll_s)
            for name, r in list(running.items()):
                rc = r.poll()
                if rc is None:
                    continue
                del running[name]
                seconds = time.time() - r.t0
                if rc == 0:
                    atomic_write_text(out / f"{name}.done", json.dumps({
                        "commands": [list(c) for c in r.job.commands], "threads": threads_each,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.t0)),
                        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1),
                        "load1": round(os.getloadavg()[0], 2)}, indent=2) + "\n")
                say(f"job {name} " + ("done" if rc == 0 else f"FAILED (exit {rc})") + f" after {seconds:.0f}s")
                results.append(JobResult(name, "done" if rc == 0 else "failed", seconds, rc))
    finally:
        for r in running.values():
            r.kill()
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        raise JobsFailed(failed, out)
    return results


class _Running:
    """A job in flight: its current command's process and the log they share."""

    def __init__(self, job: Job, log_dir: Path, env: dict[str, str]):
        self.job, self.env, self.index, self.t0 = job, env, 0, time.time()
        self.log: IO[bytes] = (log_dir / f"{job.name}.log").open("ab")
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        cmd = self.job.commands[self.index]
        self.log.write(f"$ {' '.join(cmd)}\n".encode())
        self.log.flush()
        parent = os.getpid()
        # preexec_fn (prctl in the child before exec) is the only way to tie a child's life to ours; the
        # pool starts its children from one thread.
        return subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                preexec_fn=lambda: _die_with_parent(parent))  # noqa: PLW1509

    def poll(self) -> int | None:
        """None while running; else the job's exit status (its next command is started meanwhile)."""
        rc = self.proc.poll()
        if rc == 0 and self.index + 1 < len(self.job.commands):
            self.index += 1
            self.proc = self._start()
            return None
        if rc is not None:
            self.log.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the parent dies; exit at once if it already has."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a killed parent leaves its jobs running to the end
    if os.getppid() != parent:
        os._exit(1)


def run_stages(out: Path, todo: Sequence[str], funcs: Mapping[str, Callable[[Any, Path], bool | None]], args: Any,
               done: Mapping[str, str], touch: Sequence[str] = (), log: Callable[[str], None] = print) -> None:
    """Run ``funcs[name](args, out)`` for each stage in ``todo``, in order.

    A stage named in ``done`` is skipped when ``out / done[name]`` exists (its output); the stages in ``touch``
    write no such output, so theirs is an empty marker touched after they ran. A stage that returns False did nothing
    (its latest wall time stands); the others append ``{"stage", "seconds", "load1", "finished"}`` to
    ``out/times.jsonl``, except ``report``, which only reads what the others wrote.
    """
    for name in todo:
        marker = out / done[name] if name in done else None
        if marker is not None and marker.exists():
            continue
        log(f"stage {name}")
        t0 = time.time()
        if funcs[name](args, out) is False or name == "report":
            continue
        if marker is not None and name in touch:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        row = {"stage": name, "seconds": round(time.time() - t0, 1), "load1": round(os.getloadavg()[0], 2),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        with (out / "times.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def cli_job(name: str, commands: Sequence[Sequence[str]], cost: float = 0.0) -> Job:
    """A job of ``stillhouse`` verbs (``("train", "--config", F)``, ...) run by this Python (``-m stillhouse``)."""
    return Job(name, tuple((sys.executable, "-m", "stillhouse", *c) for c in commands), cost)


def code_env() -> dict[str, str]:
    """PYTHONPATH with this package's source first, so child processes run the same code as this one (a
    checkout that is not installed, or a worktree beside an installed one)."""
    import stillhouse

    src = str(Path(stillhouse.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
