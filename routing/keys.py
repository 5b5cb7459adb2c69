"""The keys a client shares with one hop of a circuit, derived from the build's DH (sans-IO).

docs/circuits.md §2: the client's fresh ephemeral X25519 key and the hop's onion key
give a shared secret; every key of the hop's layers comes from it through
:func:`meshnode.crypto.kdf` with a distinct label, bound to both public keys, so two
hops (or two circuits) never share a key.

Not here: what the keys encrypt (routing/onion.py, routing/build.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshnode import crypto

__all__ = ["HopKeys", "derive_hop_keys"]

KDF_DOMAIN = b"meshnode/circuit/v1\0"


@dataclass(frozen=True, slots=True)
class HopKeys:
    """Everything the client and hop i derive from their build secret (circuits.md §2)."""

    record: bytes  # seals the build record itself
    kf: bytes  # forward layer AEAD
    kf_fill: bytes  # forward filler PRF
    kb_seal: bytes  # backward AEAD for cells the hop originates
    kb_relay: bytes  # backward keystream for cells the hop relays
    k_slots: bytes  # build: keystream over the remaining record slots
    k_reply: bytes  # build reply: status seal and reply-slot keystream
    off_f: int  # forward seq offset (uint64)
    off_b: int  # backward seq offset (uint64)


def derive_hop_keys(shared: bytes, eph_public: bytes, onion_public: bytes) -> HopKeys:
    """The hop keys of one build record; ``shared`` = X25519(eph, onion)."""
    secret = crypto.hash_bytes(KDF_DOMAIN + shared + eph_public + onion_public, size=32)

    def key(label: bytes) -> bytes:
        return crypto.kdf(secret, label)

    offsets = crypto.kdf(secret, b"offsets", size=16)
    return HopKeys(
        record=key(b"record"),
        kf=key(b"forward"),
        kf_fill=key(b"forward-fill"),
        kb_seal=key(b"backward-seal"),
        kb_relay=key(b"backward-relay"),
        k_slots=key(b"build-slots"),
        k_reply=key(b"build-reply"),
        off_f=int.from_bytes(offsets[:8], "big"),
        off_b=int.from_bytes(offsets[8:], "big"),
    )
