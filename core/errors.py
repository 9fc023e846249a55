"""One clear line for any failure a user can meet: what went wrong and what to do, never a traceback."""
from __future__ import annotations

import errno

# What SQLite says (inside sqlalchemy's OperationalError) when the runs database cannot take writes.
_DB_READ_ONLY = ("readonly", "read-only")
_DB_FULL = ("database or disk is full",)
_DB_GONE = ("unable to open", "no such table", "disk i/o")


def _database_error(error: BaseException) -> str | None:
    """The lower-cased text of a database error (sqlalchemy's, recognised without importing it), else None."""
    name = type(error).__name__
    if name == "OperationalError" or name.endswith("DatabaseError"):
        return str(error).lower()
    return None


def database_unwritable(error: BaseException) -> bool:
    """Whether `error` says the runs database cannot take writes (read-only, disk full, removed): waiting
    does not fix these, unlike a locked database or a database server that is restarting."""
    text = _database_error(error)
    return text is not None and any(words in text for words in _DB_READ_ONLY + _DB_FULL + _DB_GONE)


def user_message(error: BaseException) -> str:
    """The sentence the CLI prints, the dashboard shows and a failed job records first."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"the disk holding {error.filename}" if error.filename else "the disk"
        return f"{where} is full; free some space and run it again: nothing half-written was kept"
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {error.filename or 'a file'}: permission denied or a read-only file system"
    if isinstance(error, FileNotFoundError):
        return f"{error.filename or text}: no such file or folder"
    name = type(error).__name__
    low = _database_error(error)
    if low is not None:
        if any(words in low for words in _DB_READ_ONLY):
            return ("the runs database is read-only: check the permissions of its file and folder "
                    "(or ENSEMBLE_DB_URL) and try again")
        if any(words in low for words in _DB_FULL):
            return "the disk holding the runs database is full; free some space and try again"
        if any(words in low for words in _DB_GONE):
            return ("the runs database cannot be opened or was removed or replaced; restart the dashboard and "
                    "the worker so they open it again")
        return f"the runs database failed: {text.splitlines()[0][:300]}"
    if type(error).__module__.startswith("core.") or (
            isinstance(error, (ValueError, LookupError, TypeError)) and name not in ("KeyError", "IndexError", "TypeError")):
        return _one_line(text)  # the project's own errors already say what to do
    return f"{name}: {text.splitlines()[0][:300]}"


def _one_line(text: str) -> str:
    """A message's lines as one line; the items of a listing (e.g. the files in conflict) joined by "; "."""
    joined = ""
    for line in filter(None, (line.strip() for line in text.splitlines())):
        joined += line if not joined else (" " if joined[-1] in ".:;," else "; ") + line
    return joined
