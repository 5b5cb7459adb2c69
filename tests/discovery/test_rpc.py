"""DHT RPC messages (discovery/rpc.py): round trips, every refusal, fragments, vectors.

No sockets and no loop: the codec and the :class:`Reassembler` are sans-IO, fed bytes
and a ``now``. Crafted bodies are built with umsgpack directly (tests may import it; the
packages go through discovery/rpc.py). The vectors of tests/vectors/dht.json are
re-encoded from their inputs, checked against a small independent msgpack encoder
(:func:`mp`, so the layout in docs/protocol.md §11 and the code cannot drift apart) and
decoded back.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import rpc
from discovery.constants import MAX_DESCRIPTOR_BYTES
from discovery.descriptor import SignedDescriptor
from discovery.rpc import (
    FRAME_HEADER_BYTES,
    MAX_CONTACTS,
    MAX_FRAGMENTS,
    MAX_MESSAGE_BYTES,
    METHODS,
    MSG_ID_BYTES,
    PROVIDER_BUDGET_BYTES,
    REASONS,
    REQUEST,
    RESPONSE,
    DhtContact,
    FoundValue,
    Providers,
    Reassembler,
    Request,
    RpcError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    fragment,
    parse_frame,
)
from discovery.store import descriptor_key
from meshnode import crypto
from meshnode.errors import DecodeError
from meshnode.identity import Identity
from meshnode.link.constants import KIND_DHT, MAX_PAYLOAD_BYTES

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
V: dict[str, Any] = json.loads((VECTORS_DIR / "dht.json").read_text(encoding="utf-8"))
DESCRIPTOR_V: dict[str, Any] = json.loads(
    (VECTORS_DIR / "descriptor.json").read_text(encoding="utf-8")
)

VECTOR_NAMES = (
    "ping_request",
    "ping_response",
    "find_node_request",
    "find_node_response",
    "store_request",
    "two_fragments",
)


SENDER = bytes(range(1, 21))  # a 20-byte node id
KEY = bytes(range(101, 121))  # a 20-byte DHT key
MSG_ID = bytes.fromhex("a0a1a2a3a4a5a6a7")
VALUE = b"\x5a" * 300  # the codec does not look inside values (the stores do)


def link_key(i: int) -> bytes:
    """A usable X25519 public key from a fixed private key."""
    return crypto.x25519_public_from_private(bytes([0x40 + i]) * 32)


def contact(i: int, host: str = "192.0.2.7", port: int = 7520) -> DhtContact:
    return DhtContact(node_id=bytes([i]) * 20, host=host, port=port, link_key=link_key(i))


def wire_contact(i: int = 1, **changes: object) -> list[object]:
    """A contact as it travels ([id, host, port, link_key]) with some fields replaced."""
    fields = {"node_id": bytes([i]) * 20, "host": "192.0.2.7", "port": 7520}
    fields |= {"link_key": link_key(i)} | changes
    return [fields["node_id"], fields["host"], fields["port"], fields["link_key"]]


def pack(obj: object) -> bytes:
    return bytes(umsgpack.packb(obj))


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(RpcError) as info:
        call()
    return info.value.reason


def header(msg_type: int, msg_id: bytes, index: int, count: int) -> bytes:
    return struct.pack("!B8sBB", msg_type, msg_id, index, count)


# --- Constants agree with each other and with the link ---------------------------------


def test_limits_fit_the_link() -> None:
    assert KIND_DHT == 0x10
    assert FRAME_HEADER_BYTES == 11
    assert MSG_ID_BYTES == 8
    assert FRAME_HEADER_BYTES + rpc.MAX_CHUNK_BYTES == MAX_PAYLOAD_BYTES == 1422
    assert MAX_FRAGMENTS * rpc.MAX_CHUNK_BYTES >= MAX_MESSAGE_BYTES == 16 * 1024
    assert MAX_CONTACTS == 20
    assert MAX_DESCRIPTOR_BYTES == 2048
    assert PROVIDER_BUDGET_BYTES == 12 * 1024
    assert set(METHODS) == {
        "ping",
        "store",
        "find_node",
        "find_value",
        "add_provider",
        "get_providers",
    }


def test_rpc_error_is_a_decode_error() -> None:
    error = RpcError("bad_args", "sender id must be 20 bytes")
    assert isinstance(error, DecodeError)
    assert error.reason == "bad_args"
    assert str(error) == "bad_args: sender id must be 20 bytes"
    assert str(RpcError("truncated")) == "truncated"


# --- Round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_request_round_trip(method: rpc.Method) -> None:
    names = rpc._ARGS[method]
    key = KEY if "key" in names else b""
    value = VALUE if "value" in names else b""
    body = encode_request(method, SENDER, key=key, value=value)
    assert decode_request(body) == Request(method=method, sender_id=SENDER, key=key, value=value)
    # The body is rpcudp's [method, args], args = [sender id, key?, value?].
    args = [SENDER] + [key] * ("key" in names) + [value] * ("value" in names)
    assert umsgpack.unpackb(body) == [method, args]


@pytest.mark.parametrize("size", [1, MAX_DESCRIPTOR_BYTES])
@pytest.mark.parametrize("method", ["store", "add_provider"])
def test_request_values_at_their_limits(method: rpc.Method, size: int) -> None:
    body = encode_request(method, SENDER, key=KEY, value=b"v" * size)
    assert decode_request(body).value == b"v" * size


def test_encode_request_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown DHT method"):
        encode_request("stun", SENDER)  # type: ignore[arg-type]


CONTACTS = [
    contact(1),
    contact(2, host="2001:db8::2", port=1),
    contact(3, host="10.0.0.3", port=65535),
]

RESPONSES: list[tuple[rpc.Method, rpc.Response]] = [
    ("ping", SENDER),
    ("store", True),
    ("store", False),
    ("add_provider", True),
    ("add_provider", False),
    ("find_node", []),
    ("find_node", CONTACTS),
    ("find_node", [contact(i) for i in range(1, MAX_CONTACTS + 1)]),
    ("find_value", CONTACTS),
    ("find_value", FoundValue(VALUE)),
    ("find_value", FoundValue(b"v" * MAX_DESCRIPTOR_BYTES)),
    ("get_providers", Providers()),
    ("get_providers", Providers(entries=(VALUE, b"w" * 10), nodes=tuple(CONTACTS))),
]


@pytest.mark.parametrize(("method", "result"), RESPONSES, ids=lambda x: str(x)[:20])
def test_response_round_trip(method: rpc.Method, result: rpc.Response) -> None:
    assert decode_response(method, encode_response(method, result)) == result


def test_response_wire_shapes() -> None:
    """kademlia's shapes: an id, a bool, a list of tuples, {"value": v}; plus ours."""
    assert umsgpack.unpackb(encode_response("ping", SENDER)) == SENDER
    assert umsgpack.unpackb(encode_response("store", True)) is True
    assert umsgpack.unpackb(encode_response("find_node", [contact(1)])) == [
        [bytes([1]) * 20, "192.0.2.7", 7520, link_key(1)]
    ]
    assert umsgpack.unpackb(encode_response("find_value", FoundValue(VALUE))) == {"value": VALUE}
    providers = Providers(entries=(VALUE,), nodes=(contact(1),))
    assert umsgpack.unpackb(encode_response("get_providers", providers)) == {
        "providers": [VALUE],
        "nodes": [[bytes([1]) * 20, "192.0.2.7", 7520, link_key(1)]],
    }


def test_contact_hosts_are_canonicalised() -> None:
    for given_host, canonical in [
        ("2001:DB8:0:0:0:0:0:2", "2001:db8::2"),
        ("2001:db8::0002", "2001:db8::2"),
        ("192.0.2.7", "192.0.2.7"),
    ]:
        decoded = decode_response("find_node", pack([wire_contact(host=given_host)]))
        assert isinstance(decoded, list)
        assert decoded[0].host == canonical


def test_the_largest_provider_answer_fits_one_message() -> None:
    """12 KiB of descriptors plus k contacts with the longest hosts: under 16 KiB."""
    entries = tuple(b"d" * MAX_DESCRIPTOR_BYTES for _ in range(PROVIDER_BUDGET_BYTES // 2048))
    host = "2001:0db8:ffff:ffff:ffff:ffff:255.255.255.254"
    assert len(host) == rpc.MAX_HOST_CHARS
    nodes = tuple(contact(i, host=host, port=65535) for i in range(MAX_CONTACTS))
    body = encode_response("get_providers", Providers(entries=entries, nodes=nodes))
    assert len(body) <= MAX_MESSAGE_BYTES
    assert len(fragment(RESPONSE, MSG_ID, body)) <= MAX_FRAGMENTS
    decoded = decode_response("get_providers", body)
    assert isinstance(decoded, Providers)
    assert decoded.entries == entries
    assert [c.host for c in decoded.nodes] == ["2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"] * 20


def test_encode_response_refuses_an_oversized_answer() -> None:
    entries = tuple(b"d" * MAX_DESCRIPTOR_BYTES for _ in range(8))
    with pytest.raises(ValueError, match="exceeds"):
        encode_response("get_providers", Providers(entries=entries))


def test_contacts_fitting() -> None:
    many = [contact(i) for i in range(30)]
    assert rpc.contacts_fitting(many) == many[:MAX_CONTACTS]
    assert rpc.contacts_fitting(many, 3) == many[:3]
    assert rpc.contacts_fitting(many, 99) == many[:MAX_CONTACTS]


# --- Frames ----------------------------------------------------------------------------------


def test_frame_layout() -> None:
    (frame,) = fragment(REQUEST, MSG_ID, b"\xc0")
    assert frame == b"\x00" + MSG_ID + b"\x00\x01" + b"\xc0"
    assert parse_frame(frame) == (REQUEST, MSG_ID, 0, 1, b"\xc0")
    (frame,) = fragment(RESPONSE, MSG_ID, b"")
    assert frame == b"\x01" + MSG_ID + b"\x00\x01"
    assert len(frame) == FRAME_HEADER_BYTES


def test_fragment_refuses_local_misuse() -> None:
    with pytest.raises(ValueError):
        fragment(2, MSG_ID, b"x")
    with pytest.raises(ValueError):
        fragment(REQUEST, MSG_ID[:7], b"x")
    with pytest.raises(ValueError, match="exceeds"):
        fragment(REQUEST, MSG_ID, bytes(MAX_MESSAGE_BYTES + 1))


# --- Refusals: every reason from a crafted input -----------------------------------------------

PING_FRAME = header(REQUEST, MSG_ID, 0, 1) + encode_request("ping", SENDER)
ZERO_KEY = bytes(32)
# The other well-known low-order X25519 points (RFC 7748 / libsodium's blocklist).
ORDER_ONE = (1).to_bytes(32, "little")
ORDER_EIGHT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
P_MINUS_ONE = ((1 << 255) - 20).to_bytes(32, "little")


def first_fragments(r: Reassembler, peer: bytes, count: int, *, start: int = 0) -> None:
    """Open ``count`` partial messages from ``peer`` (first of two fragments each)."""
    for i in range(start, start + count):
        assert r.feed(peer, header(REQUEST, i.to_bytes(8, "big"), 0, 2) + b"x", 0.0) is None


def _per_peer_full() -> None:
    r = Reassembler(max_per_peer=2, max_total=10)
    first_fragments(r, b"a", 2)
    r.feed(b"a", header(REQUEST, b"\xff" * 8, 0, 2) + b"x", 0.0)


def _total_full() -> None:
    r = Reassembler(max_per_peer=8, max_total=3)
    for peer in (b"a", b"b", b"c"):
        first_fragments(r, peer, 1)
    r.feed(b"d", header(REQUEST, MSG_ID, 0, 2) + b"x", 0.0)


def _counts_disagree(r: Reassembler | None = None) -> None:
    r = r if r is not None else Reassembler()
    r.feed(b"p", header(REQUEST, MSG_ID, 0, 3) + b"x", 0.0)
    r.feed(b"p", header(REQUEST, MSG_ID, 1, 2) + b"x", 0.0)


def _too_large() -> None:
    r = Reassembler()
    chunk = bytes(rpc.MAX_CHUNK_BYTES)
    for i in range(MAX_FRAGMENTS):  # 12 x 1,411 = 16,932 > 16,384
        r.feed(b"p", header(REQUEST, MSG_ID, i, MAX_FRAGMENTS) + chunk, 0.0)


def _fragment_longer_than_a_frame() -> None:
    Reassembler().feed(b"p", header(REQUEST, MSG_ID, 0, 2) + bytes(rpc.MAX_CHUNK_BYTES + 1), 0.0)


def req(*args: object) -> Callable[[], object]:
    """A case: decode the request whose args are ``args`` after the method name."""
    return lambda: decode_request(pack(list(args)))


def resp(method: rpc.Method, data: object) -> Callable[[], object]:
    return lambda: decode_response(method, pack(data))


def contacts_resp(*items: object) -> Callable[[], object]:
    return resp("find_node", list(items))


FRAME_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("empty frame", lambda: parse_frame(b""), "truncated"),
    ("10-byte frame", lambda: parse_frame(PING_FRAME[:10]), "truncated"),
    ("truncated into the reassembler", lambda: Reassembler().feed(b"p", b"\x00", 0), "truncated"),
    ("type 2", lambda: parse_frame(b"\x02" + PING_FRAME[1:]), "bad_type"),
    ("type 0xff", lambda: parse_frame(b"\xff" + PING_FRAME[1:]), "bad_type"),
    ("index == count", lambda: parse_frame(header(REQUEST, MSG_ID, 2, 2)), "bad_fragment"),
    ("index > count", lambda: parse_frame(header(REQUEST, MSG_ID, 200, 3)), "bad_fragment"),
    ("count 0", lambda: parse_frame(header(REQUEST, MSG_ID, 0, 0)), "bad_fragment"),
    ("count 13", lambda: parse_frame(header(REQUEST, MSG_ID, 0, 13)), "bad_fragment"),
    ("count 255", lambda: parse_frame(header(RESPONSE, MSG_ID, 1, 255)), "bad_fragment"),
    ("counts disagree", _counts_disagree, "bad_fragment"),
    ("fragment longer than a frame", _fragment_longer_than_a_frame, "bad_fragment"),
    ("12 full fragments", _too_large, "too_large"),
    ("body over 16 KiB", lambda: decode_request(b"\xc0" * (MAX_MESSAGE_BYTES + 1)), "too_large"),
    ("per peer", _per_peer_full, "reassembly_full"),
    ("in total", _total_full, "reassembly_full"),
]

MSGPACK_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("empty body", lambda: decode_request(b""), "bad_msgpack"),
    ("reserved code 0xc1", lambda: decode_request(b"\xc1"), "bad_msgpack"),
    ("garbage", lambda: decode_request(b"\xc1\xff\x00garbage"), "bad_msgpack"),
    ("cut short", lambda: decode_request(encode_request("ping", SENDER)[:-1]), "bad_msgpack"),
    ("trailing byte", lambda: decode_request(encode_request("ping", SENDER) + b"\xc0"),
     "bad_msgpack"),
    ("trailing response byte", lambda: decode_response("store", b"\xc3\xc3"), "bad_msgpack"),
    ("10,000-deep nesting", lambda: decode_request(b"\x91" * 10_000 + b"\xc0"), "bad_msgpack"),
    ("5,000-deep maps", lambda: decode_response("find_value", b"\x81\xc0" * 5_000 + b"\xc0"),
     "bad_msgpack"),
    ("array32 longer than the body", lambda: decode_request(b"\xdd\xff\xff\xff\xff"),
     "bad_msgpack"),
    ("bin32 longer than the body", lambda: decode_request(b"\xc6\xff\xff\xff\xff"),
     "bad_msgpack"),
    ("invalid UTF-8 str", lambda: decode_request(b"\x92\xa1\xff\x90"), "bad_msgpack"),
    ("duplicate map key", lambda: decode_response("find_value", b"\x82\xa1a\xc0\xa1a\xc0"),
     "bad_msgpack"),
    ("map as a map key", lambda: decode_response("find_value", b"\x81\x80\xc0"), "bad_msgpack"),
    # Ext types are refused as msgpack: the schema has none. ext -1 (timestamp) would
    # otherwise become a datetime, and a 96-bit one overflows (OverflowError).
    ("fixext1 type 5", lambda: decode_request(b"\xd4\x05\x00"), "bad_msgpack"),
    ("ext as the method", lambda: decode_request(b"\x92\xd4\x05\x00\x90"), "bad_msgpack"),
    ("ext as an argument", lambda: decode_request(b"\x92\xa4ping\x91\xd5\x01\x00\x00"),
     "bad_msgpack"),
    ("timestamp32", lambda: decode_response("ping", b"\xd6\xff\x00\x00\x00\x01"), "bad_msgpack"),
    ("timestamp96 overflowing datetime",
     lambda: decode_response("store", b"\xc7\x0c\xff" + bytes(4) + b"\x7f" + b"\xff" * 7),
     "bad_msgpack"),
    ("ext8 type -128", lambda: decode_response("find_node", b"\xc7\x01\x80\x00"), "bad_msgpack"),
]  # fmt: skip

REQUEST_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("a string", lambda: decode_request(pack("ping")), "bad_request"),
    ("nil", lambda: decode_request(pack(None)), "bad_request"),
    ("a map", lambda: decode_request(pack({"ping": [SENDER]})), "bad_request"),
    ("one element", req("ping"), "bad_request"),
    ("three elements", req("ping", [SENDER], 1), "bad_request"),
    ("method an int", req(1, [SENDER]), "bad_request"),
    ("method bytes", req(b"ping", [SENDER]), "bad_request"),
    ("rpcudp's stun", req("stun", [SENDER]), "unknown_method"),
    ("a dunder", req("__init__", [SENDER]), "unknown_method"),
    ("rpc_ prefix", req("rpc_ping", [SENDER]), "unknown_method"),
    ("upper case", req("PING", [SENDER]), "unknown_method"),
    ("empty method", req("", [SENDER]), "unknown_method"),
    ("args not a list", req("ping", {"id": SENDER}), "bad_args"),
    ("args bytes", req("ping", SENDER), "bad_args"),
    ("ping without id", req("ping", []), "bad_args"),
    ("ping with a key", req("ping", [SENDER, KEY]), "bad_args"),
    ("find_node without key", req("find_node", [SENDER]), "bad_args"),
    ("store without value", req("store", [SENDER, KEY]), "bad_args"),
    ("store with extra", req("store", [SENDER, KEY, VALUE, VALUE]), "bad_args"),
    ("id a str", req("ping", ["0102030405060708090a0b0c0d0e0f1011121314"]), "bad_args"),
    ("id latin-1 str of 20", req("ping", [SENDER.decode("latin-1")]), "bad_args"),
    ("id 19 bytes", req("ping", [SENDER[:19]]), "bad_args"),
    ("id 21 bytes", req("ping", [SENDER + b"\x00"]), "bad_args"),
    ("id nil", req("ping", [None]), "bad_args"),
    ("id bool", req("ping", [True]), "bad_args"),
    ("id int", req("ping", [2**64 - 1]), "bad_args"),
    ("key 19 bytes", req("find_value", [SENDER, KEY[:19]]), "bad_args"),
    ("key 32 bytes", req("get_providers", [SENDER, bytes(32)]), "bad_args"),
    ("key a str", req("find_node", [SENDER, KEY.hex()[:20]]), "bad_args"),
    ("key a list", req("find_node", [SENDER, list(KEY)]), "bad_args"),
    ("empty value", req("store", [SENDER, KEY, b""]), "bad_args"),
    ("2,049-byte value", req("add_provider", [SENDER, KEY, b"v" * 2049]), "bad_args"),
    ("value a str", req("store", [SENDER, KEY, "descriptor"]), "bad_args"),
    ("value a bool", req("store", [SENDER, KEY, True]), "bad_args"),
    ("value an int", req("add_provider", [SENDER, KEY, 1]), "bad_args"),
]

RESPONSE_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("unknown method", lambda: decode_response("stun", pack(True)),  # type: ignore[arg-type]
     "unknown_method"),
    # ping: the responder's 20-byte id
    ("ping answers a str", resp("ping", SENDER.hex()), "bad_response"),
    ("ping answers 19 bytes", resp("ping", SENDER[:19]), "bad_response"),
    ("ping answers true", resp("ping", True), "bad_response"),
    # store / add_provider: a bool
    ("store answers 1", resp("store", 1), "bad_response"),
    ("store answers nil", resp("store", None), "bad_response"),
    ("add_provider answers bytes", resp("add_provider", b"\x01"), "bad_response"),
    # contacts
    ("contacts a map", resp("find_node", {"nodes": []}), "bad_response"),
    ("contacts bytes", resp("find_node", b""), "bad_response"),
    ("contacts nil", resp("find_node", None), "bad_response"),
    ("21 contacts", contacts_resp(*(wire_contact(i) for i in range(1, 22))), "bad_response"),
    ("contact of 3", contacts_resp(wire_contact()[:3]), "bad_response"),
    ("contact of 5", contacts_resp([*wire_contact(), 0]), "bad_response"),
    ("contact a map", contacts_resp({"id": SENDER}), "bad_response"),
    ("contact bytes", contacts_resp(SENDER), "bad_response"),
    ("id 19 bytes", contacts_resp(wire_contact(node_id=SENDER[:19])), "bad_response"),
    ("id a str", contacts_resp(wire_contact(node_id=SENDER.hex())), "bad_response"),
    ("hostname", contacts_resp(wire_contact(host="relay.example.org")), "bad_response"),
    ("localhost", contacts_resp(wire_contact(host="localhost")), "bad_response"),
    ("host with port", contacts_resp(wire_contact(host="192.0.2.7:7520")), "bad_response"),
    ("host empty", contacts_resp(wire_contact(host="")), "bad_response"),
    ("host bytes", contacts_resp(wire_contact(host=b"\xc0\x00\x02\x07")), "bad_response"),
    ("host 46 chars", contacts_resp(wire_contact(host="1" * 46)), "bad_response"),
    ("IPv4 multicast", contacts_resp(wire_contact(host="224.0.0.1")), "bad_response"),
    ("IPv6 multicast", contacts_resp(wire_contact(host="ff02::1")), "bad_response"),
    ("IPv4 broadcast", contacts_resp(wire_contact(host="255.255.255.255")), "bad_response"),
    ("IPv6 zone id", contacts_resp(wire_contact(host="fe80::1%eth0")), "bad_response"),
    ("IPv4-mapped", contacts_resp(wire_contact(host="::ffff:224.0.0.1")), "bad_response"),
    ("IPv4 unspecified", contacts_resp(wire_contact(host="0.0.0.0")), "bad_response"),
    ("IPv6 unspecified", contacts_resp(wire_contact(host="::")), "bad_response"),
    ("port 0", contacts_resp(wire_contact(port=0)), "bad_response"),
    ("port 65536", contacts_resp(wire_contact(port=65536)), "bad_response"),
    ("port -1", contacts_resp(wire_contact(port=-1)), "bad_response"),
    ("port true", contacts_resp(wire_contact(port=True)), "bad_response"),
    ("port false", contacts_resp(wire_contact(port=False)), "bad_response"),
    ("port a str", contacts_resp(wire_contact(port="7520")), "bad_response"),
    ("port a float", contacts_resp(wire_contact(port=7520.0)), "bad_response"),
    ("link key 31 bytes", contacts_resp(wire_contact(link_key=link_key(1)[:31])), "bad_response"),
    ("link key a str", contacts_resp(wire_contact(link_key=link_key(1).hex())), "bad_response"),
    ("link key zero", contacts_resp(wire_contact(link_key=ZERO_KEY)), "bad_response"),
    ("link key order 1", contacts_resp(wire_contact(link_key=ORDER_ONE)), "bad_response"),
    ("link key order 8", contacts_resp(wire_contact(link_key=ORDER_EIGHT)), "bad_response"),
    ("link key p - 1", contacts_resp(wire_contact(link_key=P_MINUS_ONE)), "bad_response"),
    ("duplicate ids", contacts_resp(wire_contact(1), wire_contact(1, host="192.0.2.8")),
     "bad_response"),
    ("one bad contact among good", contacts_resp(wire_contact(1), wire_contact(2, port=0)),
     "bad_response"),
    ("find_value contacts bad", resp("find_value", [wire_contact(host="x")]), "bad_response"),
    # find_value: {"value": v}
    ("find_value extra key", resp("find_value", {"value": VALUE, "nodes": []}), "bad_response"),
    ("find_value wrong key", resp("find_value", {"values": VALUE}), "bad_response"),
    ("find_value bytes key", resp("find_value", {b"value": VALUE}), "bad_response"),
    ("find_value empty map", resp("find_value", {}), "bad_response"),
    ("find_value empty value", resp("find_value", {"value": b""}), "bad_response"),
    ("find_value 2,049 bytes", resp("find_value", {"value": b"v" * 2049}), "bad_response"),
    ("find_value str value", resp("find_value", {"value": "descriptor"}), "bad_response"),
    ("find_value answers true", resp("find_value", True), "bad_response"),
    # get_providers: {"providers": [entries], "nodes": [contacts]}
    ("providers a list", resp("get_providers", [[VALUE], []]), "bad_response"),
    ("providers no nodes", resp("get_providers", {"providers": []}), "bad_response"),
    ("providers extra key",
     resp("get_providers", {"providers": [], "nodes": [], "more": True}), "bad_response"),
    ("providers a map", resp("get_providers", {"providers": {}, "nodes": []}), "bad_response"),
    ("providers bytes", resp("get_providers", {"providers": VALUE, "nodes": []}),
     "bad_response"),
    ("provider entry empty", resp("get_providers", {"providers": [b""], "nodes": []}),
     "bad_response"),
    ("provider entry 2,049 bytes",
     resp("get_providers", {"providers": [b"v" * 2049], "nodes": []}), "bad_response"),
    ("provider entry a str", resp("get_providers", {"providers": ["d"], "nodes": []}),
     "bad_response"),
    ("provider nodes a map", resp("get_providers", {"providers": [], "nodes": {}}),
     "bad_response"),
    ("provider node hostname",
     resp("get_providers", {"providers": [], "nodes": [wire_contact(host="a.example")]}),
     "bad_response"),
    ("provider nodes 21",
     resp("get_providers",
          {"providers": [], "nodes": [wire_contact(i) for i in range(1, 22)]}),
     "bad_response"),
]  # fmt: skip

ALL_CASES = FRAME_CASES + MSGPACK_CASES + REQUEST_CASES + RESPONSE_CASES


@pytest.mark.parametrize(("name", "call", "reason"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_refusal(name: str, call: Callable[[], object], reason: str) -> None:
    assert reason_of(call) == reason


def test_every_reason_has_a_crafted_input() -> None:
    assert {reason for _, _, reason in ALL_CASES} == set(REASONS)


def test_good_contact_passes_the_same_checks() -> None:
    """The refusals above are refusals of the one field changed, not of the base contact."""
    decoded = decode_response("find_node", pack([wire_contact(1), wire_contact(2)]))
    assert decoded == [contact(1), contact(2)]
    for port in (1, 65535):
        assert decode_response("find_node", pack([wire_contact(port=port)])) == [
            contact(1, port=port)
        ]


def test_counts_that_disagree_forget_the_message() -> None:
    r = Reassembler()
    with pytest.raises(RpcError):
        _counts_disagree(r)
    assert len(r) == 0


def test_too_large_forgets_the_message() -> None:
    r = Reassembler()
    chunk = bytes(rpc.MAX_CHUNK_BYTES)
    for i in range(MAX_FRAGMENTS - 1):
        assert r.feed(b"p", header(REQUEST, MSG_ID, i, MAX_FRAGMENTS) + chunk, 0.0) is None
    with pytest.raises(RpcError) as info:
        r.feed(b"p", header(REQUEST, MSG_ID, MAX_FRAGMENTS - 1, MAX_FRAGMENTS) + chunk, 0.0)
    assert info.value.reason == "too_large"
    assert len(r) == 0


def test_a_full_peer_does_not_block_others() -> None:
    r = Reassembler(max_per_peer=2, max_total=10)
    first_fragments(r, b"a", 2)
    assert reason_of(lambda: first_fragments(r, b"a", 1, start=2)) == "reassembly_full"
    first_fragments(r, b"b", 2)  # another peer still has its own slots
    assert len(r) == 4
    # A fragment of a message already under way is still accepted from the full peer.
    done = r.feed(b"a", header(REQUEST, (0).to_bytes(8, "big"), 1, 2) + b"y", 0.0)
    assert done == (REQUEST, (0).to_bytes(8, "big"), b"xy")
    first_fragments(r, b"a", 1, start=9)  # and completing it freed the slot


# --- Fragmentation and reassembly -------------------------------------------------------------

BIG_BODY = bytes(i % 251 for i in range(MAX_MESSAGE_BYTES))
BIG_FRAMES = fragment(RESPONSE, MSG_ID, BIG_BODY)


def test_16_kib_splits_into_at_most_12_frames() -> None:
    assert 1 < len(BIG_FRAMES) <= MAX_FRAGMENTS
    assert len(BIG_FRAMES) == 12
    assert all(len(f) <= MAX_PAYLOAD_BYTES for f in BIG_FRAMES)
    assert all(len(f) == MAX_PAYLOAD_BYTES for f in BIG_FRAMES[:-1])
    for i, frame in enumerate(BIG_FRAMES):
        assert parse_frame(frame)[:4] == (RESPONSE, MSG_ID, i, 12)
    assert b"".join(f[FRAME_HEADER_BYTES:] for f in BIG_FRAMES) == BIG_BODY


@settings(max_examples=50)
@given(st.permutations(range(len(BIG_FRAMES))))
def test_reassembles_in_any_order(order: list[int]) -> None:
    r = Reassembler()
    results = [r.feed(b"p", BIG_FRAMES[i], 0.0) for i in order]
    assert results[:-1] == [None] * (len(order) - 1)
    assert results[-1] == (RESPONSE, MSG_ID, BIG_BODY)
    assert len(r) == 0


@settings(max_examples=50)
@given(st.lists(st.integers(0, len(BIG_FRAMES) - 1), min_size=1, max_size=40), st.randoms())
def test_duplicates_are_ignored(extra: list[int], rnd: Any) -> None:
    """Every frame once plus duplicates, shuffled: the message comes out exactly once."""
    order = list(range(len(BIG_FRAMES))) + extra
    rnd.shuffle(order)
    r = Reassembler()
    complete = [m for m in (r.feed(b"p", BIG_FRAMES[i], 0.0) for i in order) if m is not None]
    # Duplicates that arrive after completion open a new partial (the reassembler cannot
    # know the message was complete); it never completes and expires.
    assert complete[0] == (RESPONSE, MSG_ID, BIG_BODY)
    assert len(complete) == 1 or all(c == complete[0] for c in complete)
    assert len(r) <= 1
    r.expire(r.timeout_s)
    assert len(r) == 0


def test_a_duplicate_fragment_returns_none() -> None:
    r = Reassembler()
    frames = fragment(REQUEST, MSG_ID, bytes(2000))
    assert r.feed(b"p", frames[0], 0.0) is None
    assert r.feed(b"p", frames[0], 0.0) is None
    assert len(r) == 1
    assert r.feed(b"p", frames[1], 0.0) == (REQUEST, MSG_ID, bytes(2000))
    assert len(r) == 0


def test_single_frame_messages_take_no_slot() -> None:
    r = Reassembler(max_per_peer=1, max_total=1)
    first_fragments(r, b"p", 1)
    for _ in range(10):
        assert r.feed(b"p", PING_FRAME, 0.0) == (REQUEST, MSG_ID, PING_FRAME[11:])
    assert len(r) == 1


def test_messages_are_kept_apart_by_peer_and_type() -> None:
    body_a, body_b = b"A" * 2000, b"B" * 2000
    frames_a = fragment(REQUEST, MSG_ID, body_a)
    frames_b = fragment(REQUEST, MSG_ID, body_b)  # same id, another peer
    frames_c = fragment(RESPONSE, MSG_ID, body_b)  # same id and peer, a response
    r = Reassembler()
    assert r.feed(b"a", frames_a[0], 0.0) is None
    assert r.feed(b"b", frames_b[1], 0.0) is None
    assert r.feed(b"a", frames_c[0], 0.0) is None
    assert len(r) == 3
    assert r.feed(b"b", frames_b[0], 0.0) == (REQUEST, MSG_ID, body_b)
    assert r.feed(b"a", frames_a[1], 0.0) == (REQUEST, MSG_ID, body_a)
    assert r.feed(b"a", frames_c[1], 0.0) == (RESPONSE, MSG_ID, body_b)


def test_expiry_frees_slots() -> None:
    r = Reassembler(max_per_peer=2, max_total=3, timeout_s=5.0)
    first_fragments(r, b"a", 2)
    r.feed(b"b", header(REQUEST, MSG_ID, 0, 2) + b"x", 3.0)
    assert len(r) == 3
    assert reason_of(lambda: r.feed(b"c", header(REQUEST, MSG_ID, 0, 2), 4.9)) == (
        "reassembly_full"
    )
    assert r.expire(4.99) == 0
    # At t=5 the two partials of a (started at 0) are gone; b's (started at 3) is not.
    assert r.feed(b"a", header(REQUEST, bytes(8), 0, 2) + b"x", 5.0) is None
    assert len(r) == 2
    assert r.feed(b"a", header(REQUEST, b"\x77" * 8, 0, 2) + b"x", 5.0) is None
    assert len(r) == 3
    assert r.expire(8.0) == 1  # b's
    assert r.expire(10.0) == 2
    assert len(r) == 0


def test_an_expired_message_does_not_complete() -> None:
    r = Reassembler(timeout_s=5.0)
    frames = fragment(REQUEST, MSG_ID, bytes(2000))
    assert r.feed(b"p", frames[0], 0.0) is None
    # The second fragment arrives too late: the first was forgotten, a new partial opens.
    assert r.feed(b"p", frames[1], 5.0) is None
    assert len(r) == 1


FRAME_SOURCES = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda t, i, idx, cnt, chunk: header(t, i, idx, cnt) + chunk,
        st.sampled_from([REQUEST, RESPONSE]),
        st.sampled_from([bytes(8), b"\x01" * 8, b"\x02" * 8, b"\x03" * 8]),
        st.integers(0, 13),
        st.integers(0, 13),
        st.binary(max_size=1500),
    ),
)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), FRAME_SOURCES, st.floats(0, 2)),
        max_size=80,
    )
)
def test_memory_is_bounded(events: list[tuple[bytes, bytes, float]]) -> None:
    r = Reassembler(max_per_peer=2, max_total=4, timeout_s=3.0)
    now = 0.0
    for peer, frame, step in events:
        now += step
        try:
            result = r.feed(peer, frame, now)
        except RpcError as exc:
            assert exc.reason in REASONS
        else:
            if result is not None:
                assert len(result[2]) <= MAX_MESSAGE_BYTES
        assert len(r) <= r.max_total


# --- Nothing but RpcError, whatever arrives ------------------------------------------------------

MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=40)
    | st.sampled_from([SENDER, KEY, link_key(1), "ping", "find_node", "192.0.2.7", 7520]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["value", "providers", "nodes", "x"]), children, max_size=3
        )
    ),
    max_leaves=20,
)


def refused_only_as_rpc_error(call: Callable[[], object]) -> None:
    try:
        call()
    except RpcError as exc:
        assert exc.reason in REASONS


def decoders(body: bytes, methods: tuple[rpc.Method, ...] = METHODS) -> list[Callable[[], object]]:
    """decode_request and decode_response for every method in ``methods``, on ``body``."""
    calls: list[Callable[[], object]] = [lambda: decode_request(body)]
    for method in methods:
        calls.append(lambda m=method: decode_response(m, body))  # type: ignore[misc]
    return calls


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_rpc_error(data: bytes) -> None:
    refused_only_as_rpc_error(lambda: Reassembler().feed(b"p", data, 0.0))
    for call in decoders(data):
        refused_only_as_rpc_error(call)


@settings(max_examples=300)
@given(MSGPACK_VALUES)
def test_random_msgpack_only_raises_rpc_error(value: object) -> None:
    for body in (pack(value), pack(["ping", value]), pack(["store", [SENDER, KEY, value]])):
        for call in decoders(body):
            refused_only_as_rpc_error(call)


@settings(max_examples=300)
@given(st.data())
def test_mutated_vectors_only_raise_rpc_error(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(VECTOR_NAMES))
    body = bytearray(bytes.fromhex(V[name]["outputs"]["body"]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    method = V[name]["inputs"]["method"]
    for blob in (bytes(body), bytes(body[:cut])):
        for call in decoders(blob, (method,)):
            refused_only_as_rpc_error(call)


# --- The vectors (tests/vectors/dht.json) ---------------------------------------------------------


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_dht", VECTORS_DIR / "gen_dht.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def mp(obj: object) -> bytes:
    """An independent msgpack encoder (smallest encodings, as the spec recommends) for
    the types the DHT uses: nil, bool, unsigned int, str, bin, array, map."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        assert 0 <= obj < 2**16
        return (
            bytes([obj])
            if obj < 0x80
            else (b"\xcc" + bytes([obj]) if obj < 0x100 else b"\xcd" + obj.to_bytes(2, "big"))
        )
    if isinstance(obj, str):
        raw = obj.encode()
        assert len(raw) < 32
        return bytes([0xA0 | len(raw)]) + raw
    if isinstance(obj, bytes):
        n = len(obj)
        return (b"\xc4" + bytes([n]) if n < 0x100 else b"\xc5" + n.to_bytes(2, "big")) + obj
    if isinstance(obj, list):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        return head + b"".join(mp(x) for x in obj)
    if isinstance(obj, dict):
        assert len(obj) < 16
        return bytes([0x80 | len(obj)]) + b"".join(mp(k) + mp(v) for k, v in obj.items())
    raise TypeError(type(obj))  # fmt: skip


def vector_contacts(inputs: list[dict[str, Any]]) -> list[DhtContact]:
    """Contacts rebuilt from seeds (not through the generator)."""
    out = []
    for c in inputs:
        ident = Identity(identity_seed=h(c["identity_seed"]), link_private=h(c["link_private"]))
        key = crypto.x25519_public_from_private(h(c["link_private"]))
        assert key == ident.link_public
        assert crypto.x25519_public_is_usable(key)
        out.append(DhtContact(node_id=ident.node_id, host=c["host"], port=c["port"], link_key=key))
    return out


def expected_body(name: str) -> tuple[bytes, bytes]:
    """(body from rpc.py, the same body from mp) for vector ``name``, from its inputs."""
    inputs = V[name]["inputs"]
    method = inputs["method"]
    if name == "ping_request":
        sender = h(inputs["sender_id"])
        return encode_request(method, sender), mp([method, [sender]])
    if name == "ping_response":
        return encode_response(method, h(inputs["result"])), mp(h(inputs["result"]))
    if name == "find_node_request":
        sender, key = h(inputs["sender_id"]), h(inputs["key"])
        return encode_request(method, sender, key=key), mp([method, [sender, key]])
    if name == "store_request":
        sender = h(inputs["sender_id"])
        value = h(DESCRIPTOR_V["outputs"]["wire"])
        key = descriptor_key(h(DESCRIPTOR_V["outputs"]["node_id"]))
        return (
            encode_request(method, sender, key=key, value=value),
            mp([method, [sender, key, value]]),
        )
    contacts = vector_contacts(inputs["contacts"])
    return encode_response(method, contacts), mp([c.to_wire() for c in contacts])


def test_vector_file_is_what_the_generator_prints() -> None:
    assert _load_generator().build() == V


def test_vector_nodes() -> None:
    for node in V["nodes"].values():
        inputs, outputs = node["inputs"], node["outputs"]
        ident = Identity(
            identity_seed=h(inputs["identity_seed"]), link_private=h(inputs["link_private"])
        )
        assert ident.node_id.hex() == outputs["node_id"]
        assert (
            crypto.x25519_public_from_private(h(inputs["link_private"])).hex()
            == (outputs["link_public"])
        )
    # The requester is the node of descriptor.json; the two nodes are link.json's.
    assert V["nodes"]["requester"]["outputs"]["node_id"] == DESCRIPTOR_V["outputs"]["node_id"]
    link = json.loads((VECTORS_DIR / "link.json").read_text(encoding="utf-8"))
    assert (
        V["nodes"]["responder"]["outputs"]["node_id"]
        == (link["responder_identity"]["outputs"]["node_id"])
    )


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vector_bytes(name: str) -> None:
    vector = V[name]
    inputs, outputs = vector["inputs"], vector["outputs"]
    body, independent = expected_body(name)
    assert body.hex() == outputs["body"]
    assert independent.hex() == outputs["body"]
    assert len(body) == outputs["body_length"]
    msg_id = h(inputs["msg_id"])
    frames = fragment(inputs["type"], msg_id, body)
    assert [f.hex() for f in frames] == outputs["frames"]
    assert [len(f) for f in frames] == outputs["frame_lengths"]
    count = len(frames)
    chunks = [body[i : i + rpc.MAX_CHUNK_BYTES] for i in range(0, len(body), rpc.MAX_CHUNK_BYTES)]
    for index, (frame, chunk) in enumerate(zip(frames, chunks, strict=True)):
        # [0] type, [1:9] msg id, [9] index, [10] count, [11:] the body's bytes
        assert frame == bytes([inputs["type"]]) + msg_id + bytes([index, count]) + chunk


@pytest.mark.parametrize("name", VECTOR_NAMES)
@pytest.mark.parametrize("reverse", [False, True])
def test_vector_decodes(name: str, reverse: bool) -> None:
    vector = V[name]
    inputs, outputs = vector["inputs"], vector["outputs"]
    frames = [h(f) for f in outputs["frames"]]
    r = Reassembler()
    results = [r.feed(b"peer", f, 0.0) for f in (frames[::-1] if reverse else frames)]
    assert results[:-1] == [None] * (len(frames) - 1)
    msg_type, msg_id, body = results[-1]  # type: ignore[misc]
    assert (msg_type, msg_id.hex(), body.hex()) == (
        inputs["type"],
        inputs["msg_id"],
        outputs["body"],
    )
    method = inputs["method"]
    if msg_type == REQUEST:
        request = decode_request(body)
        assert request.method == method
        assert request.sender_id.hex() == inputs["sender_id"]
        if name == "find_node_request":
            assert request.key.hex() == inputs["key"]
        if name == "store_request":
            assert request.key.hex() == outputs["key"]
            assert request.value.hex() == outputs["value"]
        return
    decoded = decode_response(method, body)
    if name == "ping_response":
        assert decoded == h(inputs["result"])
    else:
        assert decoded == vector_contacts(inputs["contacts"])


def test_vector_store_carries_the_descriptor() -> None:
    outputs = V["store_request"]["outputs"]
    assert outputs["value"] == DESCRIPTOR_V["outputs"]["wire"]
    descriptor = SignedDescriptor.decode(h(outputs["value"]), now=DESCRIPTOR_V["now"])
    assert outputs["key"] == descriptor_key(descriptor.node_id).hex()
    assert V["store_request"]["inputs"]["sender_id"] == descriptor.node_id.hex()


def test_vector_find_node_response_contacts() -> None:
    outputs = V["find_node_response"]["outputs"]
    nodes = V["nodes"]
    assert [c[0] for c in outputs["contacts"]] == [
        nodes["contact_a"]["outputs"]["node_id"],
        nodes["contact_b"]["outputs"]["node_id"],
    ]
    assert [c[3] for c in outputs["contacts"]] == [
        nodes["contact_a"]["outputs"]["link_public"],
        nodes["contact_b"]["outputs"]["link_public"],
    ]


def test_vector_two_fragments_is_a_full_k_answer() -> None:
    vector = V["two_fragments"]
    assert len(vector["inputs"]["contacts"]) == MAX_CONTACTS
    assert vector["outputs"]["frame_lengths"][0] == MAX_PAYLOAD_BYTES
    assert len(vector["outputs"]["frames"]) == 2


def test_protocol_md_quotes_the_vectors() -> None:
    """Every hex value in the code blocks of docs/protocol.md §11 is in dht.json."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")
    section = text[text.index("## 11. DHT messages") : text.index("## 12. Circuits")]
    known = json.dumps(V)
    checked = 0
    for block in section.split("```")[1::2]:
        for line in block.splitlines():
            value = line.rsplit("= ", 1)[-1].strip() if "= " in line else line.strip()
            if len(value) >= 4 and all(c in "0123456789abcdef" for c in value):
                assert value in known, line
                checked += 1
    assert checked > 50
