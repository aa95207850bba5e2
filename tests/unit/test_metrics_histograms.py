"""``metrics.observe_many`` must leave a histogram exactly as one ``observe`` per amount does
(it writes each bucket once instead of once per amount); compared on real prometheus-client
histograms, so a client whose internals changed fails here rather than in production."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from worker.ops.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    one, many = CollectorRegistry(), CollectorRegistry()
    return (
        one,
        Histogram("h", "per amount", buckets=BUCKETS, registry=one),
        many,
        Histogram("h", "per amount", buckets=BUCKETS, registry=many),
    )


amounts = st.lists(
    st.one_of(
        st.sampled_from([*BUCKETS, 0.0]),  # on a bound: counted in that bound's bucket
        st.floats(min_value=0, max_value=100, allow_nan=False),
    ),
    max_size=50,
)


@given(amounts)
def test_many_amounts_fill_the_buckets_as_one_observe_each(values: list[float]) -> None:
    one_registry, one, many_registry, many = _pair()
    for v in values:
        one.observe(v)
    observe_many(many, values)
    expected, got = _samples(one_registry), _samples(many_registry)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_nan_is_not_observed() -> None:
    registry, _, _, _ = _pair()
    h = Histogram("n", "nan", buckets=BUCKETS, registry=registry)
    observe_many(h, [math.nan, 0.5])
    samples = _samples(registry)
    assert samples[("n_count", ())] == 1
    assert samples[("n_sum", ())] == 0.5
