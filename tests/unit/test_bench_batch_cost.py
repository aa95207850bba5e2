"""bench.batch_ceiling.fixed_and_per_event: a batch's fixed cost and its cost per event, from
the cost of batches of several sizes (make bench's "one batch of it cost" figures)."""

import pytest

from bench.batch_ceiling import fixed_and_per_event


def test_a_line_through_two_sizes_splits_the_fixed_part_from_the_part_per_event() -> None:
    # 2 ms per batch and 0.1 ms per event: batches of 10 cost 3 ms, of 100 cost 12 ms.
    fixed, per_event = fixed_and_per_event([(10, 3.0), (100, 12.0)])
    assert fixed == pytest.approx(2.0)
    assert per_event == pytest.approx(0.1)


def test_repeated_sizes_are_averaged_not_counted_twice_as_a_slope() -> None:
    fixed, per_event = fixed_and_per_event([(10, 2.8), (100, 12.2), (10, 3.2), (100, 11.8)])
    assert fixed == pytest.approx(2.0)
    assert per_event == pytest.approx(0.1)


def test_one_size_alone_cannot_tell_the_two_apart() -> None:
    with pytest.raises(ValueError, match="two sizes"):
        fixed_and_per_event([(100, 12.0), (100, 11.0)])
