"""The workspace folder: where the runs database, cached embeddings, thumbnails and heads live."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "workspace"


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
    def db_url(self) -> str:
        """$ENSEMBLE_DB_URL (any SQLAlchemy URL, e.g. PostgreSQL shared by several workers), else SQLite here."""
        return os.environ.get("ENSEMBLE_DB_URL") or f"sqlite:///{self.root / 'runs.db'}"
