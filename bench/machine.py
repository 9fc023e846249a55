"""What every benchmark records about the machine it ran on."""
from __future__ import annotations

import platform


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
