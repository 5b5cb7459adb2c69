"""TokenBucket, KeyedRateLimiter and LoadDetector, with simulated time (including backwards)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode.link.ratelimit import KeyedRateLimiter, LoadDetector, TokenBucket

# Rates and steps are powers of two so the float arithmetic is exact.

# --- TokenBucket -----------------------------------------------------------------------


def test_bucket_starts_full_and_drains() -> None:
    bucket = TokenBucket(rate_per_s=4.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate_per_s=4.0, burst=2, now=0.0)
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.125)  # half a token
    assert bucket.take(0.25)  # one token
    assert not bucket.take(0.25)
    assert bucket.tokens(0.5) == 1.0


def test_bucket_caps_at_burst() -> None:
    bucket = TokenBucket(rate_per_s=4.0, burst=2, now=0.0)
    assert bucket.tokens(1000.0) == 2.0
    assert bucket.take(1000.0)
    assert bucket.take(1000.0)
    assert not bucket.take(1000.0)


def test_bucket_cost() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=4, now=0.0)
    assert bucket.take(0.0, cost=3.0)
    assert not bucket.take(0.0, cost=2.0)  # refused: nothing taken
    assert bucket.take(0.0, cost=1.0)
    assert bucket.take(0.0, cost=0.0)
    assert not bucket.take(0.0, cost=5.0)
    with pytest.raises(ValueError, match="cost"):
        bucket.take(0.0, cost=-1.0)


def test_bucket_time_going_backwards_is_no_time_passed() -> None:
    bucket = TokenBucket(rate_per_s=4.0, burst=2, now=100.0)
    assert bucket.take(100.0)
    assert bucket.take(100.0)
    assert not bucket.take(50.0)  # went back: no refill
    assert bucket.tokens(10.0) == 0.0
    # Time is measured from the new reference, not frozen until 100 comes round again.
    assert not bucket.take(50.125)
    assert bucket.take(50.25)


def test_bucket_is_full() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=2, now=0.0)
    assert bucket.is_full(0.0)
    assert bucket.take(0.0)
    assert not bucket.is_full(0.25)
    assert bucket.is_full(0.5)


@pytest.mark.parametrize(
    ("rate", "burst", "match"),
    [
        (0.0, 1, "rate_per_s"),
        (-1.0, 1, "rate_per_s"),
        (float("nan"), 1, "rate_per_s"),
        (1.0, 0, "burst"),
        (1.0, -2, "burst"),
    ],
)
def test_bucket_rejects_bad_parameters(rate: float, burst: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenBucket(rate_per_s=rate, burst=burst, now=0.0)


@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=-10.0, max_value=10.0), st.floats(0.0, 3.0)), max_size=100
    )
)
def test_bucket_never_exceeds_burst_or_goes_negative(steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate_per_s=3.0, burst=2.5, now=0.0)
    now = 0.0
    for delta, cost in steps:
        now += delta
        before = bucket.tokens(now)
        taken = bucket.take(now, cost)
        assert taken == (before >= cost)
        assert 0.0 <= bucket.tokens(now) <= 2.5


@given(times=st.lists(st.floats(min_value=0.0, max_value=1000.0), max_size=200))
def test_bucket_allows_no_more_than_rate_times_span_plus_burst(times: list[float]) -> None:
    """Whatever the order of `now` values, backwards jumps never earn extra tokens."""
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    allowed = sum(bucket.take(now) for now in times)
    # Tokens are earned only over forward steps: at most burst + rate * (sum of those steps).
    forward = 0.0
    previous = 0.0
    for now in times:
        forward += max(0.0, now - previous)
        previous = now
    assert allowed <= 3 + 2.0 * forward + 1e-9


# --- KeyedRateLimiter ------------------------------------------------------------------


def test_keyed_independent_buckets() -> None:
    limiter = KeyedRateLimiter(rate_per_s=4.0, burst=2)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", 0.0)
    assert limiter.allow(("192.0.2.1", 1), 0.0)
    assert len(limiter) == 3
    assert "a" in limiter
    assert limiter.allow("a", 0.25)


def test_keyed_entry_cap_under_100k_distinct_keys() -> None:
    limiter = KeyedRateLimiter(rate_per_s=20.0, burst=5, max_entries=4096)
    now = 0.0
    for i in range(100_000):
        now += 1e-5  # a flood of 100k spoofed sources per second
        assert limiter.allow(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now)
        assert len(limiter) <= 4096
    assert len(limiter) == 4096
    # The most recent sources are the ones kept.
    assert "10.1.134.159" in limiter  # i = 99_999
    assert "10.0.0.0" not in limiter


def test_keyed_entry_cap_all_at_one_instant() -> None:
    limiter = KeyedRateLimiter(rate_per_s=20.0, burst=5, max_entries=100)
    for i in range(10_000):
        limiter.allow(i, 0.0)
    assert len(limiter) == 100
    assert 9_999 in limiter
    assert 9_899 not in limiter


def test_keyed_evicts_full_buckets_before_lru() -> None:
    limiter = KeyedRateLimiter(rate_per_s=1.0, burst=2, max_entries=3)
    # "old" is the least recently used but drained; "a" and "b" took one token each.
    assert limiter.allow("old", 0.0)
    assert limiter.allow("old", 0.0)
    assert limiter.allow("a", 0.5)
    assert limiter.allow("b", 0.5)
    # At t=1.5: "a" and "b" are full again (1 + 1.0 * 1.0), "old" holds 1.5 tokens.
    assert limiter.allow("new", 1.5)
    assert len(limiter) == 2
    assert "old" in limiter  # its debt is remembered
    assert "a" not in limiter
    assert "b" not in limiter


def test_keyed_falls_back_to_lru() -> None:
    limiter = KeyedRateLimiter(rate_per_s=1.0, burst=2, max_entries=3)
    for key in ("a", "b", "c"):
        limiter.allow(key, 0.0)
    limiter.allow("a", 0.0)  # "a" becomes the most recently used
    assert limiter.allow("d", 0.0)
    assert len(limiter) == 3
    assert "b" not in limiter
    assert "a" in limiter
    assert "c" in limiter
    assert "d" in limiter


def test_keyed_refused_key_stays_recent() -> None:
    limiter = KeyedRateLimiter(rate_per_s=1.0, burst=1, max_entries=2)
    assert limiter.allow("flooder", 0.0)
    assert limiter.allow("x", 0.0)
    assert not limiter.allow("flooder", 0.0)  # refused, but still recently used
    assert limiter.allow("y", 0.0)
    assert "flooder" in limiter
    assert "x" not in limiter


def test_keyed_prune() -> None:
    limiter = KeyedRateLimiter(rate_per_s=1.0, burst=1)
    limiter.allow("a", 0.0)
    limiter.allow("b", 0.5)
    assert limiter.prune(0.75) == 0
    assert limiter.prune(1.0) == 1
    assert "b" in limiter
    assert limiter.prune(1.5) == 1
    assert len(limiter) == 0


def test_keyed_time_going_backwards() -> None:
    limiter = KeyedRateLimiter(rate_per_s=4.0, burst=1, max_entries=2)
    assert limiter.allow("a", 100.0)
    assert not limiter.allow("a", 10.0)  # no refill from a clock that went back
    assert not limiter.allow("a", 10.125)
    assert limiter.allow("a", 10.25)
    # Eviction still works with the clock behind the last sweep.
    for i in range(10):
        limiter.allow(i, 5.0 - i)
    assert len(limiter) == 2


def test_keyed_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        KeyedRateLimiter(rate_per_s=1.0, burst=1, max_entries=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        KeyedRateLimiter(rate_per_s=0.0, burst=1)


# --- LoadDetector ----------------------------------------------------------------------


def test_load_detector_quiet() -> None:
    detector = LoadDetector(rate_per_s=4.0, burst=2, now=0.0)
    # At the rate (one per 0.25 s) we are never under load.
    assert not any(detector.record_and_check(i * 0.25) for i in range(100))
    assert not detector.under_load(25.0)


def test_load_detector_trips_and_holds() -> None:
    detector = LoadDetector(rate_per_s=4.0, burst=2, hold_s=1.0, now=0.0)
    assert not detector.record_and_check(0.0)
    assert not detector.record_and_check(0.0)
    assert detector.record_and_check(0.0)  # ran out at t=0
    assert detector.under_load(0.5)
    # Tokens are back, but we stay under load until hold_s after the last run-out.
    assert detector.record_and_check(0.5)
    assert detector.record_and_check(0.875)
    assert not detector.record_and_check(1.0)
    assert not detector.under_load(1.0)


def test_load_detector_hold_extends_while_flooded() -> None:
    detector = LoadDetector(rate_per_s=4.0, burst=2, hold_s=1.0, now=0.0)
    now = 0.0
    for _ in range(400):  # 20 per second for 20 s: far over the rate
        now += 0.05
        assert detector.record_and_check(now) or now < 0.5
    assert detector.under_load(now + 0.99)
    assert not detector.under_load(now + 1.0)


def test_load_detector_time_going_backwards() -> None:
    detector = LoadDetector(rate_per_s=4.0, burst=1, hold_s=1.0, now=1000.0)
    assert not detector.record_and_check(1000.0)
    assert detector.record_and_check(1000.0)  # ran out at 1000
    assert detector.under_load(10.0)  # behind the run-out: no time has passed
    # The clock jumped back to 10: the hold is counted from there, not until 1001.
    assert detector.record_and_check(10.0)
    assert detector.record_and_check(10.5)
    assert not detector.record_and_check(11.25)


def test_load_detector_zero_hold() -> None:
    detector = LoadDetector(rate_per_s=4.0, burst=1, hold_s=0.0, now=0.0)
    assert not detector.record_and_check(0.0)
    assert detector.record_and_check(0.0)
    assert not detector.record_and_check(0.25)


def test_load_detector_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="hold_s"):
        LoadDetector(rate_per_s=1.0, burst=1, hold_s=-1.0, now=0.0)
    with pytest.raises(ValueError, match="burst"):
        LoadDetector(rate_per_s=1.0, burst=0, now=0.0)


def test_reprs() -> None:
    assert "TokenBucket" in repr(TokenBucket(rate_per_s=1.0, burst=1, now=0.0))
    assert "entries=0/4096" in repr(KeyedRateLimiter(rate_per_s=1.0, burst=1))
    assert "LoadDetector" in repr(LoadDetector(rate_per_s=1.0, burst=1, now=0.0))
