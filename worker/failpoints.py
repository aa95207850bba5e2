"""Failpoints: named places where a test can make a worker die, stop or stall on purpose.

Off unless ``ORDERONCE_FAILPOINTS`` is set, e.g. ``before_commit=kill,after_commit=stop``.
Actions: ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it), ``sleep:SECONDS``.
With ``ORDERONCE_FAILPOINTS_ONCE_DIR`` set, each failpoint fires once across all processes
(a marker file is created atomically), so a restarted worker goes on normally.
"""

from __future__ import annotations

import os
import signal
import time
from functools import cache
from pathlib import Path

POINTS = ("before_lock", "before_commit", "after_commit")


@cache
def _configured() -> dict[str, str]:
    spec = os.environ.get("ORDERONCE_FAILPOINTS", "")
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {name.strip(): action.strip() for name, action in pairs}


def _first_time(name: str) -> bool:
    once_dir = os.environ.get("ORDERONCE_FAILPOINTS_ONCE_DIR")
    if not once_dir:
        return True
    try:
        fd = os.open(Path(once_dir) / f"{name}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def failpoint(name: str) -> None:
    action = _configured().get(name)
    if action is None or not _first_time(name):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
