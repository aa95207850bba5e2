"""docs/performance.md's results table is the newest `make bench` run's, rendered from its raw
results in bench/results/ (bench/report.py): no figure in it is typed by hand."""

from __future__ import annotations

import pytest

from bench import report


@pytest.mark.parametrize("block", sorted(report.BLOCKS))
def test_the_tables_are_rendered_from_the_newest_results(block: str) -> None:
    assert report.doc_table(block) == report.rendered(block), (
        "run `python -m bench.report --write` to render the newest results into the docs"
    )


def test_the_performance_page_stays_a_reference_page() -> None:
    assert len(report.DOC.read_text(encoding="utf-8").splitlines()) <= 200
