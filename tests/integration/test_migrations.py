"""Migrations: they build exactly the schema the code queries, and go down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from orderonce.dev.sandboxes import fresh_database
from tests.servers import ServerUrls
from worker.store.migrate import alembic_config, upgrade
from worker.store.tables import metadata


def test_migrations_match_the_tables_and_round_trip(servers: ServerUrls) -> None:
    with fresh_database(servers.database_url) as url:  # migrated to head
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                diff = compare_metadata(MigrationContext.configure(conn), metadata)
            assert diff == [], "worker/store/tables.py and the migrations disagree"
            cfg = alembic_config()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "base")
            upgrade(engine)
            upgrade(engine)  # idempotent at head
            with engine.connect() as conn:
                assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        finally:
            engine.dispose()
