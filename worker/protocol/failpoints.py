"""Failpoints: named places where a test can make a worker die, stop, stall or fail on purpose.

Points (worker/protocol/single.py): ``before_lock``, ``before_commit``, ``after_commit``.
Off unless ``ORDERONCE_FAILPOINTS`` is set, e.g. ``before_commit=kill,after_commit=stop``.
Actions: ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it), ``sleep:SECONDS``, ``raise``
(an unexpected error, as a bug would raise). ``ACTION~TEXT`` fires only for messages whose body
contains TEXT (a poison message: ``before_commit=kill~SKU-POISON``). A point may have several
rules (``before_commit=kill~FP-A,before_commit=raise~FP-B``); each that matches and has not used
up its one firing fires, in order (a ``kill`` or ``raise`` ends the list). A batch passes each of
its bodies: a rule matches when one of them contains its TEXT.

With ``ORDERONCE_FAILPOINTS_ONCE_DIR`` set, each point fires once across all processes (a marker
file is created atomically), so a restarted worker goes on normally; a rule ending in ``~once``
(``before_commit=kill~FP-A~once``) instead fires once per distinct event body, in a batch or alone
(one firing per call: a batch of two such bodies fires for the first, the other fires later), so
every event carrying FP-A kills its worker exactly once — how the chaos harness hits each window
on purpose — and one ending in ``~always`` fires every time (a poison message).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from orderonce.errors import FailpointError


@dataclass(frozen=True)
class Rule:
    action: str
    match: bytes | None = None
    once_per_body: bool = False
    always: bool = False


@cache
def _configured() -> dict[str, list[Rule]]:
    spec = os.environ.get("ORDERONCE_FAILPOINTS", "")
    points: dict[str, list[Rule]] = {}
    for item in spec.split(","):
        if "=" not in item:
            continue
        name, rule = (part.strip() for part in item.split("=", 1))
        action, _, rest = rule.partition("~")
        match, _, flag = rest.partition("~")
        points.setdefault(name, []).append(
            Rule(action, match.encode() if match else None, flag == "once", flag == "always")
        )
    return points


def _first_time(marker: str) -> bool:
    once_dir = os.environ.get("ORDERONCE_FAILPOINTS_ONCE_DIR")
    if not once_dir:
        return True
    try:
        fd = os.open(Path(once_dir) / f"{marker}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def failpoint(name: str, *bodies: bytes) -> None:
    """The point ``name`` reached with these message bodies (a batch passes each of its own)."""
    rules = _configured().get(name)
    if not rules:
        return
    for rule in rules:
        # One marker per matching body for a ``~once`` rule, one for the point otherwise.
        markers = dict.fromkeys(
            _marker(name, rule, b)
            for b in bodies or (b"",)
            if rule.match is None or rule.match in b
        )
        if not markers:
            continue
        if not rule.always and not any(_first_time(m) for m in markers):
            continue  # fired before; a later rule may still match (a batch has many bodies)
        # Every matching rule fires, in order: ``kill`` and ``raise`` end the call, but a
        # ``sleep`` or a ``stop`` (resumed later) must not hide a poison's ``raise`` behind
        # it in a batch that holds both bodies.
        _act(name, rule.action)


def _marker(name: str, rule: Rule, body: bytes) -> str:
    """Once per body is once per event's own body, in a batch or alone: an event that ended
    its batch's worker must not end it again when its redelivered message runs alone (each
    such firing is one more crash counted against a valid event's poison limit)."""
    if not rule.once_per_body:
        return name
    match = (rule.match or b"").decode(errors="replace")
    return f"{name}~{match}~{hashlib.sha256(body).hexdigest()[:24]}"


def _act(name: str, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
