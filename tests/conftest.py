"""Session-wide servers and a fresh database; per-test cleanup; real worker subprocesses."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, text

from orderonce.config import Settings
from orderonce.dev.embedded import PrivatePostgres
from orderonce.dev.processes import IngestProcess, free_port
from orderonce.dev.sandboxes import (
    DEFAULT_AMQP_URL,
    delete_declared,
    empty_redis_db,
    fresh_database,
    listening,
    session_vhost,
)
from producers import Publisher
from tests.brokers import Broker, settings_from_env
from tests.servers import ServerUrls, fast_timings, session_servers
from tests.workers import WorkerFactory
from worker.store.db import make_engine
from worker.store.migrate import upgrade


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerUrls]:
    # Not under pytest's basetemp: another pytest session on the machine may reap old basetemps
    # (it keeps three), and with them the data directory of servers still running here.
    state_dir = Path(tempfile.mkdtemp(prefix="orderonce-test-embedded-"))
    with (
        _removed_after(state_dir),
        session_servers(
            os.environ.get("ORDERONCE_DATABASE_URL"),
            os.environ.get("ORDERONCE_REDIS_URL"),
            state_dir,
        ) as found,
        fresh_database(found.database_url) as db_url,
        empty_redis_db(found.redis_url) as r,
    ):
        yield ServerUrls(db_url, r)


@contextmanager
def _removed_after(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def worker_env(servers: ServerUrls) -> dict[str, str]:
    """The environment every worker and publisher of this session runs with."""
    return {
        "ORDERONCE_DATABASE_URL": servers.database_url,
        "ORDERONCE_REDIS_URL": servers.redis_url,
        "ORDERONCE_BROKER_URL": servers.redis_url,
        "ORDERONCE_QUEUE": f"orderonce.test.{os.getpid()}",
        **fast_timings(),
    }


@pytest.fixture(scope="session")
def settings(worker_env: dict[str, str]) -> Settings:
    return settings_from_env(worker_env)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str | None]:
    """This session's RabbitMQ (tests/brokers.py), or None when nothing listens."""
    url = os.environ.get("ORDERONCE_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    if not listening(url):
        yield None
        return
    with session_vhost(url) as (session_url, _private):
        yield session_url


@pytest.fixture
def broker(
    request: pytest.FixtureRequest,
    worker_env: dict[str, str],
    settings: Settings,
    rabbitmq_url: str | None,
) -> Iterator[Broker]:
    """The broker of this test: Redis unless the test is parametrized with
    ``@pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)``."""
    name = getattr(request, "param", "redis")
    if name == "redis":
        yield Broker("redis", worker_env["ORDERONCE_BROKER_URL"], worker_env, settings)
        return
    if rabbitmq_url is None:
        url = os.environ.get("ORDERONCE_TEST_AMQP_URL", DEFAULT_AMQP_URL)
        pytest.skip(f"no RabbitMQ listening at {url} (set ORDERONCE_TEST_AMQP_URL)")
    env = {
        **worker_env,
        "ORDERONCE_BROKER_URL": rabbitmq_url,
        "ORDERONCE_QUEUE": (queue := f"orderonce.test.{os.getpid()}.{uuid.uuid4().hex[:8]}"),
        "ORDERONCE_INGEST_QUEUE": f"{queue}.ingest",
    }
    rabbit = Broker("rabbitmq", rabbitmq_url, env, settings_from_env(env))
    yield rabbit
    delete_declared(rabbitmq_url, rabbit.settings)


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    pub = Publisher(broker.url, broker.settings)
    yield pub
    pub.close()


@pytest.fixture
def outbox_publisher(db: Engine, broker: Broker) -> Iterator[Publisher]:
    """A publisher through the outbox (in the test's database), for tests that kill a worker
    while messages are in flight and need nothing lost: a worker killed between Redis popping
    a message for it and its record of the message as unacked takes the message with it
    (kombu's Redis transport). ``relay_pass`` sends such a message again."""
    pub = Publisher(broker.url, broker.settings, outbox_engine=db)
    yield pub
    pub.close()


@pytest.fixture(scope="session")
def engine(servers: ServerUrls, settings: Settings) -> Iterator[Engine]:
    engine = make_engine(servers.database_url, settings)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine, servers: ServerUrls) -> Engine:
    """The session database, emptied before the test; the test's Redis db, flushed."""
    with engine.begin() as conn:
        tables = (
            conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                    " AND tablename <> 'alembic_version'"
                )
            )
            .scalars()
            .all()
        )
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY"))
    client = redis.Redis.from_url(servers.redis_url)
    client.flushdb()
    client.set("orderonce:test:claimed", "1")
    client.close()
    return engine


@pytest.fixture
def workers(broker: Broker, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(broker.env, tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def ingest(db: Engine, broker: Broker, tmp_path: Path) -> Iterator[IngestProcess]:
    """``orderonce ingest`` (the HTTP front door) on a free port, with the test's broker and
    database; stopped after the test."""
    front = IngestProcess(
        "ingest", {**os.environ, **broker.env}, tmp_path / "ingest.log", free_port()
    )
    try:
        front.wait_ready()
        yield front
    finally:
        front.terminate()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    # Outside pytest's 0700 tmp dir: the server runs as an unprivileged user.
    workdir = Path(tempfile.mkdtemp(prefix="orderonce-pg-"))
    pg = PrivatePostgres(workdir)
    pg.start()
    engine = create_engine(pg.url)
    upgrade(engine)
    engine.dispose()
    yield pg
    pg.stop("fast")
    shutil.rmtree(workdir, ignore_errors=True)
