"""The provider-record store: topics, validation, merging, caps, rate limits, sampling, JSON.

Descriptors are built and signed as in test_store.py; a distinct node is a distinct
Identity. Time is Unix seconds passed as ``now``. Randomness is a seeded stream
(SHA-256 in counter mode, as in test_directory.py), so the statistical bounds below are
checked once against a fixed seed and cannot flake.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.constants import MAX_DESCRIPTOR_BYTES
from discovery.descriptor import (
    REASONS,
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
)
from discovery.providers import (
    DROP_REASONS,
    PROVIDERS_FORMAT,
    TOPIC_KEY_BYTES,
    TOPIC_KEY_DOMAIN,
    ProviderStore,
    ProviderStoreError,
    Topic,
    TopicError,
    topic_key,
    topics_for,
)
from discovery.store import descriptor_key
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import Identity

ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
T0 = 1_700_000_000
NOW = T0 + 60
LIFETIME = 3600
RELAY = DescriptorRole.RELAY
EXIT = DescriptorRole.EXIT
ORIGIN = b"\x07" * 20


@cache
def identity(n: int) -> Identity:
    seed = hashlib.sha256(b"providers-test-identity" + n.to_bytes(4, "big")).digest()
    link = hashlib.sha256(b"providers-test-link" + n.to_bytes(4, "big")).digest()
    return Identity(identity_seed=seed, link_private=link)


def make_signed(
    n: int = 1,
    *,
    roles: frozenset[DescriptorRole] = frozenset({RELAY}),
    region: str = "EU",
    country: str = "DE",
    version: int = T0,
    published_at: int = T0,
    expires_at: int = T0 + LIFETIME,
    **overrides: Any,
) -> SignedDescriptor:
    ident = identity(n)
    fields: dict[str, Any] = {
        "version": version,
        "identity_key": ident.identity_public,
        "link_key": ident.link_public,
        "onion_key": ONION,
        "addresses": ((f"192.0.2.{n % 250 + 1}", 7520),),
        "roles": roles,
        "exit_policy": ((443, 443),) if EXIT in roles else (),
        "region": region,
        "country": country,
        "operator": Operator(name=f"op{n % 10}"),
        "software": "meshnode/0.1.0",
        "published_at": published_at,
        "expires_at": expires_at,
    }
    fields.update(overrides)
    return sign(NodeDescriptor(**fields), ident)


def value(n: int = 1, **overrides: Any) -> bytes:
    return make_signed(n, **overrides).encode()


RELAY_KEY = Topic(RELAY).key
RELAY_DE_KEY = Topic(RELAY, country="DE").key
EXIT_KEY = Topic(EXIT).key


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


def drops(store: ProviderStore) -> dict[str, int]:
    return {k: v for k, v in store.stats.items() if k.startswith("providers.drop.") and v}


def everything(store: ProviderStore, key: bytes, now: float = NOW) -> set[bytes]:
    return set(store.get(key, now=now, limit=10_000, random_bytes=seeded(b"all")))


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts Ed25519 signature checks made from now on (descriptor.py calls crypto's)."""
    calls = [0]
    real = crypto.ed25519_verify

    def counting(public_key: bytes, message: bytes, signature: bytes) -> bool:
        calls[0] += 1
        return real(public_key, message, signature)

    monkeypatch.setattr(crypto, "ed25519_verify", counting)
    yield calls


# --- Topics -----------------------------------------------------------------------------

NAMES = [
    (Topic(RELAY), "relay"),
    (Topic(EXIT), "exit"),
    (Topic(EXIT, region="EU"), "exit/region/EU"),
    (Topic(EXIT, country="DE"), "exit/country/DE"),
    (Topic(RELAY, region="EU"), "relay/region/EU"),
    (Topic(RELAY, country="US"), "relay/country/US"),
    (Topic(EXIT, region="APAC-2"), "exit/region/APAC-2"),
]


@pytest.mark.parametrize(("topic", "name"), NAMES)
def test_topic_names_and_parse_round_trip(topic: Topic, name: str) -> None:
    assert topic.name == name == str(topic)
    assert Topic.parse(name) == topic


def test_topic_keys_are_blake2b_160_of_domain_and_name() -> None:
    keys = set()
    for topic, name in NAMES:
        key = topic_key(topic)
        assert len(key) == TOPIC_KEY_BYTES == 20
        assert key == topic.key
        assert key == crypto.hash_bytes(TOPIC_KEY_DOMAIN + name.encode(), size=20)
        keys.add(key)
    assert len(keys) == len(NAMES)
    assert TOPIC_KEY_DOMAIN == b"meshnode/topic/v1\0"
    node_id = identity(1).node_id
    assert descriptor_key(node_id) not in keys


@pytest.mark.parametrize(
    "name",
    [
        "",
        "EXIT",
        "Exit",
        "guard",
        " exit",
        "exit ",
        "exit\n",
        "exit/",
        "exit/region",
        "exit/region/",
        "exit/region/eu",
        "exit/region/EU\n",
        "exit/region/EU/",
        "exit/region/E U",
        "exit/region/" + "A" * 17,
        "exit/country/D",
        "exit/country/DEU",
        "exit/country/de",
        "exit/country/D1",
        "exit/city/Berlin",
        "exit/region/EU/country/DE",
        "exit//EU",
        "/exit",
        "relay/" * 20,
        "x" * 10_000,
    ],
)
def test_topic_parse_is_strict(name: str) -> None:
    with pytest.raises(TopicError):
        Topic.parse(name)


def test_topic_parse_refuses_non_text_and_errors_are_decode_errors() -> None:
    with pytest.raises(DecodeError):
        Topic.parse(b"exit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"role": "exit"},
        {"role": EXIT, "region": "eu"},
        {"role": EXIT, "region": "EU", "country": "DE"},
        {"role": EXIT, "country": "D"},
        {"role": EXIT, "country": "de"},
        {"role": EXIT, "region": "A" * 17},
        {"role": EXIT, "region": "EU/1"},
        {"role": EXIT, "region": 7},
    ],
)
def test_bad_topics_cannot_be_built(fields: dict[str, Any]) -> None:
    with pytest.raises(TopicError):
        Topic(**fields)


def test_topic_key_takes_a_topic() -> None:
    with pytest.raises(LocalProtocolError):
        topic_key("exit")  # type: ignore[arg-type]


def test_topics_for_every_role_and_place() -> None:
    both = make_signed(1, roles=frozenset({RELAY, EXIT}), region="EU", country="DE")
    assert [t.name for t in topics_for(both)] == [
        "exit",
        "exit/region/EU",
        "exit/country/DE",
        "relay",
        "relay/region/EU",
        "relay/country/DE",
    ]
    assert topics_for(both.body) == topics_for(both)
    nowhere = make_signed(2, region="", country="")
    assert topics_for(nowhere) == [Topic(RELAY)]
    only_country = make_signed(3, roles=frozenset({EXIT}), region="")
    assert topics_for(only_country) == [Topic(EXIT), Topic(EXIT, country="DE")]
    assert topics_for(make_signed(4, roles=frozenset())) == []


# --- Adding and reading -----------------------------------------------------------------


def test_add_then_get() -> None:
    store = ProviderStore()
    v = value(1)
    assert store.add(RELAY_KEY, v, now=NOW, origin=ORIGIN)
    assert store.get(RELAY_KEY, now=NOW, limit=10, random_bytes=seeded(b"x")) == [v]
    assert store.get(EXIT_KEY, now=NOW, limit=10, random_bytes=seeded(b"x")) == []
    assert store.get(b"short", now=NOW, limit=10, random_bytes=seeded(b"x")) == []
    assert len(store) == 1
    assert store.total_bytes == len(v)
    assert store.topics() == [Topic(RELAY)]
    assert [d.encode() for d in store.descriptors(NOW)] == [v]
    assert store.stats["providers.added"] == 1
    assert not drops(store)


def test_one_descriptor_in_each_of_its_topics() -> None:
    store = ProviderStore()
    signed = make_signed(1, roles=frozenset({RELAY, EXIT}))
    for topic in topics_for(signed):
        assert store.add(topic.key, signed.encode(), now=NOW)
    assert len(store) == 6
    assert store.topics() == sorted(topics_for(signed), key=lambda t: t.name)
    assert store.descriptors(NOW) == [signed]  # one per node id
    assert store.total_bytes == 6 * len(signed.encode())


def test_many_providers_per_topic() -> None:
    store = ProviderStore()
    values = {value(i) for i in range(10, 20)}
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    assert everything(store, RELAY_KEY) == values
    assert len(store.descriptors(NOW)) == 10


def test_duplicate_is_accepted_without_a_signature_check(verify_calls: list[int]) -> None:
    store = ProviderStore()
    v = value(1)
    calls = verify_calls[0]
    assert store.add(RELAY_KEY, v, now=NOW)
    assert verify_calls[0] == calls + 1
    for i in range(20):
        assert store.add(RELAY_KEY, v, now=NOW + i, origin=bytes([i]) * 20)
    # The same bytes under another of its topics are known too: verified once, held twice.
    assert store.add(RELAY_DE_KEY, v, now=NOW)
    assert verify_calls[0] == calls + 1
    assert len(store) == 2
    assert store.stats["providers.duplicate"] == 20
    assert store.stats["providers.added"] == 2


def test_higher_version_replaces() -> None:
    store = ProviderStore()
    v1 = value(1, version=T0)
    v2 = value(1, version=T0 + 1, published_at=T0 + 1, expires_at=T0 + LIFETIME + 1)
    assert store.add(RELAY_KEY, v1, now=NOW)
    assert store.add(RELAY_KEY, v2, now=NOW)
    assert everything(store, RELAY_KEY) == {v2}
    assert len(store) == 1
    assert store.total_bytes == len(v2)
    assert store.stats["providers.replaced"] == 1


def test_stale_version_refused_and_newer_kept() -> None:
    store = ProviderStore()
    new = value(1, version=T0 + 5)
    old = value(1, version=T0 + 4)
    assert store.add(RELAY_KEY, new, now=NOW)
    assert not store.add(RELAY_KEY, old, now=NOW)
    assert everything(store, RELAY_KEY) == {new}
    assert drops(store) == {"providers.drop.stale_version": 1}


def test_version_conflict_refused() -> None:
    store = ProviderStore()
    first = value(1, software="meshnode/0.1.0")
    second = value(1, software="meshnode/0.1.1")  # same version, other body
    assert store.add(RELAY_KEY, first, now=NOW)
    assert not store.add(RELAY_KEY, second, now=NOW)
    assert everything(store, RELAY_KEY) == {first}
    assert drops(store) == {"providers.drop.version_conflict": 1}


def test_versions_are_per_topic_and_descriptors_pick_the_newest() -> None:
    # v1 in DE, then the node moves to FR with v2: relay/country/DE keeps v1 until it
    # expires, but descriptors() knows only the newest.
    store = ProviderStore()
    v1 = make_signed(1, country="DE", version=T0)
    v2 = make_signed(1, country="FR", version=T0 + 1)
    assert store.add(RELAY_DE_KEY, v1.encode(), now=NOW)
    assert store.add(RELAY_KEY, v1.encode(), now=NOW)
    assert store.add(RELAY_KEY, v2.encode(), now=NOW)
    assert not store.add(RELAY_DE_KEY, v2.encode(), now=NOW)  # v2 is not in DE
    assert everything(store, RELAY_DE_KEY) == {v1.encode()}
    assert everything(store, RELAY_KEY) == {v2.encode()}
    assert store.descriptors(NOW) == [v2]
    assert drops(store) == {"providers.drop.topic_mismatch": 1}


# --- Refusing ---------------------------------------------------------------------------


def _broken_signature() -> bytes:
    v = value(1)
    return v[:-1] + bytes([v[-1] ^ 1])


REFUSALS: list[tuple[str, bytes, bytes, float]] = [
    ("topic_mismatch", EXIT_KEY, value(1), NOW),  # a relay is no exit
    ("topic_mismatch", Topic(RELAY, country="FR").key, value(1), NOW),
    ("topic_mismatch", Topic(RELAY, region="NA").key, value(1), NOW),
    ("topic_mismatch", descriptor_key(identity(1).node_id), value(1), NOW),
    ("topic_mismatch", b"short", value(1), NOW),
    ("topic_mismatch", RELAY_KEY, value(1, roles=frozenset()), NOW),
    ("bad_signature", RELAY_KEY, _broken_signature(), NOW),
    ("bad_cbor", RELAY_KEY, b"\xff", NOW),
    ("bad_cbor", RELAY_KEY, b"", NOW),
    ("non_canonical", RELAY_KEY, b"\x18\x01", NOW),
    ("too_large", RELAY_KEY, bytes(MAX_DESCRIPTOR_BYTES + 1), NOW),
    ("expired", RELAY_KEY, value(1), T0 + LIFETIME),
    ("from_future", RELAY_KEY, value(1), T0 - 3600),
]


@pytest.mark.parametrize(("reason", "key", "data", "now"), REFUSALS)
def test_refusals_are_counted_and_hold_nothing(
    reason: str, key: bytes, data: bytes, now: float
) -> None:
    store = ProviderStore()
    assert store.add(key, data, now=now, origin=ORIGIN) is False
    assert len(store) == 0
    assert store.total_bytes == 0
    assert store.topics() == []
    assert store.get(key, now=now, limit=5, random_bytes=seeded(b"x")) == []
    assert drops(store) == {f"providers.drop.{reason}": 1}
    assert reason in DROP_REASONS


def test_drop_reasons_are_the_descriptor_ones_and_the_stores() -> None:
    assert set(DROP_REASONS) == {
        *REASONS,
        "rate_limited",
        "too_large",
        "topic_mismatch",
        "stale_version",
        "topic_full",
        "store_full",
        "bad_record",
    }
    assert len(DROP_REASONS) == len(set(DROP_REASONS))


def test_non_bytes_value_and_key_are_refused() -> None:
    store = ProviderStore()
    assert not store.add(RELAY_KEY, "text", now=NOW)  # type: ignore[arg-type]
    assert not store.add(RELAY_KEY, bytearray(value(1)), now=NOW)  # type: ignore[arg-type]
    assert not store.add(12345, value(1), now=NOW)  # type: ignore[arg-type]
    assert len(store) == 0
    assert drops(store) == {"providers.drop.bad_cbor": 2, "providers.drop.topic_mismatch": 1}


def test_non_finite_now_is_a_local_error() -> None:
    store = ProviderStore()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError):
            store.add(RELAY_KEY, value(1), now=bad)
        with pytest.raises(LocalProtocolError):
            store.get(RELAY_KEY, now=bad, limit=1, random_bytes=seeded(b"x"))
        with pytest.raises(LocalProtocolError):
            store.cull(bad)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=MAX_DESCRIPTOR_BYTES + 16),
    key=st.one_of(st.just(RELAY_KEY), st.binary(max_size=24)),
)
def test_random_bytes_only_ever_refused(data: bytes, key: bytes) -> None:
    store = ProviderStore()
    assert store.add(key, data, now=NOW, origin=ORIGIN) is False
    assert len(store) == 0
    assert sum(drops(store).values()) == 1
    assert set(drops(store)) <= {f"providers.drop.{r}" for r in DROP_REASONS}


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused(position: int, flip: int) -> None:
    v = value(1)
    i = position % len(v)
    forged = v[:i] + bytes([v[i] ^ flip]) + v[i + 1 :]
    store = ProviderStore()
    assert store.add(RELAY_KEY, forged, now=NOW) is False
    assert len(store) == 0


# --- Rate limit -------------------------------------------------------------------------


def test_rate_limit_per_origin_local_unlimited() -> None:
    store = ProviderStore(add_rate_per_s=1.0, add_burst=3.0)
    v = value(1)
    flooder, honest = b"\x01" * 20, b"\x02" * 20
    results = [store.add(RELAY_KEY, v, now=NOW, origin=flooder) for _ in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert store.stats["providers.drop.rate_limited"] == 7
    assert store.add(RELAY_KEY, v, now=NOW, origin=honest)  # its own bucket
    assert all(store.add(RELAY_KEY, v, now=NOW) for _ in range(50))  # local adds
    assert store.add(RELAY_KEY, v, now=NOW + 1.0, origin=flooder)  # refilled
    assert store.stats["providers.drop.rate_limited"] == 7


def test_flood_from_one_origin_spends_no_signature_checks(verify_calls: list[int]) -> None:
    values = [value(100 + i) for i in range(40)]  # signing checks signatures: do it first
    store = ProviderStore(add_rate_per_s=1.0, add_burst=5.0)
    before = verify_calls[0]
    results = [store.add(RELAY_KEY, v, now=NOW, origin=ORIGIN) for v in values]
    assert results == [True] * 5 + [False] * 35
    assert verify_calls[0] - before == 5  # only the burst was verified
    assert drops(store) == {"providers.drop.rate_limited": 35}
    assert len(store) == 5


def test_rate_limit_applies_to_garbage_too() -> None:
    store = ProviderStore(add_rate_per_s=1.0, add_burst=2.0)
    for _ in range(5):
        store.add(RELAY_KEY, b"garbage", now=NOW, origin=ORIGIN)
    assert drops(store) == {"providers.drop.bad_cbor": 2, "providers.drop.rate_limited": 3}


# --- Expiry -----------------------------------------------------------------------------


def test_expired_entries_are_never_returned() -> None:
    store = ProviderStore()
    short = value(3, expires_at=T0 + 600)
    long = value(4, expires_at=T0 + 3600)
    assert store.add(RELAY_KEY, short, now=NOW)
    assert store.add(RELAY_KEY, long, now=NOW)
    assert everything(store, RELAY_KEY, T0 + 599) == {short, long}
    assert everything(store, RELAY_KEY, T0 + 600) == {long}
    assert store.stats["providers.expired"] == 1
    assert len(store) == 1
    assert store.total_bytes == len(long)
    assert store.cull(T0 + 3600) == 1
    assert store.topics() == []
    assert store.descriptors(T0 + 3600) == []


def test_expired_entry_gives_way_to_any_valid_one() -> None:
    store = ProviderStore()
    old = value(1, version=T0 + 9, expires_at=T0 + 600)
    lower = value(1, version=T0 + 1, published_at=T0 + 500, expires_at=T0 + 4000)
    assert store.add(RELAY_KEY, old, now=NOW)
    assert store.add(RELAY_KEY, lower, now=T0 + 700)
    assert everything(store, RELAY_KEY, T0 + 700) == {lower}
    assert store.stats["providers.expired"] == 1


# --- Caps -------------------------------------------------------------------------------


def test_full_topic_evicts_soonest_expiring() -> None:
    store = ProviderStore(max_per_topic=3)
    values = [value(10 + i, expires_at=T0 + 1000 + 100 * i) for i in range(3)]
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    newcomer = value(20, expires_at=T0 + 3000)
    assert store.add(RELAY_KEY, newcomer, now=NOW)
    assert everything(store, RELAY_KEY) == {*values[1:], newcomer}
    assert store.stats["providers.evicted"] == 1
    # Other topics are not affected by this one's cap.
    assert store.add(RELAY_DE_KEY, values[0], now=NOW)


def test_full_topic_refuses_a_newcomer_expiring_soonest() -> None:
    store = ProviderStore(max_per_topic=2)
    values = [value(10 + i, expires_at=T0 + 2000 + i) for i in range(2)]
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    assert not store.add(RELAY_KEY, value(20, expires_at=T0 + 1000), now=NOW)
    assert not store.add(RELAY_KEY, value(21, expires_at=T0 + 2000), now=NOW)  # a tie too
    assert everything(store, RELAY_KEY) == set(values)
    assert drops(store) == {"providers.drop.topic_full": 2}
    assert store.stats["providers.evicted"] == 0


def test_replacement_in_a_full_topic_needs_no_eviction() -> None:
    store = ProviderStore(max_per_topic=2)
    a1 = value(3, expires_at=T0 + 1000)
    b = value(4, expires_at=T0 + 2000)
    a2 = value(3, version=T0 + 1, expires_at=T0 + 1500)
    for v in (a1, b, a2):
        assert store.add(RELAY_KEY, v, now=NOW)
    assert everything(store, RELAY_KEY) == {a2, b}
    assert store.stats["providers.evicted"] == 0


def test_topic_cap_displaces_only_single_entry_topics() -> None:
    store = ProviderStore(max_topics=2)
    de = value(1, country="DE", expires_at=T0 + 1000)
    fr = value(2, country="FR", expires_at=T0 + 2000)
    assert store.add(Topic(RELAY, country="DE").key, de, now=NOW)
    assert store.add(Topic(RELAY, country="FR").key, fr, now=NOW)
    # A third topic expiring sooner than every single-entry topic is refused...
    nl_early = value(3, country="NL", expires_at=T0 + 900)
    assert not store.add(Topic(RELAY, country="NL").key, nl_early, now=NOW)
    assert drops(store) == {"providers.drop.store_full": 1}
    # ...one expiring later displaces the soonest-expiring single-entry topic (DE).
    nl = value(4, country="NL", expires_at=T0 + 3000)
    assert store.add(Topic(RELAY, country="NL").key, nl, now=NOW)
    assert [t.name for t in store.topics()] == ["relay/country/FR", "relay/country/NL"]
    assert store.stats["providers.evicted"] == 1
    # Topics with two or more providers are never displaced by a new topic.
    assert store.add(Topic(RELAY, country="FR").key, value(5, country="FR"), now=NOW)
    assert store.add(Topic(RELAY, country="NL").key, value(6, country="NL"), now=NOW)
    late = value(7, country="SE", expires_at=T0 + LIFETIME + 100, published_at=T0 + 100)
    assert not store.add(Topic(RELAY, country="SE").key, late, now=NOW)
    assert len(store.topics()) == 2
    assert drops(store) == {"providers.drop.store_full": 2}


def test_byte_cap_evicts_soonest_expiring_anywhere() -> None:
    values = [value(10 + i, expires_at=T0 + 1000 + 10 * i) for i in range(12)]
    size = len(values[0])
    assert all(len(v) == size for v in values)  # same fields, same length
    store = ProviderStore(max_bytes=MAX_DESCRIPTOR_BYTES)
    fit = MAX_DESCRIPTOR_BYTES // size
    assert 1 < fit < len(values)
    for i, v in enumerate(values):
        # Alternate topics: the cap is over the whole store.
        assert store.add(RELAY_KEY if i % 2 else RELAY_DE_KEY, v, now=NOW)
        assert store.total_bytes <= store.max_bytes
    assert len(store) == fit
    assert store.stats["providers.evicted"] == len(values) - fit
    held = everything(store, RELAY_KEY) | everything(store, RELAY_DE_KEY)
    assert held == set(values[-fit:])  # the soonest-expiring went first
    # A newcomer that would expire soonest is refused.
    assert not store.add(RELAY_KEY, value(30, expires_at=T0 + 500), now=NOW)
    assert drops(store) == {"providers.drop.store_full": 1}


def test_byte_cap_never_evicts_the_entry_being_replaced() -> None:
    values = [value(10 + i, expires_at=T0 + 1000 + 10 * i) for i in range(8)]
    size = len(values[0])
    fit = MAX_DESCRIPTOR_BYTES // size
    store = ProviderStore(max_bytes=MAX_DESCRIPTOR_BYTES)
    for v in values[:fit]:
        assert store.add(RELAY_KEY, v, now=NOW)
    assert store.total_bytes + size > MAX_DESCRIPTOR_BYTES  # full, in bytes
    # Node 10 (expiring soonest) republishes a larger descriptor: its old entry goes by
    # replacement, and the next-soonest (node 11) makes room for the extra bytes.
    bigger = value(
        10,
        version=T0 + 1,
        expires_at=T0 + 3000,
        operator=Operator(name="x" * 64, contact="y" * 128),
    )
    assert len(bigger) - size > MAX_DESCRIPTOR_BYTES - store.total_bytes
    assert store.add(RELAY_KEY, bigger, now=NOW)
    assert everything(store, RELAY_KEY) == {bigger, *values[2:fit]}
    assert store.stats["providers.replaced"] == 1
    assert store.stats["providers.evicted"] == 1
    assert store.total_bytes <= store.max_bytes


def test_many_replacements_keep_one_entry_and_expire_cleanly() -> None:
    store = ProviderStore()
    for version in range(300):
        v = value(1, version=T0 + version, expires_at=T0 + 1000 + version)
        assert store.add(RELAY_KEY, v, now=NOW)
        assert len(store) == 1
    assert store.stats["providers.replaced"] == 299
    assert store.cull(T0 + 1000 + 298) == 0
    assert store.cull(T0 + 1000 + 299) == 1
    assert len(store) == 0
    assert store.total_bytes == 0
    assert store.stats["providers.expired"] == 1
    assert "entries=0" in repr(store)


def test_caps_are_checked() -> None:
    with pytest.raises(ValueError, match="max_per_topic"):
        ProviderStore(max_per_topic=0)
    with pytest.raises(ValueError, match="max_topics"):
        ProviderStore(max_topics=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ProviderStore(max_bytes=MAX_DESCRIPTOR_BYTES - 1)


COUNTRIES = ("DE", "FR", "NL", "SE", "US")


@cache
def pool_value(n: int, version: int, where: int) -> bytes:
    """A pre-signed descriptor from a small pool: node n, a version, a place."""
    return value(
        n,
        roles=frozenset({RELAY, EXIT}) if n % 3 == 0 else frozenset({RELAY}),
        region=("EU", "NA", "")[where % 3],
        country=COUNTRIES[where % len(COUNTRIES)],
        version=T0 + version,
        published_at=T0 + version,
        expires_at=T0 + version + 600 + 300 * ((n + where) % 8),
    )


@cache
def decoded(data: bytes) -> SignedDescriptor:
    return SignedDescriptor.decode(data, now=T0)


def check_invariants(store: ProviderStore, now: float) -> None:
    topics = store.topics()
    assert len(topics) <= store.max_topics
    assert store.total_bytes <= store.max_bytes
    held = 0
    size = 0
    for topic in topics:
        got = store.get(topic.key, now=now, limit=10_000, random_bytes=seeded(b"all"))
        assert len(got) <= store.max_per_topic
        held += len(got)
        size += sum(map(len, got))
        for v in got:
            assert topic in topics_for(decoded(v))
            assert decoded(v).is_current(now)
        ids = [decoded(v).node_id for v in got]
        assert len(ids) == len(set(ids))  # one entry per node per topic
    assert held == len(store)
    assert size == store.total_bytes


OPERATION = st.tuples(
    st.integers(min_value=0, max_value=11),  # node
    st.integers(min_value=0, max_value=3),  # version
    st.integers(min_value=0, max_value=5),  # place
    st.integers(min_value=0, max_value=5),  # which of its topics
    st.integers(min_value=0, max_value=900),  # seconds after NOW
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(OPERATION, max_size=40),
    max_per_topic=st.integers(min_value=1, max_value=4),
    max_topics=st.integers(min_value=1, max_value=5),
    max_bytes=st.integers(min_value=MAX_DESCRIPTOR_BYTES, max_value=3 * MAX_DESCRIPTOR_BYTES),
)
def test_bounds_hold_under_any_sequence(
    ops: list[tuple[int, int, int, int, int]], max_per_topic: int, max_topics: int, max_bytes: int
) -> None:
    store = ProviderStore(max_per_topic=max_per_topic, max_topics=max_topics, max_bytes=max_bytes)
    now = float(NOW)
    for n, version, where, which, dt in ops:
        now = max(now, NOW + dt)  # the clock never runs backwards here
        v = pool_value(n, version, where)
        topics = topics_for(decoded(v))
        store.add(topics[which % len(topics)].key, v, now=now)
        check_invariants(store, now)


def test_flood_of_distinct_nodes_and_topics_stays_bounded() -> None:
    store = ProviderStore(max_per_topic=4, max_topics=3, max_bytes=4 * MAX_DESCRIPTOR_BYTES)
    countries = [a + b for a in "ABCDEFGH" for b in "XY"]
    for i, country in enumerate(countries * 2):
        v = value(200 + i, country=country, expires_at=T0 + 1000 + i)
        assert store.add(RELAY_KEY, v, now=NOW, origin=bytes([i]) * 20) or i >= 4
        store.add(Topic(RELAY, country=country).key, v, now=NOW, origin=bytes([i]) * 20)
        assert len(store.topics()) <= 3
        assert store.total_bytes <= store.max_bytes
        assert len(everything(store, RELAY_KEY)) <= 4
    # The relay topic holds the four that expire last.
    kept = {decoded(v).body.expires_at for v in everything(store, RELAY_KEY)}
    assert kept == {T0 + 1000 + i for i in range(28, 32)}


# --- Sampling ---------------------------------------------------------------------------


def chi_square(counts: Counter[bytes], keys: list[bytes], expected: float) -> float:
    return sum((counts[key] - expected) ** 2 / expected for key in keys)


def test_get_is_a_uniform_sample() -> None:
    # 10 providers (not a power of two, so rejection sampling matters), limit 3, 3000
    # asks: each provider is expected 900 times. Chi-square with 9 degrees of freedom:
    # 27.9 is the 0.1% critical value. Seeded, so this is a fixed check, never a flake.
    store = ProviderStore()
    values = [value(100 + i) for i in range(10)]
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    rng = seeded(b"uniformity")
    counts: Counter[bytes] = Counter()
    firsts: Counter[bytes] = Counter()
    trials = 3000
    for _ in range(trials):
        got = store.get(RELAY_KEY, now=NOW, limit=3, random_bytes=rng)
        assert len(set(got)) == 3
        counts.update(got)
        firsts[got[0]] += 1
    assert chi_square(counts, values, trials * 3 / 10) < 27.9
    assert chi_square(firsts, values, trials / 10) < 27.9  # the order is random too


def test_get_returns_everything_in_random_order_when_under_the_limit() -> None:
    store = ProviderStore()
    values = [value(100 + i) for i in range(6)]
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    orders = set()
    for seed in range(20):
        got = store.get(RELAY_KEY, now=NOW, limit=6, random_bytes=seeded(bytes([seed])))
        assert sorted(got) == sorted(values)
        orders.add(tuple(got))
    assert len(orders) > 10  # different askers see different orders
    one = store.get(RELAY_KEY, now=NOW, limit=3, random_bytes=seeded(b"same"))
    assert one == store.get(RELAY_KEY, now=NOW, limit=3, random_bytes=seeded(b"same"))
    assert store.get(RELAY_KEY, now=NOW, limit=0, random_bytes=seeded(b"x")) == []


def test_get_checks_its_arguments() -> None:
    store = ProviderStore()
    assert store.add(RELAY_KEY, value(1), now=NOW)
    assert store.add(RELAY_KEY, value(2), now=NOW)
    for kwargs in (
        {"limit": -1},
        {"limit": 1.5},
        {"limit": True},
        {"limit": 2, "max_bytes": -1},
        {"limit": 2, "entry_overhead": -1},
    ):
        with pytest.raises(LocalProtocolError):
            store.get(RELAY_KEY, now=NOW, random_bytes=seeded(b"x"), **kwargs)
    with pytest.raises(LocalProtocolError, match="random_bytes"):
        store.get(RELAY_KEY, now=NOW, limit=2, random_bytes=lambda n: b"")


def test_budgeted_get_fits_one_message() -> None:
    store = ProviderStore()
    values = [value(300 + i) for i in range(40)]
    size = len(values[0])
    assert all(len(v) == size for v in values)
    for v in values:
        assert store.add(RELAY_KEY, v, now=NOW)
    got = store.get(RELAY_KEY, now=NOW, limit=100, random_bytes=seeded(b"b"), max_bytes=12_000)
    assert sum(map(len, got)) <= 12_000
    assert len(got) == min(40, 12_000 // size)
    assert len(set(got)) == len(got)
    budget = 3 * size + size // 2
    got = store.get(RELAY_KEY, now=NOW, limit=10, random_bytes=seeded(b"b"), max_bytes=budget)
    assert len(got) == 3
    # The caller's per-entry framing counts against the budget too.
    got = store.get(
        RELAY_KEY,
        now=NOW,
        limit=10,
        random_bytes=seeded(b"b"),
        max_bytes=3 * size,
        entry_overhead=3,
    )
    assert len(got) == 2
    assert (
        store.get(RELAY_KEY, now=NOW, limit=10, random_bytes=seeded(b"b"), max_bytes=size - 1) == []
    )
    # The limit still applies under a roomy budget.
    assert (
        len(store.get(RELAY_KEY, now=NOW, limit=5, random_bytes=seeded(b"b"), max_bytes=10**9)) == 5
    )


def test_budgeted_get_stops_rather_than_favouring_small_entries() -> None:
    store = ProviderStore()
    big = value(1, operator=Operator(name="x" * 64, contact="y" * 128))
    small = value(2, region="", country="")
    assert len(big) > len(small) + 100
    assert store.add(RELAY_KEY, big, now=NOW)
    assert store.add(RELAY_KEY, small, now=NOW)
    firsts: Counter[bytes] = Counter()
    for seed in range(400):
        got = store.get(
            RELAY_KEY,
            now=NOW,
            limit=2,
            random_bytes=seeded(bytes([seed % 256, seed // 256])),
            max_bytes=len(big),
        )
        assert len(got) == 1  # never both, and never the small one "because it fits"
        firsts[got[0]] += 1
    assert 150 < firsts[big] < 250


# --- JSON -------------------------------------------------------------------------------


def _full_store() -> tuple[ProviderStore, dict[bytes, set[bytes]]]:
    store = ProviderStore()
    held: dict[bytes, set[bytes]] = {}
    for i in range(4):
        signed = make_signed(
            40 + i, roles=frozenset({RELAY, EXIT}) if i % 2 else frozenset({RELAY})
        )
        for topic in topics_for(signed):
            assert store.add(topic.key, signed.encode(), now=NOW)
            held.setdefault(topic.key, set()).add(signed.encode())
    return store, held


def test_json_round_trip() -> None:
    store, held = _full_store()
    text = store.to_json()
    assert json.loads(text)["format"] == PROVIDERS_FORMAT == "meshnode/provider-store/v1"
    loaded = ProviderStore.from_json(text, now=NOW + 5)
    assert loaded.topics() == store.topics()
    for key, values in held.items():
        assert everything(loaded, key, NOW + 5) == values
    assert len(loaded) == len(store)
    assert loaded.stats["providers.added"] == len(store)
    assert not drops(loaded)
    assert loaded.to_json() == text
    assert "pickle" not in text


def test_json_tampered_and_misfiled_records_dropped_others_kept() -> None:
    store, _ = _full_store()
    data = json.loads(store.to_json())
    victim = data["records"][1]
    raw = base64.b64decode(victim["value"])
    victim["value"] = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 0x80])).decode()
    data["records"][2]["topic"] = "exit/country/JP"  # a record filed under a wrong topic
    loaded = ProviderStore.from_json(json.dumps(data), now=NOW)
    assert len(loaded) == len(store) - 2
    assert drops(loaded) == {"providers.drop.bad_signature": 1, "providers.drop.topic_mismatch": 1}


def test_json_expired_and_malformed_records_dropped() -> None:
    store, _ = _full_store()
    data = json.loads(store.to_json())
    good = data["records"][0]["value"]
    data["records"] += [
        {"topic": "exit", "value": "!!not base64!!"},
        {"topic": "EXIT", "value": good},
        {"topic": "exit/region/eu", "value": good},
        {"topic": 5, "value": good},
        {"value": good},
        "not an object",
        None,
    ]
    loaded = ProviderStore.from_json(json.dumps(data), now=NOW)
    assert len(loaded) == len(store)
    assert drops(loaded) == {"providers.drop.bad_record": 7}
    expired = ProviderStore.from_json(store.to_json(), now=T0 + LIFETIME)
    assert len(expired) == 0
    assert drops(expired) == {"providers.drop.expired": len(store)}


def test_json_load_respects_caps() -> None:
    store, _ = _full_store()
    loaded = ProviderStore.from_json(store.to_json(), now=NOW, max_per_topic=1, max_topics=2)
    assert len(loaded.topics()) <= 2
    assert all(len(everything(loaded, t.key)) == 1 for t in loaded.topics())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2, 3]",
        '{"records": []}',
        '{"format": "meshnode/descriptor-store/v1", "records": []}',
        '{"format": "meshnode/provider-store/v1", "records": {}}',
        '{"format": "meshnode/provider-store/v1"}',
        "[" * 100_000,
        '{"format": "meshnode/provider-store/v1", "records": [NaN',
        b"{}",
        None,
    ],
)
def test_garbage_json_raises_a_clear_decode_error(text: Any) -> None:
    with pytest.raises(ProviderStoreError, match="provider store") as info:
        ProviderStore.from_json(text, now=NOW)
    assert isinstance(info.value, DecodeError)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_text_only_decode_error(text: str) -> None:
    try:
        loaded = ProviderStore.from_json(text, now=NOW)
    except DecodeError:
        return
    assert len(loaded) == 0
