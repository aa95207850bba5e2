"""The chaos workload and the failpoint rules it relies on: pure, no servers."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from orderonce.dev.chaos import workload
from schemas import parse_event
from worker.protocol import failpoints


def test_the_workload_has_every_kind_and_marks_each_window() -> None:
    load = workload.build(3000, seed=3, max_body_bytes=4096, marked_per_window=4)
    kinds = Counter(p.kind for p in load.publications)
    assert set(kinds) == {"valid", *workload.HOSTILE, "duplicate_copy"}
    assert load.marked == dict.fromkeys(workload.WINDOWS, 4)
    assert kinds["duplicate_copy"] / len(load.publications) == pytest.approx(0.05, abs=0.02)


def test_every_copy_of_a_marked_event_carries_its_marker() -> None:
    load = workload.build(3000, seed=3, max_body_bytes=4096)
    by_identity: dict[object, set[str]] = {}
    for p in load.publications:
        if p.identity:
            by_identity.setdefault(p.identity, set()).add(p.body)
    marked = [i for i in by_identity if str(i[1]).startswith("fp-")]  # type: ignore[index]
    assert marked
    for identity in marked:
        for body in by_identity[identity]:
            event = parse_event(body.encode(), 1 << 20)
            assert (event.source, event.id) == identity


def test_hostile_bodies_fail_for_the_reason_their_kind_expects() -> None:
    load = workload.build(3000, seed=3, max_body_bytes=4096)
    for p in load.publications:
        if p.kind in ("malformed", "oversized", "wrong_schema"):
            with pytest.raises(Exception) as bad:
                parse_event(p.body.encode(), 4096)
            assert bad.value.reason in workload.EXPECTED_REASONS[p.kind]  # type: ignore[attr-defined]
        if p.kind == "key_conflict":
            assert orjson.loads(p.body)["idempotencykey"].startswith("conflict-")


@pytest.fixture
def failpoint_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], None]]:
    """Sets ORDERONCE_FAILPOINTS (once-markers in tmp_path); the rules are forgotten after."""

    def configure(spec: str) -> None:
        monkeypatch.setenv("ORDERONCE_FAILPOINTS", spec)
        monkeypatch.setenv("ORDERONCE_FAILPOINTS_ONCE_DIR", str(tmp_path))
        failpoints._configured.cache_clear()

    yield configure
    failpoints._configured.cache_clear()


def test_once_rules_fire_once_per_body_and_always_rules_every_time(
    tmp_path: Path, failpoint_rules: Callable[[str], None]
) -> None:
    failpoint_rules("before_commit=raise~FP-A~once,before_commit=raise~POISON~always")
    for body in (b"1 FP-A", b"2 FP-A"):
        with pytest.raises(failpoints.FailpointError):
            failpoints.failpoint("before_commit", body)
        failpoints.failpoint("before_commit", body)  # fired once for this body: passes
    for _ in range(3):
        with pytest.raises(failpoints.FailpointError):
            failpoints.failpoint("before_commit", b"POISON")
    failpoints.failpoint("before_commit", b"innocent")
    assert len(os.listdir(tmp_path)) == 2


def test_a_sleep_does_not_hide_a_poison_in_the_same_batch(
    tmp_path: Path, failpoint_rules: Callable[[str], None]
) -> None:
    # A buffered batch can join a slow-commit marker and a poison: both rules must fire.
    failpoint_rules("before_commit=sleep:0~FP-SL~once,before_commit=raise~POISON~always")
    with pytest.raises(failpoints.FailpointError):
        failpoints.failpoint("before_commit", b"FP-SL", b"POISON")
    assert len(os.listdir(tmp_path)) == 1  # the sleep fired first


def test_an_event_fires_its_once_rule_once_whether_in_a_batch_or_alone(
    tmp_path: Path, failpoint_rules: Callable[[str], None]
) -> None:
    # A buffered batch killed by its marked event is redelivered, and the event then runs alone:
    # firing again there would count a second crash against a valid event's poison limit.
    failpoint_rules("before_commit=raise~FP-A~once")
    with pytest.raises(failpoints.FailpointError):
        failpoints.failpoint("before_commit", b"x", b"1 FP-A", b"2 FP-A")
    failpoints.failpoint("before_commit", b"1 FP-A")  # fired in the batch: passes alone
    with pytest.raises(failpoints.FailpointError):
        failpoints.failpoint("before_commit", b"1 FP-A", b"2 FP-A")  # the other one's turn
    failpoints.failpoint("before_commit", b"2 FP-A")
    failpoints.failpoint("before_commit", b"x", b"1 FP-A", b"2 FP-A")
    assert len(os.listdir(tmp_path)) == 2
