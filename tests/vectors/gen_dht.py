"""Print the DHT message test vectors (tests/vectors/dht.json) as JSON on stdout.

Run by hand from the repository root when the DHT wire format changes on purpose::

    .venv/bin/python tests/vectors/gen_dht.py > tests/vectors/dht.json

Every input is fixed: node ids and link keys come from fixed seeds through
:class:`meshnode.identity.Identity` (the link key is
``crypto.x25519_public_from_private(link_private)``, so every key is a usable X25519
point and every id is the hash of a real identity key), message ids are fixed bytes, and
the stored value is the descriptor of tests/vectors/descriptor.json, read from that file.
The requester is the node of descriptor.json (the initiator of link.json), the responder
is link.json's responder: the messages below are what would travel inside that link
session. Every output is computed with discovery/rpc.py's own functions;
tests/discovery/test_rpc.py re-encodes them from the inputs in the JSON, compares byte
for byte, checks the bodies against an independent msgpack encoder and decodes them
back. docs/protocol.md §11 walks through the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from discovery import rpc
from discovery.store import descriptor_key
from meshnode import crypto
from meshnode.identity import Identity

VECTORS_DIR = Path(__file__).resolve().parent

# --- Inputs (fixed bytes) ----------------------------------------------------------------

REQUESTER = {  # descriptor.json's node (link.json's initiator)
    "identity_seed": bytes(range(0x00, 0x20)).hex(),
    "link_private": bytes(range(0x20, 0x40)).hex(),
}
RESPONDER = {  # link.json's responder
    "identity_seed": bytes(range(0x40, 0x60)).hex(),
    "link_private": bytes(range(0x60, 0x80)).hex(),
}
# The two contacts of the find_node answer: an IPv4 and an IPv6 node.
CONTACT_A = {
    "identity_seed": (b"\xa1" * 32).hex(),
    "link_private": (b"\xa2" * 32).hex(),
    "host": "192.0.2.1",
    "port": 7520,
}
CONTACT_B = {
    "identity_seed": (b"\xb1" * 32).hex(),
    "link_private": (b"\xb2" * 32).hex(),
    "host": "2001:db8::2",
    "port": 7521,
}
FULL_ANSWER_CONTACTS = 20  # the two-fragment message: a find_node answer listing k = 20


def full_answer_contact(i: int) -> dict[str, Any]:
    """The i-th contact of the k-contact answer: seeds 0xc0+i and 0xe0+i repeated."""
    return {
        "identity_seed": (bytes([0xC0 + i]) * 32).hex(),
        "link_private": (bytes([0xE0 + i]) * 32).hex(),
        "host": f"198.51.100.{10 + i}",
        "port": 7520,
    }


PING_MSG_ID = bytes.fromhex("0102030405060708")
FIND_NODE_MSG_ID = bytes.fromhex("1112131415161718")
STORE_MSG_ID = bytes.fromhex("2122232425262728")
TWO_FRAGMENT_MSG_ID = bytes.fromhex("3132333435363738")


def identity_from(inputs: dict[str, Any]) -> Identity:
    return Identity(
        identity_seed=bytes.fromhex(inputs["identity_seed"]),
        link_private=bytes.fromhex(inputs["link_private"]),
    )


def contact_from(inputs: dict[str, Any]) -> rpc.DhtContact:
    """The contact the JSON ``inputs`` describe (id and link key from the seeds)."""
    ident = identity_from(inputs)
    link_key = crypto.x25519_public_from_private(bytes.fromhex(inputs["link_private"]))
    assert link_key == ident.link_public
    return rpc.DhtContact(
        node_id=ident.node_id, host=inputs["host"], port=inputs["port"], link_key=link_key
    )


def node_outputs(inputs: dict[str, Any]) -> dict[str, str]:
    ident = identity_from(inputs)
    return {"node_id": ident.node_id.hex(), "link_public": ident.link_public.hex()}


def message(msg_type: int, msg_id: bytes, body: bytes) -> dict[str, Any]:
    frames = rpc.fragment(msg_type, msg_id, body)
    return {
        "body": body.hex(),
        "body_length": len(body),
        "frames": [f.hex() for f in frames],
        "frame_lengths": [len(f) for f in frames],
    }


def build() -> dict[str, Any]:
    requester = identity_from(REQUESTER)
    responder = identity_from(RESPONDER)
    descriptor = json.loads((VECTORS_DIR / "descriptor.json").read_text(encoding="utf-8"))
    value = bytes.fromhex(descriptor["outputs"]["wire"])
    store_key = descriptor_key(bytes.fromhex(descriptor["outputs"]["node_id"]))
    contacts = [contact_from(CONTACT_A), contact_from(CONTACT_B)]
    full = [full_answer_contact(i) for i in range(FULL_ANSWER_CONTACTS)]

    ping = rpc.encode_request("ping", requester.node_id)
    pong = rpc.encode_response("ping", responder.node_id)
    find_node = rpc.encode_request("find_node", requester.node_id, key=requester.node_id)
    found = rpc.encode_response("find_node", contacts)
    store = rpc.encode_request("store", requester.node_id, key=store_key, value=value)
    big = rpc.encode_response("find_node", [contact_from(c) for c in full])
    return {
        "about": (
            "meshnode DHT message test vectors (link frames of kind 0x10); byte strings "
            "are hex. Layout: docs/protocol.md section 11. Regenerate with "
            "tests/vectors/gen_dht.py; checked by tests/discovery/test_rpc.py."
        ),
        "nodes": {
            "requester": {"inputs": REQUESTER, "outputs": node_outputs(REQUESTER)},
            "responder": {"inputs": RESPONDER, "outputs": node_outputs(RESPONDER)},
            "contact_a": {"inputs": CONTACT_A, "outputs": node_outputs(CONTACT_A)},
            "contact_b": {"inputs": CONTACT_B, "outputs": node_outputs(CONTACT_B)},
        },
        "ping_request": {
            "inputs": {"type": rpc.REQUEST, "msg_id": PING_MSG_ID.hex(), "method": "ping",
                       "sender_id": requester.node_id.hex()},
            "outputs": message(rpc.REQUEST, PING_MSG_ID, ping),
        },
        "ping_response": {
            "inputs": {"type": rpc.RESPONSE, "msg_id": PING_MSG_ID.hex(), "method": "ping",
                       "result": responder.node_id.hex()},
            "outputs": message(rpc.RESPONSE, PING_MSG_ID, pong),
        },
        "find_node_request": {
            "inputs": {"type": rpc.REQUEST, "msg_id": FIND_NODE_MSG_ID.hex(),
                       "method": "find_node", "sender_id": requester.node_id.hex(),
                       "key": requester.node_id.hex()},
            "outputs": message(rpc.REQUEST, FIND_NODE_MSG_ID, find_node),
        },
        "find_node_response": {
            "inputs": {"type": rpc.RESPONSE, "msg_id": FIND_NODE_MSG_ID.hex(),
                       "method": "find_node", "contacts": [CONTACT_A, CONTACT_B]},
            "outputs": {
                "contacts": [[c.node_id.hex(), c.host, c.port, c.link_key.hex()]
                             for c in contacts],
                **message(rpc.RESPONSE, FIND_NODE_MSG_ID, found),
            },
        },
        "store_request": {
            "inputs": {"type": rpc.REQUEST, "msg_id": STORE_MSG_ID.hex(), "method": "store",
                       "sender_id": requester.node_id.hex(),
                       "descriptor": "tests/vectors/descriptor.json outputs.wire"},
            "outputs": {"key": store_key.hex(), "value": value.hex(),
                        **message(rpc.REQUEST, STORE_MSG_ID, store)},
        },
        "two_fragments": {
            "inputs": {"type": rpc.RESPONSE, "msg_id": TWO_FRAGMENT_MSG_ID.hex(),
                       "method": "find_node", "contacts": full},
            "outputs": message(rpc.RESPONSE, TWO_FRAGMENT_MSG_ID, big),
        },
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
