"""The one backoff schedule: growth, cap, jitter bounds (table-driven)."""

import pytest

from faasmoe.proto.backoff import Backoff


@pytest.mark.parametrize("backoff, attempt, draw, expected_s", [
    (Backoff(0.5, 30.0), 0, None, 0.5),
    (Backoff(0.5, 30.0), 1, None, 1.0),
    (Backoff(0.5, 30.0), 5, None, 16.0),
    (Backoff(0.5, 30.0), 6, None, 30.0),             # capped
    (Backoff(0.5, 30.0), 60, None, 30.0),            # no overflow far out
    (Backoff(0.5, 30.0), 100_000, None, 30.0),        # days of retries at the cap
    (Backoff(0.005, 0.2, factor=2.5), 10_000, None, 0.2),
    (Backoff(1.0, 1.0, factor=1.0), 10_000, None, 1.0),
    (Backoff(0.005, 0.2, factor=2.5), 2, None, 0.03125),
    (Backoff(1.0, 8.0, jitter=0.5), 0, 0.0, 1.0),     # no jitter drawn: full delay
    (Backoff(1.0, 8.0, jitter=0.5), 0, 0.999999, 0.5000005),
    (Backoff(1.0, 8.0, jitter=0.5), 3, 0.5, 6.0),
])
def test_delay(backoff, attempt, draw, expected_s):
    assert backoff.delay_s(attempt, draw) == pytest.approx(expected_s)


def test_jitter_stays_in_bounds():
    b = Backoff(0.1, 1.0, jitter=0.3)
    for attempt in range(10):
        base = min(1.0, 0.1 * 2 ** attempt)
        for _ in range(50):
            assert 0.7 * base <= b.delay_s(attempt) <= base


def test_delays_sequence():
    it = Backoff(1.0, 4.0).delays_s()
    assert [next(it) for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("args", [(0.0, 1.0), (2.0, 1.0), (0.1, 1.0, 0.5), (0.1, 1.0, 2.0, 1.5)])
def test_invalid(args):
    with pytest.raises(ValueError):
        Backoff(*args)
