"""Settings and Celery configuration that would break exactly-once or lose messages are refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from orderonce.config import Settings, check_safety, settings
from orderonce.errors import UnsafeSettings
from worker.messaging.broker import check_celery_safety, make_celery
from worker.messaging.transport import TRANSPORT as REDIS_TRANSPORT

BROKER = "redis://127.0.0.1:1/0"  # never connected to: make_celery only configures


@pytest.fixture(autouse=True)
def _no_orderonce_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("ORDERONCE_"):
            monkeypatch.delenv(name)
    yield


# --- Settings -------------------------------------------------------------------------------


def test_defaults_are_safe() -> None:
    s = Settings()
    check_safety(s)  # does not raise
    assert s.task_soft_time_limit_s < s.task_time_limit_s
    assert s.lock_ttl_ms / 1000 > s.task_time_limit_s
    assert s.visibility_timeout_s > s.task_time_limit_s
    assert s.idle_in_transaction_timeout_ms < s.lock_ttl_ms
    assert s.database_url is None and s.redis_url is None and s.broker_url is None


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERONCE_LOCK_TTL_MS", "45000")
    assert Settings().lock_ttl_ms == 45_000


# Each an unsafe change from the defaults (soft 20 s, hard 30 s, lock 40 s, visibility 90 s,
# idle-in-transaction 10 s), with the message the check gives for it.
UNSAFE: dict[str, tuple[dict[str, Any], str]] = {
    "lock ttl below the time limit": ({"lock_ttl_ms": 29_000}, "lock_ttl_ms must exceed"),
    "lock ttl equal to the time limit": ({"lock_ttl_ms": 30_000}, "lock_ttl_ms must exceed"),
    "time limit raised past the lock ttl": (
        {"task_time_limit_s": 45.0, "visibility_timeout_s": 90},
        "lock_ttl_ms must exceed",
    ),
    "visibility below the time limit": (
        {"visibility_timeout_s": 20},
        "visibility_timeout_s must exceed",
    ),
    "visibility equal to the time limit": (
        {"visibility_timeout_s": 30},
        "visibility_timeout_s must exceed",
    ),
    "soft limit equal to the hard limit": (
        {"task_soft_time_limit_s": 30.0},
        "task_soft_time_limit_s must be below",
    ),
    "soft limit above the hard limit": (
        {"task_soft_time_limit_s": 35.0},
        "task_soft_time_limit_s must be below",
    ),
    "idle-in-tx equal to the lock ttl": (
        {"idle_in_transaction_timeout_ms": 40_000},
        "idle_in_transaction_timeout_ms must be shorter",
    ),
    "idle-in-tx above the lock ttl": (
        {"idle_in_transaction_timeout_ms": 60_000},
        "idle_in_transaction_timeout_ms must be shorter",
    ),
}

# The same changes a hair on the safe side, so the boundaries above are the real ones.
JUST_SAFE: dict[str, dict[str, Any]] = {
    "lock ttl just above the time limit": {"lock_ttl_ms": 30_001},
    "visibility just above the time limit": {"visibility_timeout_s": 31},
    "soft limit just below the hard limit": {"task_soft_time_limit_s": 29.9},
    "idle-in-tx just below the lock ttl": {"idle_in_transaction_timeout_ms": 39_999},
}


@pytest.mark.parametrize("name", list(UNSAFE))
def test_check_safety_refuses(name: str) -> None:
    changes, message = UNSAFE[name]
    # model_construct skips the validator, so check_safety itself is what is tested here.
    with pytest.raises(UnsafeSettings, match=message):
        check_safety(Settings.model_construct(**changes))


@pytest.mark.parametrize("name", list(UNSAFE))
def test_unsafe_settings_are_refused(name: str) -> None:
    changes, message = UNSAFE[name]
    with pytest.raises(UnsafeSettings, match=message):
        check_safety(Settings(**changes))


@pytest.mark.parametrize("name", list(UNSAFE))
def test_the_process_settings_refuse_unsafe_environment(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes, message = UNSAFE[name]
    for key, value in changes.items():
        monkeypatch.setenv(f"ORDERONCE_{key.upper()}", str(value))
    settings.cache_clear()
    try:
        with pytest.raises(UnsafeSettings, match=message):
            settings()
    finally:
        settings.cache_clear()


def test_every_problem_is_reported_at_once() -> None:
    unsafe = Settings.model_construct(
        task_soft_time_limit_s=30.0, lock_ttl_ms=30_000, visibility_timeout_s=30
    )
    with pytest.raises(UnsafeSettings) as caught:
        check_safety(unsafe)
    assert str(caught.value).count(";") == 2


@pytest.mark.parametrize("name", list(JUST_SAFE))
def test_just_safe_settings_are_accepted(name: str) -> None:
    s = Settings(**JUST_SAFE[name])
    for field, value in JUST_SAFE[name].items():
        assert getattr(s, field) == value


# --- check_celery_safety --------------------------------------------------------------------


def _app(settings: Settings | None = None) -> Any:
    return make_celery(BROKER, settings or Settings())


def test_make_celery_output_is_safe() -> None:
    s = Settings()
    app = _app(s)
    check_celery_safety(app.conf, s)  # does not raise
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.task_time_limit == s.task_time_limit_s


def test_make_celery_is_safe_for_other_safe_settings() -> None:
    s = Settings(task_soft_time_limit_s=50, task_time_limit_s=60, lock_ttl_ms=70_000,
                 visibility_timeout_s=120, idle_in_transaction_timeout_ms=20_000)  # fmt: skip
    app = _app(s)
    check_celery_safety(app.conf, s)
    assert app.conf.task_time_limit == 60
    assert app.conf.broker_transport_options["visibility_timeout"] == 120


def test_redis_brokers_get_orderonces_transport_and_others_kombus() -> None:
    assert _app().conf.broker_transport == REDIS_TRANSPORT
    assert make_celery("rediss://127.0.0.1:1/0", Settings()).conf.broker_transport is None
    assert make_celery("amqp://guest@127.0.0.1:1//", Settings()).conf.broker_transport is None
    # The fallback: kombu's own Redis transport, which shares queues with orderonce's.
    kombus = make_celery("redis://127.0.0.1:1/0", Settings(redis_transport="kombu"))
    assert kombus.conf.broker_transport is None


def _flip_visibility(conf: Any, seconds: float) -> None:
    conf.broker_transport_options = dict(conf.broker_transport_options, visibility_timeout=seconds)


CELERY_UNSAFE: dict[str, tuple[str, Any, str]] = {
    "pickle accepted": ("accept_content", ["json", "pickle"], "only JSON"),
    "only pickle accepted": ("accept_content", ["pickle"], "only JSON"),
    "pickle serializer": ("task_serializer", "pickle", "only JSON"),
    "acks_late off": ("task_acks_late", False, "task_acks_late"),
    "reject_on_worker_lost off": ("task_reject_on_worker_lost", False, "reject_on_worker_lost"),
    "prefetch 4": ("worker_prefetch_multiplier", 4, "prefetch"),
    "prefetch 0 (unlimited)": ("worker_prefetch_multiplier", 0, "prefetch"),
    "no time limit": ("task_time_limit", None, "visibility timeout must exceed"),
    "time limit past the lock ttl": ("task_time_limit", 45, "lock TTL must exceed"),
}


@pytest.mark.parametrize("name", list(CELERY_UNSAFE))
def test_check_celery_safety_refuses(name: str) -> None:
    setting, value, message = CELERY_UNSAFE[name]
    s = Settings()
    app = _app(s)
    setattr(app.conf, setting, value)
    with pytest.raises(UnsafeSettings, match=message):
        check_celery_safety(app.conf, s)


@pytest.mark.parametrize("visibility", [30, 29, 1])
def test_check_celery_safety_refuses_visibility_not_above_the_time_limit(
    visibility: int,
) -> None:
    s = Settings()
    app = _app(s)
    _flip_visibility(app.conf, visibility)
    with pytest.raises(UnsafeSettings, match="visibility timeout must exceed"):
        check_celery_safety(app.conf, s)


def test_check_celery_safety_accepts_visibility_just_above_the_time_limit() -> None:
    s = Settings()
    app = _app(s)
    _flip_visibility(app.conf, 31)
    check_celery_safety(app.conf, s)


def test_check_celery_safety_checks_the_lock_ttl_of_the_settings_it_is_given() -> None:
    app = _app()
    short_lock = Settings.model_construct(lock_ttl_ms=30_000)
    with pytest.raises(UnsafeSettings, match="lock TTL must exceed"):
        check_celery_safety(app.conf, short_lock)


# --- buffered mode ---------------------------------------------------------------------------


def test_buffered_mode_prefetches_exactly_the_buffer() -> None:
    s = Settings(buffered=50)
    app = _app(s)
    check_celery_safety(app.conf, s)  # does not raise
    assert app.conf.worker_prefetch_multiplier == 50
    assert app.conf.task_acks_late is True


@pytest.mark.parametrize(("buffered", "prefetch"), [(0, 50), (50, 1), (50, 100)])
def test_prefetch_other_than_the_buffer_is_refused(buffered: int, prefetch: int) -> None:
    s = Settings(buffered=buffered)
    app = _app(s)
    app.conf.worker_prefetch_multiplier = prefetch
    with pytest.raises(UnsafeSettings, match="prefetch"):
        check_celery_safety(app.conf, s)


@pytest.mark.parametrize(
    "changes",
    [
        {"buffered": -1},
        {"buffered": 1001},
        {"buffered_wait_ms": -1},
        {"buffered_wait_ms": 51},
        {"buffered_max_wait_ms": 1001},
    ],
)
def test_buffered_settings_out_of_range_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(UnsafeSettings, match="buffered"):
        check_safety(Settings(**changes))
