"""orderonce/cpus.py: the default number of worker processes is the CPUs this process may use,
not the host's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orderonce.cpus import cpu_limit, usable_cpus


def _cgroup(root: Path, files: dict[str, str], membership: str = "") -> Path:
    """A cgroup mount at ``root`` holding ``files``; a v2 one when ``membership`` says so."""
    if membership.startswith("0::"):
        files = {"cgroup.controllers": "cpu memory", **files}
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


V2, V1 = "0::/", "2:cpu,cpuacct:/\n1:memory:/"  # /proc/self/cgroup in a container


@pytest.mark.parametrize(
    ("files", "membership", "limit"),
    [
        ({"cpu.max": "200000 100000"}, V2, 2.0),  # cgroup v2, docker --cpus 2
        ({"cpu.max": "150000 100000"}, V2, 1.5),
        ({"cpu.max": "max 100000"}, V2, None),
        ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, V1, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, V1, None),
        ({"cpu.max": "garbage"}, V2, None),
        ({}, V2, None),  # no cgroup files: not Linux, or no cpu controller
        ({}, "", None),
        # A service's own cgroup, below the root: a systemd CPUQuota=50%.
        (
            {"cpu.max": "max 100000", "system.slice/oo.service/cpu.max": "50000 100000"},
            "0::/system.slice/oo.service",
            0.5,
        ),
        # The smallest along the path: a pod's limit below its container's.
        (
            {"pod/cpu.max": "100000 100000", "pod/c1/cpu.max": "300000 100000"},
            "0::/pod/c1",
            1.0,
        ),
        # A path of another cgroup namespace than the mount's: the mount's root decides.
        ({"cpu.max": "200000 100000"}, "0::/docker/abc", 2.0),
    ],
)
def test_the_cgroup_cpu_limit_is_read_from_either_version(
    tmp_path: Path, files: dict[str, str], membership: str, limit: float | None
) -> None:
    assert cpu_limit(_cgroup(tmp_path, files, membership), membership) == limit


def test_a_cpu_limit_caps_the_count_rounded_up(tmp_path: Path) -> None:
    own = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path / "none", {}, V2), V2) == own
    assert usable_cpus(_cgroup(tmp_path / "half", {"cpu.max": "50000 100000"}, V2), V2) == 1
    big = _cgroup(tmp_path / "big", {"cpu.max": f"{(own + 8) * 100000} 100000"}, V2)
    assert usable_cpus(big, V2) == own  # a limit above the CPUs the process has changes nothing


def test_a_process_pinned_to_one_cpu_counts_one() -> None:
    # A real affinity mask (taskset -c 0, a cpuset), set on a real process.
    pinned = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
            " from orderonce.cpus import usable_cpus; print(usable_cpus(), os.cpu_count())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    counted, host = pinned.stdout.split()
    assert counted == "1"
    assert host == str(os.cpu_count())  # what the default was before
