"""The benchmarks' machine lines: the CPU's name (from /proc/cpuinfo, else the platform) and the load average."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average(digits: int = 1, separator: str = " / ") -> str:
    """The 1/5/15-minute load average, or "unknown" where the system has none."""
    try:
        return separator.join(f"{value:.{digits}f}" for value in os.getloadavg())
    except OSError:
        return "unknown"
