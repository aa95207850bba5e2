"""Migrations: they build exactly the schema the code queries, and go down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from orderonce.dev.sandboxes import fresh_database
from tests.db import scalar
from tests.servers import ServerUrls
from worker.store.deliveries import start_run
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


def test_a_run_marked_before_0007_still_counts_after_it(servers: ServerUrls) -> None:
    # 0007 added a token per run beside the one `running` flag per message: a run that was
    # marked when the workers were upgraded (it may have crashed) still counts.
    with fresh_database(servers.database_url) as url:
        engine = create_engine(url)
        try:
            cfg = alembic_config()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0006")
                conn.execute(
                    text(
                        "INSERT INTO message_deliveries (message_id, deliveries, running)"
                        " VALUES ('marked', 2, true), ('finished', 2, false)"
                    )
                )
            upgrade(engine)
            assert start_run(engine, "marked", "r", redelivered=True) == 3
            assert start_run(engine, "finished", "r", redelivered=True) == 2
            # ... and down again: an open run's token is the flag's mark.
            with engine.begin() as conn:
                conn.execute(text("UPDATE message_deliveries SET running = false"))
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0006")
            assert scalar(engine, "SELECT count(*) FROM message_deliveries WHERE running") == 2
        finally:
            engine.dispose()
