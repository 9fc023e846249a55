"""One clear line for any failure a user can meet: what went wrong and what to do, never a traceback."""
from __future__ import annotations

import errno


def user_message(error: BaseException) -> str:
    """The sentence the CLI prints, the dashboard shows and a failed job records first."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (f"the disk is full ({error.filename or 'while writing'}); free some space and run it again: "
                "nothing half-written was kept")
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {error.filename or 'a file'}: permission denied or a read-only file system"
    if isinstance(error, FileNotFoundError):
        return f"{error.filename or text}: no such file or folder"
    name = type(error).__name__
    if name == "OperationalError" or name.endswith("DatabaseError"):  # sqlalchemy's, without importing it here
        low = text.lower()
        if "readonly" in low or "read-only" in low:
            return "the runs database is read-only: check its file's permissions (or ENSEMBLE_DB_URL) and try again"
        if "unable to open" in low or "no such table" in low or "disk i/o" in low:
            return ("the runs database cannot be opened or was removed or replaced; restart the dashboard and "
                    "the worker so they open it again")
        return f"the runs database failed: {text.splitlines()[0][:300]}"
    if isinstance(error, (ValueError, LookupError, TypeError)) and name not in ("KeyError", "IndexError", "TypeError"):
        return text  # the project's own errors (ValueError subclasses) already say what to do
    return f"{name}: {text.splitlines()[0][:300]}"
