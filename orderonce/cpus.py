"""How many CPUs this process may use: the default number of worker processes.

``os.cpu_count()`` counts the host's CPUs. A container limited to 2 CPUs on a 64-core host
would start 64 consumer processes, and more consumers than cores make the buffered pool
slower, not faster (docs/performance.md: 2 processes drain about twice as fast as 4 on 2
cores). So the count is the CPU affinity (taskset, cpusets) capped by the CPU bandwidth limit
of the process's cgroup and those above it (a container's ``--cpus``, a Kubernetes CPU limit,
a systemd ``CPUQuota=``), rounded up.

(loky's ``cpu_count`` reads a container's limit the same way, not a cgroup's below the mount
such as a systemd service's, and would bring cloudpickle and a process executor with it.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, membership: str | None = None) -> int:
    """CPUs this process may use, at least 1 (``membership``: as for ``cpu_limit``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, NotImplementedError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cpu_limit(cgroup_root, membership)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cpu_limit(cgroup_root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPU bandwidth limit of the process's cgroup in CPUs (quota / period), the smallest
    along its path to the root (a Kubernetes pod's, a systemd ``CPUQuota=``, a container's),
    or None when there is none. ``membership``: /proc/self/cgroup. In a container the
    process's cgroup is the root of its view, and so are the files."""
    if membership is None:
        membership = _read(Path("/proc/self/cgroup")) or ""
    limits = [
        limit
        for directory, version in _cgroup_path(cgroup_root, membership)
        if (limit := _limit_in(directory, version)) is not None
    ]
    return min(limits, default=None)


def _cgroup_path(root: Path, membership: str) -> list[tuple[Path, int]]:
    """The process's cgroup directories with the cpu controller, from its own to the root:
    cgroup v2 (``0::/path``) or v1 (``N:cpu,cpuacct:/path``)."""
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and (root / "cgroup.controllers").exists():  # a v2 mount
            base, version = root, 2
        elif "cpu" in controllers.split(","):
            base, version = root / "cpu", 1
        else:
            continue
        own = base / path.strip("/")
        if not own.is_dir():  # the path of another namespace than the mount's: the root only
            own = base
        return [(d, version) for d in (own, *own.parents) if d == base or base in d.parents]
    return [(root, 2), (root / "cpu", 1)]


def _limit_in(directory: Path, version: int) -> float | None:
    if version == 2:  # "max 100000" or "200000 100000"
        parts = (_read(directory / "cpu.max") or "").split()
        return _ratio(parts[0], parts[1]) if len(parts) == 2 else None
    quota = _read(directory / "cpu.cfs_quota_us")  # -1 for none
    period = _read(directory / "cpu.cfs_period_us")
    return None if quota is None or period is None else _ratio(quota, period)


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
