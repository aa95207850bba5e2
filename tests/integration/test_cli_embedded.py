"""With no URLs configured, CLI commands start the embedded servers once, reuse them, and
``orderonce down`` stops them; the data survives a restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderonce.dev.embedded import STATE_FILE


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="orderonce-cli-"))  # not pytest's 0700 tmp (see conftest)
    yield path
    subprocess.run(
        [sys.executable, "-m", "orderonce", "down"], env=_env(path), timeout=60, capture_output=True
    )
    shutil.rmtree(path, ignore_errors=True)


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERONCE_")}
    return {**env, "ORDERONCE_STATE_DIR": str(state_dir)}


def _cli(state_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "orderonce", *args],
        env=_env(state_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def _servers(state_dir: Path) -> dict[str, object]:
    return json.loads((state_dir / STATE_FILE).read_text())  # type: ignore[no-any-return]


def test_cli_starts_reuses_and_stops_the_embedded_servers(state_dir: Path) -> None:
    _cli(state_dir, "db", "upgrade")
    first = _servers(state_dir)
    restock = {
        "specversion": "1.0",
        "id": "r-1",
        "source": "cli-test",
        "time": "2026-11-25T10:00:00Z",
        "type": "inventory.restocked",
        "data": {"sku": "SKU-E", "quantity": 3},
    }
    _cli(state_dir, "stats", "--json")
    assert _servers(state_dir) == first  # reused, not restarted

    # Apply one event directly through the protocol, against the embedded servers.
    code = (
        "import sys; from orderonce.config import settings; from orderonce.dev.embedded import "
        "urls_or_embedded; from worker.store.db import make_engine; from worker.protocol.locks "
        "import EventLocks, lock_client; from worker import protocol; "
        "u = urls_or_embedded(settings()); print(protocol.process(sys.stdin.buffer.read(), "
        "engine=make_engine(u.database_url, settings()), locks=EventLocks(lock_client("
        "u.redis_url), 5000)).kind)"
    )
    applied = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(restock),
        env=_env(state_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.stdout.strip() == "applied", applied.stderr[-2000:]

    assert "embedded servers stopped" in _cli(state_dir, "down")
    assert "no embedded servers were running" in _cli(state_dir, "down")

    stock = json.loads(_cli(state_dir, "inventory", "--json"))  # starts them again
    assert stock == [{"sku": "SKU-E", "on_hand": 3, "reserved": 0}]
