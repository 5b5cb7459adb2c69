"""Link-layer protocol constants, named after WireGuard's where they play the same role.

Units are in the names. Values that an operator may tune live in :class:`LinkConfig`
(config.py) with these as defaults; values that are part of the wire protocol are here only.
"""

from __future__ import annotations

# --- Wire protocol (changing any of these is a new protocol version) -------------------
PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"meshnode link v1"

MSG_INITIATION = 0x01
MSG_RESPONSE = 0x02
MSG_COOKIE_REPLY = 0x03
MSG_TRANSPORT = 0x04

INDEX_BYTES = 4
COUNTER_BYTES = 8
MAC_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16
TIMESTAMP_BYTES = 8
SIGNATURE_BYTES = 64

# Handshake payloads (inside Noise): initiator: timestamp | identity key | link signature;
# responder: identity key | link signature.
INITIATION_PAYLOAD_BYTES = TIMESTAMP_BYTES + KEY_BYTES + SIGNATURE_BYTES  # 104
RESPONSE_PAYLOAD_BYTES = KEY_BYTES + SIGNATURE_BYTES  # 96
# Noise IK message 1: e (32) | enc(s) (32+16) | enc(payload) (104+16)
NOISE_INITIATION_BYTES = KEY_BYTES + (KEY_BYTES + TAG_BYTES) + INITIATION_PAYLOAD_BYTES + TAG_BYTES
# Noise IK message 2: e (32) | enc(payload) (96+16)
NOISE_RESPONSE_BYTES = KEY_BYTES + RESPONSE_PAYLOAD_BYTES + TAG_BYTES

INITIATION_BYTES = 1 + INDEX_BYTES + NOISE_INITIATION_BYTES + 2 * MAC_BYTES  # 237
RESPONSE_BYTES = 1 + 2 * INDEX_BYTES + NOISE_RESPONSE_BYTES + 2 * MAC_BYTES  # 185
COOKIE_NONCE_BYTES = 24
COOKIE_BYTES = 16
COOKIE_REPLY_BYTES = 1 + INDEX_BYTES + COOKIE_NONCE_BYTES + COOKIE_BYTES + TAG_BYTES  # 61
TRANSPORT_HEADER_BYTES = 1 + INDEX_BYTES + COUNTER_BYTES  # 13
TRANSPORT_MIN_BYTES = TRANSPORT_HEADER_BYTES + TAG_BYTES  # 29: a keepalive (empty plaintext)

# Largest UDP payload we send or accept: fits a 1,500-byte MTU under IPv6 (40) + UDP (8).
MAX_DATAGRAM_BYTES = 1452
# Largest frame payload the layers above may hand to `send` (kind byte excluded).
MAX_PAYLOAD_BYTES = MAX_DATAGRAM_BYTES - TRANSPORT_MIN_BYTES - 1  # 1422

# Labels for the MAC and cookie keys (WireGuard's "mac1----" / "cookie--").
LABEL_MAC1 = b"meshnode-mac1---"
LABEL_COOKIE = b"meshnode-cookie-"

# --- Frame kinds (first plaintext byte of a transport datagram) ------------------------
KIND_PING = 0x01  # answered by the link layer itself
KIND_PONG = 0x02
KIND_DHT = 0x10  # reserved for discovery
KIND_CELL = 0x20  # reserved for routing
RESERVED_KINDS = frozenset({KIND_PING, KIND_PONG})

# --- Timers (WireGuard whitepaper §6.1 names) ------------------------------------------
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME_S = 120.0
REJECT_AFTER_TIME_S = 180.0
REKEY_TIMEOUT_S = 5.0
KEEPALIVE_TIMEOUT_S = 10.0
COOKIE_SECRET_LIFETIME_S = 120.0
COOKIE_LIFETIME_S = (
    120.0 - 5.0
)  # an initiator stops using a cookie a little before the secret turns

# Replay window: counters this far behind the highest seen are still accepted once.
REPLAY_WINDOW = 2048
