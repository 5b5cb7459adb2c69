"""Adapter for the `noiseprotocol` package: Noise_IK_25519_ChaChaPoly_BLAKE2s handshakes.

The only module that imports ``noise``; nothing untyped leaves it. It runs the two-message
IK handshake and hands back the split transport keys, which the link layer then uses with
explicit counters (UDP reorders and loses, so Noise's implicit nonces cannot be used for
transport; WireGuard makes the same move).

Not here: message framing, MACs, cookies, timers, identity checks (see endpoint.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from noise.connection import Keypair, NoiseConnection

from meshnode import crypto
from meshnode.errors import HandshakeError, LocalProtocolError
from meshnode.link.constants import KEY_BYTES, PROLOGUE, PROTOCOL_NAME


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class TransportKeys:
    """Keys from Noise's Split(): ``send_key`` for our datagrams, ``recv_key`` for the peer's."""

    send_key: bytes
    recv_key: bytes
    handshake_hash: bytes

    def __repr__(self) -> str:
        return "TransportKeys(<redacted>)"


def _connection(local_static_private: bytes, ephemeral_private: bytes | None) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, local_static_private)
    if ephemeral_private is not None:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_private)
    return conn


def _start(conn: NoiseConnection) -> None:
    # The library warns whenever the ephemeral key was set by the caller ("OK for
    # testing"). The initiator does so on purpose: a fresh random key per attempt, reused
    # only to rebuild the state of that same initiation after a forged response.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        conn.start_handshake()


def _keys(conn: NoiseConnection) -> TransportKeys:
    proto = conn.noise_protocol
    return TransportKeys(
        send_key=bytes(proto.cipher_state_encrypt.k),
        recv_key=bytes(proto.cipher_state_decrypt.k),
        handshake_hash=bytes(conn.get_handshake_hash()),
    )


class InitiatorHandshake:
    """One attempt at IK as the initiator: ``write_initiation`` then ``read_response``.

    A response that fails to verify leaves the attempt usable: the library's state is
    spent by any read, so it is rebuilt from the same ephemeral key and payload (Noise's
    write is deterministic given them). Otherwise anyone who sees an initiation could
    void it with one forged response, and the genuine one would find nothing to answer.
    """

    __slots__ = ("_conn", "_ephemeral", "_local", "_payload", "_remote", "_state")

    def __init__(
        self,
        *,
        local_static_private: bytes,
        remote_static_public: bytes,
        ephemeral_private: bytes | None = None,
    ) -> None:
        if len(remote_static_public) != KEY_BYTES:
            raise LocalProtocolError("remote static key must be 32 bytes")
        self._local = local_static_private
        self._remote = remote_static_public
        self._ephemeral = ephemeral_private or crypto.x25519_generate_private()
        self._payload = b""
        self._conn = self._fresh()
        self._state = "start"

    def _fresh(self) -> NoiseConnection:
        conn = _connection(self._local, self._ephemeral)
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, self._remote)
        conn.set_as_initiator()
        _start(conn)
        return conn

    def write_initiation(self, payload: bytes) -> bytes:
        """Noise message 1 (e, es, s, ss) carrying ``payload``."""
        if self._state != "start":
            raise LocalProtocolError("initiation already written")
        self._state = "sent"
        self._payload = payload
        try:
            return bytes(self._conn.write_message(payload))
        except Exception as exc:  # e.g. a low-order remote key fails the DH
            raise HandshakeError("cannot write an initiation to this static key") from exc

    def read_response(self, message: bytes) -> tuple[bytes, TransportKeys]:
        """Consume Noise message 2 (e, ee, se); returns the peer's payload and the keys."""
        if self._state != "sent":
            raise LocalProtocolError("no initiation outstanding")
        try:
            payload = bytes(self._conn.read_message(message))
        except Exception as exc:
            self._conn = self._fresh()
            self._conn.write_message(self._payload)
            raise HandshakeError("handshake response did not verify") from exc
        self._state = "done"
        return payload, _keys(self._conn)


class ResponderHandshake:
    """IK as the responder: ``read_initiation`` then ``write_response``."""

    __slots__ = ("_conn", "_remote_static", "_state")

    def __init__(
        self, *, local_static_private: bytes, ephemeral_private: bytes | None = None
    ) -> None:
        self._conn = _connection(local_static_private, ephemeral_private)
        self._conn.set_as_responder()
        _start(self._conn)
        self._remote_static = b""
        self._state = "start"

    def read_initiation(self, message: bytes) -> tuple[bytes, bytes]:
        """Consume Noise message 1; returns (initiator's static public key, payload)."""
        if self._state != "start":
            raise LocalProtocolError("initiation already read")
        try:
            payload = bytes(self._conn.read_message(message))
            remote = bytes(self._conn.noise_protocol.handshake_state.rs.public_bytes)
        except Exception as exc:
            self._state = "failed"
            raise HandshakeError("handshake initiation did not verify") from exc
        self._state = "read"
        self._remote_static = remote
        return remote, payload

    def write_response(self, payload: bytes) -> tuple[bytes, TransportKeys]:
        """Noise message 2 carrying ``payload``, and the transport keys."""
        if self._state != "read":
            raise LocalProtocolError("no verified initiation to answer")
        self._state = "done"
        message = bytes(self._conn.write_message(payload))
        return message, _keys(self._conn)
