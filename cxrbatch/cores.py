"""How many cores this process may use: the default number of screening workers and threads.

`os.cpu_count()` counts the machine's cores, not the process's: in a container limited to 2 CPUs
on a 64-core host it says 64, and 64 workers would each hold a batch and a set of onnxruntime
buffers to share 2 cores. This counts the cores of the process's CPU affinity (`taskset`, a batch
scheduler's pinning), capped by its cgroup v2 CPU quota (`docker --cpus`, Kubernetes limits).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        cores = os.cpu_count() or 1
    quota = cgroup_quota(cpu_max)
    return max(1, min(cores, quota) if quota else cores)


def cgroup_quota(cpu_max: Path) -> int | None:
    """The CPUs a cgroup v2 `cpu.max` file ("QUOTA PERIOD", or "max PERIOD" for none) allows,
    rounded up; None without a readable limit."""
    try:
        fields = cpu_max.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None
