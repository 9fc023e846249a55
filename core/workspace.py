"""The workspace folder: where the runs database, cached embeddings, thumbnails and heads live."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from core.files import atomic_write_text

DEFAULT_ROOT = "workspace"
WORKER_EXIT_FILE = "worker-exit.json"


@dataclass(frozen=True)
class WorkerExit:
    """Why the last worker on this workspace stopped on a problem, for the dashboard to show."""

    message: str  # one line, core.errors.user_message style
    pid: int
    host: str
    at: str  # ISO 8601, UTC
    db: str  # the runs database it used (password hidden)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Workspace":
        """`root`, else $ENSEMBLE_WORKSPACE, else ./workspace; created if absent."""
        path = Path(root or os.environ.get("ENSEMBLE_WORKSPACE") or DEFAULT_ROOT).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def embeddings(self) -> Path:
        return self.folder("embeddings")

    @property
    def datasets(self) -> Path:
        return self.folder("datasets")

    @property
    def thumbnails(self) -> Path:
        return self.folder("thumbnails")

    @property
    def heads(self) -> Path:
        return self.folder("heads")

    @property
    def probes(self) -> Path:
        """What opening each dataset learned of its files (core.datasets), so the next open reads only changes."""
        return self.folder("probes")

    @property
    def db_url(self) -> str:
        """$ENSEMBLE_DB_URL (any SQLAlchemy URL, e.g. PostgreSQL shared by several workers), else SQLite here."""
        return os.environ.get("ENSEMBLE_DB_URL") or f"sqlite:///{self.root / 'runs.db'}"

    @property
    def worker_exit_file(self) -> Path:
        return self.root / WORKER_EXIT_FILE

    def record_worker_exit(self, message: str, *, db: str) -> bool:
        """Keep why a worker stopped where the dashboard reads it (a worker's log may be anywhere). False
        when the file cannot be written (a read-only or full workspace): the worker's log line remains."""
        record = WorkerExit(message=message, pid=os.getpid(), host=socket.gethostname(),
                            at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), db=db)
        try:
            atomic_write_text(self.worker_exit_file, json.dumps(asdict(record), indent=1))
        except OSError:
            return False
        return True

    def clear_worker_exit(self) -> None:
        """A worker started fine: an older worker's problem is no longer news."""
        try:
            self.worker_exit_file.unlink(missing_ok=True)
        except OSError:
            pass

    def last_worker_exit(self) -> WorkerExit | None:
        """The problem the last worker stopped on, or None (none recorded, or a file that is not ours)."""
        try:
            with open(self.worker_exit_file, "rb") as handle:
                values = json.loads(handle.read(65536))
            return WorkerExit(message=str(values["message"]), pid=int(values["pid"]), host=str(values["host"]),
                              at=str(values["at"]), db=str(values["db"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None
