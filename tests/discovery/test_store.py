"""The descriptor store: validation before storage, versions, expiry, caps, rate limits, JSON.

Descriptors are built and signed as in test_descriptor.py; a distinct node is a distinct
Identity. Time is Unix seconds passed as ``now``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.constants import MAX_DESCRIPTOR_BYTES
from discovery.descriptor import (
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
)
from discovery.store import (
    DESCRIPTOR_KEY_BYTES,
    DESCRIPTOR_KEY_DOMAIN,
    DescriptorStore,
    descriptor_key,
)
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import Identity

ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
T0 = 1_700_000_000
NOW = T0 + 60


def identity(n: int) -> Identity:
    return Identity(identity_seed=bytes([n]) * 32, link_private=bytes([(n + 128) % 256]) * 32)


IDENT = identity(1)
OTHER = identity(2)


def make_signed(ident: Identity = IDENT, **overrides: Any) -> SignedDescriptor:
    fields: dict[str, Any] = {
        "version": T0,
        "identity_key": ident.identity_public,
        "link_key": ident.link_public,
        "onion_key": ONION,
        "addresses": (("192.0.2.10", 7520),),
        "roles": frozenset({DescriptorRole.RELAY}),
        "region": "EU",
        "country": "DE",
        "operator": Operator(name="Example Ops"),
        "software": "meshnode/0.1.0",
        "published_at": T0,
        "expires_at": T0 + 3600,
    }
    fields.update(overrides)
    return sign(NodeDescriptor(**fields), ident)


def record(ident: Identity = IDENT, **overrides: Any) -> tuple[bytes, bytes]:
    """(DHT key, wire bytes) of a signed descriptor."""
    signed = make_signed(ident, **overrides)
    return descriptor_key(signed.node_id), signed.encode()


def drops(store: DescriptorStore) -> dict[str, int]:
    return {k: v for k, v in store.stats.items() if k.startswith("store.drop.")}


# --- Keys -------------------------------------------------------------------------------


def test_descriptor_key_is_blake2b_160_of_domain_and_node_id() -> None:
    node_id = IDENT.node_id
    key = descriptor_key(node_id)
    assert len(key) == DESCRIPTOR_KEY_BYTES == 20
    assert key == crypto.hash_bytes(DESCRIPTOR_KEY_DOMAIN + node_id, size=20)
    assert key not in (node_id, descriptor_key(OTHER.node_id))


# --- Accepting --------------------------------------------------------------------------


def test_valid_put_then_get() -> None:
    store = DescriptorStore()
    key, value = record()
    assert store.put(key, value, now=NOW, origin=OTHER.node_id)
    assert store.get(key, now=NOW) == value
    assert len(store) == 1
    assert store.total_bytes == len(value)
    assert store.stats["store.stored"] == 1
    assert [d.encode() for d in store.descriptors(NOW)] == [value]
    assert store.items(NOW) == [(key, value)]
    assert store.get(descriptor_key(OTHER.node_id), now=NOW) is None
    assert not drops(store)


def test_duplicate_is_accepted_idempotently() -> None:
    store = DescriptorStore()
    key, value = record()
    assert store.put(key, value, now=NOW)
    assert store.put(key, value, now=NOW + 10)
    assert len(store) == 1
    assert store.stats["store.duplicate"] == 1
    assert not drops(store)


def test_higher_version_supersedes() -> None:
    store = DescriptorStore()
    key, v1 = record(version=T0)
    _, v2 = record(version=T0 + 1, published_at=T0 + 1, expires_at=T0 + 3601)
    assert store.put(key, v1, now=NOW)
    assert store.put(key, v2, now=NOW)
    assert store.get(key, now=NOW) == v2
    assert len(store) == 1
    assert store.total_bytes == len(v2)
    assert store.stats["store.replaced"] == 1


def test_stale_version_refused_and_kept_old() -> None:
    store = DescriptorStore()
    key, new = record(version=T0 + 5)
    _, old = record(version=T0 + 4)
    assert store.put(key, new, now=NOW)
    assert not store.put(key, old, now=NOW)
    assert store.get(key, now=NOW) == new
    assert drops(store) == {"store.drop.stale_version": 1}


def test_version_conflict_refused() -> None:
    store = DescriptorStore()
    key, first = record(region="EU")
    _, second = record(region="NA")  # same version, different body
    assert store.put(key, first, now=NOW)
    assert not store.put(key, second, now=NOW)
    assert store.get(key, now=NOW) == first
    assert drops(store) == {"store.drop.version_conflict": 1}


# --- Refusing ---------------------------------------------------------------------------


def _broken_signature() -> bytes:
    _, value = record()
    return value[:-1] + bytes([value[-1] ^ 1])


REFUSALS: list[tuple[str, bytes, bytes, float]] = [
    ("key_mismatch", descriptor_key(OTHER.node_id), record()[1], NOW),
    ("key_mismatch", b"short", record()[1], NOW),
    ("bad_signature", record()[0], _broken_signature(), NOW),
    ("bad_cbor", record()[0], b"\xff", NOW),
    ("too_large", record()[0], bytes(MAX_DESCRIPTOR_BYTES + 1), NOW),
    ("expired", record()[0], record()[1], T0 + 3600),
    ("from_future", record()[0], record()[1], T0 - 3600),
]


@pytest.mark.parametrize(("reason", "key", "value", "now"), REFUSALS)
def test_refusals_are_counted_and_store_nothing(
    reason: str, key: bytes, value: bytes, now: float
) -> None:
    store = DescriptorStore()
    assert store.put(key, value, now=now, origin=OTHER.node_id) is False
    assert len(store) == 0
    assert store.total_bytes == 0
    assert store.get(key, now=now) is None
    assert drops(store) == {f"store.drop.{reason}": 1}


def test_non_bytes_value_and_key_are_refused() -> None:
    store = DescriptorStore()
    key, _ = record()
    assert not store.put(key, "text", now=NOW)  # type: ignore[arg-type]
    assert not store.put(12345, record()[1], now=NOW)  # type: ignore[arg-type]
    assert len(store) == 0
    assert drops(store) == {"store.drop.bad_cbor": 1, "store.drop.key_mismatch": 1}


def test_non_finite_now_is_a_local_error() -> None:
    store = DescriptorStore()
    key, value = record()
    with pytest.raises(LocalProtocolError):
        store.put(key, value, now=float("nan"))


@settings(max_examples=300)
@given(value=st.binary(max_size=MAX_DESCRIPTOR_BYTES + 16))
def test_random_bytes_never_raise_never_store(value: bytes) -> None:
    store = DescriptorStore()
    assert store.put(record()[0], value, now=NOW, origin=OTHER.node_id) is False
    assert len(store) == 0
    assert sum(drops(store).values()) == 1


# --- Expiry -----------------------------------------------------------------------------


def test_expired_record_not_returned_and_removed() -> None:
    store = DescriptorStore()
    key, value = record(expires_at=T0 + 600)
    assert store.put(key, value, now=NOW)
    assert store.get(key, now=T0 + 599) == value
    assert store.get(key, now=T0 + 600) is None
    assert len(store) == 0
    assert store.total_bytes == 0
    assert store.stats["store.expired"] == 1


def test_cull_drops_only_expired() -> None:
    store = DescriptorStore()
    short_key, short = record(identity(3), expires_at=T0 + 600)
    long_key, long = record(identity(4), expires_at=T0 + 3600)
    assert store.put(short_key, short, now=NOW)
    assert store.put(long_key, long, now=NOW)
    assert store.cull(T0 + 599) == 0
    assert store.cull(T0 + 600) == 1
    assert store.items(T0 + 600) == [(long_key, long)]
    assert store.descriptors(T0 + 3600) == []
    assert len(store) == 0


def test_expired_stored_record_gives_way_to_any_valid_one() -> None:
    store = DescriptorStore()
    key, old = record(version=T0 + 9, expires_at=T0 + 600)
    _, newer_but_lower = record(version=T0 + 1, published_at=T0 + 500, expires_at=T0 + 4000)
    assert store.put(key, old, now=NOW)
    assert store.put(key, newer_but_lower, now=T0 + 700)
    assert store.get(key, now=T0 + 700) == newer_but_lower


def test_items_older_than_for_republishing() -> None:
    store = DescriptorStore()
    a_key, a = record(identity(3))
    b_key, b = record(identity(4))
    assert store.put(a_key, a, now=NOW)
    assert store.put(b_key, b, now=NOW + 100)
    assert store.items_older_than(100, now=NOW + 150) == [(a_key, a)]
    assert store.items_older_than(10, now=NOW + 150) == [(a_key, a), (b_key, b)]
    assert store.put(a_key, a, now=NOW + 150)  # a duplicate STORE resets the age
    assert store.items_older_than(100, now=NOW + 150) == []


# --- Caps -------------------------------------------------------------------------------


def test_record_cap_evicts_soonest_expiring() -> None:
    store = DescriptorStore(max_records=3)
    recs = [record(identity(10 + i), expires_at=T0 + 1000 + 100 * i) for i in range(3)]
    for key, value in recs:
        assert store.put(key, value, now=NOW)
    new_key, new = record(identity(20), expires_at=T0 + 3000)
    assert store.put(new_key, new, now=NOW)
    assert len(store) == 3
    assert store.get(recs[0][0], now=NOW) is None  # expired soonest: evicted
    assert all(store.get(k, now=NOW) is not None for k, _ in recs[1:])
    assert store.stats["store.evicted"] == 1


def test_newcomer_expiring_soonest_is_refused_when_full() -> None:
    store = DescriptorStore(max_records=2)
    recs = [record(identity(10 + i), expires_at=T0 + 2000 + i) for i in range(2)]
    for key, value in recs:
        assert store.put(key, value, now=NOW)
    key, value = record(identity(20), expires_at=T0 + 1000)
    assert not store.put(key, value, now=NOW)
    assert sorted(k for k, _ in store.items(NOW)) == sorted(k for k, _ in recs)
    assert drops(store) == {"store.drop.store_full": 1}
    assert store.stats["store.evicted"] == 0


def test_replacement_when_full_needs_no_eviction() -> None:
    store = DescriptorStore(max_records=2)
    a_key, a1 = record(identity(3), expires_at=T0 + 1000)
    b_key, b = record(identity(4), expires_at=T0 + 2000)
    _, a2 = record(identity(3), version=T0 + 1, expires_at=T0 + 1500)
    for key, value in ((a_key, a1), (b_key, b), (a_key, a2)):
        assert store.put(key, value, now=NOW)
    assert len(store) == 2
    assert store.get(a_key, now=NOW) == a2
    assert store.stats["store.evicted"] == 0


def test_byte_cap_evicts_until_it_fits() -> None:
    recs = [record(identity(10 + i), expires_at=T0 + 1000 + 10 * i) for i in range(12)]
    size = len(recs[0][1])
    assert all(len(value) == size for _, value in recs)  # same fields, same length
    store = DescriptorStore(max_bytes=MAX_DESCRIPTOR_BYTES)
    fit = MAX_DESCRIPTOR_BYTES // size
    assert fit < len(recs)
    for key, value in recs:
        assert store.put(key, value, now=NOW)
        assert store.total_bytes <= store.max_bytes
    assert len(store) == fit
    assert store.stats["store.evicted"] == len(recs) - fit
    kept = sorted(k for k, _ in store.items(NOW))
    assert kept == sorted(k for k, _ in recs[-fit:])  # the soonest-expiring went first


def test_flood_of_distinct_nodes_stays_bounded() -> None:
    store = DescriptorStore(max_records=5)
    for i in range(30):
        key, value = record(identity(30 + i), expires_at=T0 + 1000 + i)
        store.put(key, value, now=NOW, origin=bytes([i]) * 20)
        assert len(store) <= 5
    assert store.stats["store.evicted"] == 25
    # The five that expire last are the ones kept.
    kept = {d.body.expires_at for d in store.descriptors(NOW)}
    assert kept == {T0 + 1000 + i for i in range(25, 30)}


def test_caps_are_checked() -> None:
    with pytest.raises(ValueError, match="max_records"):
        DescriptorStore(max_records=0)
    with pytest.raises(ValueError, match="max_bytes"):
        DescriptorStore(max_bytes=MAX_DESCRIPTOR_BYTES - 1)


# --- Rate limit -------------------------------------------------------------------------


def test_rate_limit_per_origin_local_unlimited() -> None:
    store = DescriptorStore(put_rate_per_s=1.0, put_burst=3.0)
    key, value = record()
    flooder, honest = b"\x01" * 20, b"\x02" * 20
    results = [store.put(key, value, now=NOW, origin=flooder) for _ in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert store.stats["store.drop.rate_limited"] == 7
    assert store.put(key, value, now=NOW, origin=honest)  # another peer has its own bucket
    assert all(store.put(key, value, now=NOW) for _ in range(50))  # local publishes
    assert store.put(key, value, now=NOW + 1.0, origin=flooder)  # refilled
    assert store.stats["store.drop.rate_limited"] == 7


def test_rate_limit_applies_to_invalid_puts_too() -> None:
    store = DescriptorStore(put_rate_per_s=1.0, put_burst=2.0)
    flooder = b"\x01" * 20
    for _ in range(5):
        store.put(b"\x00" * 20, b"garbage", now=NOW, origin=flooder)
    assert drops(store) == {"store.drop.bad_cbor": 2, "store.drop.rate_limited": 3}


# --- JSON -------------------------------------------------------------------------------


def _full_store() -> tuple[DescriptorStore, list[tuple[bytes, bytes]]]:
    store = DescriptorStore()
    recs = [record(identity(40 + i)) for i in range(3)]
    for key, value in recs:
        assert store.put(key, value, now=NOW)
    return store, recs


def test_json_round_trip() -> None:
    store, recs = _full_store()
    text = store.to_json()
    loaded = DescriptorStore.from_json(text, now=NOW + 5)
    assert sorted(loaded.items(NOW + 5)) == sorted(recs)
    assert loaded.stats["store.stored"] == 3
    assert not drops(loaded)
    assert loaded.to_json() == text
    assert "pickle" not in text


def test_json_tampered_record_dropped_others_kept() -> None:
    store, recs = _full_store()
    data = json.loads(store.to_json())
    victim = data["records"][1]
    raw = base64.b64decode(victim["value"])
    victim["value"] = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 0x80])).decode()
    loaded = DescriptorStore.from_json(json.dumps(data), now=NOW)
    assert len(loaded) == 2
    kept = dict(loaded.items(NOW))
    assert bytes.fromhex(victim["key"]) not in kept
    assert sum(kept.get(key) == value for key, value in recs) == 2
    assert drops(loaded) == {"store.drop.bad_signature": 1}


def test_json_expired_and_malformed_entries_dropped() -> None:
    store, _ = _full_store()
    data = json.loads(store.to_json())
    data["records"].append({"key": "zz", "value": "AAAA"})
    data["records"].append("not an object")
    data["records"].append({"key": "00" * 20, "value": "!!not base64!!"})
    loaded = DescriptorStore.from_json(json.dumps(data), now=NOW)
    assert len(loaded) == 3
    assert drops(loaded) == {"store.drop.bad_record": 3}
    expired = DescriptorStore.from_json(store.to_json(), now=T0 + 3600)
    assert len(expired) == 0
    assert drops(expired) == {"store.drop.expired": 3}


def test_json_load_respects_caps() -> None:
    store, _ = _full_store()
    loaded = DescriptorStore.from_json(store.to_json(), now=NOW, max_records=2)
    assert len(loaded) == 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2, 3]",
        '{"records": []}',
        '{"format": "something/else", "records": []}',
        '{"format": "meshnode/descriptor-store/v1", "records": {}}',
        "[" * 100_000,
        '{"format": "meshnode/descriptor-store/v1", "records": [NaN',
        b"{}",
    ],
)
def test_garbage_json_raises_decode_error(text: Any) -> None:
    with pytest.raises(DecodeError, match="descriptor store"):
        DescriptorStore.from_json(text, now=NOW)


@settings(max_examples=200)
@given(text=st.text(max_size=200))
def test_random_text_only_decode_error(text: str) -> None:
    try:
        loaded = DescriptorStore.from_json(text, now=NOW)
    except DecodeError:
        return
    assert len(loaded) == 0
