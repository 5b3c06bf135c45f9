"""This CPU's feature flags as Linux lists them. No imports from the package or torch: setup.py
loads this file by path to record what a native build may use, and ``ops`` checks a build's
record against the same list when it loads the extension, so the two always read it alike."""
from __future__ import annotations


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo, or None where there is no
    such list (another OS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None
