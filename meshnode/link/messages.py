"""Link wire messages: fixed layouts, named offsets, codecs that check length first.

Byte-by-byte layouts are in docs/protocol.md. All integers are big-endian except the
AEAD nonce (Noise's layout: 4 zero bytes + little-endian 64-bit counter). Decoders raise
:class:`DecodeError`; they never return a half-valid object.

Not here: cryptography (noise.py, cookie.py), session state (endpoint.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshnode.errors import DecodeError
from meshnode.link import constants as C

_U32 = struct.Struct(">I")
_INIT_PAYLOAD = struct.Struct(">Q32s64s")
_RESP_PAYLOAD = struct.Struct(">32s64s")


@dataclass(frozen=True, slots=True, kw_only=True)
class Initiation:
    """Type 1: ``type | sender_index | noise message 1 (200) | mac1 | mac2`` (237 bytes)."""

    sender_index: int
    noise: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """Type 2: ``type | sender_index | receiver_index | noise message 2 (144) | mac1 | mac2``."""

    sender_index: int
    receiver_index: int
    noise: bytes


def encode_initiation_body(sender_index: int, noise: bytes) -> bytes:
    """An initiation without its MACs (the cookie generator appends them)."""
    if len(noise) != C.NOISE_INITIATION_BYTES:
        raise DecodeError("noise initiation has the wrong length")
    return bytes((C.MSG_INITIATION,)) + _U32.pack(sender_index) + noise


def decode_initiation(data: bytes) -> Initiation:
    if len(data) != C.INITIATION_BYTES or data[0] != C.MSG_INITIATION:
        raise DecodeError("not an initiation")
    (sender,) = _U32.unpack_from(data, 1)
    return Initiation(sender_index=sender, noise=data[5 : 5 + C.NOISE_INITIATION_BYTES])


def encode_response_body(sender_index: int, receiver_index: int, noise: bytes) -> bytes:
    if len(noise) != C.NOISE_RESPONSE_BYTES:
        raise DecodeError("noise response has the wrong length")
    return bytes((C.MSG_RESPONSE,)) + _U32.pack(sender_index) + _U32.pack(receiver_index) + noise


def decode_response(data: bytes) -> Response:
    if len(data) != C.RESPONSE_BYTES or data[0] != C.MSG_RESPONSE:
        raise DecodeError("not a response")
    sender, receiver = struct.unpack_from(">II", data, 1)
    return Response(
        sender_index=sender, receiver_index=receiver, noise=data[9 : 9 + C.NOISE_RESPONSE_BYTES]
    )


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class InitiationPayload:
    """Inside Noise message 1: ``timestamp_ns (8) | identity key (32) | link signature (64)``.

    The timestamp (wall clock, ns, strictly increasing per sender) lets a responder refuse
    a replayed initiation (WireGuard's TAI64N); the signature binds the Noise static key to
    the sender's Ed25519 identity.
    """

    timestamp_ns: int
    identity_key: bytes
    link_signature: bytes

    def encode(self) -> bytes:
        return _INIT_PAYLOAD.pack(self.timestamp_ns, self.identity_key, self.link_signature)

    @classmethod
    def decode(cls, data: bytes) -> InitiationPayload:
        if len(data) != C.INITIATION_PAYLOAD_BYTES:
            raise DecodeError("initiation payload has the wrong length")
        ts, ikey, sig = _INIT_PAYLOAD.unpack(data)
        return cls(timestamp_ns=ts, identity_key=ikey, link_signature=sig)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ResponsePayload:
    """Inside Noise message 2: ``identity key (32) | link signature (64)``."""

    identity_key: bytes
    link_signature: bytes

    def encode(self) -> bytes:
        return _RESP_PAYLOAD.pack(self.identity_key, self.link_signature)

    @classmethod
    def decode(cls, data: bytes) -> ResponsePayload:
        if len(data) != C.RESPONSE_PAYLOAD_BYTES:
            raise DecodeError("response payload has the wrong length")
        ikey, sig = _RESP_PAYLOAD.unpack(data)
        return cls(identity_key=ikey, link_signature=sig)


def transport_header(receiver_index: int, counter: int) -> bytes:
    """``type (1) | receiver_index (4) | counter (8)``: also the AEAD's associated data."""
    return bytes((C.MSG_TRANSPORT,)) + _U32.pack(receiver_index) + counter.to_bytes(8, "big")
