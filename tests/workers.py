"""Real Celery worker processes for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from orderonce.dev.processes import WorkerProcess
from orderonce.dev.processes import wait_until as _wait_until

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll until ``check()`` is truthy; fail the test naming ``what`` after ``timeout``."""
    try:
        return _wait_until(check, timeout, what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def wait_exited(workers: Sequence[WorkerProcess], timeout: float, what: str) -> None:
    """Wait for every worker's main process to exit; on a timeout the failure names those still
    running, their pool processes and the end of their logs (a hung shutdown says where)."""
    try:
        _wait_until(lambda: not any(w.alive() for w in workers), timeout, what)
    except TimeoutError as exc:
        report = [str(exc)]
        for w in workers:
            if w.alive():
                report.append(f"--- {w.name} (pid {w.proc.pid}, children {w.children()}) log tail:")
                report.append(w.text()[-3000:])
        raise AssertionError("\n".join(report)) from None


class WorkerFactory:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self._env = env
        self._tmp = tmp
        self.started: list[WorkerProcess] = []

    def start(
        self,
        name: str = "w",
        *,
        pool: str = "solo",
        concurrency: int = 1,
        ready: bool = True,
        args: Sequence[str] = (),
        entry: Sequence[str] = ("-m", "orderonce"),
        **env: str,
    ) -> WorkerProcess:
        """Start ``orderonce worker`` with extra CLI ``args`` and extra ``env`` variables."""
        full_env = {**os.environ, **self._env, **env}
        n = len(self.started)
        worker = WorkerProcess(
            f"{name}{n}", full_env, self._tmp / f"{name}{n}.log", pool, concurrency, args, entry
        )
        self.started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.alive():
                worker.kill()


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """``orderonce ARGS`` in a subprocess with the session's environment."""
    result = subprocess.run(
        [sys.executable, "-m", "orderonce", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
    )
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result
