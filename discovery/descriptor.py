"""Node descriptors: what a node says about itself, signed by its identity key.

A :class:`NodeDescriptor` is the body (keys, addresses, roles, exit policy summary,
place, operator, bandwidth, software, stake reference, version, lifetime); a
:class:`SignedDescriptor` is a body with its Ed25519 signature, the only thing that goes
on the wire. Both are frozen and validated on construction, so a bad one cannot exist.

Encoding (byte by byte in docs/descriptor-format.md): the body is a CBOR map with small
integer keys (table below), encoded deterministically (RFC 8949 §4.2.1: shortest
integer and length forms, map keys in bytewise order, no indefinite lengths, no tags, no
floats) by ``cbor2`` with ``canonical=True``. The signature covers
``DESCRIPTOR_DOMAIN || body``; the wire form is the deterministic CBOR array
``[body, signature]``, i.e. ``0x82 || body || 0x58 0x40 || signature``.

====  ===============  ==============================================================
key   field            CBOR value
====  ===============  ==============================================================
0     version          uint (monotonic per node; publishers use a timestamp)
1     identity_key     bstr 32 (Ed25519 public key)
2     link_key         bstr 32 (X25519, the Noise static key)
3     onion_key        bstr 32 (X25519, current)
4     next_onion_key   bstr 32 (X25519, announced ahead of rotation) or null
5     addresses        array of [bstr 4|16 (IPv4|IPv6 packed), uint port]
6     roles            array of tstr ("exit", "relay"), sorted, no duplicates
7     exit_policy      array of [uint lo, uint hi] allowed port ranges, sorted, disjoint
8     region           tstr ("EU"; uppercase ASCII letters, digits, "-")
9     country          tstr (ISO 3166-1 alpha-2, uppercase) or ""
10    operator         array [tstr name, tstr contact, bstr 32 operator key or null]
11    bandwidth_bps    uint (advertised bits per second)
12    software         tstr (printable ASCII)
13    stake_ref        tstr (printable ASCII; "" for now)
14    published_at     uint (Unix seconds)
15    expires_at       uint (Unix seconds)
====  ===============  ==============================================================

Every key is present in every descriptor (absent values are null or empty); decoders
refuse unknown keys, so a new format needs a new ``DESCRIPTOR_DOMAIN``. Every refusal is
a :class:`DescriptorError` whose ``reason`` is one of :data:`REASONS`, for counters.

Only importer of ``cbor2``. Not here: storing, caching or fetching descriptors
(store.py, directory.py, dht.py), deciding when to republish (publisher.py).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import cbor2

from discovery.constants import (
    DESCRIPTOR_DOMAIN,
    DESCRIPTOR_LIFETIME_S,
    MAX_ADDRESSES,
    MAX_BANDWIDTH_BPS,
    MAX_CBOR_DEPTH,
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
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import Identity, NodeId, node_id_for

__all__ = [
    "KEYS",
    "REASONS",
    "DescriptorError",
    "DescriptorRole",
    "NodeDescriptor",
    "Operator",
    "Reason",
    "SignedDescriptor",
    "sign",
    "supersedes",
]

Reason = Literal[
    "too_large",  # more than MAX_DESCRIPTOR_BYTES (checked before parsing)
    "bad_cbor",  # not CBOR, or CBOR we never use: tags, floats, simple values, odd shapes
    "non_canonical",  # valid CBOR, but not the one deterministic encoding
    "unknown_key",  # the body map has a key this version does not define
    "missing_key",  # the body map lacks a key
    "bad_field",  # a value of the wrong type, length, range or form
    "exit_policy_without_exit",  # a non-empty exit policy without the exit role
    "unusable_key",  # an X25519 key no Diffie-Hellman can use (low order)
    "lifetime_too_long",  # expires_at - published_at > DESCRIPTOR_LIFETIME_S
    "bad_signature",  # the identity key did not sign these bytes
    "expired",  # expires_at <= now
    "from_future",  # published_at > now + MAX_CLOCK_SKEW_S
    "version_conflict",  # same node, same version, different descriptor
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class DescriptorError(DecodeError):
    """A descriptor was refused. ``reason`` is a stable token (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DescriptorRole(enum.Enum):
    """What a node offers to carry. A closed set: unknown roles are refused."""

    RELAY = "relay"
    EXIT = "exit"


# Field name -> CBOR map key. Never renumber; a new field needs a new format.
KEYS: Mapping[str, int] = {
    "version": 0,
    "identity_key": 1,
    "link_key": 2,
    "onion_key": 3,
    "next_onion_key": 4,
    "addresses": 5,
    "roles": 6,
    "exit_policy": 7,
    "region": 8,
    "country": 9,
    "operator": 10,
    "bandwidth_bps": 11,
    "software": 12,
    "stake_ref": 13,
    "published_at": 14,
    "expires_at": 15,
}
_FIELD_FOR_KEY = {key: name for name, key in KEYS.items()}
_KEY_BYTES = 32
_PORT_MAX = 65535
_REGION = re.compile(rf"[A-Z0-9-]{{0,{MAX_REGION_CHARS}}}")
_COUNTRY = re.compile(r"([A-Z]{2})?")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
# Line and paragraph separators plus every "other" category (control, format such as
# bidi overrides, surrogates, private use, unassigned): nothing that can disguise text.
_REFUSED_CATEGORIES = ("C", "Zl", "Zp")


# --- Field checks (shared by construction and decoding) ---------------------------------


def _bad(detail: str) -> DescriptorError:
    return DescriptorError("bad_field", detail)


def _is_uint(value: object, maximum: int = MAX_UINT) -> bool:
    # bool is an int subclass; CBOR true/false are never integers here.
    return type(value) is int and 0 <= value <= maximum


def _check_uint(value: object, name: str, maximum: int = MAX_UINT) -> None:
    if not _is_uint(value, maximum):
        raise _bad(f"{name} must be an integer from 0 to {maximum}")


def _check_key(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes) or len(value) != _KEY_BYTES:
        raise _bad(f"{name} must be {_KEY_BYTES} bytes" + (" or None" if optional else ""))


def _check_ascii(value: object, name: str, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit or not _PRINTABLE_ASCII.fullmatch(value):
        raise _bad(f"{name} must be printable ASCII of at most {limit} characters")


def _check_text(value: object, name: str, limit_bytes: int) -> None:
    if not isinstance(value, str):
        raise _bad(f"{name} must be text")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        raise _bad(f"{name} is not valid Unicode") from None
    if size > limit_bytes:
        raise _bad(f"{name} must be at most {limit_bytes} bytes of UTF-8")
    if any(unicodedata.category(c).startswith(_REFUSED_CATEGORIES) for c in value):
        raise _bad(f"{name} holds control, format or unassigned characters")


def _check_address(item: object) -> None:
    if not isinstance(item, tuple) or len(item) != 2:
        raise _bad("an address must be a (host, port) pair")
    host, port = item
    if not isinstance(host, str):
        raise _bad("an address host must be an IP address literal")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _bad("an address host must be an IP address literal") from None
    if isinstance(ip, ipaddress.IPv6Address) and (ip.scope_id or ip.ipv4_mapped is not None):
        raise _bad("IPv6 zone ids and IPv4-mapped addresses are refused")
    if str(ip) != host:
        # One address, one spelling: the wire carries packed bytes, so the text must be
        # what they decode to.
        raise _bad("an address host must be written in canonical form")
    if ip.is_unspecified or ip.is_multicast:
        raise _bad("an address may not be unspecified or multicast")
    if not _is_uint(port, _PORT_MAX) or port == 0:
        raise _bad("an address port must be 1 to 65535")


def _check_exit_policy(policy: object) -> None:
    if not isinstance(policy, tuple) or len(policy) > MAX_EXIT_PORT_RANGES:
        raise _bad(f"exit_policy must be a tuple of at most {MAX_EXIT_PORT_RANGES} ranges")
    previous_hi = -1
    for item in policy:
        if not isinstance(item, tuple) or len(item) != 2:
            raise _bad("an exit policy range must be a (lo, hi) pair")
        lo, hi = item
        if not (_is_uint(lo, _PORT_MAX) and _is_uint(hi, _PORT_MAX) and 1 <= lo <= hi):
            raise _bad("an exit policy range must satisfy 1 <= lo <= hi <= 65535")
        # Sorted, disjoint and not adjacent (adjacent ranges merge): one policy, one spelling.
        if lo <= previous_hi + 1:
            raise _bad("exit policy ranges must be sorted, disjoint and not adjacent")
        previous_hi = hi


# --- Values -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Operator:
    """Who runs the node: free-text name and contact, and an optional operator key.

    The operator key (Ed25519, 32 bytes) lets one operator's nodes be grouped (as a
    family); this module only carries it.
    """

    name: str = ""
    contact: str = ""
    operator_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_text(self.name, "operator name", MAX_OPERATOR_NAME_BYTES)
        _check_text(self.contact, "operator contact", MAX_OPERATOR_CONTACT_BYTES)
        _check_key(self.operator_key, "operator_key", optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeDescriptor:
    """The unsigned body of a descriptor. Construction validates every field.

    Raises :class:`DescriptorError` (``bad_field``, ``unusable_key``,
    ``exit_policy_without_exit``, ``lifetime_too_long``) for a bad value. Time against a
    clock is checked by :meth:`SignedDescriptor.check_current`, not here.
    """

    version: int
    identity_key: bytes
    link_key: bytes
    onion_key: bytes
    next_onion_key: bytes | None = None
    addresses: tuple[tuple[str, int], ...]
    roles: frozenset[DescriptorRole] = frozenset()
    exit_policy: tuple[tuple[int, int], ...] = ()
    region: str = ""
    country: str = ""
    operator: Operator = field(default_factory=Operator)
    bandwidth_bps: int = 0
    software: str = ""
    stake_ref: str = ""
    published_at: int
    expires_at: int

    def __post_init__(self) -> None:
        _check_uint(self.version, "version")
        _check_key(self.identity_key, "identity_key")
        _check_key(self.link_key, "link_key")
        _check_key(self.onion_key, "onion_key")
        _check_key(self.next_onion_key, "next_onion_key", optional=True)
        if self.next_onion_key == self.onion_key:
            raise _bad("next_onion_key must differ from onion_key")
        if not isinstance(self.addresses, tuple) or not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise _bad(f"addresses must be a tuple of 1 to {MAX_ADDRESSES} (host, port) pairs")
        for address in self.addresses:
            _check_address(address)
        if len(set(self.addresses)) != len(self.addresses):
            raise _bad("addresses must not repeat")
        if not isinstance(self.roles, frozenset) or not all(
            isinstance(r, DescriptorRole) for r in self.roles
        ):
            raise _bad("roles must be a frozenset of DescriptorRole")
        _check_exit_policy(self.exit_policy)
        if not isinstance(self.region, str) or not _REGION.fullmatch(self.region):
            raise _bad(f"region must be at most {MAX_REGION_CHARS} of A-Z, 0-9, '-'")
        if not isinstance(self.country, str) or not _COUNTRY.fullmatch(self.country):
            raise _bad("country must be two uppercase letters (ISO 3166-1 alpha-2) or empty")
        if not isinstance(self.operator, Operator):
            raise _bad("operator must be an Operator")
        _check_uint(self.bandwidth_bps, "bandwidth_bps", MAX_BANDWIDTH_BPS)
        _check_ascii(self.software, "software", MAX_SOFTWARE_BYTES)
        _check_ascii(self.stake_ref, "stake_ref", MAX_STAKE_REF_BYTES)
        _check_uint(self.published_at, "published_at")
        _check_uint(self.expires_at, "expires_at")
        # Semantic rules, after every field has the right type and form.
        for name in ("link_key", "onion_key", "next_onion_key"):
            key = getattr(self, name)
            if key is not None and not crypto.x25519_public_is_usable(key):
                raise DescriptorError("unusable_key", f"{name} is a low-order X25519 point")
        if self.exit_policy and DescriptorRole.EXIT not in self.roles:
            raise DescriptorError("exit_policy_without_exit", "an exit policy needs the exit role")
        if self.expires_at <= self.published_at:
            raise _bad("expires_at must be after published_at")
        if self.expires_at - self.published_at > DESCRIPTOR_LIFETIME_S:
            raise DescriptorError(
                "lifetime_too_long", f"lifetime may be at most {DESCRIPTOR_LIFETIME_S} s"
            )

    @property
    def node_id(self) -> NodeId:
        """The node id (DHT id) of the identity key."""
        return node_id_for(self.identity_key)

    def to_cbor(self) -> bytes:
        """The body's canonical CBOR encoding (what the signature covers, after the domain)."""
        return _dumps(self._to_map())

    def signing_message(self) -> bytes:
        """``DESCRIPTOR_DOMAIN || to_cbor()``: the exact bytes the identity key signs."""
        return DESCRIPTOR_DOMAIN + self.to_cbor()

    def _to_map(self) -> dict[int, object]:
        body: dict[str, object] = {
            "version": self.version,
            "identity_key": self.identity_key,
            "link_key": self.link_key,
            "onion_key": self.onion_key,
            "next_onion_key": self.next_onion_key,
            "addresses": [[ipaddress.ip_address(h).packed, p] for h, p in self.addresses],
            "roles": sorted(role.value for role in self.roles),
            "exit_policy": [[lo, hi] for lo, hi in self.exit_policy],
            "region": self.region,
            "country": self.country,
            "operator": [self.operator.name, self.operator.contact, self.operator.operator_key],
            "bandwidth_bps": self.bandwidth_bps,
            "software": self.software,
            "stake_ref": self.stake_ref,
            "published_at": self.published_at,
            "expires_at": self.expires_at,
        }
        return {KEYS[name]: value for name, value in body.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedDescriptor:
    """A body and its identity-key signature. Construction verifies the signature.

    Build one with :func:`sign` (publishing) or :meth:`decode` (receiving).
    """

    body: NodeDescriptor
    signature: bytes
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.body, NodeDescriptor):
            raise _bad("body must be a NodeDescriptor")
        if (
            not isinstance(self.signature, bytes)
            or len(self.signature) != crypto.ED25519_SIGNATURE_BYTES
        ):
            raise DescriptorError("bad_signature", "a signature is 64 bytes")
        body_map = self.body._to_map()
        message = DESCRIPTOR_DOMAIN + _dumps(body_map)
        if not crypto.ed25519_verify(self.body.identity_key, message, self.signature):
            raise DescriptorError("bad_signature", "the identity key did not sign this body")
        wire = _dumps([body_map, self.signature])
        if len(wire) > MAX_DESCRIPTOR_BYTES:
            raise DescriptorError("too_large", f"{len(wire)} > {MAX_DESCRIPTOR_BYTES} bytes")
        object.__setattr__(self, "_wire", wire)

    @property
    def node_id(self) -> NodeId:
        return self.body.node_id

    def encode(self) -> bytes:
        """The wire form: ``0x82 || body CBOR || 0x58 0x40 || signature``."""
        return self._wire

    def check_current(self, now: float) -> None:
        """Refuse a descriptor not valid at ``now`` (Unix seconds): expired or from the future."""
        if not math.isfinite(now):  # NaN would pass both comparisons below
            raise LocalProtocolError("now must be a finite number of Unix seconds")
        if self.body.published_at > now + MAX_CLOCK_SKEW_S:
            raise DescriptorError("from_future", "published_at is ahead of our clock")
        if self.body.expires_at <= now:
            raise DescriptorError("expired", "expires_at has passed")

    def is_current(self, now: float) -> bool:
        """True when :meth:`check_current` would pass at ``now``."""
        try:
            self.check_current(now)
        except DescriptorError:
            return False
        return True

    @classmethod
    def decode(cls, data: bytes, *, now: float) -> SignedDescriptor:
        """Parse and validate wire bytes received at ``now`` (Unix seconds).

        Checks, in order: size, CBOR well-formedness and plain types, canonical encoding,
        the key set, every field, the signature, then time. Raises
        :class:`DescriptorError` and nothing else.
        """
        if not isinstance(data, bytes):
            raise DescriptorError("bad_cbor", "expected bytes")
        if len(data) > MAX_DESCRIPTOR_BYTES:
            raise DescriptorError("too_large", f"{len(data)} > {MAX_DESCRIPTOR_BYTES} bytes")
        raw = _loads(data)
        if _dumps(raw) != data:
            raise DescriptorError("non_canonical", "not the deterministic CBOR encoding")
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], dict)):
            raise DescriptorError("bad_cbor", "expected the array [body map, signature]")
        signed = cls(body=_body_from_map(raw[0]), signature=_as_bytes(raw[1]))
        if signed.encode() != data:  # e.g. roles out of order: same data, other bytes
            raise DescriptorError("non_canonical", "fields not in canonical order")
        signed.check_current(now)
        return signed


def sign(body: NodeDescriptor, identity: Identity) -> SignedDescriptor:
    """Sign ``body`` with ``identity``, whose public key must be ``body.identity_key``."""
    if identity.identity_public != body.identity_key:
        raise LocalProtocolError("the descriptor's identity_key is not this identity's key")
    return SignedDescriptor(body=body, signature=identity.sign(body.signing_message()))


def supersedes(new: SignedDescriptor, old: SignedDescriptor) -> bool:
    """True when ``new`` should replace ``old``: same node, strictly higher version.

    False for another node, a lower version or the very same descriptor. The same
    version with a different descriptor raises ``DescriptorError("version_conflict")``:
    a node never reuses a version, so two bodies under one version mean a publisher bug
    or a stolen identity key; the caller keeps what it has and counts the conflict.
    """
    if new.body.identity_key != old.body.identity_key:
        return False
    if new.body.version == old.body.version and new.encode() != old.encode():
        raise DescriptorError(
            "version_conflict", f"two descriptors with version {new.body.version}"
        )
    return new.body.version > old.body.version


# --- CBOR (the cbor2 adapter) -----------------------------------------------------------


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _loads(data: bytes) -> object:
    try:
        value: object = cbor2.loads(
            data,
            max_depth=MAX_CBOR_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except cbor2.CBORError as exc:  # since 6.0 every decoding failure is a CBORDecodeError
        raise DescriptorError("bad_cbor", type(exc).__name__) from None
    _check_plain(value)
    return value


def _check_plain(value: object) -> None:
    """Refuse anything but the CBOR we use: uint/nint, bstr, tstr, array, map, null.

    cbor2 turns tags into Python objects (datetime, Decimal, big ints, CBORTag...),
    floats into float and simple values into their own types: all refused here. A
    tag-2 bignum that fits 64 bits is an int here but re-encodes differently, so the
    canonical check refuses it.
    """
    if value is None or isinstance(value, bytes | str):
        return
    if type(value) is int:
        if not -(2**64) <= value < 2**64:
            raise DescriptorError("bad_cbor", "integer beyond 64 bits (a bignum tag)")
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key)
            _check_plain(item)
        return
    raise DescriptorError("bad_cbor", f"unsupported CBOR item ({type(value).__name__})")


# --- Body map -> NodeDescriptor ---------------------------------------------------------


def _as_bytes(value: object) -> bytes:
    # The signature slot: anything but a byte string is a bad signature, not a bad field.
    if not isinstance(value, bytes):
        raise DescriptorError("bad_signature", "the signature must be a byte string")
    return value


def _as_list(value: object, name: str) -> list[object]:
    if not isinstance(value, list):
        raise _bad(f"{name} must be an array")
    return value


def _int(value: object, name: str) -> int:
    if type(value) is not int:
        raise _bad(f"{name} must be an integer")
    return value


def _bstr(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be a byte string")
    return value


def _opt_bstr(value: object, name: str) -> bytes | None:
    return None if value is None else _bstr(value, name)


def _tstr(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a text string")
    return value


def _pair(value: object, name: str) -> tuple[object, object]:
    items = _as_list(value, name)
    if len(items) != 2:
        raise _bad(f"{name} must be an array of two items")
    return items[0], items[1]


def _address_from_cbor(item: object) -> tuple[str, int]:
    host, port = _pair(item, "an address")
    packed = _bstr(host, "an address host")
    if len(packed) not in (4, 16):
        raise _bad("an address host must be 4 (IPv4) or 16 (IPv6) bytes")
    return str(ipaddress.ip_address(packed)), _int(port, "an address port")


def _range_from_cbor(item: object) -> tuple[int, int]:
    lo, hi = _pair(item, "an exit policy range")
    return _int(lo, "an exit policy port"), _int(hi, "an exit policy port")


def _roles_from_cbor(value: object) -> frozenset[DescriptorRole]:
    names = [_tstr(n, "a role") for n in _as_list(value, "roles")]
    try:
        roles = frozenset(DescriptorRole(n) for n in names)
    except ValueError:
        raise _bad("unknown role") from None
    if names != sorted(role.value for role in roles):
        raise DescriptorError("non_canonical", "roles must be sorted and not repeat")
    return roles


def _operator_from_cbor(value: object) -> Operator:
    items = _as_list(value, "operator")
    if len(items) != 3:
        raise _bad("operator must be [name, contact, operator key]")
    return Operator(
        name=_tstr(items[0], "operator name"),
        contact=_tstr(items[1], "operator contact"),
        operator_key=_opt_bstr(items[2], "operator_key"),
    )


def _body_from_map(body: dict[object, object]) -> NodeDescriptor:
    unknown = [k for k in body if k not in _FIELD_FOR_KEY]
    if unknown:
        raise DescriptorError("unknown_key", f"keys {sorted(map(repr, unknown))}")
    missing = [name for name, key in KEYS.items() if key not in body]
    if missing:
        raise DescriptorError("missing_key", f"fields {missing}")
    f = {name: body[key] for name, key in KEYS.items()}
    # Only types are checked here; the constructor checks lengths, ranges and forms.
    return NodeDescriptor(
        version=_int(f["version"], "version"),
        identity_key=_bstr(f["identity_key"], "identity_key"),
        link_key=_bstr(f["link_key"], "link_key"),
        onion_key=_bstr(f["onion_key"], "onion_key"),
        next_onion_key=_opt_bstr(f["next_onion_key"], "next_onion_key"),
        addresses=tuple(_address_from_cbor(a) for a in _as_list(f["addresses"], "addresses")),
        roles=_roles_from_cbor(f["roles"]),
        exit_policy=tuple(_range_from_cbor(r) for r in _as_list(f["exit_policy"], "exit_policy")),
        region=_tstr(f["region"], "region"),
        country=_tstr(f["country"], "country"),
        operator=_operator_from_cbor(f["operator"]),
        bandwidth_bps=_int(f["bandwidth_bps"], "bandwidth_bps"),
        software=_tstr(f["software"], "software"),
        stake_ref=_tstr(f["stake_ref"], "stake_ref"),
        published_at=_int(f["published_at"], "published_at"),
        expires_at=_int(f["expires_at"], "expires_at"),
    )
