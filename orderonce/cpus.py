"""How many CPUs this process may use: the default number of worker processes.

``os.cpu_count()`` counts the host's CPUs. A container limited to 2 CPUs on a 64-core host
would start 64 consumer processes, and more consumers than cores make the buffered pool
slower, not faster (docs/performance.md: 2 processes drain about twice as fast as 4 on 2
cores). So the count is the CPU affinity (taskset, cpusets) capped by the cgroup's CPU
bandwidth limit (a container's ``--cpus``, a Kubernetes CPU limit), rounded up.

(loky's ``cpu_count`` does the same, but would bring cloudpickle and a process executor for
this one function.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, NotImplementedError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cpu_limit(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU bandwidth limit in CPUs (quota / period), or None when there is none.
    The files of the process's own cgroup as it sees them: in a container, its cgroup is the
    root of the view, and so are these files."""
    v2 = _read(cgroup_root / "cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if v2 is not None:
        parts = v2.split()
        return _ratio(parts[0], parts[1]) if len(parts) == 2 else None
    quota = _read(cgroup_root / "cpu" / "cpu.cfs_quota_us")  # cgroup v1: -1 for none
    period = _read(cgroup_root / "cpu" / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
