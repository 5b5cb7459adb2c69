"""The one-round-trip build (docs/circuits.md §5), driven entirely in memory.

Each hop is an :class:`OnionKeyring` and a :class:`HopSpec`; a test creates a BUILD body,
hands it to the hops in order, sends the reply back through them and lets the client
finish. Randomness is a seeded stream, so every test, statistical bounds included, is
deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import timeit
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.constants import DESCRIPTOR_LIFETIME_S, ONION_KEY_OVERLAP_S
from discovery.descriptor import NodeDescriptor
from meshnode import crypto
from meshnode.errors import LocalProtocolError
from meshnode.identity import Identity, NodeId
from routing.build import (
    BODY_BYTES,
    RECORD_BYTES,
    SLOT_BYTES,
    SLOTS,
    BuildError,
    BuildRecord,
    BuildStatus,
    HopBuildResult,
    HopSpec,
    NextHop,
    PendingBuild,
    create_build,
    extend_reply,
    process_build,
    start_reply,
)
from routing.keys import HopKeys
from routing.onionkeys import OnionKeyring
from tests.conftest import DeterministicBytes

T0 = 1_700_000_000
OK = BuildStatus.OK


@dataclass
class Hop:
    spec: HopSpec
    ring: OnionKeyring


def make_hops(n: int, seed: bytes = b"hops", **ring_settings: object) -> list[Hop]:
    rng = DeterministicBytes(seed)
    hops = []
    for i in range(n):
        ring = OnionKeyring.generate(now=T0, random_bytes=rng, **ring_settings)  # type: ignore[arg-type]
        host = f"192.0.2.{i + 1}" if i % 2 == 0 else f"2001:db8::{i + 1}"
        spec = HopSpec(
            node_id=NodeId(hashlib.sha256(seed + b"id" + bytes([i])).digest()[:20]),
            link_key=hashlib.sha256(seed + b"link" + bytes([i])).digest(),
            onion_key=ring.publics()[0],
            address=(host, 4000 + i),
        )
        hops.append(Hop(spec, ring))
    return hops


def forward(
    hops: list[Hop], body: bytes, *, now: float, rng: DeterministicBytes
) -> tuple[list[HopBuildResult], list[bytes]]:
    """Pass a BUILD body through every hop; the results and the body on every link."""
    results, links = [], [body]
    for hop in hops:
        result = process_build(body, hop.ring, now=now, random_bytes=rng)
        results.append(result)
        if result.out_body is not None:
            body = result.out_body
            links.append(body)
    return results, links


def backward(results: list[HopBuildResult], *, now: float, rng: DeterministicBytes) -> list[bytes]:
    """The BUILD_REPLY on every link, from the last hop's to the client's."""
    reply = start_reply(results[-1].keys, OK, now=now, random_bytes=rng)
    links = [reply]
    for result in reversed(results[:-1]):
        reply = extend_reply(result.keys, reply, OK, now=now)
        links.append(reply)
    return links


def build(
    n: int, *, seed: bytes = b"hops"
) -> tuple[list[Hop], PendingBuild, list[HopBuildResult], list[bytes], list[bytes]]:
    hops = make_hops(n, seed)
    rng = DeterministicBytes(seed + b"/rng")
    body, pending = create_build([h.spec for h in hops], now=T0, random_bytes=rng)
    results, links = forward(hops, body, now=T0 + 1, rng=rng)
    replies = backward(results, now=T0 + 2, rng=rng)
    return hops, pending, results, links, replies


def slots(body: bytes) -> list[bytes]:
    return [body[i * SLOT_BYTES : (i + 1) * SLOT_BYTES] for i in range(SLOTS)]


def flip(body: bytes, index: int, mask: int = 0x01) -> bytes:
    return body[:index] + bytes([body[index] ^ mask]) + body[index + 1 :]


def refusal(body: bytes, hop: Hop, *, now: float = T0) -> str:
    with pytest.raises(BuildError) as info:
        process_build(body, hop.ring, now=now, random_bytes=DeterministicBytes(b"x"))
    return info.value.reason


# --- A whole build ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_build_through_n_hops_gives_both_ends_the_same_keys(n: int) -> None:
    hops, pending, results, links, replies = build(n)
    assert len(links) == n
    for i, result in enumerate(results):
        assert result.last == (i == n - 1)
        assert result.onion_key == hops[i].spec.onion_key
        assert result.timestamp == T0
        if i + 1 < n:
            assert result.next_hop == hops[i + 1].spec.next_hop()
            assert result.out_body is not None
        else:
            assert result.next_hop is None
            assert result.out_body is None
    keys = pending.finish(replies[-1])
    assert keys == [r.keys for r in results]
    assert len({k.kf for k in keys}) == n  # every hop its own keys
    statuses = pending.read_reply(replies[-1])
    assert [s.status for s in statuses] == [0] * n
    assert all(s.timestamp == T0 + 2 for s in statuses)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_every_link_carries_five_random_looking_slots(n: int) -> None:
    _, _, _, links, replies = build(n)
    for bodies in (links, replies):
        assert all(len(b) == BODY_BYTES and b.endswith(bytes(4)) for b in bodies)
        seen = [s for body in bodies for s in slots(body)]
        assert len(set(seen)) == len(seen)  # no slot appears twice, on any link
        for body in bodies:
            # Every body looks like noise: about half of its 11,240 bits set (the bound
            # is more than 6 standard deviations wide).
            ones = sum(bin(byte).count("1") for byte in body[: SLOTS * SLOT_BYTES])
            assert abs(ones / (SLOTS * SLOT_BYTES * 8) - 0.5) < 0.03
    assert len(set(links)) == len(links)
    assert len(set(replies)) == len(replies)


def test_hops_cannot_tell_their_position_from_the_body() -> None:
    """What a hop sees is the same shape at every position of a 1..5-hop circuit: five
    slots, slot 0 opening for it and the other four not opening for it."""
    for n in (1, 3, 5):
        hops, _, _, links, _ = build(n, seed=b"pos" + bytes([n]))
        for i, body in enumerate(links):
            assert len(slots(body)) == SLOTS
            for other in slots(body)[1:]:
                moved = other + slots(body)[0] * 4 + bytes(4)
                # No other slot is a record for this hop.
                assert refusal(moved, hops[i]) in ("bad_record", "bad_padding")


def test_hop_spec_from_descriptor(identities: tuple[Identity, ...]) -> None:
    identity = identities[0]
    ring = OnionKeyring.generate(now=T0, random_bytes=DeterministicBytes(b"d"))
    current, nxt = ring.publics()
    descriptor = NodeDescriptor(
        version=T0,
        identity_key=identity.identity_public,
        link_key=identity.link_public,
        onion_key=current,
        next_onion_key=nxt,
        addresses=(("198.51.100.7", 4433), ("2001:db8::7", 4433)),
        published_at=T0,
        expires_at=T0 + 3600,
    )
    spec = HopSpec.from_descriptor(descriptor)
    assert spec.node_id == identity.node_id
    assert spec.link_key == identity.link_public
    assert spec.onion_key == current
    assert spec.address == ("198.51.100.7", 4433)
    assert HopSpec.from_descriptor(descriptor, address=("2001:db8::7", 4433)).address == (
        "2001:db8::7",
        4433,
    )
    with pytest.raises(LocalProtocolError):
        HopSpec.from_descriptor(descriptor, address=("192.0.2.1", 1))


# --- Refusals at a hop ------------------------------------------------------------------


def test_replayed_build_is_refused_at_the_first_hop() -> None:
    hops, _, _, links, _ = build(3)
    assert refusal(links[0], hops[0], now=T0 + 5) == "replay"
    # Each hop's cache catches its own record too.
    assert refusal(links[1], hops[1], now=T0 + 5) == "replay"


def test_replay_after_the_window_is_stale_not_accepted() -> None:
    hops, _, _, links, _ = build(1)
    assert refusal(links[0], hops[0], now=T0 + 601) == "stale_timestamp"


def test_record_for_another_onion_key_is_refused() -> None:
    hops = make_hops(2)
    stranger = make_hops(1, seed=b"stranger")[0]
    wrong = HopSpec(
        node_id=hops[0].spec.node_id,
        link_key=hops[0].spec.link_key,
        onion_key=stranger.spec.onion_key,
        address=hops[0].spec.address,
    )
    body, _ = create_build([wrong, hops[1].spec], now=T0, random_bytes=DeterministicBytes(b"w"))
    assert refusal(body, hops[0]) == "bad_record"
    assert process_build(body, stranger.ring, now=T0, random_bytes=DeterministicBytes(b"s"))


@pytest.mark.parametrize("index", [0, 31, 32, 100, 248, 264])
def test_tampered_slot_zero_is_refused(index: int) -> None:
    hops, _, _, links, _ = build(3, seed=b"tamper")
    fresh = make_hops(3, seed=b"tamper")  # empty replay caches
    assert refusal(flip(links[0], index), fresh[0]) == "bad_record"
    assert hops


def test_slot_filler_is_not_authenticated_and_ignored() -> None:
    """The 16 bytes after the sealed record (281 - 32 - 233) carry nothing: the spec binds
    only eph as associated data. Flipping them changes nothing a hop reads."""
    hops = make_hops(2, seed=b"filler")
    body, pending = create_build(
        [h.spec for h in hops], now=T0, random_bytes=DeterministicBytes(b"f")
    )
    rng = DeterministicBytes(b"f2")
    results, _ = forward(hops, flip(body, 270), now=T0, rng=rng)
    assert pending.finish(backward(results, now=T0, rng=rng)[-1]) == [r.keys for r in results]


@pytest.mark.parametrize(("slot", "refusing_hop"), [(1, 1), (2, 2)])
def test_tampered_later_slot_makes_that_hop_refuse(slot: int, refusing_hop: int) -> None:
    hops = make_hops(3, seed=b"later")
    rng = DeterministicBytes(b"later/rng")
    body, _ = create_build([h.spec for h in hops], now=T0, random_bytes=rng)
    body = flip(body, slot * SLOT_BYTES + 100)
    for i, hop in enumerate(hops):
        if i == refusing_hop:
            assert refusal(body, hop) == "bad_record"
            return
        result = process_build(body, hop.ring, now=T0, random_bytes=rng)
        assert result.out_body is not None
        body = result.out_body
    pytest.fail("no hop refused")


def test_tampered_unused_slot_changes_nothing() -> None:
    hops = make_hops(3, seed=b"unused")
    rng = DeterministicBytes(b"unused/rng")
    body, pending = create_build([h.spec for h in hops], now=T0, random_bytes=rng)
    results, _ = forward(hops, flip(body, 4 * SLOT_BYTES + 7), now=T0, rng=rng)
    assert pending.finish(backward(results, now=T0, rng=rng)[-1])


@pytest.mark.parametrize(("skew", "ok"), [(-601, False), (-600, True), (600, True), (601, False)])
def test_timestamp_more_than_ten_minutes_off_is_refused(skew: int, ok: bool) -> None:
    hops = make_hops(1, seed=b"stale")
    body, _ = create_build([hops[0].spec], now=T0, random_bytes=DeterministicBytes(b"s"))
    if ok:
        assert process_build(
            body, hops[0].ring, now=T0 + skew, random_bytes=DeterministicBytes(b"")
        ).last
    else:
        assert refusal(body, hops[0], now=T0 + skew) == "stale_timestamp"


def test_bad_length_and_padding() -> None:
    hops, _, _, links, _ = build(1, seed=b"len")
    assert refusal(links[0][:-1], hops[0]) == "bad_length"
    assert refusal(links[0] + b"\0", hops[0]) == "bad_length"
    assert refusal(flip(links[0], BODY_BYTES - 1), hops[0]) == "bad_padding"


def test_low_order_ephemeral_key_is_a_bad_record() -> None:
    hops = make_hops(1)
    body = bytes(32) + bytes(SLOTS * SLOT_BYTES - 32) + bytes(4)
    assert refusal(body, hops[0]) == "bad_record"


# --- Onion-key rotation -----------------------------------------------------------------


def test_previous_onion_key_opens_within_the_overlap_only() -> None:
    hop = make_hops(1, seed=b"rot")[0]
    old = hop.spec
    t1 = T0 + DESCRIPTOR_LIFETIME_S
    hop.ring.rotate(t1, DeterministicBytes(b"rot/r"))
    assert hop.ring.publics()[0] != old.onion_key
    within = t1 + ONION_KEY_OVERLAP_S - 1
    body, _ = create_build([old], now=within, random_bytes=DeterministicBytes(b"a"))
    result = process_build(body, hop.ring, now=within, random_bytes=DeterministicBytes(b"b"))
    assert result.onion_key == old.onion_key
    after = t1 + ONION_KEY_OVERLAP_S
    body, _ = create_build([old], now=after, random_bytes=DeterministicBytes(b"c"))
    assert refusal(body, hop, now=after) == "bad_record"


def test_next_onion_key_opens_before_and_after_rotation() -> None:
    hop = make_hops(1, seed=b"next")[0]
    nxt = hop.ring.publics()[1]
    spec = HopSpec(
        node_id=hop.spec.node_id,
        link_key=hop.spec.link_key,
        onion_key=nxt,
        address=hop.spec.address,
    )
    body, _ = create_build([spec], now=T0, random_bytes=DeterministicBytes(b"n1"))
    assert (
        process_build(body, hop.ring, now=T0, random_bytes=DeterministicBytes(b"")).onion_key == nxt
    )
    hop.ring.rotate(T0 + 10, DeterministicBytes(b"n/r"))
    body, _ = create_build([spec], now=T0 + 10, random_bytes=DeterministicBytes(b"n2"))
    assert (
        process_build(body, hop.ring, now=T0 + 10, random_bytes=DeterministicBytes(b"")).onion_key
        == nxt
    )
    # The replay cache of a key follows it from next to current.
    assert refusal(body, hop, now=T0 + 10) == "replay"


def test_replay_cache_full_refuses_new_builds_until_entries_expire() -> None:
    hop = make_hops(1, seed=b"full", max_replay_entries=2)[0]
    rng = DeterministicBytes(b"full/rng")

    def attempt(now: float) -> str:
        body, _ = create_build([hop.spec], now=now, random_bytes=rng)
        try:
            process_build(body, hop.ring, now=now, random_bytes=rng)
        except BuildError as exc:
            return exc.reason
        return "ok"

    assert [attempt(T0), attempt(T0 + 1), attempt(T0 + 2)] == ["ok", "ok", "replay_cache_full"]
    assert hop.ring.replay_entries() == 2
    assert attempt(T0 + 601) == "ok"  # the first entry expired (T0 + 600 < now)
    assert attempt(T0 + 601) == "replay_cache_full"


# --- The reply --------------------------------------------------------------------------


def test_middle_hop_that_cannot_extend_answers_for_the_circuit() -> None:
    hops = make_hops(3, seed=b"refuse")
    rng = DeterministicBytes(b"refuse/rng")
    body, pending = create_build([h.spec for h in hops], now=T0, random_bytes=rng)
    first = process_build(body, hops[0].ring, now=T0, random_bytes=rng)
    assert first.out_body is not None
    second = process_build(first.out_body, hops[1].ring, now=T0, random_bytes=rng)
    reply = start_reply(second.keys, BuildStatus.NEXT_HOP_UNREACHABLE, now=T0, random_bytes=rng)
    reply = extend_reply(first.keys, reply, OK, now=T0)
    with pytest.raises(BuildError) as info:
        pending.finish(reply)
    assert (info.value.reason, info.value.hop, info.value.status) == ("refused", 2, 2)
    assert [s.status for s in pending.read_reply(reply)] == [0, 2]


def test_reply_missing_a_hop_or_tampered_is_refused() -> None:
    hops, pending, results, _, replies = build(3, seed=b"reply")
    rng = DeterministicBytes(b"reply/rng")
    short = extend_reply(
        results[0].keys, start_reply(results[1].keys, OK, now=T0, random_bytes=rng), OK, now=T0
    )
    with pytest.raises(BuildError) as info:
        pending.finish(short)  # hop 3 never answered: its slot is noise
    assert (info.value.reason, info.value.hop) == ("bad_reply", 3)
    for slot in range(3):
        with pytest.raises(BuildError) as info:
            pending.finish(flip(replies[-1], slot * SLOT_BYTES + 50))
        assert (info.value.reason, info.value.hop) == ("bad_reply", slot + 1)
    # Slots past the last hop carry nothing.
    assert pending.finish(flip(replies[-1], 4 * SLOT_BYTES)) == [r.keys for r in results]
    with pytest.raises(BuildError, match="bad_length"):
        pending.finish(replies[-1][:-1])
    with pytest.raises(BuildError, match="bad_padding"):
        pending.finish(flip(replies[-1], BODY_BYTES - 1))
    with pytest.raises(BuildError, match="bad_length"):
        extend_reply(results[0].keys, b"", OK, now=T0)
    assert hops


def test_reply_from_another_build_is_refused() -> None:
    _, pending, _, _, _ = build(2, seed=b"one")
    _, _, _, _, other = build(2, seed=b"two")
    with pytest.raises(BuildError, match="bad_reply"):
        pending.finish(other[-1])


def test_status_must_be_a_byte() -> None:
    _, _, results, _, replies = build(1)
    keys = results[0].keys
    for status in (-1, 256, True):
        with pytest.raises(LocalProtocolError):
            start_reply(keys, status, now=T0, random_bytes=DeterministicBytes(b""))
        with pytest.raises(LocalProtocolError):
            extend_reply(keys, replies[0], status, now=T0)


# --- Record codec -----------------------------------------------------------------------


def next_hop(host: str = "192.0.2.9", port: int = 9) -> NextHop:
    return NextHop(node_id=NodeId(b"n" * 20), link_key=b"k" * 32, address=(host, port))


@pytest.mark.parametrize("host", ["192.0.2.9", "2001:db8::9", "::1", "127.0.0.1"])
def test_record_round_trip(host: str) -> None:
    record = BuildRecord(timestamp=T0, next_hop=next_hop(host, 65535))
    data = record.encode()
    assert len(data) == RECORD_BYTES
    assert BuildRecord.decode(data) == record
    last = BuildRecord(timestamp=2**64 - 1, next_hop=None)
    assert last.last
    assert BuildRecord.decode(last.encode()) == last
    assert last.encode()[1] == 1
    assert last.encode()[2:72] == bytes(70)


def test_record_ipv4_travels_v4_mapped() -> None:
    data = BuildRecord(timestamp=T0, next_hop=next_hop("192.0.2.9")).encode()
    assert data[54:70] == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 9])


def _record_with(offset: int, value: bytes) -> bytes:
    data = BuildRecord(timestamp=T0, next_hop=next_hop()).encode()
    return data[:offset] + value + data[offset + len(value) :]


def _last_with(offset: int, value: bytes) -> bytes:
    data = BuildRecord(timestamp=T0, next_hop=None).encode()
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_field"),
        (bytes(RECORD_BYTES + 1), "bad_field"),
        (_record_with(0, b"\x02"), "bad_version"),
        (_record_with(0, b"\x00"), "bad_version"),
        (_record_with(1, b"\x02"), "bad_field"),  # unknown flag
        (_record_with(1, b"\x80"), "bad_field"),
        (_record_with(RECORD_BYTES - 1, b"\x01"), "bad_field"),  # padding
        (_record_with(80, b"\x01"), "bad_field"),
        (_record_with(70, b"\x00\x00"), "bad_field"),  # port 0
        (_record_with(54, bytes(16)), "bad_field"),  # ::
        (_record_with(54, bytes(10) + b"\xff\xff" + bytes(4)), "bad_field"),  # 0.0.0.0
        (_record_with(54, b"\xff\x02" + bytes(14)), "bad_field"),  # multicast
        (_record_with(54, bytes(10) + b"\xff\xff\xe0\x00\x00\x01"), "bad_field"),  # 224.0.0.1
        (_last_with(2, b"\x01"), "bad_field"),  # the last hop names a next hop
        (_last_with(71, b"\x01"), "bad_field"),
    ],
)
def test_record_decode_is_strict(data: bytes, reason: str) -> None:
    with pytest.raises(BuildError) as info:
        BuildRecord.decode(data)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=RECORD_BYTES, max_size=RECORD_BYTES))
def test_record_decode_random_bytes_round_trips_or_refuses(data: bytes) -> None:
    try:
        record = BuildRecord.decode(data)
    except BuildError:
        return
    assert record.encode() == data


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(1, 65535),
    st.integers(0, 2**64 - 1),
)
def test_record_round_trip_any_address(ip: object, port: int, timestamp: int) -> None:
    host = str(ip)
    try:
        hop = next_hop(host, port)
    except LocalProtocolError:
        return  # unspecified, multicast, v4-mapped IPv6 spellings
    record = BuildRecord(timestamp=timestamp, next_hop=hop)
    assert BuildRecord.decode(record.encode()) == record


def test_values_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        next_hop("not-an-ip")
    with pytest.raises(LocalProtocolError):
        next_hop("::ffff:192.0.2.1")
    with pytest.raises(LocalProtocolError):
        next_hop("2001:DB8::1")  # not canonical
    with pytest.raises(LocalProtocolError):
        next_hop(port=0)
    with pytest.raises(LocalProtocolError):
        NextHop(node_id=NodeId(b"n" * 19), link_key=b"k" * 32, address=("192.0.2.1", 1))
    with pytest.raises(LocalProtocolError):
        HopSpec(
            node_id=NodeId(b"n" * 20), link_key=b"k" * 32, onion_key=b"o", address=("192.0.2.1", 1)
        )
    with pytest.raises(LocalProtocolError):
        BuildRecord(timestamp=-1, next_hop=None)


def test_create_build_checks_its_arguments() -> None:
    hops = [h.spec for h in make_hops(6)]
    rng = DeterministicBytes(b"args")
    with pytest.raises(LocalProtocolError):
        create_build([], now=T0, random_bytes=rng)
    with pytest.raises(LocalProtocolError):
        create_build(hops, now=T0, random_bytes=rng)
    with pytest.raises(LocalProtocolError):
        create_build(hops[:1], now=float("nan"), random_bytes=rng)
    low_order = HopSpec(
        node_id=hops[0].node_id,
        link_key=hops[0].link_key,
        onion_key=bytes(32),
        address=hops[0].address,
    )
    with pytest.raises(LocalProtocolError):
        create_build([low_order], now=T0, random_bytes=rng)
    with pytest.raises(LocalProtocolError):
        create_build(hops[:1], now=T0, random_bytes=lambda n: bytes(n - 1))


# --- Anything from the network raises BuildError or nothing -----------------------------

_FUZZ_HOPS = make_hops(3, seed=b"fuzz")
_FUZZ_KEYS = HopKeys(
    record=b"r" * 32,
    kf=b"f" * 32,
    kf_fill=b"F" * 32,
    kb_seal=b"s" * 32,
    kb_relay=b"R" * 32,
    k_slots=b"k" * 32,
    k_reply=b"K" * 32,
    off_f=1,
    off_b=2,
)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2 * BODY_BYTES),
        st.binary(min_size=BODY_BYTES - 4, max_size=BODY_BYTES - 4).map(lambda b: b + bytes(4)),
    )
)
def test_process_build_random_bytes_raise_only_build_error(body: bytes) -> None:
    try:
        process_build(body, _FUZZ_HOPS[0].ring, now=T0, random_bytes=DeterministicBytes(b""))
    except BuildError as exc:
        assert exc.reason in ("bad_length", "bad_padding", "bad_record")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, BODY_BYTES - 1), st.integers(1, 255), st.integers(0, 2**32))
def test_mutated_build_fails_only_with_build_error(index: int, mask: int, seed: int) -> None:
    rng = DeterministicBytes(b"mut" + seed.to_bytes(8, "big"))
    hops = make_hops(3, seed=b"mut" + seed.to_bytes(8, "big"))
    body, pending = create_build([h.spec for h in hops], now=T0, random_bytes=rng)
    body = flip(body, index, mask)
    try:
        results, _ = forward(hops, body, now=T0, rng=rng)
        keys = pending.finish(backward(results, now=T0, rng=rng)[-1])
    except BuildError:
        return
    assert keys == [r.keys for r in results]  # only unused bytes were touched
    in_slot = index % SLOT_BYTES
    assert index >= 3 * SLOT_BYTES or in_slot >= 265


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2 * BODY_BYTES),
        st.binary(min_size=BODY_BYTES - 4, max_size=BODY_BYTES - 4).map(lambda b: b + bytes(4)),
    )
)
def test_finish_and_extend_reply_random_bytes_raise_only_build_error(reply: bytes) -> None:
    pending = PendingBuild(
        hops=tuple(h.spec for h in _FUZZ_HOPS), keys=(_FUZZ_KEYS,) * 3, sent_at=T0
    )
    with pytest.raises(BuildError):
        pending.finish(reply)
    try:
        out = extend_reply(_FUZZ_KEYS, reply, OK, now=T0)
    except BuildError as exc:
        assert exc.reason in ("bad_length", "bad_padding")
    else:
        assert len(out) == BODY_BYTES


# --- Microbenchmark (reported, never asserted) ------------------------------------------


def test_microbenchmark_report(capsys: pytest.CaptureFixture[str]) -> None:
    hops = make_hops(3, seed=b"bench", max_replay_entries=10**6)
    specs = [h.spec for h in hops]
    rng = DeterministicBytes(b"bench/rng")
    rounds = 200
    bodies = [create_build(specs, now=T0, random_bytes=rng)[0] for _ in range(rounds)]
    create_s = min(
        timeit.repeat(lambda: create_build(specs, now=T0, random_bytes=rng), number=50, repeat=3)
    )
    queue = iter(bodies)
    process_s = timeit.timeit(
        lambda: process_build(next(queue), hops[0].ring, now=T0, random_bytes=rng), number=rounds
    )
    # A garbage slot 0 costs a DH per candidate key (current and next here).
    garbage = b"\x09" * 32 + bytes(SLOTS * SLOT_BYTES - 32) + bytes(4)

    def refuse() -> None:
        with contextlib.suppress(BuildError):
            process_build(garbage, hops[0].ring, now=T0, random_bytes=rng)

    refuse_s = timeit.timeit(refuse, number=rounds)
    _, pending, results, _, replies = build(3, seed=b"bench2")
    finish_s = timeit.timeit(lambda: pending.finish(replies[-1]), number=rounds)
    extend_s = timeit.timeit(
        lambda: extend_reply(results[0].keys, replies[-2], OK, now=T0), number=rounds
    )
    with capsys.disabled():
        print(
            f"\n[build bench] create_build(3 hops) {create_s / 50 * 1e6:.0f} us, "
            f"process_build {process_s / rounds * 1e6:.0f} us, "
            f"process_build refusing garbage {refuse_s / rounds * 1e6:.0f} us, "
            f"finish(3 hops) {finish_s / rounds * 1e6:.0f} us, "
            f"extend_reply {extend_s / rounds * 1e6:.0f} us"
        )
    assert crypto.AEAD_TAG_BYTES == 16
