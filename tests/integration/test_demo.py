"""``orderonce demo``: a small run exits 0, and its report agrees with the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import Engine, text


def test_small_demo_run_reports_what_the_database_holds(
    db: Engine, worker_env: dict[str, str]
) -> None:
    env = {**os.environ, **worker_env}
    result = subprocess.run(
        [sys.executable, "-m", "orderonce", "demo", "--orders", "200", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["chaos"] and "SIGKILL" in report["chaos"][0]

    prefix = f"demo/{report['run']}/%"
    with db.connect() as conn:

        def one(sql: str) -> int:
            return int(
                conn.execute(text(sql), {"p": prefix, "o": f"{report['run']}-%"}).scalar_one()
            )

        assert (
            one("SELECT count(*) FROM processed_messages WHERE source LIKE :p")
            == (report["unique_events"])
        )
        assert (
            one(
                "SELECT count(*) FROM processed_messages WHERE source LIKE :p"
                " AND outcome = 'applied'"
            )
            == report["applied"]
        )
        assert one(
            "SELECT coalesce(sum(duplicates), 0) FROM processed_messages WHERE source LIKE :p"
        ) == (
            report["duplicates_suppressed"]["producer_retry"]
            + report["duplicates_suppressed"]["redelivery"]
        )
        by_status = dict(
            conn.execute(
                text("SELECT status, count(*) FROM orders WHERE order_id LIKE :o GROUP BY 1"),
                {"o": f"{report['run']}-%"},
            ).all()
        )
    assert by_status == report["orders_by_status"]
    # Each order placed twice by its customer has a second order row, held as a suspect.
    assert sum(by_status.values()) == 200 + report["orders_placed_twice"]
    # Producer copies, plus any copy the relay sent while a killed worker's message waited.
    copies = report["events_published"] - report["unique_events"]
    assert copies <= report["duplicates_suppressed"]["producer_retry"]
    assert report["duplicates_suppressed"]["producer_retry"] <= copies + report["relay_resends"]
