"""The embedded servers are real processes: these tests start, kill and restart them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from orderonce.dev.embedded import (
    STATE_FILE,
    EmbeddedServers,
    PrivatePostgres,
    PrivateRedis,
    ensure_servers,
    stop_servers,
)
from orderonce.errors import EmbeddedServerError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    # Not under pytest's basetemp when root: every pytest session that starts resets
    # /tmp/pytest-of-root to 0700, which would cut off the unprivileged PostgreSQL account in the
    # middle of an initdb should another session (another engineer's, say) start meanwhile.
    if os.geteuid() != 0:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="orderonce-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    stop_servers(path)


def psycopg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def recorded_pids(state_dir: Path) -> dict[str, int]:
    state = json.loads((state_dir / STATE_FILE).read_text())
    return {name: state[name]["pid"] for name in ("postgres", "redis")}


def processes_in(directory: Path, comm: str) -> list[int]:
    """Pids of live processes named `comm` whose working directory is `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != comm:
                continue
            if "Z" in (entry / "stat").read_text().rsplit(")", 1)[1].split()[:1]:
                continue
            if Path(os.readlink(entry / "cwd")) == directory.resolve():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def postmasters_in(data: Path) -> list[int]:
    """Pids of the postmasters (not their children) serving `data`."""
    pids = processes_in(data, "postgres")
    return [pid for pid in pids if parent_pid(pid) not in pids]


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def can_connect_postgres(url: str) -> bool:
    try:
        with psycopg.connect(psycopg_dsn(url), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def can_ping_redis(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def test_ensure_reuse_stop_and_restart_keeps_data(state_dir: Path) -> None:
    servers = ensure_servers(state_dir)
    assert servers.database_url.startswith("postgresql+psycopg://")
    assert servers.database_url.endswith("/orderonce")
    assert servers.redis_url.startswith("redis://127.0.0.1:")

    with psycopg.connect(psycopg_dsn(servers.database_url)) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'survives a restart')")
    r = redis.Redis.from_url(servers.redis_url)
    r.set("kept", "survives a restart")
    r.close()

    pids = recorded_pids(state_dir)
    assert ensure_servers(state_dir) == servers
    assert recorded_pids(state_dir) == pids
    assert postmasters_in(state_dir / "postgres" / "data") == [pids["postgres"]]
    assert processes_in(state_dir / "redis", "redis-server") == [pids["redis"]]

    assert stop_servers(state_dir) is True
    assert not can_connect_postgres(servers.database_url)
    assert not can_ping_redis(servers.redis_url)
    assert stop_servers(state_dir) is False

    again = ensure_servers(state_dir)
    assert again == servers  # the freed ports are taken again, so configured URLs keep working
    assert recorded_pids(state_dir) != pids
    with psycopg.connect(psycopg_dsn(again.database_url)) as conn:
        assert conn.execute("SELECT note FROM kept WHERE id = 1").fetchone() == (
            "survives a restart",
        )
    r = redis.Redis.from_url(again.redis_url)
    assert r.get("kept") == b"survives a restart"
    r.close()


def test_stale_state_is_detected_and_servers_restarted(state_dir: Path) -> None:
    ensure_servers(state_dir)
    pids = recorded_pids(state_dir)
    os.kill(pids["redis"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes_in(state_dir / "redis", "redis-server") and time.monotonic() < deadline:
        time.sleep(0.05)

    servers = ensure_servers(state_dir)
    new_pids = recorded_pids(state_dir)
    assert new_pids["postgres"] == pids["postgres"]
    assert new_pids["redis"] != pids["redis"]
    assert can_ping_redis(servers.redis_url)

    # A lost record must not lead to a second server on the same data.
    (state_dir / STATE_FILE).unlink()
    servers = ensure_servers(state_dir)
    assert can_connect_postgres(servers.database_url)
    assert can_ping_redis(servers.redis_url)
    assert postmasters_in(state_dir / "postgres" / "data") == [pids["postgres"]]
    assert len(processes_in(state_dir / "redis", "redis-server")) == 1


def test_concurrent_callers_share_one_server_each(state_dir: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = f"""
import json, os, sys, time
from pathlib import Path
from orderonce.dev.embedded import ensure_servers
while not os.path.exists({str(go)!r}):
    time.sleep(0.005)
servers = ensure_servers(Path({str(state_dir)!r}))
print(json.dumps([servers.database_url, servers.redis_url]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *sys.path])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(0.5)  # let both interpreters reach the starting line
    go.touch()
    outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]

    first, second = (json.loads(out) for out in outputs)
    assert first == second
    assert len(postmasters_in(state_dir / "postgres" / "data")) == 1
    assert len(processes_in(state_dir / "redis", "redis-server")) == 1
    assert ensure_servers(state_dir) == EmbeddedServers(*first)


def test_private_redis_stop_and_restart(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    try:
        server.start()
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.set("k", "v")
        assert client.get("k") == b"v"

        server.stop()
        assert not can_ping_redis(server.url)

        url = server.url
        server.restart()
        assert server.url == url
        assert client.ping()
        assert client.get("k") is None  # no persistence: a crash loses everything
        client.close()

        server.restart()
        assert can_ping_redis(server.url)
    finally:
        server.stop()
    assert not can_ping_redis(server.url)


def test_private_redis_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "a") as first:
        second = PrivateRedis(tmp_path / "b", port=first.port)
        with pytest.raises(EmbeddedServerError, match=r"log file: .*redis\.log"):
            second.start()


def test_private_postgres_crash_and_restart(tmp_path: Path) -> None:
    server = PrivatePostgres(tmp_path)
    try:
        server.start()
        assert server.url.endswith("/orderonce")
        with psycopg.connect(psycopg_dsn(server.url)) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (1)")

        server.stop("immediate")
        assert not can_connect_postgres(server.url)

        server.start()  # crash recovery: the committed row is back
        with psycopg.connect(psycopg_dsn(server.url)) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
            conn.execute("INSERT INTO t VALUES (2)")

        url = server.url
        server.restart()
        assert server.url == url
        with psycopg.connect(psycopg_dsn(server.url)) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)

        server.stop("kill")  # the postmaster alone, as the OOM killer would
        server.start()
        with psycopg.connect(psycopg_dsn(server.url)) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)

        server.stop("fast")
        server.start()
        assert can_connect_postgres(server.url)
        with pytest.raises(ValueError):
            server.stop("sideways")
    finally:
        server.stop()
    assert not can_connect_postgres(server.url)
