"""Print the link-layer test vectors (tests/vectors/link.json) as JSON on stdout.

Run by hand from the repository root when the wire format changes on purpose::

    .venv/bin/python tests/vectors/make_link_vectors.py > tests/vectors/link.json

Every input is a fixed byte string (no randomness, no clock): the ephemeral keys are
pinned through ``noise.InitiatorHandshake(ephemeral_private=...)`` /
``noise.ResponderHandshake(ephemeral_private=...)`` and the cookie checker draws its
secret and nonce from a callable that returns fixed bytes. Every output is computed with
the package's own functions; tests/meshnode/link/test_vectors.py recomputes them from the
inputs in the JSON and compares byte for byte. docs/protocol.md explains each field.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from meshnode import crypto
from meshnode.contact import Contact
from meshnode.identity import Identity, b32encode, link_cert_message
from meshnode.link import constants as C
from meshnode.link import cookie, messages, noise

# --- Inputs (fixed bytes) ----------------------------------------------------------------

INITIATOR_IDENTITY_SEED = bytes(range(0x00, 0x20))
INITIATOR_LINK_PRIVATE = bytes(range(0x20, 0x40))  # the initiator's Noise static private key
RESPONDER_IDENTITY_SEED = bytes(range(0x40, 0x60))
RESPONDER_LINK_PRIVATE = bytes(range(0x60, 0x80))  # the responder's Noise static private key
INITIATOR_EPHEMERAL_PRIVATE = bytes(range(0x80, 0xA0))
RESPONDER_EPHEMERAL_PRIVATE = bytes(range(0xA0, 0xC0))
COOKIE_SECRET = bytes(range(0xC0, 0xE0))  # 32 bytes: the responder's cookie secret
COOKIE_NONCE = bytes(range(0xE0, 0xF8))  # 24 bytes: the cookie reply's XChaCha20 nonce

CONTACT_HOST = "127.10.0.1"
CONTACT_PORT = 7520
TIMESTAMP_NS = 1_700_000_000_123_456_789
INITIATOR_INDEX = 0x11223344
RESPONDER_INDEX = 0x55667788
NOW = 1000.0  # monotonic seconds; only matters for cookie lifetimes
TRANSPORT_COUNTER = 7
TRANSPORT_KIND = C.KIND_DHT
TRANSPORT_PAYLOAD = b"meshnode"
KEEPALIVE_COUNTER = 0


def fixed_random(n: int) -> bytes:
    """The cookie checker's ``random_bytes``: 32 bytes are the secret, 24 the nonce."""
    return {len(COOKIE_SECRET): COOKIE_SECRET, len(COOKIE_NONCE): COOKIE_NONCE}[n]


def identity_outputs(ident: Identity) -> dict[str, str]:
    return {
        "identity_public": ident.identity_public.hex(),
        "identity_public_b32": b32encode(ident.identity_public),
        "node_id": ident.node_id.hex(),
        "node_id_b32": b32encode(ident.node_id),
        "link_public": ident.link_public.hex(),
        "link_public_b32": b32encode(ident.link_public),
        "link_cert_message": link_cert_message(ident.link_public).hex(),
        "link_signature": ident.link_signature.hex(),
    }


def build() -> dict[str, Any]:
    initiator = Identity(identity_seed=INITIATOR_IDENTITY_SEED, link_private=INITIATOR_LINK_PRIVATE)
    responder = Identity(identity_seed=RESPONDER_IDENTITY_SEED, link_private=RESPONDER_LINK_PRIVATE)
    contact = Contact(host=CONTACT_HOST, port=CONTACT_PORT, static_key=initiator.link_public)

    # (b) Handshake initiation.
    ini = noise.InitiatorHandshake(
        local_static_private=initiator.link_private,
        remote_static_public=responder.link_public,
        ephemeral_private=INITIATOR_EPHEMERAL_PRIVATE,
    )
    init_payload = messages.InitiationPayload(
        timestamp_ns=TIMESTAMP_NS,
        identity_key=initiator.identity_public,
        link_signature=initiator.link_signature,
    ).encode()
    noise1 = ini.write_initiation(init_payload)
    init_body = messages.encode_initiation_body(INITIATOR_INDEX, noise1)
    to_responder = cookie.CookieGenerator(responder.link_public)
    initiation = to_responder.add_macs(init_body, NOW)

    # (c) Handshake response.
    rsp = noise.ResponderHandshake(
        local_static_private=responder.link_private,
        ephemeral_private=RESPONDER_EPHEMERAL_PRIVATE,
    )
    seen_static, seen_payload = rsp.read_initiation(messages.decode_initiation(initiation).noise)
    assert seen_static == initiator.link_public and seen_payload == init_payload
    resp_payload = messages.ResponsePayload(
        identity_key=responder.identity_public, link_signature=responder.link_signature
    ).encode()
    noise2, responder_keys = rsp.write_response(resp_payload)
    resp_body = messages.encode_response_body(RESPONDER_INDEX, INITIATOR_INDEX, noise2)
    response = cookie.CookieGenerator(initiator.link_public).add_macs(resp_body, NOW)
    got_payload, initiator_keys = ini.read_response(messages.decode_response(response).noise)
    assert got_payload == resp_payload
    assert initiator_keys.send_key == responder_keys.recv_key
    assert initiator_keys.recv_key == responder_keys.send_key
    assert initiator_keys.handshake_hash == responder_keys.handshake_hash

    # (d) Transport datagrams, initiator -> responder (receiver index = responder's index).
    sender = crypto.TransportCipher(initiator_keys.send_key)
    plaintext = bytes((TRANSPORT_KIND,)) + TRANSPORT_PAYLOAD
    header = messages.transport_header(RESPONDER_INDEX, TRANSPORT_COUNTER)
    datagram = header + sender.seal(TRANSPORT_COUNTER, plaintext, header)
    ka_header = messages.transport_header(RESPONDER_INDEX, KEEPALIVE_COUNTER)
    keepalive = ka_header + sender.seal(KEEPALIVE_COUNTER, b"", ka_header)

    # (e) mac1, the cookie reply to the initiation, and the initiation again with mac2.
    source = (CONTACT_HOST, CONTACT_PORT)
    checker = cookie.CookieChecker(responder.link_public, fixed_random)
    reply = checker.create_reply(initiation, INITIATOR_INDEX, source, NOW)
    the_cookie = crypto.mac(COOKIE_SECRET, cookie.addr_bytes(source), size=C.COOKIE_BYTES)
    assert to_responder.consume_reply(reply, NOW)
    initiation_with_cookie = to_responder.add_macs(init_body, NOW)
    assert checker.check_mac2(initiation_with_cookie, source, NOW)

    return {
        "about": (
            "meshnode link v1 test vectors; byte strings are hex. Layouts and rules: "
            "docs/protocol.md. Regenerate with tests/vectors/make_link_vectors.py; checked by "
            "tests/meshnode/link/test_vectors.py."
        ),
        "protocol": {
            "noise_protocol_name": C.PROTOCOL_NAME.decode("ascii"),
            "prologue": C.PROLOGUE.hex(),
        },
        "identity": {
            "inputs": {
                "identity_seed": INITIATOR_IDENTITY_SEED.hex(),
                "link_private": INITIATOR_LINK_PRIVATE.hex(),
                "contact_host": CONTACT_HOST,
                "contact_port": CONTACT_PORT,
            },
            "outputs": {**identity_outputs(initiator), "contact": str(contact)},
        },
        "responder_identity": {
            "inputs": {
                "identity_seed": RESPONDER_IDENTITY_SEED.hex(),
                "link_private": RESPONDER_LINK_PRIVATE.hex(),
            },
            "outputs": identity_outputs(responder),
        },
        "initiation": {
            "inputs": {
                "initiator_static_private": INITIATOR_LINK_PRIVATE.hex(),
                "responder_static_private": RESPONDER_LINK_PRIVATE.hex(),
                "initiator_ephemeral_private": INITIATOR_EPHEMERAL_PRIVATE.hex(),
                "timestamp_ns": TIMESTAMP_NS,
                "identity_key": initiator.identity_public.hex(),
                "link_signature": initiator.link_signature.hex(),
                "sender_index": INITIATOR_INDEX,
                "now": NOW,
            },
            "outputs": {
                "responder_static_public": responder.link_public.hex(),
                "initiator_ephemeral_public": crypto.x25519_public_from_private(
                    INITIATOR_EPHEMERAL_PRIVATE
                ).hex(),
                "payload": init_payload.hex(),
                "noise_message": noise1.hex(),
                "body": init_body.hex(),
                "mac1": initiation[-32:-16].hex(),
                "mac2": initiation[-16:].hex(),
                "message": initiation.hex(),
            },
        },
        "response": {
            "inputs": {
                "responder_ephemeral_private": RESPONDER_EPHEMERAL_PRIVATE.hex(),
                "responder_identity_seed": RESPONDER_IDENTITY_SEED.hex(),
                "sender_index": RESPONDER_INDEX,
                "receiver_index": INITIATOR_INDEX,
                "now": NOW,
            },
            "outputs": {
                "responder_ephemeral_public": crypto.x25519_public_from_private(
                    RESPONDER_EPHEMERAL_PRIVATE
                ).hex(),
                "payload": resp_payload.hex(),
                "noise_message": noise2.hex(),
                "body": resp_body.hex(),
                "mac1": response[-32:-16].hex(),
                "mac2": response[-16:].hex(),
                "message": response.hex(),
                "handshake_hash": initiator_keys.handshake_hash.hex(),
                "initiator_send_key": initiator_keys.send_key.hex(),
                "initiator_recv_key": initiator_keys.recv_key.hex(),
                "responder_send_key": responder_keys.send_key.hex(),
                "responder_recv_key": responder_keys.recv_key.hex(),
            },
        },
        "transport": {
            "inputs": {
                "key": initiator_keys.send_key.hex(),
                "receiver_index": RESPONDER_INDEX,
                "counter": TRANSPORT_COUNTER,
                "kind": TRANSPORT_KIND,
                "payload": TRANSPORT_PAYLOAD.hex(),
                "keepalive_counter": KEEPALIVE_COUNTER,
            },
            "outputs": {
                "header": header.hex(),
                "nonce": (bytes(4) + TRANSPORT_COUNTER.to_bytes(8, "little")).hex(),
                "plaintext": plaintext.hex(),
                "datagram": datagram.hex(),
                "keepalive_header": ka_header.hex(),
                "keepalive": keepalive.hex(),
            },
        },
        "cookie": {
            "inputs": {
                "responder_static_public": responder.link_public.hex(),
                "cookie_secret": COOKIE_SECRET.hex(),
                "cookie_nonce": COOKIE_NONCE.hex(),
                "source_host": CONTACT_HOST,
                "source_port": CONTACT_PORT,
                "message": initiation.hex(),
                "receiver_index": INITIATOR_INDEX,
                "now": NOW,
            },
            "outputs": {
                "mac1_key": crypto.hash_bytes(C.LABEL_MAC1 + responder.link_public).hex(),
                "cookie_key": crypto.hash_bytes(C.LABEL_COOKIE + responder.link_public).hex(),
                "mac1": initiation[-32:-16].hex(),
                "source_addr_bytes": cookie.addr_bytes(source).hex(),
                "cookie": the_cookie.hex(),
                "reply": reply.hex(),
                "initiation_with_mac2": initiation_with_cookie.hex(),
                "mac2": initiation_with_cookie[-16:].hex(),
            },
        },
    }


def main() -> None:
    # noiseprotocol warns whenever an ephemeral key is pinned; pinning is the point here.
    warnings.filterwarnings("ignore", message="One of ephemeral keypairs", category=UserWarning)
    print(json.dumps(build(), indent=2))


if __name__ == "__main__":
    main()
