"""One-round-trip circuit build: the BUILD body, its records, and the BUILD_REPLY (sans-IO).

docs/circuits.md §5. The client seals one record per hop to that hop's onion key with a
fresh ephemeral X25519 key and sends one BUILD body of five record slots::

    slot (281 bytes)
    0    32   eph      the client's ephemeral public key for this hop
    32   233  sealed   ChaCha20-Poly1305(k_record, nonce 0, record, ad = eph): 217 + 16 tag
    265  16   filler   random; not covered by the tag, ignored by the hop

    body = 5 slots (1,405 bytes) || 4 zero bytes = 1,409 bytes (the cell body)

Record plaintext (217 bytes, :class:`BuildRecord`)::

    0    1    version (1)
    1    1    flags: bit 0 = last hop; other bits zero
    2    20   next hop node id         \\
    22   32   next hop link key         | all zero for the last hop
    54   16   next hop address (IPv6, IPv4 as v4-mapped)
    70   2    next hop port            /
    72   8    timestamp (Unix seconds, client clock)
    80   137  zero

Hop i opens slot 0 (:func:`process_build`), then sends on
``(slots[1:5] XOR ChaCha20(k_slots_i, nonce 0)) || random slot || 4 zero bytes``. The
client pre-applies those keystreams (:func:`create_build`), so hop j's record arrives in
slot 0 exactly as sealed, and every hop sees five random-looking slots whatever its
position.

BUILD_REPLY body: five slots and 4 zero bytes. A hop's status is
``ChaCha20-Poly1305(k_reply, nonce 1, status (1) || hop time (8) || 256 zero)``, exactly
one slot. The last hop writes its status in slot 0 and random slots after it
(:func:`start_reply`); every other hop shifts the slots right by one (dropping the
last), XORs the shifted four with ``ChaCha20(k_reply, nonce 2)`` and writes its own
status in slot 0 (:func:`extend_reply`). A hop that cannot extend answers with
:func:`start_reply` and a non-zero status. :meth:`PendingBuild.finish` unmasks and opens
every hop's status. Nonces are 12 bytes, big-endian: ``nonce 2`` is ``0x00..02``.

Every refusal of bytes from the network is a :class:`BuildError` whose ``reason`` is a
stable token (:data:`REASONS`) for counters; nothing else escapes. Not here: cells and
circuit ids (routing/cells.py), the relay table, sending (the driver).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from discovery.descriptor import NodeDescriptor
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import NODE_ID_BYTES, NodeId
from routing.cells import BODY_BYTES
from routing.keys import HopKeys, derive_hop_keys
from routing.onionkeys import BUILD_TIMESTAMP_WINDOW_S, OnionKeyring, RandomBytes

__all__ = [
    "BODY_BYTES",
    "MAX_HOPS",
    "REASONS",
    "RECORD_BYTES",
    "SLOT_BYTES",
    "SLOTS",
    "STATUS_BYTES",
    "BuildError",
    "BuildRecord",
    "BuildStatus",
    "HopBuildResult",
    "HopSpec",
    "HopStatus",
    "NextHop",
    "PendingBuild",
    "Reason",
    "create_build",
    "extend_reply",
    "process_build",
    "start_reply",
]

SLOTS = 5
SLOT_BYTES = 281
MAX_HOPS = SLOTS
RECORD_BYTES = 217
"""Build record plaintext."""
STATUS_BYTES = SLOT_BYTES - crypto.AEAD_TAG_BYTES
"""Status record plaintext (265): sealed, it fills one slot."""

_EPH = crypto.X25519_KEY_BYTES
_SEALED_END = _EPH + RECORD_BYTES + crypto.AEAD_TAG_BYTES  # 265
_FILLER = SLOT_BYTES - _SEALED_END  # 16
_SLOTS_END = SLOTS * SLOT_BYTES  # 1405
_PAD = bytes(BODY_BYTES - _SLOTS_END)  # 4
_REST = (SLOTS - 1) * SLOT_BYTES  # the four slots after slot 0
_VERSION = 1
_FLAG_LAST = 0x01
_RECORD = struct.Struct("!BB20s32s16sHQ")  # version .. timestamp: 80 bytes
_RECORD_PAD = bytes(RECORD_BYTES - _RECORD.size)
_NO_NEXT = (bytes(NODE_ID_BYTES), bytes(32), bytes(16), 0)
_STATUS = struct.Struct("!BQ")
_STATUS_PAD = bytes(STATUS_BYTES - _STATUS.size)
_NONCE_RECORD = bytes(12)
_NONCE_SLOTS = bytes(12)
_NONCE_STATUS = (1).to_bytes(12, "big")
_NONCE_REPLY = (2).to_bytes(12, "big")
_V4_MAPPED = bytes(10) + b"\xff\xff"
_UINT64_MAX = 2**64 - 1

Reason = Literal[
    "bad_length",  # a body that is not BODY_BYTES long
    "bad_padding",  # the 4 bytes after the slots are not zero
    "bad_record",  # no onion key of ours opens slot 0 (tampered, wrong key, garbage)
    "bad_version",  # the record opened but has a version we do not speak
    "bad_field",  # the record opened but a field is malformed (flags, address, padding)
    "stale_timestamp",  # the record's timestamp is more than 10 minutes off our clock
    "replay",  # this ephemeral key already opened a build under this onion key
    "replay_cache_full",  # the replay cache is full of live entries: refuse, not forget
    "bad_reply",  # client: a hop's status slot does not open or is malformed
    "refused",  # client: a hop answered with a non-zero status (see .hop, .status)
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class BuildError(DecodeError):
    """A build or build reply was refused; ``reason`` is one of :data:`REASONS`.

    For the client's reasons ``bad_reply`` and ``refused``, ``hop`` is the 1-based hop
    whose status failed and, for ``refused``, ``status`` the byte it sent.
    """

    def __init__(
        self, reason: Reason, detail: str = "", *, hop: int | None = None, status: int | None = None
    ) -> None:
        self.reason: Reason = reason
        self.detail = detail
        self.hop = hop
        self.status = status
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BuildStatus(enum.IntEnum):
    """A hop's answer in the BUILD_REPLY. Unknown values are refusals too."""

    OK = 0
    REFUSED = 1  # policy or any reason the hop does not say
    NEXT_HOP_UNREACHABLE = 2  # no link to the next hop could be made
    OVERLOADED = 3  # circuit limits reached


# --- Addresses --------------------------------------------------------------------------


def _address_problem(address: object) -> str | None:
    if not isinstance(address, tuple) or len(address) != 2:
        return "an address must be a (host, port) pair"
    host, port = address
    if not isinstance(host, str):
        return "an address host must be an IP address literal"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "an address host must be an IP address literal"
    if isinstance(ip, ipaddress.IPv6Address) and (ip.scope_id or ip.ipv4_mapped is not None):
        return "IPv6 zone ids and IPv4-mapped addresses are refused"
    if str(ip) != host:
        return "an address host must be written in canonical form"
    if ip.is_unspecified or ip.is_multicast:
        return "an address may not be unspecified or multicast"
    if type(port) is not int or not 1 <= port <= 65535:
        return "an address port must be 1 to 65535"
    return None


def _pack_host(host: str) -> bytes:
    ip = ipaddress.ip_address(host)
    return _V4_MAPPED + ip.packed if ip.version == 4 else ip.packed


def _unpack_host(packed: bytes) -> str:
    ip = ipaddress.IPv6Address(packed)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


# --- Values -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NextHop:
    """Where a hop sends the BUILD on: what the record tells it, and all it learns."""

    node_id: NodeId
    link_key: bytes
    address: tuple[str, int]

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != NODE_ID_BYTES:
            raise LocalProtocolError(f"node_id must be {NODE_ID_BYTES} bytes")
        if not isinstance(self.link_key, bytes) or len(self.link_key) != crypto.X25519_KEY_BYTES:
            raise LocalProtocolError("link_key must be 32 bytes")
        problem = _address_problem(self.address)
        if problem is not None:
            raise LocalProtocolError(problem)


@dataclass(frozen=True, slots=True, kw_only=True)
class HopSpec:
    """One hop as the client knows it from the hop's descriptor."""

    node_id: NodeId
    link_key: bytes
    onion_key: bytes
    address: tuple[str, int]

    def __post_init__(self) -> None:
        NextHop(node_id=self.node_id, link_key=self.link_key, address=self.address)
        if not isinstance(self.onion_key, bytes) or len(self.onion_key) != _EPH:
            raise LocalProtocolError("onion_key must be 32 bytes")

    @classmethod
    def from_descriptor(
        cls, descriptor: NodeDescriptor, *, address: tuple[str, int] | None = None
    ) -> HopSpec:
        """The hop of a (validated) descriptor, sealed to its current onion key, reached
        at ``address`` (one of the descriptor's; the first by default)."""
        if address is None:
            address = descriptor.addresses[0]
        elif address not in descriptor.addresses:
            raise LocalProtocolError("address is not one of the descriptor's addresses")
        return cls(
            node_id=descriptor.node_id,
            link_key=descriptor.link_key,
            onion_key=descriptor.onion_key,
            address=address,
        )

    def next_hop(self) -> NextHop:
        return NextHop(node_id=self.node_id, link_key=self.link_key, address=self.address)


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildRecord:
    """A build record's plaintext: where to go next (None for the last hop) and when."""

    timestamp: int
    next_hop: NextHop | None

    def __post_init__(self) -> None:
        if type(self.timestamp) is not int or not 0 <= self.timestamp <= _UINT64_MAX:
            raise LocalProtocolError("timestamp must be a uint64 of Unix seconds")
        if self.next_hop is not None and not isinstance(self.next_hop, NextHop):
            raise LocalProtocolError("next_hop must be a NextHop or None")

    @property
    def last(self) -> bool:
        return self.next_hop is None

    def encode(self) -> bytes:
        """The 217-byte plaintext."""
        nxt = self.next_hop
        if nxt is None:
            fields = _NO_NEXT
        else:
            host, port = nxt.address
            fields = (nxt.node_id, nxt.link_key, _pack_host(host), port)
        flags = _FLAG_LAST if nxt is None else 0
        return _RECORD.pack(_VERSION, flags, *fields, self.timestamp) + _RECORD_PAD

    @classmethod
    def decode(cls, data: bytes) -> BuildRecord:
        """Parse a plaintext strictly; raises :class:`BuildError` (``bad_version``,
        ``bad_field``) and nothing else."""
        if not isinstance(data, bytes) or len(data) != RECORD_BYTES:
            raise BuildError("bad_field", f"a record is {RECORD_BYTES} bytes")
        version, flags, node_id, link_key, host, port, timestamp = _RECORD.unpack_from(data)
        if version != _VERSION:
            raise BuildError("bad_version", f"record version {version}")
        if flags & ~_FLAG_LAST:
            raise BuildError("bad_field", "unknown flags")
        if data[_RECORD.size :] != _RECORD_PAD:
            raise BuildError("bad_field", "non-zero padding")
        if flags & _FLAG_LAST:
            if (node_id, link_key, host, port) != _NO_NEXT:
                raise BuildError("bad_field", "the last hop's record names a next hop")
            return cls(timestamp=timestamp, next_hop=None)
        address = (_unpack_host(host), port)
        problem = _address_problem(address)
        if problem is not None:
            raise BuildError("bad_field", problem)
        nxt = NextHop(node_id=NodeId(node_id), link_key=link_key, address=address)
        return cls(timestamp=timestamp, next_hop=nxt)


@dataclass(frozen=True, slots=True, kw_only=True)
class HopBuildResult:
    """What a hop learned from a BUILD it accepted."""

    keys: HopKeys
    """The hop's circuit keys (circuits.md §2)."""
    next_hop: NextHop | None
    """Where to send ``out_body``; None when this hop is the last."""
    out_body: bytes | None
    """The BUILD body for the next hop; None when this hop is the last."""
    timestamp: int
    """The client's timestamp from the record."""
    onion_key: bytes
    """Which of our onion public keys opened the record (current, retired or next)."""

    @property
    def last(self) -> bool:
        return self.next_hop is None


@dataclass(frozen=True, slots=True)
class HopStatus:
    """One hop's status record, as the client opened it."""

    status: int
    timestamp: int  # the hop's clock when it answered, Unix seconds


# --- Helpers ----------------------------------------------------------------------------


def _check_now(now: float) -> None:
    if not isinstance(now, int | float) or not math.isfinite(now):
        raise LocalProtocolError("now must be a finite number of Unix seconds")


def _random(random_bytes: RandomBytes, n: int) -> bytes:
    data = random_bytes(n)
    if not isinstance(data, bytes) or len(data) != n:
        raise LocalProtocolError("random_bytes returned the wrong number of bytes")
    return data


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _chunk(stream: bytes, index: int) -> bytes:
    return stream[index * SLOT_BYTES : (index + 1) * SLOT_BYTES]


def _premask(arrivals: Sequence[bytes], streams: Sequence[bytes]) -> list[bytes]:
    """Slot j on link 1 for the slot that must arrive at hop j (0-based) as ``arrivals[j]``.

    Hop m sends slot k+1 of its input as slot k XOR chunk k of its stream, so the slot
    hop j reads as slot 0 was slot j on link 1, XORed on the way by chunk j-1-m of the
    stream of every hop m < j. Build slots (k_slots) and reply slots (k_reply, read in
    reverse) have the same shape.
    """
    slots = []
    for j, arrival in enumerate(arrivals):
        value = int.from_bytes(arrival, "big")
        for m in range(j):
            value ^= int.from_bytes(_chunk(streams[m], j - 1 - m), "big")
        slots.append(value.to_bytes(SLOT_BYTES, "big"))
    return slots


def _seal_status(keys: HopKeys, status: int, now: float) -> bytes:
    if type(status) is not int and not isinstance(status, BuildStatus):
        raise LocalProtocolError("status must be an integer 0..255")
    if not 0 <= status <= 255:
        raise LocalProtocolError("status must be an integer 0..255")
    _check_now(now)
    stamp = min(max(int(now), 0), _UINT64_MAX)
    plain = _STATUS.pack(int(status), stamp) + _STATUS_PAD
    return crypto.Aead(keys.k_reply).seal(_NONCE_STATUS, plain)


def _check_body(body: bytes) -> None:
    if not isinstance(body, bytes) or len(body) != BODY_BYTES:
        raise BuildError("bad_length", f"a body is {BODY_BYTES} bytes")
    if body[_SLOTS_END:] != _PAD:
        raise BuildError("bad_padding")


# --- Client -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingBuild:
    """The client's side of a build in flight: each hop's keys, until the reply."""

    hops: tuple[HopSpec, ...]
    keys: tuple[HopKeys, ...]
    sent_at: float

    def read_reply(self, reply_body: bytes) -> list[HopStatus]:
        """Unmask and open every hop's status, hop 1 first; stop after the first
        non-zero status (the hops beyond it never saw the build). Raises
        :class:`BuildError` (``bad_length``, ``bad_padding``, ``bad_reply``) only."""
        _check_body(reply_body)
        streams = [crypto.chacha20_stream(k.k_reply, _NONCE_REPLY, _REST) for k in self.keys[:-1]]
        # The reply slots have the build's shape: slot j on link 1 is hop j's status
        # XORed with chunk j-1-m of the stream of each hop m < j.
        slots = [_chunk(reply_body, j) for j in range(len(self.keys))]
        statuses: list[HopStatus] = []
        for j, arrived in enumerate(_premask(slots, streams)):
            plain = crypto.Aead(self.keys[j].k_reply).open(_NONCE_STATUS, arrived)
            if plain is None or plain[_STATUS.size :] != _STATUS_PAD:
                raise BuildError("bad_reply", f"hop {j + 1}'s status", hop=j + 1)
            status, stamp = _STATUS.unpack_from(plain)
            statuses.append(HopStatus(status, stamp))
            if status != BuildStatus.OK:
                break
        return statuses

    def finish(self, reply_body: bytes) -> list[HopKeys]:
        """Every hop's keys when every hop answered OK; else :class:`BuildError`
        (``bad_length``, ``bad_padding``, ``bad_reply``, ``refused``) and nothing else."""
        for hop, answer in enumerate(self.read_reply(reply_body), start=1):
            if answer.status != BuildStatus.OK:
                raise BuildError(
                    "refused", f"hop {hop} status {answer.status}", hop=hop, status=answer.status
                )
        return list(self.keys)


def create_build(
    hops: Sequence[HopSpec], *, now: float, random_bytes: RandomBytes
) -> tuple[bytes, PendingBuild]:
    """The BUILD body for a circuit through ``hops`` (1..5, entry first) and the state to
    read its reply with. Each record is sealed to the hop's ``onion_key`` with a fresh
    ephemeral key; unused slots are random."""
    _check_now(now)
    if not 1 <= len(hops) <= MAX_HOPS:
        raise LocalProtocolError(f"a circuit has 1 to {MAX_HOPS} hops")
    if not all(isinstance(h, HopSpec) for h in hops):
        raise LocalProtocolError("hops must be HopSpec values")
    if now < 0:
        raise LocalProtocolError("now must not be before the Unix epoch")
    timestamp = int(now)
    keys: list[HopKeys] = []
    arrivals: list[bytes] = []
    for i, hop in enumerate(hops):
        eph_private = _random(random_bytes, _EPH)
        eph = crypto.x25519_public_from_private(eph_private)
        shared = crypto.x25519_shared(eph_private, hop.onion_key)
        if shared is None:
            raise LocalProtocolError(f"hop {i + 1}'s onion key is unusable (low order)")
        hop_keys = derive_hop_keys(shared, eph, hop.onion_key)
        nxt = hops[i + 1].next_hop() if i + 1 < len(hops) else None
        record = BuildRecord(timestamp=timestamp, next_hop=nxt).encode()
        sealed = crypto.Aead(hop_keys.record).seal(_NONCE_RECORD, record, eph)
        keys.append(hop_keys)
        arrivals.append(eph + sealed + _random(random_bytes, _FILLER))
    streams = [crypto.chacha20_stream(k.k_slots, _NONCE_SLOTS, _REST) for k in keys[:-1]]
    slots = _premask(arrivals, streams)
    slots.extend(_random(random_bytes, SLOT_BYTES) for _ in range(SLOTS - len(hops)))
    body = b"".join(slots) + _PAD
    return body, PendingBuild(tuple(hops), tuple(keys), float(now))


# --- Hop --------------------------------------------------------------------------------


def process_build(
    body: bytes, keyring: OnionKeyring, *, now: float, random_bytes: RandomBytes
) -> HopBuildResult:
    """Open slot 0 of a BUILD body with one of our onion keys and prepare the body for
    the next hop. Raises :class:`BuildError` (``bad_length``, ``bad_padding``,
    ``bad_record``, ``bad_version``, ``bad_field``, ``stale_timestamp``, ``replay``,
    ``replay_cache_full``) and nothing else for any ``body``."""
    _check_now(now)
    _check_body(body)
    eph = body[:_EPH]
    sealed = body[_EPH:_SEALED_END]
    opened: tuple[bytes, HopKeys, bytes] | None = None
    for private, public in keyring.candidates(now):
        shared = crypto.x25519_shared(private, eph)
        if shared is None:  # a low-order point: no key of ours can open it
            break
        hop_keys = derive_hop_keys(shared, eph, public)
        plain = crypto.Aead(hop_keys.record).open(_NONCE_RECORD, sealed, eph)
        if plain is not None:
            opened = (public, hop_keys, plain)
            break
    if opened is None:
        raise BuildError("bad_record")
    public, hop_keys, plain = opened
    record = BuildRecord.decode(plain)
    if abs(now - record.timestamp) > BUILD_TIMESTAMP_WINDOW_S:
        raise BuildError("stale_timestamp", f"{record.timestamp} vs our {int(now)}")
    refusal = keyring.check_replay(public, eph, timestamp=record.timestamp, now=now)
    if refusal is not None:
        raise BuildError(refusal)
    out_body = None
    if record.next_hop is not None:
        rest = crypto.chacha20_xor(hop_keys.k_slots, _NONCE_SLOTS, body[SLOT_BYTES:_SLOTS_END])
        out_body = rest + _random(random_bytes, SLOT_BYTES) + _PAD
    return HopBuildResult(
        keys=hop_keys,
        next_hop=record.next_hop,
        out_body=out_body,
        timestamp=record.timestamp,
        onion_key=public,
    )


def start_reply(keys: HopKeys, status: int, *, now: float, random_bytes: RandomBytes) -> bytes:
    """The BUILD_REPLY body a last hop (or a hop that cannot extend) sends back: its
    sealed status in slot 0, random slots after it."""
    first = _seal_status(keys, status, now)
    return first + _random(random_bytes, _REST) + _PAD


def extend_reply(keys: HopKeys, reply_body: bytes, status: int, *, now: float) -> bytes:
    """Pass a successor's BUILD_REPLY back: shift its slots right by one (dropping the
    last), mask them with this hop's reply keystream, and put our status in slot 0.
    Raises :class:`BuildError` (``bad_length``, ``bad_padding``) for a bad body."""
    _check_body(reply_body)
    first = _seal_status(keys, status, now)
    shifted = crypto.chacha20_xor(keys.k_reply, _NONCE_REPLY, reply_body[:_REST])
    return first + shifted + _PAD
