"""Print the node descriptor test vector (tests/vectors/descriptor.json) as JSON on stdout.

Run by hand from the repository root when the descriptor format changes on purpose::

    .venv/bin/python tests/vectors/make_descriptor_vectors.py > tests/vectors/descriptor.json

Every input is fixed (keys come from fixed seeds; Ed25519 signatures are deterministic),
so the output is the same on every run. tests/discovery/test_descriptor.py rebuilds the
descriptor from the inputs in the JSON, compares every output byte for byte and decodes
the wire bytes at ``now``; docs/descriptor-format.md walks through the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from discovery.constants import DESCRIPTOR_DOMAIN, MAX_CLOCK_SKEW_S
from discovery.descriptor import DescriptorRole, NodeDescriptor, Operator, sign
from meshnode import crypto
from meshnode.identity import Identity

# --- Inputs (fixed bytes) ----------------------------------------------------------------

IDENTITY_SEED = bytes(range(0x00, 0x20))
LINK_PRIVATE = bytes(range(0x20, 0x40))
ONION_PRIVATE = bytes(range(0x40, 0x60))
NEXT_ONION_PRIVATE = bytes(range(0x60, 0x80))
OPERATOR_SEED = bytes(range(0x80, 0xA0))  # the operator key is this seed's Ed25519 public key

PUBLISHED_AT = 1_700_000_000
FIELDS: dict[str, Any] = {
    "version": PUBLISHED_AT,
    "addresses": [["192.0.2.10", 7520], ["2001:db8::10", 7520]],
    "roles": ["exit", "relay"],
    "exit_policy": [[80, 80], [443, 443], [8000, 8999]],
    "region": "EU",
    "country": "DE",
    "operator_name": "Example Ops",
    "operator_contact": "ops@example.org",
    "bandwidth_bps": 100_000_000,
    "software": "meshnode/0.1.0",
    "stake_ref": "",
    "published_at": PUBLISHED_AT,
    "expires_at": PUBLISHED_AT + 3 * 3600,
}
NOW = PUBLISHED_AT + 600  # a time at which the descriptor is valid


def descriptor_from_inputs(inputs: dict[str, Any]) -> tuple[NodeDescriptor, Identity]:
    """The descriptor and signing identity the JSON ``inputs`` describe."""
    identity = Identity(
        identity_seed=bytes.fromhex(inputs["identity_seed"]),
        link_private=bytes.fromhex(inputs["link_private"]),
    )
    fields = inputs["fields"]
    body = NodeDescriptor(
        version=fields["version"],
        identity_key=identity.identity_public,
        link_key=identity.link_public,
        onion_key=crypto.x25519_public_from_private(bytes.fromhex(inputs["onion_private"])),
        next_onion_key=crypto.x25519_public_from_private(
            bytes.fromhex(inputs["next_onion_private"])
        ),
        addresses=tuple((host, port) for host, port in fields["addresses"]),
        roles=frozenset(DescriptorRole(r) for r in fields["roles"]),
        exit_policy=tuple((lo, hi) for lo, hi in fields["exit_policy"]),
        region=fields["region"],
        country=fields["country"],
        operator=Operator(
            name=fields["operator_name"],
            contact=fields["operator_contact"],
            operator_key=crypto.ed25519_public_from_seed(bytes.fromhex(inputs["operator_seed"])),
        ),
        bandwidth_bps=fields["bandwidth_bps"],
        software=fields["software"],
        stake_ref=fields["stake_ref"],
        published_at=fields["published_at"],
        expires_at=fields["expires_at"],
    )
    return body, identity


def build() -> dict[str, Any]:
    inputs = {
        "identity_seed": IDENTITY_SEED.hex(),
        "link_private": LINK_PRIVATE.hex(),
        "onion_private": ONION_PRIVATE.hex(),
        "next_onion_private": NEXT_ONION_PRIVATE.hex(),
        "operator_seed": OPERATOR_SEED.hex(),
        "fields": FIELDS,
    }
    body, identity = descriptor_from_inputs(inputs)
    signed = sign(body, identity)
    wire = signed.encode()
    tampered = bytearray(wire)
    tampered[-1] ^= 0x01
    return {
        "about": (
            "meshnode node descriptor v1 test vector; byte strings are hex. Layout: "
            "docs/descriptor-format.md. Regenerate with tests/vectors/make_descriptor_vectors.py; "
            "checked by tests/discovery/test_descriptor.py."
        ),
        "inputs": inputs,
        "now": NOW,
        "outputs": {
            "identity_public": body.identity_key.hex(),
            "node_id": body.node_id.hex(),
            "link_public": body.link_key.hex(),
            "onion_public": body.onion_key.hex(),
            "next_onion_public": (body.next_onion_key or b"").hex(),
            "operator_key": (body.operator.operator_key or b"").hex(),
            "domain": DESCRIPTOR_DOMAIN.hex(),
            "body_cbor": body.to_cbor().hex(),
            "signing_message": body.signing_message().hex(),
            "signature": signed.signature.hex(),
            "wire": wire.hex(),
            "wire_length": len(wire),
        },
        "refusals": [
            {"case": "last signature byte flipped", "wire": bytes(tampered).hex(), "now": NOW,
             "reason": "bad_signature"},
            {"case": "now = expires_at", "wire": wire.hex(), "now": FIELDS["expires_at"],
             "reason": "expired"},
            {"case": "published more than MAX_CLOCK_SKEW_S ahead of now", "wire": wire.hex(),
             "now": PUBLISHED_AT - MAX_CLOCK_SKEW_S - 1, "reason": "from_future"},
        ],
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
