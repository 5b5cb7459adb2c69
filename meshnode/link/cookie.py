"""mac1 / mac2 and cookie replies for handshake messages (WireGuard whitepaper §5.4.4, §5.4.7).

Every handshake message (initiation and response) ends with ``mac1 | mac2``, 16 bytes each.

* ``mac1 = MAC(HASH(LABEL_MAC1 | receiver's static public key), msg[:-32])``: only someone
  who knows whom they are talking to can produce it, so scanners get no answer at all.
* ``mac2 = MAC(cookie, msg[:-16])`` where ``cookie = MAC(secret, source address)`` and the
  responder's ``secret`` is random and rotates every ``COOKIE_SECRET_LIFETIME_S``. Under load
  a responder answers an initiation without a valid mac2 with a COOKIE_REPLY instead of
  doing Diffie-Hellman; an initiator that can read that reply has shown it owns its source
  address. Without a cookie, mac2 is 16 zero bytes.

COOKIE_REPLY: ``type (1) | receiver index (4, big-endian) | nonce (24) |
XChaCha20-Poly1305(HASH(LABEL_COOKIE | responder's static public key), nonce, cookie,
aad=mac1 of the message answered)`` — 61 bytes. The aad binds a reply to one message, so a
reply cannot be forged without having seen that message.

Sans-IO: time is a ``now`` argument, randomness an injected ``random_bytes``.
Not here: deciding when we are under load (ratelimit.py) or matching reply indexes to
handshakes (the endpoint does that with :func:`parse_cookie_reply_index`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from meshnode import crypto
from meshnode.errors import LocalProtocolError
from meshnode.link import constants

__all__ = [
    "MACS_BYTES",
    "CookieChecker",
    "CookieGenerator",
    "addr_bytes",
    "parse_cookie_reply_index",
]

MACS_BYTES = 2 * constants.MAC_BYTES
"""Bytes that mac1 and mac2 add to the end of every handshake message."""

_MAC = constants.MAC_BYTES
_SECRET_BYTES = 32
_ZERO_MAC = bytes(_MAC)
_INDEX_END = 1 + constants.INDEX_BYTES
_NONCE_END = _INDEX_END + constants.COOKIE_NONCE_BYTES
_MAX_INDEX = 2 ** (8 * constants.INDEX_BYTES) - 1


def _mac1_key(static_public: bytes) -> bytes:
    return crypto.hash_bytes(constants.LABEL_MAC1 + static_public, size=32)


def _cookie_key(static_public: bytes) -> bytes:
    return crypto.hash_bytes(constants.LABEL_COOKIE + static_public, size=32)


def addr_bytes(addr: tuple[str, int]) -> bytes:
    """The bytes a cookie is bound to: packed IP (4 or 16 bytes) + port (2 bytes, big-endian).

    A host that is not an IP literal (only seen in tests and odd transports) is used as its
    UTF-8 bytes. An IPv6 scope (``%eth0``) is not part of the packed address.
    """
    host, port = addr[0], addr[1]
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = host.encode("utf-8", "surrogatepass")
    return packed + port.to_bytes(2, "big")


def parse_cookie_reply_index(reply: bytes) -> int | None:
    """The receiver index of a COOKIE_REPLY (the sender index of the message it answers).

    None when ``reply`` does not have a COOKIE_REPLY's type byte and exact length.
    """
    if len(reply) != constants.COOKIE_REPLY_BYTES or reply[0] != constants.MSG_COOKIE_REPLY:
        return None
    return int.from_bytes(reply[1:_INDEX_END], "big")


class CookieChecker:
    """The receiving side of handshake messages, keyed by OUR static public key.

    Checks mac1 and mac2 and writes cookie replies. A secret is used for new cookies for
    ``COOKIE_SECRET_LIFETIME_S`` after it was drawn and accepted in mac2 for twice that, so a
    cookie stays valid for at least one secret lifetime after it was issued (longer than
    an initiator uses it, ``COOKIE_LIFETIME_S``) and dies after two rotations. Secrets are
    drawn lazily, when a reply is needed.
    """

    __slots__ = (
        "_cookie_key",
        "_mac1_key",
        "_previous",
        "_previous_set",
        "_random_bytes",
        "_secret",
        "_secret_set",
    )

    def __init__(self, local_static_public: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self._mac1_key = _mac1_key(local_static_public)
        self._cookie_key = _cookie_key(local_static_public)
        self._random_bytes = random_bytes
        self._secret: bytes | None = None
        self._secret_set = 0.0
        self._previous: bytes | None = None
        self._previous_set = 0.0

    def check_mac1(self, msg: bytes) -> bool:
        """True when ``msg`` ends with a valid mac1 (and a mac2 field) for our public key."""
        if len(msg) < MACS_BYTES:
            return False
        expected = crypto.mac(self._mac1_key, msg[:-MACS_BYTES], size=_MAC)
        return crypto.constant_time_equal(expected, msg[-MACS_BYTES:-_MAC])

    def check_mac2(self, msg: bytes, addr: tuple[str, int], now: float) -> bool:
        """True when ``msg``'s mac2 was made with a cookie we issued to ``addr`` that is still
        valid. Does not check mac1 (call :meth:`check_mac1` first)."""
        if len(msg) < MACS_BYTES:
            return False
        lifetime = 2 * constants.COOKIE_SECRET_LIFETIME_S
        source = addr_bytes(addr)
        body, received = msg[:-_MAC], msg[-_MAC:]
        for secret, set_at in (
            (self._secret, self._secret_set),
            (self._previous, self._previous_set),
        ):
            if secret is None or now - set_at >= lifetime:
                continue
            cookie = crypto.mac(secret, source, size=_MAC)
            expected = crypto.mac(cookie, body, size=_MAC)
            if crypto.constant_time_equal(expected, received):
                return True
        return False

    def create_reply(
        self, msg: bytes, receiver_index: int, addr: tuple[str, int], now: float
    ) -> bytes:
        """A COOKIE_REPLY answering ``msg`` (whose sender index is ``receiver_index``) from
        ``addr``. Draws a new secret if the current one is too old to issue cookies."""
        if len(msg) < MACS_BYTES:
            raise LocalProtocolError("message too short to carry mac1 and mac2")
        if not 0 <= receiver_index <= _MAX_INDEX:
            raise LocalProtocolError(f"receiver index out of range: {receiver_index}")
        secret = self._issuing_secret(now)
        cookie = crypto.mac(secret, addr_bytes(addr), size=_MAC)
        nonce = self._random_bytes(constants.COOKIE_NONCE_BYTES)
        if len(nonce) != constants.COOKIE_NONCE_BYTES:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        sealed = crypto.xaead_seal(self._cookie_key, nonce, cookie, msg[-MACS_BYTES:-_MAC])
        return (
            bytes((constants.MSG_COOKIE_REPLY,))
            + receiver_index.to_bytes(constants.INDEX_BYTES, "big")
            + nonce
            + sealed
        )

    def _issuing_secret(self, now: float) -> bytes:
        secret = self._secret
        age = now - self._secret_set
        if secret is not None and 0 <= age < constants.COOKIE_SECRET_LIFETIME_S:
            return secret
        fresh = self._random_bytes(_SECRET_BYTES)
        if len(fresh) != _SECRET_BYTES:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        # The outgoing secret stays acceptable for the rest of its (doubled) lifetime; a
        # clock that went backwards re-anchors it so it expires rather than lingers.
        self._previous, self._previous_set = secret, min(self._secret_set, now)
        self._secret, self._secret_set = fresh, now
        return fresh

    def __repr__(self) -> str:
        return "CookieChecker(<redacted>)"


class CookieGenerator:
    """The sending side, one per remote peer, keyed by THEIR static public key.

    Appends mac1 and mac2 to our handshake messages and takes in the cookie replies the
    peer sends back. A consumed reply is good once: the mac1 it answers is then forgotten,
    so a replayed reply cannot extend a cookie's life.
    """

    __slots__ = ("_cookie", "_cookie_key", "_cookie_set", "_last_mac1", "_mac1_key")

    def __init__(self, remote_static_public: bytes) -> None:
        self._mac1_key = _mac1_key(remote_static_public)
        self._cookie_key = _cookie_key(remote_static_public)
        self._cookie: bytes | None = None
        self._cookie_set = 0.0
        self._last_mac1: bytes | None = None

    def has_cookie(self, now: float) -> bool:
        """True while a cookie younger than ``COOKIE_LIFETIME_S`` is held (mac2 is non-zero)."""
        return self._cookie is not None and now - self._cookie_set < constants.COOKIE_LIFETIME_S

    def add_macs(self, msg_without_macs: bytes, now: float) -> bytes:
        """``msg_without_macs`` followed by mac1 and mac2; remembers the mac1 sent."""
        mac1 = crypto.mac(self._mac1_key, msg_without_macs, size=_MAC)
        self._last_mac1 = mac1
        with_mac1 = msg_without_macs + mac1
        cookie = self._cookie
        if cookie is None or now - self._cookie_set >= constants.COOKIE_LIFETIME_S:
            return with_mac1 + _ZERO_MAC
        return with_mac1 + crypto.mac(cookie, with_mac1, size=_MAC)

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Take the cookie from a COOKIE_REPLY answering the last message we sent.

        False, and nothing changes, unless the reply has the exact layout and opens with
        the mac1 we sent last. The caller checks the receiver index beforehand.
        """
        last_mac1 = self._last_mac1
        if last_mac1 is None or parse_cookie_reply_index(reply) is None:
            return False
        nonce = reply[_INDEX_END:_NONCE_END]
        cookie = crypto.xaead_open(self._cookie_key, nonce, reply[_NONCE_END:], last_mac1)
        if cookie is None or len(cookie) != constants.COOKIE_BYTES:
            return False
        self._cookie, self._cookie_set = cookie, now
        self._last_mac1 = None
        return True

    def __repr__(self) -> str:
        return "CookieGenerator(<redacted>)"
