"""A throwaway PostgreSQL server for the job queue tests: Debian's binaries, a data folder and a
unix socket in one temporary folder, nothing listening on the network, removed afterwards.

PostgreSQL refuses to run as root, and CI runs the tests as root: there the server runs as the
`postgres` system user that Debian's package creates.
"""
from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DATABASE = "ensemble_test"
PORT = 5432  # only names the socket file; the socket lives in a folder of our own
INSTALL_HINT = "run `bash scripts/setup.sh --tests` (installs Debian's postgresql and psycopg)"


def bindir() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's newest version, else whatever PATH has."""
    def version(pg_ctl: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in pg_ctl.parts[-3].split("."))

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=version)
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def missing() -> str | None:
    """Why no throwaway server can be started here, or None if it can."""
    if bindir() is None:
        return f"PostgreSQL's server binaries (initdb, pg_ctl) are not installed: {INSTALL_HINT}"
    if importlib.util.find_spec("psycopg") is None:
        return f"the PostgreSQL driver psycopg is not installed: {INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return ("running as root, and there is no `postgres` user to run the server as"
                    " (PostgreSQL refuses root)")
    return None


@contextmanager
def throwaway_database() -> Iterator[str]:
    """Start a fresh server with one empty database; yield its SQLAlchemy URL; stop and remove it.

    Durability is switched off (fsync, synchronous_commit): the data is thrown away anyway.
    """
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    bin_ = bindir()
    root = Path(tempfile.mkdtemp(prefix="ensemble-pg-"))
    as_server_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(root, pwd.getpwnam("postgres").pw_uid, -1)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"

    def run(*command: str | Path) -> None:
        # cwd: the server user may not be allowed into the caller's working directory.
        done = subprocess.run([*as_server_user, *map(str, command)], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{Path(command[0]).name} failed (exit {done.returncode}) for the throwaway PostgreSQL "
                f"server in {root}:\n{done.stdout}{done.stderr}{server_log}"
            )

    started = False
    try:
        run(bin_ / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{root}'\n"
                f"port = {PORT}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        run(bin_ / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start")
        started = True
        run(bin_ / "createdb", "-h", root, "-p", str(PORT), "-U", "postgres", DATABASE)
        yield f"postgresql+psycopg://postgres@/{DATABASE}?host={root}&port={PORT}"
    finally:
        try:
            if started:
                run(bin_ / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)
