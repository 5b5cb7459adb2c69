"""DHT RPC messages on the link: framing, fragmentation and a strict schema (sans-IO).

The DHT speaks kademlia's RPC convention (rpcudp's: a request is the msgpack array
``[method, args]``, a response is the msgpack of the method's return value, matched
by a random message id), but every message travels as link frames of kind
:data:`KIND_DHT` inside the Noise session, never in clear. A message larger than one
link frame (a descriptor of up to 2 KiB, a provider set) is cut into fragments; the
:class:`Reassembler` puts them back together with bounded memory.

Frame layout (the payload of one link frame of kind 0x10; docs/protocol.md §11)::

    0      1   type: 0x00 request, 0x01 response
    1      8   message id (random, chosen by the requester; the response repeats it)
    9      1   fragment index, 0-based
    10     1   fragment count, 1..MAX_FRAGMENTS
    11     ..  the fragment's bytes of the msgpack body

Nothing from the network is trusted: :func:`decode_request` and :func:`decode_response`
check every type, length and count before anything reaches the DHT, and refuse with an
:class:`RpcError` whose ``reason`` is a stable token the driver counts as
``dht.drop.<reason>``. msgpack itself is decoded with u-msgpack-python (the codec rpcudp
uses) and its every failure, including absurd nesting, becomes ``bad_msgpack``; so does
any ext type (the schema has none, and umsgpack would turn ext -1 into a ``datetime``
that can overflow, or hand other types to whatever ext classes are registered).

Not here: sending, timeouts, the routing table (discovery/dht.py, the asyncio driver),
what is stored (discovery/store.py, discovery/providers.py).
"""

from __future__ import annotations

import functools
import io
import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import umsgpack

from discovery.constants import MAX_DESCRIPTOR_BYTES
from meshnode import crypto
from meshnode.errors import DecodeError
from meshnode.link.constants import KIND_DHT, MAX_PAYLOAD_BYTES

__all__ = [
    "FRAME_HEADER_BYTES",
    "KIND_DHT",
    "MAX_CONTACTS",
    "MAX_FRAGMENTS",
    "MAX_MESSAGE_BYTES",
    "METHODS",
    "MSG_ID_BYTES",
    "PROVIDER_BUDGET_BYTES",
    "REASONS",
    "REQUEST",
    "RESPONSE",
    "DhtContact",
    "FoundValue",
    "Method",
    "Providers",
    "Reassembler",
    "Request",
    "RpcError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "fragment",
    "parse_frame",
]

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_BYTES = 8
_HEADER = struct.Struct("!B8sBB")
FRAME_HEADER_BYTES = _HEADER.size  # 11
MAX_CHUNK_BYTES = MAX_PAYLOAD_BYTES - FRAME_HEADER_BYTES  # 1411
MAX_FRAGMENTS = 12
# The largest message body: a get_providers answer (12 KB of descriptors + k contacts)
# fits; twelve fragments of 1,411 bytes hold it.
MAX_MESSAGE_BYTES = 16 * 1024
# Bytes of descriptors one get_providers answer may carry, leaving room for k contacts.
PROVIDER_BUDGET_BYTES = 12 * 1024
MAX_CONTACTS = 20  # k: the most contacts one answer may list
ID_BYTES = 20
KEY_BYTES = 20
LINK_KEY_BYTES = 32
MAX_HOST_CHARS = 45  # the longest textual IPv6 address

Method = Literal["ping", "store", "find_node", "find_value", "add_provider", "get_providers"]
METHODS: tuple[Method, ...] = get_args(Method)

Reason = Literal[
    "truncated",  # shorter than the frame header
    "bad_type",  # neither request nor response
    "bad_fragment",  # index >= count, count 0 or > MAX_FRAGMENTS, fragments that disagree
    "too_large",  # reassembled body over MAX_MESSAGE_BYTES
    "reassembly_full",  # too many half-received messages (per peer or in total)
    "bad_msgpack",  # the body is not msgpack (or nests absurdly deep)
    "bad_request",  # not [method, args]
    "unknown_method",
    "bad_args",  # wrong count, type or length of arguments
    "bad_response",  # the answer does not have the shape its method returns
]
REASONS: tuple[Reason, ...] = get_args(Reason)

# Arguments after the sender id, per method: "key" (20 bytes) and "value" (a descriptor).
_ARGS: dict[str, tuple[str, ...]] = {
    "ping": (),
    "store": ("key", "value"),
    "find_node": ("key",),
    "find_value": ("key",),
    "add_provider": ("key", "value"),
    "get_providers": ("key",),
}


class RpcError(DecodeError):
    """A DHT message was refused; ``reason`` is a stable token (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# The low-order check is a scalar multiplication (~25 us); the same contacts come back in
# answer after answer, so the verdicts of recent keys are remembered (bounded).
_usable_key = functools.lru_cache(maxsize=4096)(crypto.x25519_public_is_usable)


# --- Value types ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DhtContact:
    """A DHT node as one answer names it: its id, an IP address, a port and its link key.

    kademlia's contacts are only (id, ip, port); a Noise IK handshake also needs the
    peer's static key, so ours carry it. The id is a claim until a handshake with
    ``link_key`` proves the identity key hashing to it (discovery/dht.py checks).
    """

    node_id: bytes
    host: str
    port: int
    link_key: bytes

    def to_wire(self) -> list[object]:
        return [self.node_id, self.host, self.port, self.link_key]

    @classmethod
    def from_wire(cls, item: object) -> DhtContact:
        if not isinstance(item, list) or len(item) != 4:
            raise RpcError("bad_response", "a contact is [id, host, port, link_key]")
        node_id, host, port, link_key = item
        _check_bin(node_id, ID_BYTES, "contact id", "bad_response")
        if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_CHARS:
            raise RpcError("bad_response", "contact host must be an IP address")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise RpcError("bad_response", "contact host must be an IP address") from None
        if (
            address.is_multicast
            or address.is_unspecified
            or address == ipaddress.IPv4Address("255.255.255.255")
            or (
                isinstance(address, ipaddress.IPv6Address)
                and (address.scope_id is not None or address.ipv4_mapped is not None)
            )
        ):
            # The same rule as descriptor addresses: one spelling, unicast, no zone ids.
            raise RpcError("bad_response", "contact host must be a unicast address")
        if type(port) is not int or not 0 < port <= 65535:
            raise RpcError("bad_response", "contact port must be 1..65535")
        _check_bin(link_key, LINK_KEY_BYTES, "contact link key", "bad_response")
        assert isinstance(node_id, bytes) and isinstance(link_key, bytes)
        if not _usable_key(link_key):
            raise RpcError("bad_response", "contact link key is a low-order point")
        return cls(node_id=node_id, host=address.compressed, port=port, link_key=link_key)


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, well-formed request. ``sender_id`` is what the peer claims to be."""

    method: Method
    sender_id: bytes
    key: bytes = b""
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class FoundValue:
    """find_value's answer when the responder holds the value."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Providers:
    """get_providers' answer: entries (signed descriptors) and closer nodes."""

    entries: tuple[bytes, ...] = ()
    nodes: tuple[DhtContact, ...] = field(default=())


Response = bytes | bool | list[DhtContact] | FoundValue | Providers


# --- Frames and fragments ------------------------------------------------------------------


def fragment(msg_type: int, msg_id: bytes, body: bytes) -> list[bytes]:
    """Cut ``body`` into link-frame payloads (each at most MAX_PAYLOAD_BYTES)."""
    if msg_type not in (REQUEST, RESPONSE) or len(msg_id) != MSG_ID_BYTES:
        raise ValueError("bad message type or id")
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"DHT message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    chunks = [body[i : i + MAX_CHUNK_BYTES] for i in range(0, len(body), MAX_CHUNK_BYTES)]
    if not chunks:
        chunks = [b""]
    count = len(chunks)
    return [_HEADER.pack(msg_type, msg_id, i, count) + c for i, c in enumerate(chunks)]


def parse_frame(frame: bytes) -> tuple[int, bytes, int, int, bytes]:
    """(type, msg_id, index, count, chunk) of one frame; RpcError when malformed."""
    if len(frame) < FRAME_HEADER_BYTES:
        raise RpcError("truncated", f"{len(frame)} bytes")
    msg_type, msg_id, index, count = _HEADER.unpack_from(frame)
    if msg_type not in (REQUEST, RESPONSE):
        raise RpcError("bad_type", f"type {msg_type}")
    if not 0 < count <= MAX_FRAGMENTS or index >= count:
        raise RpcError("bad_fragment", f"fragment {index} of {count}")
    return msg_type, msg_id, index, count, frame[FRAME_HEADER_BYTES:]


@dataclass(slots=True)
class _Partial:
    count: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Puts fragmented messages back together; memory bounded per peer and in total.

    ``feed`` returns ``(type, msg_id, body)`` once a message is complete, else None, and
    raises :class:`RpcError` for a frame to drop. A half-received message is forgotten
    after ``timeout_s``; a peer may have at most ``max_per_peer`` of them, everyone
    together ``max_total``. Worst case memory: max_total x MAX_MESSAGE_BYTES.
    """

    def __init__(
        self, *, max_per_peer: int = 8, max_total: int = 256, timeout_s: float = 5.0
    ) -> None:
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self.timeout_s = timeout_s
        self._partials: OrderedDict[tuple[bytes, int, bytes], _Partial] = OrderedDict()
        self._per_peer: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._partials)

    def feed(self, peer: bytes, frame: bytes, now: float) -> tuple[int, bytes, bytes] | None:
        msg_type, msg_id, index, count, chunk = parse_frame(frame)
        if count == 1:
            return msg_type, msg_id, chunk
        if len(chunk) > MAX_CHUNK_BYTES:
            raise RpcError("bad_fragment", "fragment longer than a frame allows")
        self.expire(now)
        key = (peer, msg_type, msg_id)
        partial = self._partials.get(key)
        if partial is None:
            if self._per_peer.get(peer, 0) >= self.max_per_peer:
                raise RpcError("reassembly_full", "too many partial messages from this peer")
            if len(self._partials) >= self.max_total:
                raise RpcError("reassembly_full", "too many partial messages")
            partial = _Partial(count=count, started=now)
            self._partials[key] = partial
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        elif partial.count != count:
            self._forget(key)
            raise RpcError("bad_fragment", "fragment counts disagree")
        if index in partial.parts:
            return None  # a duplicate fragment: harmless, ignored
        partial.parts[index] = chunk
        partial.size += len(chunk)
        if partial.size > MAX_MESSAGE_BYTES:
            self._forget(key)
            raise RpcError("too_large", "reassembled message too large")
        if len(partial.parts) < count:
            return None
        self._forget(key)
        return msg_type, msg_id, b"".join(partial.parts[i] for i in range(count))

    def expire(self, now: float) -> int:
        """Forget partial messages older than ``timeout_s``; returns how many."""
        dropped = 0
        while self._partials:
            key, partial = next(iter(self._partials.items()))
            if now - partial.started < self.timeout_s:
                break
            self._forget(key)
            dropped += 1
        return dropped

    def _forget(self, key: tuple[bytes, int, bytes]) -> None:
        if self._partials.pop(key, None) is None:
            return
        peer = key[0]
        left = self._per_peer.get(peer, 1) - 1
        if left:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)


# --- Bodies --------------------------------------------------------------------------------


def encode_request(
    method: Method, sender_id: bytes, *, key: bytes = b"", value: bytes = b""
) -> bytes:
    """The msgpack body ``[method, [sender_id, args...]]``."""
    if method not in _ARGS:
        raise ValueError(f"unknown DHT method {method!r}")
    args: list[object] = [sender_id]
    for name in _ARGS[method]:
        args.append(key if name == "key" else value)
    return bytes(umsgpack.packb([method, args]))


def decode_request(body: bytes) -> Request:
    """Check a request body against the schema of its method."""
    data = _unpack(body)
    if not isinstance(data, list) or len(data) != 2:
        raise RpcError("bad_request", "a request is [method, args]")
    method, args = data
    if not isinstance(method, str):
        raise RpcError("bad_request", "method must be a string")
    if method not in _ARGS:
        raise RpcError("unknown_method", method[:32])
    names = _ARGS[method]
    if not isinstance(args, list) or len(args) != 1 + len(names):
        raise RpcError("bad_args", f"{method} takes {1 + len(names)} arguments")
    sender_id = args[0]
    _check_bin(sender_id, ID_BYTES, "sender id", "bad_args")
    key = value = b""
    for name, arg in zip(names, args[1:], strict=True):
        if name == "key":
            _check_bin(arg, KEY_BYTES, "key", "bad_args")
            key = arg
        else:
            if not isinstance(arg, bytes) or not 0 < len(arg) <= MAX_DESCRIPTOR_BYTES:
                raise RpcError("bad_args", f"value must be 1..{MAX_DESCRIPTOR_BYTES} bytes")
            value = arg
    assert isinstance(sender_id, bytes)
    return Request(method=method, sender_id=sender_id, key=key, value=value)  # type: ignore[arg-type]


def encode_response(method: Method, result: Response) -> bytes:
    """The msgpack body of ``method``'s answer ``result``."""
    wire: object
    if isinstance(result, FoundValue):
        wire = {"value": result.value}
    elif isinstance(result, Providers):
        wire = {
            "providers": list(result.entries),
            "nodes": [c.to_wire() for c in result.nodes],
        }
    elif isinstance(result, list):
        wire = [c.to_wire() for c in result]
    else:
        wire = result
    body = bytes(umsgpack.packb(wire))
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{method} answer of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return body


def decode_response(method: Method, body: bytes) -> Response:
    """Check an answer against what ``method`` returns."""
    data = _unpack(body)
    if method == "ping":
        _check_bin(data, ID_BYTES, "ping answer", "bad_response")
        assert isinstance(data, bytes)
        return data
    if method in ("store", "add_provider"):
        if not isinstance(data, bool):
            raise RpcError("bad_response", f"{method} answers true or false")
        return data
    if method == "find_value" and isinstance(data, dict):
        if set(data) != {"value"}:
            raise RpcError("bad_response", "find_value answers {value} or contacts")
        value = data["value"]
        if not isinstance(value, bytes) or not 0 < len(value) <= MAX_DESCRIPTOR_BYTES:
            raise RpcError("bad_response", "value must be 1..2048 bytes")
        return FoundValue(value)
    if method == "get_providers":
        if not isinstance(data, dict) or set(data) != {"providers", "nodes"}:
            raise RpcError("bad_response", "get_providers answers {providers, nodes}")
        entries = data["providers"]
        if not isinstance(entries, list) or not all(
            isinstance(e, bytes) and 0 < len(e) <= MAX_DESCRIPTOR_BYTES for e in entries
        ):
            raise RpcError("bad_response", "providers must be a list of descriptors")
        return Providers(entries=tuple(entries), nodes=tuple(_contacts(data["nodes"])))
    if method in ("find_node", "find_value"):
        return _contacts(data)
    raise RpcError("unknown_method", str(method))


def _contacts(data: object) -> list[DhtContact]:
    if not isinstance(data, list) or len(data) > MAX_CONTACTS:
        raise RpcError("bad_response", f"contacts must be a list of at most {MAX_CONTACTS}")
    contacts = [DhtContact.from_wire(item) for item in data]
    if len({c.node_id for c in contacts}) != len(contacts):
        raise RpcError("bad_response", "a contact is listed twice")
    return contacts


def _refuse_ext(ext: umsgpack.Ext) -> object:
    raise RpcError("bad_msgpack", f"ext type {ext.type}")


# A handler for every ext type, so umsgpack never decodes one itself (module docstring).
_NO_EXT = {ext_type: _refuse_ext for ext_type in range(-128, 128)}


def _unpack(body: bytes) -> object:
    if len(body) > MAX_MESSAGE_BYTES:
        raise RpcError("too_large", f"{len(body)} bytes")
    stream = io.BytesIO(body)
    try:
        data = umsgpack.unpack(stream, ext_handlers=_NO_EXT)
    except (umsgpack.UnpackException, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise RpcError("bad_msgpack", type(exc).__name__) from None
    if stream.tell() != len(body):
        raise RpcError("bad_msgpack", "trailing bytes after the message")
    return data


def _check_bin(value: object, size: int, what: str, reason: Reason) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise RpcError(reason, f"{what} must be {size} bytes")


def contacts_fitting(contacts: Sequence[DhtContact], limit: int = MAX_CONTACTS) -> list[DhtContact]:
    """At most ``limit`` contacts (an answer never lists more than MAX_CONTACTS)."""
    return list(contacts[: min(limit, MAX_CONTACTS)])
