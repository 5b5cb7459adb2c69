"""The link test vectors (tests/vectors/link.json) and the layouts in docs/protocol.md.

Each vector is recomputed from the inputs in the JSON with the package's own functions
and compared byte for byte; the hashing, MAC and AEAD constructions the document
describes are also recomputed with hashlib / libsodium directly, so the prose and the
code cannot drift apart unnoticed. Finally a real :class:`LinkEndpoint` is fed the
documented bytes: it must accept them, and with its randomness pinned it must produce
them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest

from meshnode import crypto
from meshnode.contact import Contact
from meshnode.identity import Identity, verify_link_binding
from meshnode.link import constants as C
from meshnode.link import cookie, messages, noise
from meshnode.link import endpoint as endpoint_module
from meshnode.link.config import LinkConfig
from meshnode.link.endpoint import LinkEndpoint
from meshnode.link.events import FrameReceived, LinkEvent, SessionEstablished
from tests.vectors.make_link_vectors import identity_outputs

pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")

VECTORS_PATH = Path(__file__).resolve().parents[2] / "vectors" / "link.json"
V: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

IDENT, RESP_IDENT = V["identity"], V["responder_identity"]
INIT, RESP, TRANS, COOK = V["initiation"], V["response"], V["transport"], V["cookie"]
ADDR = (IDENT["inputs"]["contact_host"], IDENT["inputs"]["contact_port"])


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def initiator_identity() -> Identity:
    return Identity(
        identity_seed=h(IDENT["inputs"]["identity_seed"]),
        link_private=h(IDENT["inputs"]["link_private"]),
    )


def responder_identity() -> Identity:
    return Identity(
        identity_seed=h(RESP_IDENT["inputs"]["identity_seed"]),
        link_private=h(RESP_IDENT["inputs"]["link_private"]),
    )


def blake2b(data: bytes, *, size: int, key: bytes = b"", person: bytes = b"") -> bytes:
    """Straight from hashlib, not through meshnode.crypto."""
    return hashlib.blake2b(data, digest_size=size, key=key, person=person).digest()


# --- Recomputing the vectors from their inputs ----------------------------------------


def build_initiation() -> tuple[noise.InitiatorHandshake, bytes, bytes, bytes]:
    """(initiator handshake state, payload, body, full message) from the JSON inputs."""
    inputs = INIT["inputs"]
    hs = noise.InitiatorHandshake(
        local_static_private=h(inputs["initiator_static_private"]),
        remote_static_public=crypto.x25519_public_from_private(
            h(inputs["responder_static_private"])
        ),
        ephemeral_private=h(inputs["initiator_ephemeral_private"]),
    )
    payload = messages.InitiationPayload(
        timestamp_ns=inputs["timestamp_ns"],
        identity_key=h(inputs["identity_key"]),
        link_signature=h(inputs["link_signature"]),
    ).encode()
    body = messages.encode_initiation_body(inputs["sender_index"], hs.write_initiation(payload))
    responder_public = crypto.x25519_public_from_private(h(inputs["responder_static_private"]))
    message = cookie.CookieGenerator(responder_public).add_macs(body, inputs["now"])
    return hs, payload, body, message


def build_response() -> tuple[bytes, bytes, bytes, noise.TransportKeys, noise.TransportKeys]:
    """(payload, body, message, initiator keys, responder keys) from the JSON inputs."""
    inputs = RESP["inputs"]
    ini, _, _, initiation = build_initiation()
    responder = Identity(
        identity_seed=h(inputs["responder_identity_seed"]),
        link_private=h(INIT["inputs"]["responder_static_private"]),
    )
    hs = noise.ResponderHandshake(
        local_static_private=responder.link_private,
        ephemeral_private=h(inputs["responder_ephemeral_private"]),
    )
    initiator_static, _ = hs.read_initiation(messages.decode_initiation(initiation).noise)
    payload = messages.ResponsePayload(
        identity_key=responder.identity_public, link_signature=responder.link_signature
    ).encode()
    noise2, responder_keys = hs.write_response(payload)
    body = messages.encode_response_body(inputs["sender_index"], inputs["receiver_index"], noise2)
    message = cookie.CookieGenerator(initiator_static).add_macs(body, inputs["now"])
    _, initiator_keys = ini.read_response(messages.decode_response(message).noise)
    return payload, body, message, initiator_keys, responder_keys


def seal_transport(counter: int, plaintext: bytes) -> bytes:
    inputs = TRANS["inputs"]
    header = messages.transport_header(inputs["receiver_index"], counter)
    return header + crypto.TransportCipher(h(inputs["key"])).seal(counter, plaintext, header)


def fixed_cookie_random(n: int) -> bytes:
    """The responder's randomness in vector (e): 32 bytes are the secret, 24 the nonce."""
    return {32: h(COOK["inputs"]["cookie_secret"]), 24: h(COOK["inputs"]["cookie_nonce"])}[n]


# --- (a) identity -----------------------------------------------------------------------


@pytest.mark.parametrize("vector", [IDENT, RESP_IDENT], ids=["initiator", "responder"])
def test_identity_vector(vector: dict[str, Any]) -> None:
    ident = Identity(
        identity_seed=h(vector["inputs"]["identity_seed"]),
        link_private=h(vector["inputs"]["link_private"]),
    )
    expected = {k: v for k, v in vector["outputs"].items() if k != "contact"}
    assert identity_outputs(ident) == expected


def test_identity_vector_constructions() -> None:
    out = IDENT["outputs"]
    ipub, lpub, sig = h(out["identity_public"]), h(out["link_public"]), h(out["link_signature"])
    # node id: BLAKE2b, 20-byte digest, personalisation "meshnode-nodeid" zero-padded to 16.
    assert h(out["node_id"]) == blake2b(ipub, size=20, person=b"meshnode-nodeid")
    assert h(out["node_id"]) == blake2b(ipub, size=20, person=b"meshnode-nodeid\0")
    # The link key certificate: Ed25519 over "meshnode/link-key/v1\0" || link public key.
    assert h(out["link_cert_message"]) == b"meshnode/link-key/v1\x00" + lpub
    assert verify_link_binding(ipub, lpub, sig)
    assert not verify_link_binding(ipub, h(RESP_IDENT["outputs"]["link_public"]), sig)
    # base32: RFC 4648, lowercase, no padding; 52 characters for a key, 32 for a node id.
    assert out["link_public_b32"] == base64.b32encode(lpub).decode().rstrip("=").lower()
    assert len(out["link_public_b32"]) == 52 and len(out["node_id_b32"]) == 32


def test_contact_vector() -> None:
    ident = initiator_identity()
    host, port = ADDR
    text = str(Contact(host=host, port=port, static_key=ident.link_public))
    assert text == IDENT["outputs"]["contact"]
    assert text == f"127.10.0.1:7520#{IDENT['outputs']['link_public_b32']}"
    assert Contact.parse(text) == Contact(host=host, port=port, static_key=ident.link_public)


# --- (b) initiation -----------------------------------------------------------------------


def test_initiation_vector() -> None:
    _, payload, body, message = build_initiation()
    out = INIT["outputs"]
    assert payload == h(out["payload"])
    assert body == h(out["body"])
    assert message == h(out["message"])
    assert message[-32:-16] == h(out["mac1"])
    assert message[-16:] == h(out["mac2"]) == bytes(16)  # no cookie: mac2 is zero
    ident = initiator_identity()
    assert INIT["inputs"]["identity_key"] == ident.identity_public.hex()
    assert INIT["inputs"]["link_signature"] == ident.link_signature.hex()
    assert INIT["inputs"]["initiator_static_private"] == ident.link_private.hex()
    assert out["responder_static_public"] == RESP_IDENT["outputs"]["link_public"]


def test_initiation_layout() -> None:
    msg = h(INIT["outputs"]["message"])
    out = INIT["outputs"]
    assert len(msg) == C.INITIATION_BYTES == 237
    assert msg[0] == C.MSG_INITIATION == 0x01
    assert int.from_bytes(msg[1:5], "big") == INIT["inputs"]["sender_index"]
    assert msg[5:205] == h(out["noise_message"])
    assert msg[205:221] == h(out["mac1"]) and msg[221:237] == h(out["mac2"])
    # Noise message 1: e (32, clear) | s (32 + 16 tag) | payload (104 + 16 tag).
    assert msg[5:37] == h(out["initiator_ephemeral_public"])
    assert len(h(out["noise_message"])) == 32 + 48 + 120 == C.NOISE_INITIATION_BYTES
    # Payload: timestamp (8, big-endian ns) | identity key (32) | link signature (64).
    payload = h(out["payload"])
    assert len(payload) == 104
    assert payload[:8] == INIT["inputs"]["timestamp_ns"].to_bytes(8, "big")
    assert payload[8:40] == h(IDENT["outputs"]["identity_public"])
    assert payload[40:104] == h(IDENT["outputs"]["link_signature"])
    decoded = messages.decode_initiation(msg)
    assert decoded.sender_index == INIT["inputs"]["sender_index"]


def test_initiation_is_what_the_responder_reads() -> None:
    hs = noise.ResponderHandshake(
        local_static_private=h(INIT["inputs"]["responder_static_private"])
    )
    static, payload = hs.read_initiation(h(INIT["outputs"]["noise_message"]))
    assert static == h(IDENT["outputs"]["link_public"])
    assert payload == h(INIT["outputs"]["payload"])


# --- (c) response and transport keys -----------------------------------------------------


def test_response_vector() -> None:
    payload, body, message, ikeys, rkeys = build_response()
    out = RESP["outputs"]
    assert payload == h(out["payload"])
    assert body == h(out["body"])
    assert message == h(out["message"])
    assert message[-32:-16] == h(out["mac1"])
    assert message[-16:] == h(out["mac2"]) == bytes(16)
    assert ikeys.handshake_hash == rkeys.handshake_hash == h(out["handshake_hash"])
    assert ikeys.send_key == h(out["initiator_send_key"]) == rkeys.recv_key
    assert ikeys.recv_key == h(out["initiator_recv_key"]) == rkeys.send_key
    assert rkeys.send_key == h(out["responder_send_key"])
    assert rkeys.recv_key == h(out["responder_recv_key"])
    assert RESP["inputs"]["responder_identity_seed"] == RESP_IDENT["inputs"]["identity_seed"]


def test_response_layout() -> None:
    msg = h(RESP["outputs"]["message"])
    out = RESP["outputs"]
    assert len(msg) == C.RESPONSE_BYTES == 185
    assert msg[0] == C.MSG_RESPONSE == 0x02
    assert int.from_bytes(msg[1:5], "big") == RESP["inputs"]["sender_index"]
    assert int.from_bytes(msg[5:9], "big") == RESP["inputs"]["receiver_index"]
    assert RESP["inputs"]["receiver_index"] == INIT["inputs"]["sender_index"]
    assert msg[9:153] == h(out["noise_message"])
    assert msg[153:169] == h(out["mac1"]) and msg[169:185] == h(out["mac2"])
    # Noise message 2: e (32, clear) | payload (96 + 16 tag).
    assert msg[9:41] == h(out["responder_ephemeral_public"])
    assert len(h(out["noise_message"])) == 32 + 112 == C.NOISE_RESPONSE_BYTES
    payload = h(out["payload"])
    assert payload == h(RESP_IDENT["outputs"]["identity_public"]) + h(
        RESP_IDENT["outputs"]["link_signature"]
    )
    # The response's mac1 is keyed by the INITIATOR's static public key.
    mac1_key = blake2b(C.LABEL_MAC1 + h(IDENT["outputs"]["link_public"]), size=32)
    assert msg[153:169] == blake2b(msg[:153], size=16, key=mac1_key)


# --- (d) transport -----------------------------------------------------------------------


def test_transport_vectors() -> None:
    inputs, out = TRANS["inputs"], TRANS["outputs"]
    assert inputs["key"] == RESP["outputs"]["initiator_send_key"]
    assert inputs["receiver_index"] == RESP["inputs"]["sender_index"]
    plaintext = bytes((inputs["kind"],)) + h(inputs["payload"])
    assert plaintext == h(out["plaintext"]) == b"\x10meshnode"
    datagram = seal_transport(inputs["counter"], plaintext)
    assert datagram == h(out["datagram"])
    assert datagram[:13] == h(out["header"])
    keepalive = seal_transport(inputs["keepalive_counter"], b"")
    assert keepalive == h(out["keepalive"])
    assert keepalive[:13] == h(out["keepalive_header"])


def test_transport_layout_and_aead() -> None:
    inputs, out = TRANS["inputs"], TRANS["outputs"]
    key, datagram = h(inputs["key"]), h(out["datagram"])
    assert len(datagram) == C.TRANSPORT_HEADER_BYTES + 9 + C.TAG_BYTES == 13 + 9 + 16
    assert datagram[0] == C.MSG_TRANSPORT == 0x04
    assert int.from_bytes(datagram[1:5], "big") == inputs["receiver_index"]
    assert int.from_bytes(datagram[5:13], "big") == inputs["counter"]
    # ChaCha20-Poly1305 (IETF), nonce = 4 zero bytes || counter as little-endian u64,
    # associated data = the 13-byte header. Checked with libsodium, not the package.
    nonce = bytes(4) + inputs["counter"].to_bytes(8, "little")
    assert nonce == h(out["nonce"])
    sealed = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        h(out["plaintext"]), datagram[:13], nonce, key
    )
    assert datagram[13:] == sealed
    keepalive = h(out["keepalive"])
    assert len(keepalive) == C.TRANSPORT_MIN_BYTES == 29
    # The responder opens with its receive key (= the initiator's send key).
    receiver = crypto.TransportCipher(h(RESP["outputs"]["responder_recv_key"]))
    assert receiver.open(inputs["counter"], datagram[13:], datagram[:13]) == h(out["plaintext"])
    assert receiver.open(0, keepalive[13:], keepalive[:13]) == b""
    assert messages.transport_header(inputs["receiver_index"], inputs["counter"]) == datagram[:13]


# --- (e) mac1, cookie reply, mac2 ---------------------------------------------------------


def test_mac1_vector() -> None:
    out = COOK["outputs"]
    spub = h(COOK["inputs"]["responder_static_public"])
    message = h(COOK["inputs"]["message"])
    assert message == h(INIT["outputs"]["message"])
    assert h(out["mac1_key"]) == crypto.hash_bytes(C.LABEL_MAC1 + spub, size=32)
    assert h(out["mac1_key"]) == blake2b(b"meshnode-mac1---" + spub, size=32)
    assert h(out["cookie_key"]) == blake2b(b"meshnode-cookie-" + spub, size=32)
    # mac1 covers every byte before it: the 205-byte body.
    assert h(out["mac1"]) == blake2b(message[:205], size=16, key=h(out["mac1_key"]))
    assert h(out["mac1"]) == crypto.mac(h(out["mac1_key"]), message[:-32])
    assert cookie.CookieChecker(spub, fixed_cookie_random).check_mac1(message)


def test_cookie_reply_vector() -> None:
    inputs, out = COOK["inputs"], COOK["outputs"]
    spub = h(inputs["responder_static_public"])
    source = (inputs["source_host"], inputs["source_port"])
    checker = cookie.CookieChecker(spub, fixed_cookie_random)
    reply = checker.create_reply(
        h(inputs["message"]), inputs["receiver_index"], source, inputs["now"]
    )
    assert reply == h(out["reply"])
    # Layout: type | receiver index | nonce | XChaCha20-Poly1305(cookie) (16 + 16 tag).
    assert len(reply) == C.COOKIE_REPLY_BYTES == 61
    assert reply[0] == C.MSG_COOKIE_REPLY == 0x03
    assert int.from_bytes(reply[1:5], "big") == INIT["inputs"]["sender_index"]
    assert cookie.parse_cookie_reply_index(reply) == inputs["receiver_index"]
    assert reply[5:29] == h(inputs["cookie_nonce"])
    # cookie = BLAKE2b-128 keyed with the secret over packed IPv4 (4) || port (2, big-endian).
    addr = ipaddress.ip_address(inputs["source_host"]).packed + (7520).to_bytes(2, "big")
    assert addr == cookie.addr_bytes(source) == h(out["source_addr_bytes"])
    assert h(out["cookie"]) == blake2b(addr, size=16, key=h(inputs["cookie_secret"]))
    opened = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        reply[29:], h(out["mac1"]), reply[5:29], h(out["cookie_key"])
    )
    assert opened == h(out["cookie"])


def test_mac2_vector() -> None:
    inputs, out = COOK["inputs"], COOK["outputs"]
    spub = h(inputs["responder_static_public"])
    source = (inputs["source_host"], inputs["source_port"])
    _, _, body, message = build_initiation()
    generator = cookie.CookieGenerator(spub)
    assert generator.add_macs(body, inputs["now"]) == message
    assert generator.consume_reply(h(out["reply"]), inputs["now"])
    with_mac2 = generator.add_macs(body, inputs["now"])
    assert with_mac2 == h(out["initiation_with_mac2"])
    assert with_mac2[:-16] == message[:-16]  # same body and mac1
    # mac2 = BLAKE2b-128 keyed with the cookie over everything before it (body || mac1).
    assert with_mac2[-16:] == h(out["mac2"])
    assert h(out["mac2"]) == blake2b(with_mac2[:-16], size=16, key=h(out["cookie"]))
    checker = cookie.CookieChecker(spub, fixed_cookie_random)
    checker.create_reply(message, inputs["receiver_index"], source, inputs["now"])
    assert checker.check_mac2(with_mac2, source, inputs["now"])
    assert not checker.check_mac2(with_mac2, (inputs["source_host"], 7521), inputs["now"])


def test_sizes() -> None:
    assert (C.INITIATION_BYTES, C.RESPONSE_BYTES, C.COOKIE_REPLY_BYTES) == (237, 185, 61)
    assert (C.TRANSPORT_HEADER_BYTES, C.TRANSPORT_MIN_BYTES) == (13, 29)
    assert (C.MAX_DATAGRAM_BYTES, C.MAX_PAYLOAD_BYTES) == (1452, 1422)
    assert C.MAX_DATAGRAM_BYTES == 1500 - 40 - 8
    assert C.PROTOCOL_NAME.decode() == V["protocol"]["noise_protocol_name"]
    assert h(V["protocol"]["prologue"]) == C.PROLOGUE == b"meshnode link v1"


# --- The documented bytes against a real LinkEndpoint ------------------------------------


class PinnedRandom:
    """``random_bytes`` for an endpoint: the first 4-byte draw is ``index`` (its next
    session index), 32 and 24 bytes are the vector's cookie secret and nonce, anything
    else comes from a fixed hash stream."""

    def __init__(self, index: int) -> None:
        self._index: bytes | None = index.to_bytes(4, "big")
        self._n = 0

    def __call__(self, n: int) -> bytes:
        if n == 4 and self._index is not None:
            out, self._index = self._index, None
            return out
        if n in (32, 24):
            return fixed_cookie_random(n)
        self._n += 1
        return hashlib.sha256(b"pinned" + self._n.to_bytes(8, "big")).digest()[:n]


def make_endpoint(ident: Identity, *, index: int, config: LinkConfig | None = None) -> LinkEndpoint:
    return LinkEndpoint(
        identity=ident,
        now=INIT["inputs"]["now"],
        wallclock_ns=lambda: INIT["inputs"]["timestamp_ns"],
        config=config,
        random_bytes=PinnedRandom(index),
    )


def events(ep: LinkEndpoint) -> list[LinkEvent]:
    out: list[LinkEvent] = []
    while (event := ep.next_event()) is not None:
        out.append(event)
    return out


def test_endpoint_answers_the_vector_initiation() -> None:
    """The real responder (random ephemeral) accepts the documented initiation."""
    now = INIT["inputs"]["now"]
    ep = LinkEndpoint(identity=responder_identity(), now=now, wallclock_ns=lambda: 0)
    ep.receive_datagram(h(INIT["outputs"]["message"]), ADDR, now)
    [(reply, dest)] = ep.datagrams_to_send()
    assert dest == ADDR
    assert len(reply) == C.RESPONSE_BYTES and reply[0] == C.MSG_RESPONSE
    assert int.from_bytes(reply[5:9], "big") == INIT["inputs"]["sender_index"]
    assert ep.stats["handshake.responded"] == 1
    assert not any(k.startswith("drop.") for k in ep.stats)
    # And it is a genuine answer: the vector's initiator state reads it.
    assert cookie.CookieChecker(h(IDENT["outputs"]["link_public"]), fixed_cookie_random).check_mac1(
        reply
    )
    hs, _, _, _ = build_initiation()
    payload, _ = hs.read_response(messages.decode_response(reply).noise)
    assert payload == h(RESP["outputs"]["payload"])


def test_endpoint_as_responder_produces_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """With its ephemeral key and index pinned, the responder sends the documented response
    and accepts the documented transport datagrams."""
    monkeypatch.setattr(
        endpoint_module,
        "ResponderHandshake",
        functools.partial(
            noise.ResponderHandshake,
            ephemeral_private=h(RESP["inputs"]["responder_ephemeral_private"]),
        ),
    )
    now = INIT["inputs"]["now"]
    ep = make_endpoint(responder_identity(), index=RESP["inputs"]["sender_index"])
    ep.register_kind(TRANS["inputs"]["kind"])
    ep.receive_datagram(h(INIT["outputs"]["message"]), ADDR, now)
    assert ep.datagrams_to_send() == [(h(RESP["outputs"]["message"]), ADDR)]
    assert events(ep) == []  # the session is `next` until the initiator confirms it
    ep.receive_datagram(h(TRANS["outputs"]["keepalive"]), ADDR, now)
    [est] = events(ep)
    assert isinstance(est, SessionEstablished) and not est.initiator
    assert est.node_id == h(IDENT["outputs"]["node_id"])
    assert est.identity_key == h(IDENT["outputs"]["identity_public"])
    ep.receive_datagram(h(TRANS["outputs"]["datagram"]), ADDR, now)
    [frame] = events(ep)
    assert isinstance(frame, FrameReceived)
    assert (frame.kind, frame.payload) == (TRANS["inputs"]["kind"], h(TRANS["inputs"]["payload"]))
    # The same datagram again is a replay.
    ep.receive_datagram(h(TRANS["outputs"]["datagram"]), ADDR, now)
    assert events(ep) == [] and ep.stats["drop.replay"] == 1


def test_endpoint_as_initiator_produces_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """With its ephemeral key, index and clock pinned, the initiator sends the documented
    initiation, accepts the documented response and confirms with the documented keepalive."""
    monkeypatch.setattr(
        endpoint_module,
        "InitiatorHandshake",
        functools.partial(
            noise.InitiatorHandshake,
            ephemeral_private=h(INIT["inputs"]["initiator_ephemeral_private"]),
        ),
    )
    now = INIT["inputs"]["now"]
    responder_addr = ("127.10.0.2", 7520)
    ep = make_endpoint(initiator_identity(), index=INIT["inputs"]["sender_index"])
    ep.register_kind(TRANS["inputs"]["kind"])
    responder_key = h(RESP_IDENT["outputs"]["link_public"])
    ep.connect(responder_key, responder_addr, now)
    assert ep.datagrams_to_send() == [(h(INIT["outputs"]["message"]), responder_addr)]
    ep.receive_datagram(h(RESP["outputs"]["message"]), responder_addr, now)
    [est] = events(ep)
    assert isinstance(est, SessionEstablished) and est.initiator
    assert est.node_id == h(RESP_IDENT["outputs"]["node_id"])
    assert ep.datagrams_to_send() == [(h(TRANS["outputs"]["keepalive"]), responder_addr)]
    # Counters 1..7: the seventh frame is the documented datagram.
    for _ in range(TRANS["inputs"]["counter"]):
        ep.send(responder_key, TRANS["inputs"]["kind"], h(TRANS["inputs"]["payload"]), now)
    sent = ep.datagrams_to_send()
    assert sent[-1] == (h(TRANS["outputs"]["datagram"]), responder_addr)


def test_endpoint_under_load_sends_the_vector_cookie_reply() -> None:
    """Under load, the responder answers the documented initiation with the documented
    cookie reply; the initiation with the documented mac2 gets past the cookie check and
    is then refused as a replay (its timestamp is not newer than the one accepted)."""
    now = INIT["inputs"]["now"]
    config = LinkConfig(handshake_rate_per_s=0.001, handshake_burst=1)
    ep = make_endpoint(responder_identity(), index=RESP["inputs"]["sender_index"], config=config)
    initiation = h(INIT["outputs"]["message"])
    ep.receive_datagram(initiation, ADDR, now)  # takes the only token: answered
    [(first, _)] = ep.datagrams_to_send()
    assert first[0] == C.MSG_RESPONSE
    ep.receive_datagram(initiation, ADDR, now)  # under load, mac2 is zero: cookie reply
    assert ep.datagrams_to_send() == [(h(COOK["outputs"]["reply"]), ADDR)]
    assert ep.stats["handshake.cookie_sent"] == 1
    ep.receive_datagram(h(COOK["outputs"]["initiation_with_mac2"]), ADDR, now)
    assert ep.datagrams_to_send() == []
    assert ep.stats["handshake.cookie_sent"] == 1
    assert ep.stats["drop.replayed_initiation"] == 1
