"""Writing files so that a crash or a kill never leaves one that looks complete: the one atomic write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write `target` through `write(handle)` into a temp file beside it, fsync it, `os.replace` it
    over the target and fsync the folder: readers see the old file or the whole new one, never a part,
    and the new one survives a power cut once this returns."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(target.parent)
    return target


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(target, lambda handle: handle.write(data))


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda handle: handle.write(text.encode("utf-8")))
