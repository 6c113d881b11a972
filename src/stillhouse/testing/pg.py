"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temp dir, pg_ctl on a free port.

Needs the server binaries (Debian package ``postgresql``; ``scripts/ensure-postgres.sh``
installs them). PostgreSQL refuses to run as root, so as root every command runs as the
``postgres`` OS user through ``runuser``. ``find_pg_bin()`` returns None when the binaries
are missing, and ``skip_reason()`` says why, so tests can skip with a clear message.

    with PgCluster() as pg:
        url = pg.url            # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.stop(); pg.start()   # take it down and bring it back (same data)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Self


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl (or from PATH)."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if find_pg_bin() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
                "`bash scripts/ensure-postgres.sh` (Debian: apt-get install -y postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' OS user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root but `runuser` is missing (needed to run PostgreSQL as 'postgres')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One private PostgreSQL server; data lives in a temp dir removed on close."""

    def __init__(self) -> None:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.bin = find_pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="stillhouse-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]  # type: ignore[operator]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(self.dir), check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                " -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log.txt"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.running = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
