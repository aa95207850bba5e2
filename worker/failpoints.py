"""Failpoints: named places where a test can make a worker die, stop, stall or fail on purpose.

Points (worker/exactly_once.py): ``before_lock``, ``before_commit``, ``after_commit``.
Off unless ``ORDERONCE_FAILPOINTS`` is set, e.g. ``before_commit=kill,after_commit=stop``.
Actions: ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it), ``sleep:SECONDS``, ``raise``
(an unexpected error, as a bug would raise). ``ACTION~TEXT`` fires only for messages whose body
contains TEXT (a poison message: ``before_commit=kill~SKU-POISON``). With
``ORDERONCE_FAILPOINTS_ONCE_DIR`` set, each failpoint fires once across all processes (a marker
file is created atomically), so a restarted worker goes on normally.
"""

from __future__ import annotations

import os
import signal
import time
from functools import cache
from pathlib import Path


class FailpointError(RuntimeError):
    pass


@cache
def _configured() -> dict[str, tuple[str, bytes | None]]:
    spec = os.environ.get("ORDERONCE_FAILPOINTS", "")
    points: dict[str, tuple[str, bytes | None]] = {}
    for item in spec.split(","):
        if "=" not in item:
            continue
        name, action = (part.strip() for part in item.split("=", 1))
        action, _, match = action.partition("~")
        points[name] = (action, match.encode() if match else None)
    return points


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


def failpoint(name: str, body: bytes = b"") -> None:
    configured = _configured().get(name)
    if configured is None:
        return
    action, match = configured
    if (match is not None and match not in body) or not _first_time(name):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
