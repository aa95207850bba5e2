"""``orderonce worker`` that sends itself SIGQUIT in the middle of handing a job to a pool
process: after the header of its Nth job (``SIGQUIT_AFTER_JOBS``), before the body. That is
where Celery's cold shutdown, run inside the signal handler, waited for good for the rest of a
job it would never write (worker/messaging/cold_shutdown.py); here it lands there every time.

Run as ``python -m tests.sigquit_mid_job worker ...`` from the project's root."""

from __future__ import annotations

import os
import signal

import billiard.connection

from orderonce.cli import app

_AFTER_JOBS = int(os.environ["SIGQUIT_AFTER_JOBS"])
_MAIN_PID = os.getpid()  # pool processes are forked from this one and inherit the patch
_write = billiard.connection.send_offset
_headers = 0


def _send_offset(fd: int, buf: memoryview, offset: int) -> int:
    global _headers
    written: int = _write(fd, buf, offset)
    if os.getpid() == _MAIN_PID and len(buf) == 4 and offset + written == 4:  # a job's header
        _headers += 1
        if _headers == _AFTER_JOBS:
            os.kill(_MAIN_PID, signal.SIGQUIT)
    return written


billiard.connection.send_offset = _send_offset
app()
