"""The chaos harness inside the test suite: a small seeded run of every fault must find nothing
lost, duplicated or unexpected, with every failpoint window hit at least three times; and the
same checks must turn red for each deliberately broken worker (a checker that never shows red
proves nothing). Private PostgreSQL and Redis servers: the harness restarts them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orderonce.dev.chaos import broken, workload
from orderonce.dev.chaos.runner import ChaosOptions, run
from orderonce.dev.sandboxes import DEFAULT_AMQP_URL, listening, session_vhost

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


def _failed(report: dict[str, object]) -> set[str]:
    return {f["name"] for f in report["findings"] if not f["ok"]}  # type: ignore[attr-defined, index]


def test_a_seeded_run_of_every_fault_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = run(ChaosOptions(events=2000, seed=11, drain_timeout_s=240, workdir=tmp_path))
    assert report["ok"], [f for f in report["findings"] if not f["ok"]]  # type: ignore[attr-defined]
    hits = report["failpoint_hits"]
    for marker, (point, _) in workload.WINDOWS.items():
        assert hits.get(f"{point}~{marker}", 0) >= 3, hits  # type: ignore[attr-defined]
    faults = report["faults"]
    for fault in ("kill_main", "kill_child", "pause", "redis_restart", "pg_restart", "lock_wipe"):
        assert faults.get(fault, 0) >= 1, faults  # type: ignore[attr-defined]
    outcomes = report["attempt_outcomes"]
    assert outcomes["duplicate"] > 0 and outcomes["dead_lettered"] > 0  # type: ignore[index]


@pytest.mark.parametrize("variant", ["correct", *broken.VARIANTS])
def test_negative_controls_show_red(variant: str, tmp_path: Path) -> None:
    report = run(
        ChaosOptions(
            events=600,
            seed=5,
            profile="control",
            variant=variant,
            drain_timeout_s=60 if variant == "correct" else 10,
            workdir=tmp_path,
        )
    )
    failed = _failed(report)
    if variant == "correct":
        assert not failed, report["findings"]
        return
    expected = (
        {"lost"} if variant in ("ack_before_commit", "skip_when_locked") else {"duplicated_effects"}
    )
    assert expected <= failed, (variant, report["findings"])


def test_batch_mode_under_the_same_faults_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = run(
        ChaosOptions(events=1000, seed=12, batch=True, drain_timeout_s=240, workdir=tmp_path)
    )
    assert report["ok"], [f for f in report["findings"] if not f["ok"]]  # type: ignore[attr-defined]
    assert report["attempt_outcomes"]["duplicate"] > 0  # type: ignore[index]


def test_buffered_mode_under_the_same_faults_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # A crash gives back a whole buffer; those messages must not be taken for poison (they
    # were waiting, not running: worker/store/processed.py, start_redelivered_run).
    report = run(
        ChaosOptions(events=1000, seed=14, buffered=50, drain_timeout_s=240, workdir=tmp_path)
    )
    assert report["ok"], [f for f in report["findings"] if not f["ok"]]  # type: ignore[attr-defined]
    assert report["attempt_outcomes"]["duplicate"] > 0  # type: ignore[index]


# Buffered: a buffer's messages are acked with one multiple ack where that is safe
# (worker/messaging/amqp_acks.py), which kills and restarts must not turn into a lost message.
@pytest.mark.parametrize("buffered", [0, 50])
def test_on_rabbitmq_the_same_faults_lose_and_duplicate_nothing(
    tmp_path: Path, buffered: int
) -> None:
    url = os.environ.get("ORDERONCE_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    if not listening(url):
        pytest.skip(f"no RabbitMQ listens at {url} (ORDERONCE_TEST_AMQP_URL)")
    with session_vhost(url) as (vhost_url, _private):
        report = run(
            ChaosOptions(
                events=1000,
                seed=13,
                broker_url=vhost_url,
                buffered=buffered,
                drain_timeout_s=240,
                workdir=tmp_path,
            )
        )
    assert report["broker"] == "rabbitmq"
    assert report["ok"], [f for f in report["findings"] if not f["ok"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mode", "buffered", "kombu_worker"), [("default", 0, True), ("buffered", 50, False)]
)
def test_without_the_outbox_frequent_kills_lose_nothing(
    tmp_path: Path, mode: str, buffered: int, kombu_worker: bool
) -> None:
    """Straight to a Redis broker, no outbox, no relay, main processes SIGKILLed about every 20
    events: kombu's own transport lost a message now and then in its receive window (popped,
    not yet recorded as unacked); orderonce's receives atomically. Every redelivery must be a
    counted duplicate, and nothing lost, in default and buffered mode; in default mode with a
    worker on kombu's own transport sharing the queue (never killed: it is the one that could
    lose a message), so the two transports' records must be each other's."""
    report = run(
        ChaosOptions(
            events=2000,
            seed=21 if buffered else 22,
            profile="no-outbox",
            buffered=buffered,
            kombu_worker=kombu_worker,
            drain_timeout_s=240,
            workdir=tmp_path,
        )
    )
    assert report["ok"], [f for f in report["findings"] if not f["ok"]]  # type: ignore[attr-defined]
    assert report["sigkills"] >= 100, report["faults"]  # type: ignore[operator]
    outcomes = report["attempt_outcomes"]
    assert outcomes["duplicate"] > 0  # type: ignore[index]
