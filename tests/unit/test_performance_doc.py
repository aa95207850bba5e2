"""docs/performance.md's results table is the newest `make bench` run's, rendered from its raw
results in bench/results/ (bench/report.py): no figure in it is typed by hand."""

from __future__ import annotations

import json

import pytest

from bench import report


@pytest.mark.parametrize("block", sorted(report.BLOCKS))
def test_the_tables_are_rendered_from_the_newest_results(block: str) -> None:
    assert report.doc_table(block) == report.rendered(block), (
        "run `python -m bench.report --write` to render the newest results into the docs"
    )


def test_the_performance_page_stays_a_reference_page() -> None:
    assert len(report.DOC.read_text(encoding="utf-8").splitlines()) <= 200


def test_how_busy_the_host_was_during_the_p99_is_rendered_from_the_runs_that_measured_it() -> None:
    results = json.loads(report.newest("throughput").read_text()) | {"file": "x.json"}
    workers = tuple(results["options"]["workers"])
    for run in results["runs"]:  # as a run before 2026-12-07: not measured, nothing shown
        run["orderonce"]["latency"].pop("cpu_us_per_event", None)
        run["orderonce"]["latency"].pop("lock_waits", None)
    results["summary"] = report.summarize(results["runs"], workers)
    assert report._paced_cpu(results) == ""
    for i, run in enumerate(results["runs"]):
        run["orderonce"]["latency"]["cpu_us_per_event"] = {
            "workers": 200.0 + i,
            "database": 100.0,
            "redis": 50.0,
            "benchmark": 80.0,
            "total": 430.0 + i,
            "cores_busy": 1.5 + i / 100,
        }
    results["summary"] = report.summarize(results["runs"], workers)
    rows = [line for line in report.markdown_table(results).splitlines() if line.count("|") == 7]
    # The median of each N's runs, one row per worker count, after the throughput table.
    assert rows[1] == "|---|---|---|---|---|---|"
    for n, row in zip(workers, rows[2:], strict=True):
        at = [i for i, r in enumerate(results["runs"]) if r["workers"] == n]
        i = at[len(at) // 2]
        assert row == f"| {n} | {1.5 + i / 100:.2f} | {200 + i} | 100 | 50 | 80 |"
    # Runs that also sampled the lock waits: one more column, the median share of each N.
    for i, run in enumerate(results["runs"]):
        run["orderonce"]["latency"]["lock_waits"] = {
            "looks": 200,
            "busy_sessions": 150,
            "waiting_share": 0.1 + i / 100,
            "by_lock": {"advisory": 0.1 + i / 100},
        }
    results["summary"] = report.summarize(results["runs"], workers)
    rows = [line for line in report.markdown_table(results).splitlines() if line.count("|") == 8]
    assert rows[0].endswith("| this benchmark | waiting on a lock |")
    for n, row in zip(workers, rows[2:], strict=True):
        at = [i for i, r in enumerate(results["runs"]) if r["workers"] == n]
        i = at[len(at) // 2]
        assert row.endswith(f"| 80 | {0.1 + i / 100:.0%} |")
