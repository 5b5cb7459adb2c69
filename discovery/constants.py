"""Discovery protocol constants: descriptor sizes, lifetimes, clock skew, field limits.

Units are in the names (``_S`` seconds, ``_BYTES`` bytes, ``_BPS`` bits per second). The
byte layout these limits apply to is in docs/descriptor-format.md. Not here: link-layer
constants (meshnode/link/constants.py), DHT tuning (k, alpha) of the kademlia adapter.
"""

from __future__ import annotations

# --- Descriptor envelope ----------------------------------------------------------------

# Signed bytes = DESCRIPTOR_DOMAIN || canonical CBOR of the body map. The domain keeps a
# descriptor signature from ever verifying as another message signed by the identity key
# (the link certificate uses b"meshnode/link-key/v1\0"); a new format gets a new domain.
DESCRIPTOR_DOMAIN = b"meshnode/descriptor/v1\0"

# Checked before any parsing. A descriptor with every field at its limit below encodes
# to about 1,300 bytes (tests/discovery/test_descriptor.py proves it fits), so 2 KiB
# leaves room without letting one record cost a store much.
MAX_DESCRIPTOR_BYTES = 2048

# CBOR nesting: wire array > body map > addresses array > [host, port] array.
MAX_CBOR_DEPTH = 4

# --- Time -------------------------------------------------------------------------------

# expires_at - published_at may not exceed this. Short, so a stale record (old address,
# retired onion key) dies within hours; publishers republish well before expiry.
DESCRIPTOR_LIFETIME_S = 3 * 3600

# published_at may be at most this far ahead of the verifier's clock. Expiry gets no
# slack: a record past expires_at is refused.
MAX_CLOCK_SKEW_S = 15 * 60

# Onion-key rotation overlap. A descriptor naming an onion key can be cached and used
# for up to one lifetime (plus skew) after it was published, so a node keeps the private
# half of a retired onion key at least this long after it stops advertising it, and
# advertises a key as next_onion_key at least this long before making it current.
ONION_KEY_OVERLAP_S = DESCRIPTOR_LIFETIME_S + MAX_CLOCK_SKEW_S

# --- Field limits -----------------------------------------------------------------------

MAX_UINT = 2**63 - 1  # version, timestamps: fit a signed 64-bit integer everywhere
MAX_ADDRESSES = 8
MAX_EXIT_PORT_RANGES = 32
MAX_BANDWIDTH_BPS = 10**13  # 10 Tbit/s: no single node advertises more
MAX_REGION_CHARS = 16  # ASCII, uppercase: "EU", "NA", "APAC"
MAX_OPERATOR_NAME_BYTES = 64  # UTF-8
MAX_OPERATOR_CONTACT_BYTES = 128  # UTF-8
MAX_SOFTWARE_BYTES = 64  # printable ASCII, e.g. "meshnode/0.1.0"
MAX_STAKE_REF_BYTES = 128  # printable ASCII; empty until stake exists
