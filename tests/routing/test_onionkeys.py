"""The onion keyring: rotation, overlap, persistence, and the bounded replay caches."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.constants import DESCRIPTOR_LIFETIME_S, ONION_KEY_OVERLAP_S
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from routing.onionkeys import (
    BUILD_TIMESTAMP_WINDOW_S,
    KEYRING_FORMAT,
    OnionKeyring,
    ReplayCache,
)
from tests.conftest import DeterministicBytes

T0 = 1_700_000_000.0


def keyring(seed: bytes = b"keyring", **settings_: object) -> OnionKeyring:
    return OnionKeyring.generate(now=T0, random_bytes=DeterministicBytes(seed), **settings_)  # type: ignore[arg-type]


def publics(ring: OnionKeyring, now: float) -> list[bytes]:
    return [public for _, public in ring.candidates(now)]


def test_generate_gives_current_and_next_keys() -> None:
    ring = keyring()
    current, nxt = ring.publics()
    assert current != nxt
    pairs = ring.candidates(T0)
    assert publics(ring, T0) == [current, nxt]
    for private, public in pairs:
        assert crypto.x25519_public_from_private(private) == public
    assert "OnionKeyring(" in repr(ring)
    assert pairs[0][0].hex() not in repr(ring)


def test_same_randomness_same_keys_and_different_seeds_differ() -> None:
    assert keyring(b"a").publics() == keyring(b"a").publics()
    assert keyring(b"a").publics() != keyring(b"b").publics()


def test_due_every_descriptor_lifetime_by_default() -> None:
    ring = keyring()
    assert ring.rotate_every_s == DESCRIPTOR_LIFETIME_S
    assert not ring.due(T0)
    assert not ring.due(T0 + DESCRIPTOR_LIFETIME_S - 1)
    assert ring.due(T0 + DESCRIPTOR_LIFETIME_S)
    assert ring.get_timer() == T0 + DESCRIPTOR_LIFETIME_S
    assert keyring(rotate_every_s=600).get_timer() == T0 + 600


def test_rotate_promotes_next_and_keeps_previous_for_the_overlap() -> None:
    ring = keyring()
    rng = DeterministicBytes(b"rotate")
    old_current, old_next = ring.publics()
    t1 = T0 + DESCRIPTOR_LIFETIME_S
    ring.rotate(t1, rng)
    current, nxt = ring.publics()
    assert current == old_next
    assert nxt not in (old_current, old_next)
    assert publics(ring, t1) == [current, old_current, nxt]
    # Inside the overlap: still tried; at its end: gone.
    assert publics(ring, t1 + ONION_KEY_OVERLAP_S - 1) == [current, old_current, nxt]
    assert publics(ring, t1 + ONION_KEY_OVERLAP_S) == [current, nxt]
    assert ring.get_timer() == t1 + DESCRIPTOR_LIFETIME_S  # rotation comes first at defaults


def test_two_rotations_inside_one_overlap_keep_both_previous_newest_first() -> None:
    ring = keyring()
    rng = DeterministicBytes(b"rotate")
    k1, k2 = ring.publics()
    t1, t2 = T0 + DESCRIPTOR_LIFETIME_S, T0 + 2 * DESCRIPTOR_LIFETIME_S
    ring.rotate(t1, rng)
    k3 = ring.publics()[1]
    ring.rotate(t2, rng)
    k4 = ring.publics()[1]
    assert publics(ring, t2) == [k3, k2, k1, k4]
    assert ring.get_timer() == t1 + ONION_KEY_OVERLAP_S  # k1's end comes before rotation
    assert ring.expire(t1 + ONION_KEY_OVERLAP_S) == 1
    assert publics(ring, t1 + ONION_KEY_OVERLAP_S) == [k3, k2, k4]


def test_handle_timer_rotates_when_due_and_expires_otherwise() -> None:
    ring = keyring(rotate_every_s=100, overlap_s=50)
    rng = DeterministicBytes(b"timer")
    first = ring.publics()
    assert not ring.handle_timer(T0 + 99, rng)
    assert ring.publics() == first
    assert ring.handle_timer(T0 + 100, rng)
    assert ring.publics()[0] == first[1]
    assert ring.get_timer() == T0 + 150  # the retired key's end
    assert not ring.handle_timer(T0 + 150, rng)
    assert publics(ring, T0 + 150) == list(ring.publics())
    assert ring.get_timer() == T0 + 200


def test_settings_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        keyring(rotate_every_s=0)
    with pytest.raises(LocalProtocolError):
        keyring(overlap_s=float("nan"))
    with pytest.raises(LocalProtocolError):
        keyring(max_replay_entries=0)
    with pytest.raises(LocalProtocolError):
        keyring().candidates(float("inf"))
    with pytest.raises(LocalProtocolError):
        OnionKeyring.generate(now=T0, random_bytes=lambda n: b"short")


# --- Replay caches ----------------------------------------------------------------------


def test_replay_cache_refuses_a_repeat_until_its_expiry() -> None:
    cache = ReplayCache(10)
    eph = b"e" * 32
    assert cache.check_and_add(eph, expires_at=T0 + 600, now=T0) is None
    assert cache.check_and_add(eph, expires_at=T0 + 600, now=T0 + 1) == "replay"
    assert cache.check_and_add(eph, expires_at=T0 + 900, now=T0 + 600) == "replay"
    # Past the expiry the entry is gone (the timestamp check refuses such a build first).
    assert cache.check_and_add(eph, expires_at=T0 + 1300, now=T0 + 601) is None
    assert len(cache) == 1


def test_replay_cache_full_refuses_instead_of_forgetting_live_entries() -> None:
    cache = ReplayCache(3)
    for i in range(3):
        assert cache.check_and_add(bytes([i]) * 32, expires_at=T0 + 600 + i, now=T0) is None
    assert cache.check_and_add(b"x" * 32, expires_at=T0 + 600, now=T0) == "replay_cache_full"
    # Entries are still there: no replay slips through because of the pressure.
    assert cache.check_and_add(bytes([0]) * 32, expires_at=T0 + 600, now=T0) == "replay"
    assert len(cache) == 3
    # The first entry expires: room for exactly one more.
    assert cache.check_and_add(b"x" * 32, expires_at=T0 + 1300, now=T0 + 600.5) is None
    assert cache.check_and_add(b"y" * 32, expires_at=T0 + 1300, now=T0 + 600.5) == (
        "replay_cache_full"
    )
    assert cache.prune(T0 + 10_000) == 3
    assert len(cache) == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 15), st.integers(-600, 600), st.integers(0, 30)),
        max_size=60,
    )
)
def test_replay_cache_model(events: list[tuple[int, int, int]]) -> None:
    """Against a dict model: never above the cap, never forgets a live entry."""
    cap = 5
    cache = ReplayCache(cap)
    model: dict[bytes, float] = {}
    now = T0
    for eph_index, skew, step in events:
        now += step
        eph = bytes([eph_index]) * 32
        expires_at = now + skew
        model = {k: v for k, v in model.items() if v >= now}
        got = cache.check_and_add(eph, expires_at=expires_at, now=now)
        if eph in model:
            assert got == "replay"
        elif len(model) >= cap:
            assert got == "replay_cache_full"
        else:
            assert got is None
            model[eph] = expires_at
        assert len(cache) == len(model) <= cap


def test_keyring_replay_cache_per_key_dropped_with_the_key() -> None:
    ring = keyring(rotate_every_s=100, overlap_s=50)
    current, nxt = ring.publics()
    eph = b"e" * 32
    assert ring.check_replay(current, eph, timestamp=T0, now=T0) is None
    assert ring.check_replay(current, eph, timestamp=T0, now=T0) == "replay"
    assert ring.check_replay(nxt, eph, timestamp=T0, now=T0) is None  # another key's cache
    assert ring.replay_entries() == 2
    ring.rotate(T0 + 100, DeterministicBytes(b"r"))
    assert ring.check_replay(current, b"f" * 32, timestamp=T0 + 100, now=T0 + 100) is None
    ring.expire(T0 + 150)  # the old current key retires for good, with its cache
    assert ring.replay_entries() == 1
    with pytest.raises(LocalProtocolError):
        ring.check_replay(current, b"g" * 32, timestamp=T0 + 150, now=T0 + 150)


def test_keyring_replay_entry_lives_for_the_timestamp_window() -> None:
    ring = keyring()
    current = ring.publics()[0]
    eph = b"e" * 32
    assert ring.replay_window_s == BUILD_TIMESTAMP_WINDOW_S
    assert ring.check_replay(current, eph, timestamp=T0, now=T0) is None
    assert ring.check_replay(current, eph, timestamp=T0, now=T0 + 600) == "replay"
    ring.expire(T0 + 601)
    assert ring.replay_entries() == 0


def test_keyring_max_replay_entries_applies_per_key() -> None:
    ring = keyring(max_replay_entries=2)
    current = ring.publics()[0]
    assert ring.check_replay(current, b"a" * 32, timestamp=T0, now=T0) is None
    assert ring.check_replay(current, b"b" * 32, timestamp=T0, now=T0) is None
    assert ring.check_replay(current, b"c" * 32, timestamp=T0, now=T0) == "replay_cache_full"


# --- Persistence ------------------------------------------------------------------------


def test_json_round_trip_keeps_keys_and_times() -> None:
    ring = keyring()
    ring.rotate(T0 + DESCRIPTOR_LIFETIME_S, DeterministicBytes(b"r"))
    text = ring.to_json()
    data = json.loads(text)
    assert data["format"] == KEYRING_FORMAT
    assert len(data["retired"]) == 1
    loaded = OnionKeyring.from_json(text)
    assert loaded.publics() == ring.publics()
    now = T0 + DESCRIPTOR_LIFETIME_S + 1
    assert loaded.candidates(now) == ring.candidates(now)
    assert loaded.get_timer() == ring.get_timer()
    assert loaded.to_json() == text
    assert OnionKeyring.from_json(text, rotate_every_s=60).get_timer() == (
        T0 + DESCRIPTOR_LIFETIME_S + 60
    )


def _mutated(change: object) -> str:
    data = json.loads(keyring().to_json())
    change(data)  # type: ignore[operator]
    return json.dumps(data)


def _set(path: tuple[str, ...], value: object) -> object:
    def change(data: dict[str, object]) -> None:
        target: dict[str, object] = data
        for name in path[:-1]:
            target = target[name]  # type: ignore[assignment]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{",
        json.dumps({"format": "other"}),
        _mutated(_set(("format",), "meshnode/onion-keys/v0")),
        _mutated(_set(("extra",), 1)),
        _mutated(_set(("retired",), {})),
        _mutated(_set(("current", "private"), "zz" * 32)),
        _mutated(_set(("current", "private"), "00" * 31)),
        _mutated(_set(("current", "private"), 5)),
        _mutated(_set(("current", "public"), "00" * 32)),  # does not match the private key
        _mutated(_set(("current", "since"), "now")),
        _mutated(_set(("current", "since"), True)),
        _mutated(_set(("current", "since"), -1)),
        _mutated(_set(("next", "extra"), 1)),
        _mutated(_set(("retired",), [{"private": "00" * 32}])),
        _mutated(lambda d: d.__setitem__("next", d["current"])),  # the same key twice
        json.dumps({"format": KEYRING_FORMAT, "current": 1, "next": 2, "retired": []}),
        '{"format": "meshnode/onion-keys/v1", "current": {"since": 1e999}}',
    ],
)
def test_from_json_refuses_malformed_text(text: str) -> None:
    with pytest.raises(DecodeError):
        OnionKeyring.from_json(text)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    ["format", "current", "next", "retired", "private", "public", "since"]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_from_json_raises_only_decode_error(value: object) -> None:
    with contextlib.suppress(DecodeError):
        OnionKeyring.from_json(json.dumps(value))
