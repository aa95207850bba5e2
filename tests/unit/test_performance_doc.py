"""docs/performance.md's results table is the newest `make bench` run's, rendered from its raw
results in bench/results/ (bench/report.py): no figure in it is typed by hand."""

from __future__ import annotations

import json

from bench import report


def test_the_results_table_is_rendered_from_the_newest_results() -> None:
    newest = report.newest()
    results = json.loads(newest.read_text()) | {"file": newest.name}
    assert report.doc_table() == report.markdown_table(results), (
        f"run `python -m bench.report --write` to render {newest.name} into the docs"
    )


def test_the_performance_page_stays_a_reference_page() -> None:
    assert len(report.DOC.read_text(encoding="utf-8").splitlines()) <= 200
