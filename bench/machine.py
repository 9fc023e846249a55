"""What every benchmark records about the machine it ran on, how it times a call, and how it writes its JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from core.files import atomic_write_text


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> tuple[object, float]:
    """fn()'s value and the wall-clock seconds it took."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def write_result(result: dict, path: str | Path, summary: str | None = None, text: str | None = None) -> Path:
    """Write the benchmark's JSON (`text`, default `result` indented) atomically to `path`, then print
    `summary` (default: the JSON) and where it went."""
    text = text if text is not None else json.dumps(result, indent=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    print(summary if summary is not None else text)
    print(f"wrote {path}")
    return path
