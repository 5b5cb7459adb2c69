"""Relay health (weight factors that fall with failures and recover) and the learned
build timeout; both persisted as JSON that is re-validated on load."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import NodeId, b32encode
from routing.health import (
    BUILD_TIMEOUT_FORMAT,
    DEFAULT_BUILD_TIMEOUT_S,
    HEALTH_FORMAT,
    HEALTH_HALF_LIFE_S,
    MAX_BUILD_COUNT,
    MAX_BUILD_TIMEOUT_S,
    MIN_BUILD_TIMEOUT_S,
    MIN_WEIGHT_FACTOR,
    NEUTRAL_WEIGHT_FACTOR,
    BuildTimeout,
    HealthBook,
    RelayHealth,
)

T0 = 1_700_000_000.0


def nid(i: int) -> NodeId:
    return NodeId(hashlib.sha256(b"health-test" + i.to_bytes(4, "big")).digest()[:20])


A, B, C, D = nid(1), nid(2), nid(3), nid(4)


# --- Weight factors ---------------------------------------------------------------------


def test_unknown_relay_is_neutral() -> None:
    book = HealthBook()
    assert book.weight_factor(A) == NEUTRAL_WEIGHT_FACTOR == 1.0
    assert book.get(A) is None
    assert A not in book
    assert len(book) == 0


def test_build_failures_lower_the_factor_but_never_to_zero() -> None:
    book = HealthBook()
    factors = []
    for i in range(500):
        book.record_build(A, ok=False, now=T0 + i)
        factors.append(book.weight_factor(A))
    assert factors[0] == pytest.approx(0.75)  # prior of three successes: 3 / 4
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(factors))
    assert factors[9] < 0.25
    assert min(factors) >= MIN_WEIGHT_FACTOR > 0
    assert book.get(A).consecutive_build_failures == 500  # type: ignore[union-attr]
    assert book.get(A).build_attempts <= MAX_BUILD_COUNT  # type: ignore[union-attr]


def test_successes_recover_a_failed_relay() -> None:
    book = HealthBook()
    for i in range(200):
        book.record_build(A, ok=False, now=T0 + i)
    low = book.weight_factor(A)
    for i in range(300):
        book.record_build(A, ok=True, now=T0 + 200 + i)
    record = book.get(A)
    assert record is not None
    assert record.consecutive_build_failures == 0
    # Counts are capped at 100 attempts (each new build then weighs 1%), so 300 new
    # successes leave the old failures ~5% of the record.
    assert book.weight_factor(A) > 0.9 > low


def test_successes_alone_stay_neutral() -> None:
    book = HealthBook()
    for i in range(50):
        book.record_build(A, ok=True, now=T0 + i)
        book.record_probe(A, rtt_s=0.2, now=T0 + i)
    assert book.weight_factor(A) == 1.0


def test_probe_loss_lowers_the_factor() -> None:
    book = HealthBook()
    for i in range(10):
        book.record_probe(A, rtt_s=0.1, now=T0 + i)
        book.record_probe(B, rtt_s=None if i % 2 else 0.1, now=T0 + i)
        book.record_probe(C, rtt_s=None, now=T0 + i)
    assert book.weight_factor(A) == 1.0
    assert book.weight_factor(C) < book.weight_factor(B) < 1.0
    assert book.weight_factor(B) == pytest.approx(1 - 5 / 15, rel=1e-3)
    record = book.get(C)
    assert record is not None
    assert record.probes_sent == record.probes_lost == pytest.approx(10, rel=1e-3)
    assert record.rtt_s is None


def test_slow_rtt_lowers_the_factor_mildly() -> None:
    book = HealthBook()
    book.record_probe(A, rtt_s=0.9, now=T0)
    book.record_probe(B, rtt_s=2.0, now=T0)
    book.record_probe(C, rtt_s=3600.0, now=T0)  # recorded as 60 s
    assert book.weight_factor(A) == 1.0
    assert book.weight_factor(B) == pytest.approx(0.5)
    assert book.weight_factor(C) == pytest.approx(0.25)  # never below a quarter for RTT
    assert book.get(C).rtt_s == 60.0  # type: ignore[union-attr]


def test_rtt_is_smoothed() -> None:
    book = HealthBook()
    book.record_probe(A, rtt_s=1.0, now=T0)
    book.record_probe(A, rtt_s=2.0, now=T0 + 1)
    assert book.get(A).rtt_s == pytest.approx(1.125)  # type: ignore[union-attr]
    for i in range(100):
        book.record_probe(A, rtt_s=0.5, now=T0 + 2 + i)
    assert book.get(A).rtt_s == pytest.approx(0.5, abs=1e-3)  # type: ignore[union-attr]


def test_old_failures_fade_with_time() -> None:
    book = HealthBook()
    for i in range(20):
        book.record_build(A, ok=False, now=T0 + i)
    now_factor = book.weight_factor(A, now=T0 + 20)
    assert book.weight_factor(A) == pytest.approx(now_factor, rel=1e-3)
    a_day = book.weight_factor(A, now=T0 + 20 + HEALTH_HALF_LIFE_S)
    a_week = book.weight_factor(A, now=T0 + 20 + 7 * HEALTH_HALF_LIFE_S)
    assert now_factor < a_day < a_week < 1.0
    assert a_week > 0.85
    # A clock stepping back fades nothing.
    assert book.weight_factor(A, now=T0 - 1000) == book.weight_factor(A)
    # Fading also applies when the next record arrives.
    book.record_build(A, ok=True, now=T0 + 20 + 7 * HEALTH_HALF_LIFE_S)
    record = book.get(A)
    assert record is not None
    assert record.build_attempts < 2


def test_clock_stepping_back_keeps_last_seen() -> None:
    book = HealthBook()
    book.record_build(A, ok=True, now=T0)
    book.record_build(A, ok=True, now=T0 - 500)
    assert book.get(A).last_seen == T0  # type: ignore[union-attr]


def test_book_is_bounded_least_recently_seen_evicted() -> None:
    book = HealthBook(max_relays=3)
    for i, node in enumerate((A, B, C)):
        book.record_build(node, ok=True, now=T0 + i)
    book.record_probe(A, rtt_s=0.1, now=T0 + 10)  # A seen again: now B is the oldest
    book.record_build(D, ok=False, now=T0 + 11)
    assert list(book) == [C, A, D]
    assert B not in book
    book.forget(C)
    book.forget(C)
    assert list(book) == [A, D]
    assert book.max_relays == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.record_build(b"short", ok=True, now=T0),
        lambda b: b.record_build(A, ok=1, now=T0),
        lambda b: b.record_build(A, ok=True, now=float("nan")),
        lambda b: b.record_probe(A, rtt_s=-1.0, now=T0),
        lambda b: b.record_probe(A, rtt_s=float("inf"), now=T0),
        lambda b: b.record_probe(A, rtt_s=True, now=T0),
        lambda b: b.record_probe(A, rtt_s=0.1, now="now"),
    ],
)
def test_bad_arguments_are_caller_bugs(call: Callable[[HealthBook], object]) -> None:
    with pytest.raises(LocalProtocolError):
        call(HealthBook())


@pytest.mark.parametrize(
    "fields",
    [
        {"build_attempts": -1.0},
        {"build_attempts": 1.0, "build_successes": 2.0},
        {"probes_sent": 1.0, "probes_lost": 2.0},
        {"probes_sent": float("nan")},
        {"consecutive_build_failures": -1},
        {"consecutive_build_failures": True},
        {"rtt_s": 61.0},
        {"rtt_s": -0.1},
        {"last_seen": float("inf")},
    ],
)
def test_relay_health_refuses_impossible_records(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        RelayHealth(**fields)


def test_max_relays_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError):
        HealthBook(max_relays=0)


events = st.lists(
    st.tuples(
        st.sampled_from([A, B, C, D]),
        st.one_of(
            st.booleans(),  # a build
            st.none(),  # a lost probe
            st.floats(min_value=0, max_value=500, allow_nan=False),  # an answered probe
        ),
        st.floats(min_value=0, max_value=30 * 86400, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_factors_stay_in_range_and_round_trip(
    history: list[tuple[NodeId, bool | float | None, float]],
) -> None:
    book = HealthBook(max_relays=3)
    for node, event, dt in history:
        if isinstance(event, bool):
            book.record_build(node, ok=event, now=T0 + dt)
        else:
            book.record_probe(node, rtt_s=event, now=T0 + dt)
    assert len(book) <= 3
    for node in (A, B, C, D):
        for now in (None, T0, T0 + 90 * 86400):
            assert MIN_WEIGHT_FACTOR <= book.weight_factor(node, now=now) <= 1.0
    loaded = HealthBook.from_json(book.to_json(), max_relays=3)
    assert loaded.skipped == 0
    assert list(loaded) == list(book)
    for node in book:
        assert loaded.get(node) == book.get(node)
        assert loaded.weight_factor(node) == book.weight_factor(node)


# --- Health persistence -----------------------------------------------------------------


def populated() -> HealthBook:
    book = HealthBook()
    book.record_build(A, ok=True, now=T0)
    book.record_build(B, ok=False, now=T0 + 1)
    book.record_probe(C, rtt_s=0.25, now=T0 + 2)
    book.record_probe(C, rtt_s=None, now=T0 + 3)
    return book


def test_health_json_round_trip_keeps_order() -> None:
    book = populated()
    text = book.to_json()
    assert json.loads(text)["format"] == HEALTH_FORMAT
    loaded = HealthBook.from_json(text)
    assert list(loaded) == [A, B, C]
    assert [loaded.get(n) for n in loaded] == [book.get(n) for n in book]
    assert loaded.to_json() == text


def test_health_load_keeps_the_most_recent_when_over_the_bound() -> None:
    loaded = HealthBook.from_json(populated().to_json(), max_relays=2)
    assert list(loaded) == [B, C]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "null",
        '{"format": "something else", "relays": []}',
        json.dumps({"format": HEALTH_FORMAT}),
        json.dumps({"format": HEALTH_FORMAT, "relays": {}}),
        "[" * 100_000,
    ],
)
def test_health_load_refuses_what_is_not_a_snapshot(text: str) -> None:
    with pytest.raises(DecodeError):
        HealthBook.from_json(text)


def test_health_load_refuses_non_text() -> None:
    with pytest.raises(DecodeError):
        HealthBook.from_json(b"{}")  # type: ignore[arg-type]


def good_entry(node: NodeId = A, **changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "id": b32encode(node),
        "build_attempts": 4.0,
        "build_successes": 3.0,
        "consecutive_build_failures": 1,
        "probes_sent": 2.0,
        "probes_lost": 1.0,
        "rtt_s": 0.3,
        "last_seen": T0,
    }
    entry.update(changes)
    return entry


BAD_ENTRIES: list[object] = [
    "a string",
    None,
    [],
    good_entry(id="not base32!"),
    good_entry(id=b32encode(b"short")),
    good_entry(id=7),
    good_entry(build_attempts="4"),
    good_entry(build_attempts=True),
    good_entry(build_successes=5.0),  # more than attempts
    good_entry(probes_lost=3.0),  # more than sent
    good_entry(build_attempts=1e9, build_successes=0.0),  # past the cap: not ours
    good_entry(consecutive_build_failures=1.5),
    good_entry(rtt_s=-1),
    good_entry(rtt_s="fast"),
    good_entry(last_seen=None),
    {k: v for k, v in good_entry().items() if k != "rtt_s"},
    {**good_entry(), "extra": 1},
]


def test_health_load_skips_bad_entries() -> None:
    relays = [good_entry(A), *BAD_ENTRIES, good_entry(B, last_seen=T0 + 5), good_entry(A)]
    text = json.dumps({"format": HEALTH_FORMAT, "relays": relays})
    loaded = HealthBook.from_json(text)
    assert list(loaded) == [A, B]
    assert loaded.skipped == len(BAD_ENTRIES) + 1  # the bad ones and the repeated A
    assert loaded.weight_factor(A) == pytest.approx((3 + 3) / (4 + 3) * (1 - 1 / 7))


# --- Build timeout ----------------------------------------------------------------------


def test_timeout_is_the_default_until_ten_samples() -> None:
    timeout = BuildTimeout()
    assert timeout.timeout_s == DEFAULT_BUILD_TIMEOUT_S == 10.0
    for _ in range(9):
        timeout.record_success(0.5)
    assert timeout.timeout_s == 10.0
    timeout.record_success(0.5)
    assert len(timeout) == 10
    assert timeout.timeout_s == MIN_BUILD_TIMEOUT_S  # 0.75 s, clamped to 1.5 s


def test_timeout_learns_the_80th_percentile_with_margin() -> None:
    timeout = BuildTimeout()
    for i in range(1, 101):  # 0.1 s .. 10.0 s
        timeout.record_success(i / 10)
    assert timeout.timeout_s == pytest.approx(8.0 * 1.5)
    for _ in range(100):  # the oldest samples roll out
        timeout.record_success(2.0)
    assert len(timeout) == 100
    assert timeout.timeout_s == pytest.approx(3.0)


def test_timeout_is_clamped_above() -> None:
    timeout = BuildTimeout()
    for _ in range(20):
        timeout.record_success(300.0)
    assert timeout.timeout_s == MAX_BUILD_TIMEOUT_S == 60.0


def test_too_short_a_timeout_grows_from_timeouts() -> None:
    timeout = BuildTimeout()
    for _ in range(50):
        timeout.record_success(2.0)
    assert timeout.timeout_s == pytest.approx(3.0)
    # The network slows: builds now take 5 s, longer than the 3 s we wait.
    seen = []
    for _ in range(40):
        current = timeout.timeout_s
        seen.append(current)
        timeout.record_timeout(current)
    assert max(seen) > 5.0  # grew past the real build time without any reset


def test_many_recent_timeouts_reset_to_a_longer_fallback() -> None:
    timeout = BuildTimeout()
    for _ in range(30):
        timeout.record_success(1.0)
    assert timeout.timeout_s == MIN_BUILD_TIMEOUT_S
    # Builds stop completing: 18 of 20 time out (at the 1.5 s we wait).
    for i in range(20):
        if i in (3, 11):
            timeout.record_success(1.0)
        else:
            timeout.record_timeout(MIN_BUILD_TIMEOUT_S)
    # Samples forgotten; wait max(default, 2 x 1.5 s) until 10 new ones are in.
    assert len(timeout) == 0
    assert timeout.timeout_s == DEFAULT_BUILD_TIMEOUT_S
    for _ in range(20):
        timeout.record_timeout(10.0)
    assert len(timeout) == 0
    assert timeout.timeout_s == 20.0  # twice what we waited
    for _ in range(100):
        timeout.record_timeout(timeout.timeout_s)
    assert timeout.timeout_s == MAX_BUILD_TIMEOUT_S


def test_timeout_refuses_bad_times() -> None:
    timeout = BuildTimeout()
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(LocalProtocolError):
            timeout.record_success(bad)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            timeout.record_timeout(bad)  # type: ignore[arg-type]
    assert len(timeout) == 0


def test_timeout_json_round_trip() -> None:
    timeout = BuildTimeout()
    for i in range(30):
        timeout.record_success(1.0 + i / 10)
    timeout.record_timeout(5.0)
    text = timeout.to_json()
    assert json.loads(text)["format"] == BUILD_TIMEOUT_FORMAT
    loaded = BuildTimeout.from_json(text)
    assert loaded.skipped == 0
    assert len(loaded) == 31
    assert loaded.timeout_s == timeout.timeout_s
    assert loaded.to_json() == text


def test_timeout_json_keeps_a_raised_fallback() -> None:
    timeout = BuildTimeout()
    for _ in range(20):
        timeout.record_timeout(10.0)
    assert timeout.timeout_s == 20.0 and len(timeout) == 0
    assert BuildTimeout.from_json(timeout.to_json()).timeout_s == 20.0


def test_timeout_load_skips_bad_samples_and_fallback() -> None:
    samples = [
        [1.0, False],
        [2, True],
        [-1, False],
        [1.0],
        ["1", False],
        [1.0, 0],
        None,
        [61, False],
    ]
    text = json.dumps({"format": BUILD_TIMEOUT_FORMAT, "fallback_s": 0.001, "samples": samples})
    loaded = BuildTimeout.from_json(text)
    assert len(loaded) == 2
    assert loaded.skipped == 6
    assert loaded.timeout_s == DEFAULT_BUILD_TIMEOUT_S  # bad fallback: the default


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "7",
        json.dumps({"format": "x", "samples": []}),
        json.dumps({"format": BUILD_TIMEOUT_FORMAT}),
    ],
)
def test_timeout_load_refuses_what_is_not_a_snapshot(text: str) -> None:
    with pytest.raises(DecodeError):
        BuildTimeout.from_json(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(min_value=0, max_value=1000, allow_nan=False)),
        max_size=250,
    )
)
def test_timeout_always_within_bounds(outcomes: list[tuple[bool, float]]) -> None:
    timeout = BuildTimeout()
    for timed_out, seconds in outcomes:
        if timed_out:
            timeout.record_timeout(seconds)
        else:
            timeout.record_success(seconds)
        assert MIN_BUILD_TIMEOUT_S <= timeout.timeout_s <= MAX_BUILD_TIMEOUT_S
        assert len(timeout) <= 100
    assert BuildTimeout.from_json(timeout.to_json()).timeout_s == timeout.timeout_s
