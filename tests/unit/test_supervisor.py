"""The supervisor of the default pool (worker/messaging/supervisor.py) with real child
processes that stand in for consumers: what it does when one exits. The pool with real
consumers is tests/integration/test_default_pool.py."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from worker.messaging.supervisor import REFUSED, Supervisor


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_refuses_its_settings_stops_the_others() -> None:
    exited: list[int] = []
    supervisor = Supervisor(
        [
            _python("import time; time.sleep(60)"),
            _python(f"import sys, time; time.sleep(0.3); sys.exit({REFUSED})"),
        ],
        on_exit=exited.append,
    )
    started = time.monotonic()
    assert supervisor.run() == REFUSED
    assert time.monotonic() - started < 30  # the sleeper was stopped, not waited for
    assert len(exited) == 2


def test_a_child_that_dies_is_started_again_until_a_signal_stops_all(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    # First start: dies (as if killed). Second: asks the supervisor to stop, as an operator's
    # SIGTERM would, and waits for its own SIGTERM.
    child = _python(
        "import os, signal, sys, time\n"
        f"p = {str(starts)!r}\n"
        "n = len(open(p).read()) if os.path.exists(p) else 0\n"
        "open(p, 'a').write('x')\n"
        "if n == 0:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    handler = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert Supervisor([child]).run() == 0
    assert time.monotonic() - started < 30
    assert starts.read_text() == "xx"
    assert signal.getsignal(signal.SIGTERM) == handler  # the test process's own, back
