"""The local directory: snapshots, filters, expiry, superseding, and sampling.

Randomness is a seeded stream (SHA-256 in counter mode), so every sampling test is
deterministic: the statistical bounds below are checked once against a fixed seed and
cannot flake.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.descriptor import (
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
)
from discovery.directory import Directory
from meshnode import crypto
from meshnode.errors import LocalProtocolError
from meshnode.identity import Identity, NodeId

T0 = 1_700_000_000
NOW = T0 + 60
LIFETIME = 3600
ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
RELAY = DescriptorRole.RELAY
EXIT = DescriptorRole.EXIT


@cache
def ident(i: int) -> Identity:
    seed = hashlib.sha256(b"directory-test-identity" + i.to_bytes(4, "big")).digest()
    link = hashlib.sha256(b"directory-test-link" + i.to_bytes(4, "big")).digest()
    return Identity(identity_seed=seed, link_private=link)


def desc(
    i: int,
    *,
    roles: frozenset[DescriptorRole] = frozenset({RELAY}),
    region: str = "EU",
    country: str = "DE",
    version: int = T0,
    published_at: int = T0,
    expires_at: int = T0 + LIFETIME,
    **overrides: Any,
) -> SignedDescriptor:
    identity = ident(i)
    body = NodeDescriptor(
        version=version,
        identity_key=identity.identity_public,
        link_key=identity.link_public,
        onion_key=ONION,
        addresses=((f"192.0.2.{i % 250 + 1}", 7520),),
        roles=roles,
        exit_policy=((443, 443),) if EXIT in roles else (),
        region=region,
        country=country,
        operator=Operator(name=f"op{i}"),
        published_at=published_at,
        expires_at=expires_at,
        **overrides,
    )
    return sign(body, identity)


def seeded(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic random_bytes: SHA-256(seed || counter) blocks, consumed in order."""
    buffer = bytearray()
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        while len(buffer) < n:
            buffer.extend(hashlib.sha256(seed + counter.to_bytes(8, "big")).digest())
            counter += 1
        out = bytes(buffer[:n])
        del buffer[:n]
        return out

    return random_bytes


def ids(descriptors: tuple[SignedDescriptor, ...]) -> list[NodeId]:
    return [d.node_id for d in descriptors]


# A small mixed network: 0-3 relays in EU/DE, 4-5 exits in EU/NL, 6 exit+relay in NA/US,
# 7 a relay naming no place.
NETWORK = (
    *(desc(i) for i in range(4)),
    desc(4, roles=frozenset({EXIT}), country="NL"),
    desc(5, roles=frozenset({EXIT}), country="NL"),
    desc(6, roles=frozenset({EXIT, RELAY}), region="NA", country="US"),
    desc(7, region="", country=""),
)


@pytest.fixture
def directory() -> Directory:
    return Directory(NETWORK, now=NOW)


# --- Lookup and filters -----------------------------------------------------------------


def test_get_contains_len(directory: Directory) -> None:
    assert len(directory) == 8
    for d in NETWORK:
        assert d.node_id in directory
        assert directory.get(d.node_id) == d
    stranger = ident(99).node_id
    assert stranger not in directory
    assert directory.get(stranger) is None
    assert "not an id" not in directory
    assert list(directory) == sorted(NETWORK, key=lambda d: d.node_id)


def test_empty_directory() -> None:
    empty = Directory(now=NOW)
    assert len(empty) == 0
    assert empty.nodes() == ()
    assert empty.sample(k=3, random_bytes=seeded(b"x")) == ()


def test_nodes_filters_sorted_by_node_id(directory: Directory) -> None:
    everything = directory.nodes()
    assert ids(everything) == sorted(d.node_id for d in NETWORK)
    assert {d.node_id for d in directory.nodes(role=EXIT)} == {
        NETWORK[i].node_id for i in (4, 5, 6)
    }
    assert {d.node_id for d in directory.nodes(role=RELAY)} == {
        NETWORK[i].node_id for i in (0, 1, 2, 3, 6, 7)
    }
    assert {d.node_id for d in directory.nodes(role=EXIT, region="EU")} == {
        NETWORK[i].node_id for i in (4, 5)
    }
    assert ids(directory.nodes(role=EXIT, country="US")) == [NETWORK[6].node_id]
    assert ids(directory.nodes(region="", country="")) == [NETWORK[7].node_id]
    assert directory.nodes(role=RELAY, country="NL") == ()
    assert directory.nodes(region="APAC") == ()
    for subset in (directory.nodes(role=RELAY), directory.nodes(region="EU")):
        assert ids(subset) == sorted(ids(subset))


@pytest.mark.parametrize(
    "filters",
    [
        {"region": "eu"},
        {"country": "de"},
        {"country": "DEU"},
        {"region": "E U"},
        {"region": "X" * 17},
        {"role": "exit"},
    ],
)
def test_filters_that_can_never_match_are_refused(
    directory: Directory, filters: dict[str, Any]
) -> None:
    with pytest.raises(LocalProtocolError):
        directory.nodes(**filters)
    with pytest.raises(LocalProtocolError):
        directory.sample(k=1, random_bytes=seeded(b"x"), **filters)


def test_snapshot_is_immutable(directory: Directory) -> None:
    with pytest.raises(AttributeError):
        directory.now = 0
    with pytest.raises(AttributeError):
        del directory.now
    assert "8 nodes" in repr(directory)


def test_bad_construction() -> None:
    with pytest.raises(LocalProtocolError):
        Directory(NETWORK, now=float("nan"))
    with pytest.raises(LocalProtocolError):
        Directory([NETWORK[0].encode()], now=NOW)  # type: ignore[list-item]


# --- Expiry -----------------------------------------------------------------------------


def test_only_current_descriptors_enter_the_snapshot() -> None:
    expired = desc(10, published_at=T0 - LIFETIME, expires_at=NOW)  # expires_at <= now
    future = desc(11, published_at=NOW + 3600, expires_at=NOW + 7200)
    ok = desc(12)
    directory = Directory([expired, future, ok], now=NOW)
    assert ids(directory.nodes()) == [ok.node_id]
    assert directory.not_current == 2
    assert directory.version_conflicts == 0


def test_refreshed_drops_expired_and_leaves_the_old_snapshot_alone() -> None:
    short = desc(20, expires_at=T0 + 600)
    long = desc(21, expires_at=T0 + 3000)
    before = Directory([short, long], now=NOW)
    after = before.refreshed(T0 + 600)
    assert short.node_id not in after
    assert long.node_id in after
    assert after.now == T0 + 600
    assert after.not_current == 1
    assert len(before) == 2  # untouched
    assert before.get(short.node_id) == short
    assert len(after.refreshed(T0 + 3000)) == 0


def test_refreshed_merges_new_descriptors() -> None:
    a = desc(30)
    before = Directory([a], now=NOW)
    b = desc(31, roles=frozenset({EXIT}))
    a2 = desc(30, version=T0 + 100, published_at=T0 + 100, expires_at=T0 + 100 + LIFETIME)
    after = before.refreshed(NOW + 100, [b, a2])
    assert len(after) == 2
    assert after.get(a.node_id) == a2
    assert after.get(b.node_id) == b
    assert before.get(a.node_id) == a


def test_refreshed_keeps_a_current_old_version_over_an_expired_new_one() -> None:
    old = desc(32, expires_at=T0 + 3000)
    newer_but_expired = desc(32, version=T0 + 1, published_at=T0 + 1, expires_at=T0 + 100)
    after = Directory([old], now=NOW).refreshed(T0 + 200, [newer_but_expired])
    assert after.get(old.node_id) == old
    assert after.not_current == 1


# --- Superseding and conflicts ----------------------------------------------------------


def test_the_highest_version_wins_in_any_order() -> None:
    v1 = desc(40, version=T0)
    v2 = desc(40, version=T0 + 5)
    v3 = desc(40, version=T0 + 9)
    for order in ([v1, v2, v3], [v3, v1, v2], [v2, v3, v1]):
        directory = Directory(order, now=NOW)
        assert len(directory) == 1
        assert directory.get(v1.node_id) == v3
        assert directory.version_conflicts == 0


def test_refreshed_never_goes_back_a_version() -> None:
    v2 = desc(41, version=T0 + 5)
    v1 = desc(41, version=T0)
    assert Directory([v2], now=NOW).refreshed(NOW, [v1]).get(v2.node_id) == v2


def test_an_exact_duplicate_is_not_a_conflict() -> None:
    a = desc(42)
    directory = Directory([a, a], now=NOW)
    assert len(directory) == 1
    assert directory.version_conflicts == 0
    assert directory.refreshed(NOW, [a]).version_conflicts == 0


def test_version_conflict_keeps_the_first_and_counts() -> None:
    first = desc(43, software="a/1")
    second = desc(43, software="b/2")  # same node, same version, other body
    directory = Directory([first, second], now=NOW)
    assert directory.get(first.node_id) == first
    assert directory.version_conflicts == 1
    reversed_ = Directory([second, first], now=NOW)
    assert reversed_.get(first.node_id) == second
    refreshed = directory.refreshed(NOW, [second])
    assert refreshed.get(first.node_id) == first  # the held one stays
    assert refreshed.version_conflicts == 1


# --- Sampling ---------------------------------------------------------------------------


def test_sample_k_larger_than_the_pool_returns_the_pool(directory: Directory) -> None:
    got = directory.sample(k=100, random_bytes=seeded(b"big"), role=EXIT)
    assert sorted(ids(got)) == sorted(NETWORK[i].node_id for i in (4, 5, 6))
    assert directory.sample(k=0, random_bytes=seeded(b"zero")) == ()
    assert directory.sample(k=5, random_bytes=seeded(b"none"), country="FR") == ()


@pytest.mark.parametrize("k", [-1, 1.5, True])
def test_sample_refuses_a_bad_k(directory: Directory, k: Any) -> None:
    with pytest.raises(LocalProtocolError):
        directory.sample(k=k, random_bytes=seeded(b"x"))


def test_sample_respects_filters_and_exclude(directory: Directory) -> None:
    excluded = {NETWORK[4].node_id, NETWORK[0].node_id}
    for seed in range(50):
        got = directory.sample(
            k=2, random_bytes=seeded(seed.to_bytes(2, "big")), role=EXIT, exclude=excluded
        )
        assert sorted(ids(got)) == sorted([NETWORK[5].node_id, NETWORK[6].node_id])
    everything_excluded = {d.node_id for d in NETWORK}
    assert directory.sample(k=3, random_bytes=seeded(b"x"), exclude=everything_excluded) == ()
    got = directory.sample(k=10, random_bytes=seeded(b"eu"), region="EU", country="DE")
    assert sorted(ids(got)) == sorted(NETWORK[i].node_id for i in range(4))


def test_sample_is_deterministic_for_a_seed(directory: Directory) -> None:
    one = directory.sample(k=4, random_bytes=seeded(b"seed"))
    two = directory.sample(k=4, random_bytes=seeded(b"seed"))
    assert one == two
    # Insertion order does not matter: the pool is in node id order before drawing.
    shuffled = Directory(reversed(NETWORK), now=NOW)
    assert shuffled.sample(k=4, random_bytes=seeded(b"seed")) == one
    # Other seeds give other samples (at least some of the time).
    others = {ids(directory.sample(k=4, random_bytes=seeded(bytes([s]))))[0] for s in range(40)}
    assert len(others) > 1


def test_sample_refuses_short_random_bytes(directory: Directory) -> None:
    with pytest.raises(LocalProtocolError):
        directory.sample(k=2, random_bytes=lambda n: b"\x00" * (n - 1))
    with pytest.raises(LocalProtocolError):
        directory.sample(k=2, random_bytes=lambda n: b"\x00" * (n - 1), weight=lambda d: 1.0)


def chi_square(counts: Counter[NodeId], keys: list[NodeId], expected: float) -> float:
    return sum((counts[key] - expected) ** 2 / expected for key in keys)


def test_uniform_sampling_is_roughly_uniform() -> None:
    # 10 nodes (not a power of two, so rejection sampling matters), k=3, 3000 trials:
    # each node is expected 900 times. Chi-square with 9 degrees of freedom: 27.9 is the
    # 0.1% critical value. Seeded, so this is a fixed check and never flakes.
    pool = [desc(100 + i) for i in range(10)]
    directory = Directory(pool, now=NOW)
    rng = seeded(b"uniformity")
    counts: Counter[NodeId] = Counter()
    firsts: Counter[NodeId] = Counter()
    trials = 3000
    for _ in range(trials):
        got = directory.sample(k=3, random_bytes=rng)
        assert len(set(ids(got))) == 3
        counts.update(ids(got))
        firsts[got[0].node_id] += 1
    keys = [d.node_id for d in pool]
    assert chi_square(counts, keys, trials * 3 / 10) < 27.9
    assert chi_square(firsts, keys, trials / 10) < 27.9  # the order is random too


def test_weighted_sampling_favours_heavy_weights_and_skips_zero() -> None:
    heavy = desc(200, bandwidth_bps=90)
    light = desc(201, bandwidth_bps=10)
    zero = desc(202, bandwidth_bps=0)
    directory = Directory([heavy, light, zero], now=NOW)

    def weight(d: SignedDescriptor) -> float:
        return float(d.body.bandwidth_bps)

    rng = seeded(b"weights")
    firsts: Counter[NodeId] = Counter()
    trials = 2000
    for _ in range(trials):
        got = directory.sample(k=1, random_bytes=rng, weight=weight)
        assert len(got) == 1
        firsts[got[0].node_id] += 1
    assert firsts[zero.node_id] == 0
    # Expected 1800 : 200; allow a wide band.
    assert 1700 < firsts[heavy.node_id] < 1900
    # Asking for more than the positive-weight pool returns only positive weights.
    for _ in range(50):
        got = directory.sample(k=3, random_bytes=rng, weight=weight)
        assert sorted(ids(got)) == sorted([heavy.node_id, light.node_id])
    only_zero = directory.sample(k=2, random_bytes=rng, weight=lambda d: 0.0)
    assert only_zero == ()


def test_weighted_sampling_with_equal_weights_is_uniform() -> None:
    pool = [desc(300 + i) for i in range(6)]
    directory = Directory(pool, now=NOW)
    rng = seeded(b"equal")
    counts: Counter[NodeId] = Counter()
    trials = 3000
    for _ in range(trials):
        counts.update(ids(directory.sample(k=2, random_bytes=rng, weight=lambda d: 2.5)))
    # 5 degrees of freedom: 20.5 is the 0.1% critical value.
    assert chi_square(counts, [d.node_id for d in pool], trials * 2 / 6) < 20.5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1"])
def test_weighted_sampling_refuses_bad_weights(directory: Directory, bad: Any) -> None:
    with pytest.raises(LocalProtocolError):
        directory.sample(k=1, random_bytes=seeded(b"x"), weight=lambda d: bad)


POOL = tuple(
    desc(400 + i, roles=frozenset({EXIT}) if i % 3 == 0 else frozenset({RELAY})) for i in range(12)
)
POOL_DIRECTORY = Directory(POOL, now=NOW)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(min_value=0, max_value=20),
    seed=st.binary(max_size=8),
    excluded=st.sets(st.integers(min_value=0, max_value=11), max_size=12),
    role=st.sampled_from([None, EXIT, RELAY]),
    weights=st.none() | st.lists(st.sampled_from([0.0, 0.5, 1.0, 7.0]), min_size=12, max_size=12),
)
def test_samples_are_distinct_matching_and_bounded(
    k: int,
    seed: bytes,
    excluded: set[int],
    role: DescriptorRole | None,
    weights: list[float] | None,
) -> None:
    exclude = {POOL[i].node_id for i in excluded}
    weight_of = (
        None if weights is None else {d.node_id: w for d, w in zip(POOL, weights, strict=True)}
    )
    got = POOL_DIRECTORY.sample(
        k=k,
        random_bytes=seeded(seed),
        role=role,
        exclude=exclude,
        weight=None if weight_of is None else (lambda d: weight_of[d.node_id]),
    )
    eligible = {
        d.node_id
        for d in POOL_DIRECTORY.nodes(role=role)
        if d.node_id not in exclude and (weight_of is None or weight_of[d.node_id] > 0)
    }
    got_ids = ids(got)
    assert len(got_ids) == len(set(got_ids))
    assert set(got_ids) <= eligible
    assert len(got_ids) == min(k, len(eligible))
