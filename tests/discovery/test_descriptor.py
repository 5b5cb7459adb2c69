"""Node descriptors: canonical encoding, signing, the vector, and every refusal reason.

Crafted inputs are built with cbor2 directly (tests may import it; the packages go
through discovery/descriptor.py). A crafted body that should fail a field check is
re-signed with the right key, so the refusal is for the field and not the signature.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.constants import (
    DESCRIPTOR_DOMAIN,
    DESCRIPTOR_LIFETIME_S,
    MAX_ADDRESSES,
    MAX_BANDWIDTH_BPS,
    MAX_CLOCK_SKEW_S,
    MAX_DESCRIPTOR_BYTES,
    MAX_EXIT_PORT_RANGES,
    MAX_OPERATOR_CONTACT_BYTES,
    MAX_OPERATOR_NAME_BYTES,
    MAX_REGION_CHARS,
    MAX_SOFTWARE_BYTES,
    MAX_STAKE_REF_BYTES,
    MAX_UINT,
)
from discovery.descriptor import (
    KEYS,
    REASONS,
    DescriptorError,
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
    supersedes,
)
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import Identity, node_id_for

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
V: dict[str, Any] = json.loads((VECTORS_DIR / "descriptor.json").read_text(encoding="utf-8"))

IDENT = Identity(identity_seed=bytes(range(0x00, 0x20)), link_private=bytes(range(0x20, 0x40)))
OTHER = Identity(identity_seed=bytes(range(0x40, 0x60)), link_private=bytes(range(0x60, 0x80)))
ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
NEXT_ONION = crypto.x25519_public_from_private(bytes(range(0xA0, 0xC0)))
T0 = 1_700_000_000
NOW = T0 + 60
LOW_ORDER_KEYS = [bytes(32), b"\x01" + bytes(31)]  # the zero point and the identity point


def make_body(identity: Identity = IDENT, **overrides: Any) -> NodeDescriptor:
    fields: dict[str, Any] = {
        "version": T0,
        "identity_key": identity.identity_public,
        "link_key": identity.link_public,
        "onion_key": ONION,
        "next_onion_key": NEXT_ONION,
        "addresses": (("192.0.2.10", 7520), ("2001:db8::10", 7520)),
        "roles": frozenset({DescriptorRole.RELAY, DescriptorRole.EXIT}),
        "exit_policy": ((80, 80), (443, 443)),
        "region": "EU",
        "country": "DE",
        "operator": Operator(name="Example Ops", contact="ops@example.org"),
        "bandwidth_bps": 10**8,
        "software": "meshnode/0.1.0",
        "published_at": T0,
        "expires_at": T0 + 3600,
    }
    fields.update(overrides)
    return NodeDescriptor(**fields)


def make_wire(identity: Identity = IDENT, **overrides: Any) -> bytes:
    return sign(make_body(identity, **overrides), identity).encode()


def raw_body(**overrides: Any) -> dict[Any, Any]:
    """The default body as a plain CBOR map (field name keys translated), with overrides."""
    body: dict[Any, Any] = cbor2.loads(make_body().to_cbor())
    for name, value in overrides.items():
        body[KEYS[name]] = value
    return body


def wire_of(body: dict[Any, Any], *, identity: Identity = IDENT, canonical: bool = True) -> bytes:
    """A wire descriptor for a crafted body map, properly signed over its CBOR."""
    body_cbor = cbor2.dumps(body, canonical=canonical)
    signature = identity.sign(DESCRIPTOR_DOMAIN + body_cbor)
    return b"\x82" + body_cbor + b"\x58\x40" + signature


def refusal(data: bytes, now: float = NOW) -> str:
    with pytest.raises(DescriptorError) as info:
        SignedDescriptor.decode(data, now=now)
    assert info.value.reason in REASONS
    return info.value.reason


# --- Round trip, layout, API ------------------------------------------------------------


def test_round_trip() -> None:
    signed = sign(make_body(), IDENT)
    decoded = SignedDescriptor.decode(signed.encode(), now=NOW)
    assert decoded == signed
    assert decoded.body == make_body()
    assert decoded.encode() == signed.encode()
    assert decoded.node_id == IDENT.node_id == node_id_for(IDENT.identity_public)
    assert decoded.body.node_id == IDENT.node_id


def test_wire_layout_is_array_of_body_and_signature() -> None:
    body = make_body()
    signed = sign(body, IDENT)
    wire = signed.encode()
    assert wire == b"\x82" + body.to_cbor() + b"\x58\x40" + signed.signature
    assert body.signing_message() == DESCRIPTOR_DOMAIN + body.to_cbor()
    assert crypto.ed25519_verify(IDENT.identity_public, body.signing_message(), signed.signature)
    assert cbor2.loads(wire) == [cbor2.loads(body.to_cbor()), signed.signature]


def test_body_keys_are_the_documented_small_integers() -> None:
    assert dict(KEYS) == {
        name: i
        for i, name in enumerate(
            [
                "version",
                "identity_key",
                "link_key",
                "onion_key",
                "next_onion_key",
                "addresses",
                "roles",
                "exit_policy",
                "region",
                "country",
                "operator",
                "bandwidth_bps",
                "software",
                "stake_ref",
                "published_at",
                "expires_at",
            ]
        )
    }
    assert sorted(cbor2.loads(make_body().to_cbor())) == list(range(16))


def test_absent_values_are_null_and_empty() -> None:
    body = make_body(next_onion_key=None, roles=frozenset(), exit_policy=(), region="", country="")
    raw = cbor2.loads(body.to_cbor())
    assert raw[KEYS["next_onion_key"]] is None
    assert raw[KEYS["roles"]] == []
    assert raw[KEYS["operator"]] == ["Example Ops", "ops@example.org", None]
    assert SignedDescriptor.decode(sign(body, IDENT).encode(), now=NOW).body == body


def test_sign_refuses_another_identity() -> None:
    with pytest.raises(LocalProtocolError):
        sign(make_body(IDENT), OTHER)


def test_descriptor_error_is_a_decode_error_with_a_reason() -> None:
    err = DescriptorError("expired", "expires_at has passed")
    assert isinstance(err, DecodeError)
    assert err.reason == "expired"
    assert str(err) == "expired: expires_at has passed"
    assert len(set(REASONS)) == len(REASONS)
    assert all(r.isidentifier() and r.islower() for r in REASONS)


def test_signed_descriptor_cannot_be_built_with_a_bad_signature() -> None:
    body = make_body()
    with pytest.raises(DescriptorError) as info:
        SignedDescriptor(body=body, signature=bytes(64))
    assert info.value.reason == "bad_signature"
    with pytest.raises(DescriptorError) as info:
        SignedDescriptor(body=body, signature=b"short")
    assert info.value.reason == "bad_signature"


def test_every_field_at_its_limit_still_fits() -> None:
    wide = "é"  # two bytes of UTF-8
    body = make_body(
        version=MAX_UINT,
        addresses=tuple((f"2001:db8::{i + 1:x}", 65535) for i in range(MAX_ADDRESSES)),
        exit_policy=tuple((1000 * i + 1000, 1000 * i + 1998) for i in range(MAX_EXIT_PORT_RANGES)),
        region="X" * MAX_REGION_CHARS,
        operator=Operator(
            name=wide * (MAX_OPERATOR_NAME_BYTES // 2),
            contact=wide * (MAX_OPERATOR_CONTACT_BYTES // 2),
            operator_key=OTHER.identity_public,
        ),
        bandwidth_bps=MAX_BANDWIDTH_BPS,
        software="s" * MAX_SOFTWARE_BYTES,
        stake_ref="r" * MAX_STAKE_REF_BYTES,
        published_at=MAX_UINT - DESCRIPTOR_LIFETIME_S,
        expires_at=MAX_UINT,
    )
    wire = sign(body, IDENT).encode()
    assert len(wire) <= MAX_DESCRIPTOR_BYTES
    assert SignedDescriptor.decode(wire, now=MAX_UINT - DESCRIPTOR_LIFETIME_S).body == body


# --- The vector -------------------------------------------------------------------------


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_descriptor_vectors", VECTORS_DIR / "make_descriptor_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vector_file_is_what_the_generator_prints() -> None:
    assert _load_generator().build() == V


def test_vector_bytes() -> None:
    body, identity = _load_generator().descriptor_from_inputs(V["inputs"])
    out = V["outputs"]
    assert body.identity_key.hex() == out["identity_public"]
    assert body.node_id.hex() == out["node_id"]
    assert body.link_key.hex() == out["link_public"]
    assert body.onion_key.hex() == out["onion_public"]
    assert body.next_onion_key.hex() == out["next_onion_public"]
    assert body.operator.operator_key.hex() == out["operator_key"]
    assert DESCRIPTOR_DOMAIN.hex() == out["domain"]
    assert body.to_cbor().hex() == out["body_cbor"]
    assert body.signing_message().hex() == out["signing_message"]
    signed = sign(body, identity)
    assert signed.signature.hex() == out["signature"]
    assert signed.encode().hex() == out["wire"]
    assert len(signed.encode()) == out["wire_length"]


def test_vector_decodes_at_its_now() -> None:
    decoded = SignedDescriptor.decode(bytes.fromhex(V["outputs"]["wire"]), now=V["now"])
    fields = V["inputs"]["fields"]
    assert decoded.body.version == fields["version"]
    assert decoded.body.addresses == tuple(tuple(a) for a in fields["addresses"])
    assert sorted(r.value for r in decoded.body.roles) == fields["roles"]
    assert decoded.body.country == "DE"
    assert decoded.node_id.hex() == V["outputs"]["node_id"]


@pytest.mark.parametrize("case", V["refusals"], ids=lambda c: c["reason"])
def test_vector_refusals(case: dict[str, Any]) -> None:
    assert refusal(bytes.fromhex(case["wire"]), now=case["now"]) == case["reason"]


# --- Refusals, one crafted input per reason ----------------------------------------------

GOOD = make_wire()
SIG = GOOD[-64:]


def crafted(**overrides: Any) -> Callable[[], bytes]:
    """A case factory: the default body with ``overrides`` (raw CBOR values), re-signed."""
    return lambda: wire_of(raw_body(**overrides))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _non_minimal_version() -> bytes:
    body_cbor = make_body().to_cbor()
    minimal = b"\x00\x1a" + T0.to_bytes(4, "big")  # key 0, uint32
    assert body_cbor.count(minimal) == 1
    wide = body_cbor.replace(minimal, b"\x00\x1b" + T0.to_bytes(8, "big"))  # same, as uint64
    return b"\x82" + wide + b"\x58\x40" + IDENT.sign(DESCRIPTOR_DOMAIN + wide)


def _reordered_map() -> bytes:
    body = raw_body()
    reordered = {KEYS["identity_key"]: body.pop(KEYS["identity_key"]), **body}
    return wire_of(reordered, canonical=False)


def _without(name: str) -> bytes:
    body = raw_body()
    del body[KEYS[name]]
    return wire_of(body)


def _with_extra_key(key: Any) -> bytes:
    body = raw_body()
    body[key] = 0
    return wire_of(body)


def _body_with_tag() -> bytes:
    # published_at as tag 1 (epoch date/time): a tag where a uint belongs.
    body_cbor = make_body().to_cbor()
    plain = b"\x0e\x1a" + T0.to_bytes(4, "big")
    assert body_cbor.count(plain) == 1
    tagged = body_cbor.replace(plain, b"\x0e\xc1\x1a" + T0.to_bytes(4, "big"))
    return b"\x82" + tagged + b"\x58\x40" + IDENT.sign(DESCRIPTOR_DOMAIN + tagged)


def _tampered_text() -> bytes:
    index = GOOD.index(b"meshnode/0.1.0")
    return GOOD[:index] + b"n" + GOOD[index + 1 :]  # "neshnode/0.1.0": still valid ASCII


CASES: list[tuple[str, Callable[[], bytes], float, str]] = [
    # size, before any parsing
    ("oversized", lambda: b"\x00" * (MAX_DESCRIPTOR_BYTES + 1), NOW, "too_large"),
    ("oversized-valid-prefix", lambda: GOOD + b"\x00" * MAX_DESCRIPTOR_BYTES, NOW, "too_large"),
    # CBOR itself
    ("empty", lambda: b"", NOW, "bad_cbor"),
    ("break-byte", lambda: b"\xff", NOW, "bad_cbor"),
    ("truncated", lambda: GOOD[:-1], NOW, "bad_cbor"),
    ("invalid-utf8", lambda: b"\x82\xa1\x08\x62\xc3\x28\x58\x40" + SIG, NOW, "bad_cbor"),
    ("indefinite-array", lambda: b"\x9f" + GOOD[1:] + b"\xff", NOW, "bad_cbor"),
    ("duplicate-key", lambda: b"\x82\xa2\x00\x01\x00\x02\x58\x40" + SIG, NOW, "bad_cbor"),
    ("float", crafted(bandwidth_bps=1.5), NOW, "bad_cbor"),
    ("bool", crafted(version=True), NOW, "bad_cbor"),
    ("simple-value", crafted(version=cbor2.undefined), NOW, "bad_cbor"),
    ("tag", _body_with_tag, NOW, "bad_cbor"),
    ("bignum", crafted(version=2**64), NOW, "bad_cbor"),
    ("not-an-array", lambda: cbor2.dumps({0: 1}), NOW, "bad_cbor"),
    ("array-of-three", lambda: cbor2.dumps([{}, SIG, 0], canonical=True), NOW, "bad_cbor"),
    # canonical form
    ("trailing-byte", lambda: GOOD + b"\x00", NOW, "non_canonical"),
    ("non-minimal-integer", _non_minimal_version, NOW, "non_canonical"),
    ("map-key-order", _reordered_map, NOW, "non_canonical"),
    ("non-minimal-sig-length", lambda: GOOD[:-66] + b"\x59\x00\x40" + SIG, NOW, "non_canonical"),
    ("roles-unsorted", crafted(roles=["relay", "exit"]), NOW, "non_canonical"),
    ("roles-repeated", crafted(roles=["exit", "exit"]), NOW, "non_canonical"),
    # key set
    ("unknown-int-key", lambda: _with_extra_key(16), NOW, "unknown_key"),
    ("unknown-text-key", lambda: _with_extra_key("version"), NOW, "unknown_key"),
    ("negative-key", lambda: _with_extra_key(-1), NOW, "unknown_key"),
    ("missing-stake-ref", lambda: _without("stake_ref"), NOW, "missing_key"),
    ("missing-next-onion", lambda: _without("next_onion_key"), NOW, "missing_key"),
    # fields: types
    ("version-text", crafted(version="1"), NOW, "bad_field"),
    ("version-negative", crafted(version=-1), NOW, "bad_field"),
    ("identity-key-text", crafted(identity_key="k" * 32), NOW, "bad_field"),
    ("link-key-short", crafted(link_key=bytes(31)), NOW, "bad_field"),
    ("onion-key-null", crafted(onion_key=None), NOW, "bad_field"),
    ("addresses-map", crafted(addresses={}), NOW, "bad_field"),
    ("addresses-empty", crafted(addresses=[]), NOW, "bad_field"),
    ("host-text", crafted(addresses=[["192.0.2.1", 1]]), NOW, "bad_field"),
    ("host-5-bytes", crafted(addresses=[[bytes(5), 1]]), NOW, "bad_field"),
    ("host-unspecified", crafted(addresses=[[bytes(4), 1]]), NOW, "bad_field"),
    ("port-zero", crafted(addresses=[[b"\xc0\x00\x02\x01", 0]]), NOW, "bad_field"),
    ("port-big", crafted(addresses=[[b"\xc0\x00\x02\x01", 65536]]), NOW, "bad_field"),
    ("address-triple", crafted(addresses=[[b"\xc0\x00\x02\x01", 1, 2]]), NOW, "bad_field"),
    (
        "ipv4-mapped",
        crafted(addresses=[[ipaddress.ip_address("::ffff:192.0.2.1").packed, 1]]),
        NOW,
        "bad_field",
    ),
    (
        "addresses-repeat",
        crafted(addresses=[[b"\xc0\x00\x02\x01", 1]] * 2),
        NOW,
        "bad_field",
    ),
    (
        "too-many-addresses",
        lambda: wire_of(
            raw_body(addresses=[[bytes([192, 0, 2, i + 1]), 1] for i in range(MAX_ADDRESSES + 1)])
        ),
        NOW,
        "bad_field",
    ),
    ("role-unknown", crafted(roles=["exit", "guard"]), NOW, "bad_field"),
    ("role-int", crafted(roles=[1]), NOW, "bad_field"),
    ("policy-lo-gt-hi", crafted(exit_policy=[[443, 80]]), NOW, "bad_field"),
    ("policy-port-zero", crafted(exit_policy=[[0, 80]]), NOW, "bad_field"),
    ("policy-unsorted", crafted(exit_policy=[[443, 443], [80, 80]]), NOW, "bad_field"),
    ("policy-adjacent", crafted(exit_policy=[[80, 80], [81, 81]]), NOW, "bad_field"),
    ("policy-pair-short", crafted(exit_policy=[[80]]), NOW, "bad_field"),
    ("region-lowercase", crafted(region="eu"), NOW, "bad_field"),
    ("region-long", crafted(region="E" * (MAX_REGION_CHARS + 1)), NOW, "bad_field"),
    ("country-alpha3", crafted(country="DEU"), NOW, "bad_field"),
    ("country-lowercase", crafted(country="de"), NOW, "bad_field"),
    ("operator-short", crafted(operator=["a", "b"]), NOW, "bad_field"),
    ("operator-control", crafted(operator=["a\nb", "", None]), NOW, "bad_field"),
    ("operator-bidi", crafted(operator=["a\u202eb", "", None]), NOW, "bad_field"),
    ("operator-key-short", crafted(operator=["", "", bytes(31)]), NOW, "bad_field"),
    (
        "operator-name-long",
        crafted(operator=["é" * MAX_OPERATOR_NAME_BYTES, "", None]),
        NOW,
        "bad_field",
    ),
    ("bandwidth-huge", crafted(bandwidth_bps=MAX_BANDWIDTH_BPS + 1), NOW, "bad_field"),
    ("software-newline", crafted(software="meshnode\n"), NOW, "bad_field"),
    ("software-non-ascii", crafted(software="meshnodé"), NOW, "bad_field"),
    ("stake-ref-bytes", crafted(stake_ref=b""), NOW, "bad_field"),
    ("next-onion-equals-onion", crafted(next_onion_key=ONION), NOW, "bad_field"),
    ("expires-before-published", crafted(expires_at=T0 - 1), NOW, "bad_field"),
    ("expires-equals-published", crafted(expires_at=T0), NOW, "bad_field"),
    ("sig-text", lambda: cbor2.dumps([raw_body(), "x"], canonical=True), NOW, "bad_signature"),
    # semantic rules
    (
        "exit-policy-without-exit",
        crafted(roles=["relay"]),
        NOW,
        "exit_policy_without_exit",
    ),
    ("link-key-zero", crafted(link_key=LOW_ORDER_KEYS[0]), NOW, "unusable_key"),
    ("onion-key-low-order", crafted(onion_key=LOW_ORDER_KEYS[1]), NOW, "unusable_key"),
    ("next-onion-zero", crafted(next_onion_key=LOW_ORDER_KEYS[0]), NOW, "unusable_key"),
    (
        "lifetime-too-long",
        crafted(expires_at=T0 + DESCRIPTOR_LIFETIME_S + 1),
        NOW,
        "lifetime_too_long",
    ),
    # signature
    ("sig-byte-flipped", lambda: _flip(GOOD, len(GOOD) - 1), NOW, "bad_signature"),
    ("body-text-tampered", _tampered_text, NOW, "bad_signature"),
    ("signed-by-another-key", lambda: wire_of(raw_body(), identity=OTHER), NOW, "bad_signature"),
    ("no-domain", lambda: GOOD[:-64] + IDENT.sign(make_body().to_cbor()), NOW, "bad_signature"),
    (
        "signature-short",
        lambda: cbor2.dumps([raw_body(), SIG[:63]], canonical=True),
        NOW,
        "bad_signature",
    ),
    # time
    ("expired", lambda: GOOD, T0 + 3600, "expired"),
    ("long-expired", lambda: GOOD, T0 + 10**6, "expired"),
    ("from-future", lambda: GOOD, T0 - MAX_CLOCK_SKEW_S - 1, "from_future"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "now", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_refusal(make: Callable[[], bytes], now: float, reason: str) -> None:
    assert refusal(make(), now=now) == reason


def test_every_reason_has_a_crafted_case() -> None:
    covered = {c[3] for c in CASES} | {"version_conflict"}  # supersedes: below
    assert covered == set(REASONS)


def test_clock_boundaries() -> None:
    assert SignedDescriptor.decode(GOOD, now=T0 - MAX_CLOCK_SKEW_S).body.published_at == T0
    assert SignedDescriptor.decode(GOOD, now=T0 + 3600 - 0.5).is_current(T0 + 3600 - 0.5)
    signed = SignedDescriptor.decode(GOOD, now=NOW)
    assert not signed.is_current(T0 + 3600)
    assert not signed.is_current(T0 - MAX_CLOCK_SKEW_S - 0.5)


def test_decode_refuses_non_bytes() -> None:
    assert refusal(bytearray(GOOD)) == "bad_cbor"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"addresses": (("::1%eth0", 7000),)}, "bad_field"),
        ({"addresses": (("2001:DB8::1", 7000),)}, "bad_field"),  # not canonical text
        ({"addresses": (("example.org", 7000),)}, "bad_field"),
        ({"addresses": (("224.0.0.1", 7000),)}, "bad_field"),
        ({"addresses": [("192.0.2.1", 7000)]}, "bad_field"),  # a list, not a tuple
        ({"roles": {DescriptorRole.EXIT}}, "bad_field"),  # a set, not a frozenset
        ({"roles": frozenset({"exit"})}, "bad_field"),  # a string, not the enum
        ({"exit_policy": [(80, 80)]}, "bad_field"),
        ({"bandwidth_bps": -1}, "bad_field"),
        ({"version": True}, "bad_field"),
        ({"operator": None}, "bad_field"),
        ({"link_key": LOW_ORDER_KEYS[1]}, "unusable_key"),
        ({"roles": frozenset({DescriptorRole.RELAY})}, "exit_policy_without_exit"),
        ({"expires_at": T0 + DESCRIPTOR_LIFETIME_S + 1}, "lifetime_too_long"),
    ],
)
def test_construction_validates(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(DescriptorError) as info:
        make_body(**overrides)
    assert info.value.reason == reason


def test_operator_construction_validates() -> None:
    with pytest.raises(DescriptorError):
        Operator(name="x" * (MAX_OPERATOR_NAME_BYTES + 1))
    with pytest.raises(DescriptorError):
        Operator(contact="\ud800")  # a lone surrogate is not text
    assert Operator(name="Ünïcode Ops", contact="https://example.org/contact").name


# --- Versions ---------------------------------------------------------------------------


def test_supersedes() -> None:
    old = sign(make_body(version=5), IDENT)
    new = sign(make_body(version=6), IDENT)
    assert supersedes(new, old)
    assert not supersedes(old, new)  # never backwards
    assert not supersedes(old, old)  # the same record again
    assert not supersedes(old, sign(make_body(version=5), IDENT))  # identical bytes
    assert not supersedes(sign(make_body(OTHER, version=7), OTHER), old)  # another node


def test_same_version_different_content_is_a_conflict() -> None:
    a = sign(make_body(version=5, bandwidth_bps=1), IDENT)
    b = sign(make_body(version=5, bandwidth_bps=2), IDENT)
    for new, old in ((a, b), (b, a)):
        with pytest.raises(DescriptorError) as info:
            supersedes(new, old)
        assert info.value.reason == "version_conflict"


# --- Properties -------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=MAX_DESCRIPTOR_BYTES + 8))
def test_random_bytes_only_raise_descriptor_error(data: bytes) -> None:
    try:
        SignedDescriptor.decode(data, now=NOW)
    except DescriptorError as exc:
        assert exc.reason in REASONS


@settings(max_examples=500)
@given(st.data())
def test_mutated_vector_only_raises_descriptor_error(data: st.DataObject) -> None:
    wire = bytearray(bytes.fromhex(V["outputs"]["wire"]))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(wire) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if action == "flip":
            wire[index] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            wire[index] = data.draw(st.integers(0, 255))
        elif action == "delete" and len(wire) > 1:
            del wire[index]
        else:
            wire.insert(index, data.draw(st.integers(0, 255)))
    if bytes(wire) == bytes.fromhex(V["outputs"]["wire"]):
        return  # two flips of the same bit
    with pytest.raises(DescriptorError) as info:
        SignedDescriptor.decode(bytes(wire), now=V["now"])
    assert info.value.reason in REASONS


_plain_cbor = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.integers(-2, 20) | st.text(max_size=3), children, max_size=17)
    ),
    max_leaves=40,
)


@settings(max_examples=500)
@given(st.dictionaries(st.integers(0, 16), _plain_cbor, max_size=17), st.binary(max_size=70))
def test_well_formed_but_wrong_bodies_only_raise_descriptor_error(
    body: dict[int, Any], signature: bytes
) -> None:
    merged = {**raw_body(), **body}
    data = cbor2.dumps([merged, signature], canonical=True)
    try:
        SignedDescriptor.decode(data, now=NOW)
    except DescriptorError as exc:
        assert exc.reason in REASONS


def _ports() -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    def build(steps: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        ranges: list[tuple[int, int]] = []
        hi = -1
        for gap, width in steps:
            lo = hi + 2 + gap
            if lo + width > 65535:
                break
            hi = lo + width
            ranges.append((lo, hi))
        return tuple(ranges)

    return st.lists(
        st.tuples(st.integers(0, 3000), st.integers(0, 3000)), max_size=MAX_EXIT_PORT_RANGES
    ).map(build)


_address = st.tuples(
    st.ip_addresses().filter(
        lambda ip: (
            not (
                ip.is_unspecified
                or ip.is_multicast
                or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None)
            )
        )
    ),
    st.integers(1, 65535),
).map(lambda a: (str(a[0]), a[1]))
_x25519 = st.binary(min_size=32, max_size=32).map(crypto.x25519_public_from_private)
_text_chars = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def _utf8_at_most(limit: int) -> st.SearchStrategy[str]:
    return st.text(_text_chars, max_size=limit).filter(lambda s: len(s.encode()) <= limit)


@st.composite
def descriptors(draw: st.DrawFn) -> tuple[NodeDescriptor, Identity]:
    identity = draw(st.sampled_from([IDENT, OTHER]))
    onion = draw(_x25519)
    roles = draw(st.frozensets(st.sampled_from(DescriptorRole)))
    published = draw(st.integers(0, 2**40))
    body = NodeDescriptor(
        version=draw(st.integers(0, MAX_UINT)),
        identity_key=identity.identity_public,
        link_key=draw(st.just(identity.link_public) | _x25519),
        onion_key=onion,
        next_onion_key=draw(st.none() | _x25519.filter(lambda k: k != onion)),
        addresses=tuple(
            draw(st.lists(_address, min_size=1, max_size=MAX_ADDRESSES, unique_by=lambda a: a))
        ),
        roles=roles,
        exit_policy=draw(_ports()) if DescriptorRole.EXIT in roles else (),
        region=draw(st.from_regex(rf"[A-Z0-9-]{{0,{MAX_REGION_CHARS}}}", fullmatch=True)),
        country=draw(st.just("") | st.from_regex(r"[A-Z]{2}", fullmatch=True)),
        operator=Operator(
            name=draw(_utf8_at_most(MAX_OPERATOR_NAME_BYTES)),
            contact=draw(_utf8_at_most(MAX_OPERATOR_CONTACT_BYTES)),
            operator_key=draw(st.none() | st.binary(min_size=32, max_size=32)),
        ),
        bandwidth_bps=draw(st.integers(0, MAX_BANDWIDTH_BPS)),
        software=draw(st.text(_ascii, max_size=MAX_SOFTWARE_BYTES)),
        stake_ref=draw(st.text(_ascii, max_size=MAX_STAKE_REF_BYTES)),
        published_at=published,
        expires_at=published + draw(st.integers(1, DESCRIPTOR_LIFETIME_S)),
    )
    return body, identity


@settings(max_examples=200, deadline=None)
@given(descriptors())
def test_valid_descriptors_round_trip(case: tuple[NodeDescriptor, Identity]) -> None:
    body, identity = case
    signed = sign(body, identity)
    wire = signed.encode()
    assert len(wire) <= MAX_DESCRIPTOR_BYTES
    decoded = SignedDescriptor.decode(wire, now=body.published_at)
    assert decoded == signed
    assert decoded.body == body
    assert decoded.encode() == wire
    assert body.to_cbor() == cbor2.dumps(cbor2.loads(body.to_cbor()), canonical=True)
