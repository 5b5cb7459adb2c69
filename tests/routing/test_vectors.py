"""The circuit vectors (tests/vectors/circuit.json), checked three ways.

1. The file is what tests/vectors/gen_circuit.py prints (it runs a ClientCircuit and
   three Relays end to end).
2. Every output is rebuilt from the JSON's inputs with the lower-level cores, step by
   step: create_build, process_build, start_reply / extend_reply, PendingBuild, the
   layers (ForwardLayer, BackwardRelay, BackwardOrigin, ClientCircuitCrypto), the message
   codec and destroy_cell. The random bytes each call takes come off the JSON's tapes,
   in order and at the exact sizes, so the tapes also pin what each core draws.
3. The constructions of docs/protocol.md §12 are recomputed without the package: the KDF
   with hashlib, the layers with `cryptography`'s ChaCha20-Poly1305 and ChaCha20, the
   record and status layouts byte by byte. And every hex value quoted in §12's code
   blocks is one of these vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshnode import crypto
from meshnode.identity import Identity
from routing.build import (
    BuildRecord,
    BuildStatus,
    HopSpec,
    HopStatus,
    create_build,
    extend_reply,
    process_build,
    start_reply,
)
from routing.cells import (
    BODY_BYTES,
    CELL_BYTES,
    HEADER_BYTES,
    Cell,
    CellType,
    Command,
    decode_message,
    encode_message,
)
from routing.keys import HopKeys, derive_hop_keys
from routing.onion import (
    BACKWARD_CAPACITY,
    BackwardOrigin,
    BackwardRelay,
    ClientCircuitCrypto,
    ForwardLayer,
    OnionError,
    capacity,
)
from routing.onionkeys import OnionKeyring
from routing.relay import CircuitClosed, CircuitData, Extend, Relay, SendCell, destroy_cell

REPO = Path(__file__).resolve().parents[2]
VECTORS_DIR = REPO / "tests" / "vectors"
V: dict[str, Any] = json.loads((VECTORS_DIR / "circuit.json").read_text(encoding="utf-8"))
INPUTS: dict[str, Any] = V["inputs"]
TIMES: dict[str, int] = INPUTS["times"]
U64 = 2**64
SLOT = 281
KEY_LABELS = {
    "record": b"record",
    "kf": b"forward",
    "kf_fill": b"forward-fill",
    "kb_seal": b"backward-seal",
    "kb_relay": b"backward-relay",
    "k_slots": b"build-slots",
    "k_reply": b"build-reply",
}


def h(text: str) -> bytes:
    return bytes.fromhex(text)


class Tape:
    """``random_bytes`` from one of the JSON's tapes: chunks in order, exact sizes."""

    def __init__(self, name: str, start: int = 0, stop: int | None = None) -> None:
        chunks = INPUTS["random"][name][start:stop]
        self.name = name
        self.chunks = [(c["use"], h(c["hex"])) for c in chunks]
        self.taken = 0

    def __call__(self, n: int) -> bytes:
        assert self.taken < len(self.chunks), f"{self.name}: {n} bytes past the tape"
        use, data = self.chunks[self.taken]
        assert len(data) == n, f"{self.name}: asked {n} bytes, next is {use} ({len(data)})"
        self.taken += 1
        return data

    @property
    def used_up(self) -> bool:
        return self.taken == len(self.chunks)


def chunk(name: str, use: str) -> bytes:
    """The tape chunk of ``name`` whose use is ``use``."""
    (found,) = [h(c["hex"]) for c in INPUTS["random"][name] if c["use"] == use]
    return found


def spec(i: int) -> HopSpec:
    """Hop ``i`` (1-based) as the client knows it, from the inputs."""
    inputs = V["nodes"][f"hop{i}"]["inputs"]
    ident = Identity(
        identity_seed=h(inputs["identity_seed"]), link_private=h(inputs["link_private"])
    )
    return HopSpec(
        node_id=ident.node_id,
        link_key=ident.link_public,
        onion_key=crypto.x25519_public_from_private(h(inputs["onion_private"])),
        address=(inputs["host"], inputs["port"]),
    )


def keyring(i: int) -> OnionKeyring:
    """Hop ``i``'s onion keys, from the first two chunks of its tape."""
    return OnionKeyring.generate(now=TIMES["keyrings"], random_bytes=Tape(f"hop{i}", 0, 2))


def link_key(name: str) -> bytes:
    return h(V["nodes"][name]["outputs"]["link_public"])


def keys(i: int) -> HopKeys:
    """Hop ``i``'s keys as the JSON gives them."""
    k = V["hops"][i - 1]["keys"]
    return HopKeys(
        record=h(k["record"]),
        kf=h(k["kf"]),
        kf_fill=h(k["kf_fill"]),
        kb_seal=h(k["kb_seal"]),
        kb_relay=h(k["kb_relay"]),
        k_slots=h(k["k_slots"]),
        k_reply=h(k["k_reply"]),
        off_f=int(k["off_f"], 16),
        off_b=int(k["off_b"], 16),
    )


def cells(name: str) -> list[Cell]:
    """The cells of vector ``name`` in the order they travel."""
    return [
        Cell(int(c["circ_id"], 16), CellType(c["type"]), c["seq"], h(c["body"]))
        for c in V[name]["cells"]
    ]


def nonce(seq: int) -> bytes:
    return bytes(4) + seq.to_bytes(8, "big")


def aead_open(key: bytes, seq: int, body: bytes) -> bytes:
    """The layer's plaintext, opened with `cryptography` directly: body = tag || ct."""
    return ChaCha20Poly1305(key).decrypt(nonce(seq), body[16:] + body[:16], None)


def keystream(key: bytes, nonce12: bytes, n: int) -> bytes:
    """IETF ChaCha20 from block 0 (`cryptography` takes counter_le32 || nonce)."""
    cipher = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce12), mode=None)
    return cipher.encryptor().update(bytes(n))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _load_generator() -> Any:
    spec_ = importlib.util.spec_from_file_location("gen_circuit", VECTORS_DIR / "gen_circuit.py")
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


# --- The file ----------------------------------------------------------------------------


def test_vector_file_is_what_the_generator_prints() -> None:
    assert _load_generator().build() == V


def test_vector_nodes() -> None:
    client = V["nodes"]["client"]
    assert (
        crypto.x25519_public_from_private(h(client["inputs"]["link_private"])).hex()
        == client["outputs"]["link_public"]
    )
    for i in (1, 2, 3):
        node = V["nodes"][f"hop{i}"]
        hop = spec(i)
        assert hop.node_id.hex() == node["outputs"]["node_id"]
        assert hop.link_key.hex() == node["outputs"]["link_public"]
        assert hop.onion_key.hex() == node["outputs"]["onion_public"]
        assert keyring(i).publics() == (
            h(node["outputs"]["onion_public"]),
            h(node["outputs"]["next_onion_public"]),
        )


def test_every_cell_is_a_whole_cell_with_its_header() -> None:
    seen_ids: dict[int, str] = {}
    for name in ("build", "build_reply", "data", "probe", "probe_reply", "data_reply", "destroy"):
        for c in V[name]["cells"]:
            circ_id, seq, body = h(c["circ_id"]), c["seq"], h(c["body"])
            header = circ_id + bytes([c["type"]]) + seq.to_bytes(8, "big")
            assert c["header"] == header.hex()
            assert len(header) == HEADER_BYTES and len(body) == BODY_BYTES
            cell = Cell.decode(header + body)
            assert len(cell.encode()) == CELL_BYTES
            assert (cell.circ_id, cell.type.value, cell.seq) == (
                int(c["circ_id"], 16),
                c["type"],
                seq,
            )
            # One circ_id per link, the same for every cell of the circuit on it.
            assert seen_ids.setdefault(c["link"], c["circ_id"]) == c["circ_id"]
    assert len(set(seen_ids.values())) == 3
    # BUILD, BUILD_REPLY and DESTROY carry seq 0.
    for name in ("build", "build_reply", "destroy"):
        assert all(c["seq"] == 0 for c in V[name]["cells"])


# --- Keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [1, 2, 3])
def test_hop_keys(i: int) -> None:
    hop = V["hops"][i - 1]
    eph_private = h(INPUTS["ephemeral_privates"][i - 1])
    onion_private = h(V["nodes"][f"hop{i}"]["inputs"]["onion_private"])
    eph = crypto.x25519_public_from_private(eph_private)
    onion = spec(i).onion_key
    shared = crypto.x25519_shared(eph_private, onion)
    assert shared is not None
    assert crypto.x25519_shared(onion_private, eph) == shared  # what the hop computes
    assert (eph.hex(), shared.hex()) == (hop["ephemeral_public"], hop["shared"])
    assert derive_hop_keys(shared, eph, onion) == keys(i)
    # The KDF of §12.3 with hashlib alone.
    secret = hashlib.blake2b(
        b"meshnode/circuit/v1\0" + shared + eph + onion, digest_size=32
    ).digest()
    assert secret.hex() == hop["kdf_secret"]
    for name, label in KEY_LABELS.items():
        assert hashlib.blake2b(label, key=secret, digest_size=32).hexdigest() == hop["keys"][name]
    offsets = hashlib.blake2b(b"offsets", key=secret, digest_size=16).digest()
    assert (offsets[:8].hex(), offsets[8:].hex()) == (hop["keys"]["off_f"], hop["keys"]["off_b"])


# --- Build -------------------------------------------------------------------------------


def test_build_body_from_the_client() -> None:
    tape = Tape("client", 0, 8)  # 3 x (ephemeral key, record filler), 2 random slots
    body, pending = create_build(
        [spec(i) for i in (1, 2, 3)], now=TIMES["build"], random_bytes=tape
    )
    assert tape.used_up
    assert body.hex() == V["build"]["cells"][0]["body"]
    assert list(pending.keys) == [keys(i) for i in (1, 2, 3)]
    # The circ_id on link 1 is the client's next 4 random bytes (ClientCircuit).
    assert V["build"]["cells"][0]["circ_id"] == chunk("client", "circ_id on link 1").hex()
    # Slots 4 and 5 are the random ones, as drawn; 4 zero bytes close the body.
    assert body[3 * SLOT : 4 * SLOT] == chunk("client", "random slot 3 of the BUILD")
    assert body[4 * SLOT : 5 * SLOT] == chunk("client", "random slot 4 of the BUILD")
    assert body[5 * SLOT :] == bytes(4)


@pytest.mark.parametrize("i", [1, 2, 3])
def test_build_at_each_hop(i: int) -> None:
    build = cells("build")
    body = build[i - 1].body
    record = V["build"]["records"][i - 1]
    # Slot 0 as hop i reads it: eph || sealed record || 16 ignored bytes.
    slot = body[:SLOT]
    assert record["slot"] == slot.hex()
    eph, sealed, ignored = slot[:32], slot[32:265], slot[265:]
    assert eph.hex() == V["hops"][i - 1]["ephemeral_public"]
    assert ignored == chunk("client", f"ignored bytes of hop {i}'s record slot")
    plain = ChaCha20Poly1305(keys(i).record).decrypt(bytes(12), sealed, eph)
    assert plain.hex() == record["plaintext"]
    # The record's fields byte by byte (§12.7).
    version, flags, node_id, link, address, port, timestamp = struct.unpack(
        "!BB20s32s16sHQ", plain[:80]
    )
    assert (version, flags, port, timestamp) == (
        record["version"], record["flags"], record["next_port"], record["timestamp"],
    )  # fmt: skip
    assert (node_id.hex(), link.hex(), address.hex()) == (
        record["next_node_id"], record["next_link_key"], record["next_address"],
    )  # fmt: skip
    assert plain[80:] == bytes(137)
    assert timestamp == TIMES["build"]
    decoded = BuildRecord.decode(plain)
    if i < 3:
        assert decoded.next_hop == spec(i + 1).next_hop()
        assert flags == 0
    else:
        assert decoded.next_hop is None
        assert flags == 1 and plain[2:72] == bytes(70)
    # The hop's real code: process_build with its keyring and the rest of its tape.
    tape = Tape(f"hop{i}", 2, 3)  # the random slot it appends (none at the last hop)
    result = process_build(body, keyring(i), now=TIMES[f"build_at_hop{i}"], random_bytes=tape)
    assert result.keys == keys(i)
    assert result.timestamp == TIMES["build"]
    assert result.onion_key == spec(i).onion_key
    if i == 3:
        assert result.out_body is None and result.next_hop is None
        assert tape.taken == 0
        return
    assert tape.used_up
    assert result.next_hop == spec(i + 1).next_hop()
    out = build[i].body
    assert result.out_body == out
    # The forwarded body: slots 1-4 under the slot keystream, a random slot, 4 zeros.
    assert out[: 4 * SLOT] == xor(
        body[SLOT : 5 * SLOT], keystream(keys(i).k_slots, bytes(12), 4 * SLOT)
    )
    assert out[4 * SLOT : 5 * SLOT] == chunk(
        f"hop{i}", f"random slot 4 of the BUILD on link {i + 1}"
    )
    assert out[5 * SLOT :] == bytes(4)
    assert V["build"]["cells"][i]["circ_id"] == chunk(f"hop{i}", f"circ_id on link {i + 1}").hex()


def test_build_reply_hop_by_hop() -> None:
    replies = cells("build_reply")  # link 3, 2, 1
    tape = Tape("hop3", 2)
    body = start_reply(keys(3), BuildStatus.OK, now=TIMES["build_at_hop3"], random_bytes=tape)
    assert tape.used_up
    assert body == replies[0].body
    assert body[SLOT : 5 * SLOT] == chunk("hop3", "random slots 1-4 of the BUILD_REPLY")
    for n, reply in enumerate(replies):  # each hop's own status leads the reply it sends
        assert reply.body[:SLOT].hex() == V["build_reply"]["statuses"][2 - n]["sealed"]
    for hop, at, expected in ((2, "reply_at_hop2", replies[1]), (1, "reply_at_hop1", replies[2])):
        passed = extend_reply(keys(hop), body, BuildStatus.OK, now=TIMES[at])
        assert passed == expected.body
        # Shifted right by one slot, masked with ChaCha20(k_reply, nonce 2), 4 zeros.
        mask = keystream(keys(hop).k_reply, (2).to_bytes(12, "big"), 4 * SLOT)
        assert passed[SLOT : 5 * SLOT] == xor(body[: 4 * SLOT], mask)
        assert passed[5 * SLOT :] == bytes(4)
        body = passed


def test_build_reply_at_the_client() -> None:
    body = cells("build_reply")[-1].body
    tape = Tape("client", 0, 8)
    _, pending = create_build([spec(i) for i in (1, 2, 3)], now=TIMES["build"], random_bytes=tape)
    statuses = V["build_reply"]["statuses"]
    assert pending.read_reply(body) == [HopStatus(s["status"], s["timestamp"]) for s in statuses]
    assert pending.finish(body) == [keys(i) for i in (1, 2, 3)]
    # By hand: slot j on link 1 is hop j's sealed status under the reply keystreams of
    # the hops before it (chunk j-1-m of hop m's), opened under nonce 1.
    streams = [keystream(keys(m).k_reply, (2).to_bytes(12, "big"), 4 * SLOT) for m in (1, 2)]
    for j, status in enumerate(statuses):
        slot = body[j * SLOT : (j + 1) * SLOT]
        for m in range(j):
            k = j - 1 - m
            slot = xor(slot, streams[m][k * SLOT : (k + 1) * SLOT])
        assert slot.hex() == status["sealed"]  # as hop j+1 wrote it in slot 0
        plain = ChaCha20Poly1305(keys(j + 1).k_reply).decrypt((1).to_bytes(12, "big"), slot, None)
        assert plain[:9].hex() == status["record"]
        assert plain == bytes([status["status"]]) + status["timestamp"].to_bytes(8, "big") + bytes(
            256
        )


# --- Layers ------------------------------------------------------------------------------


def forward_by_hand(i: int, seq: int, body: bytes) -> tuple[int, bytes] | bytes:
    """Hop i's forward layer without the package: (next seq, next body) or the message."""
    pt = aead_open(keys(i).kf, seq, body)
    if pt[:16] == bytes(16):
        return pt[16:]
    filler = hashlib.blake2b(seq.to_bytes(8, "big"), key=keys(i).kf_fill, digest_size=16).digest()
    return (seq - keys(i).off_f) % U64, pt + filler


def test_data_to_the_exit() -> None:
    data = h(INPUTS["data"])
    links = cells("data")
    client = ClientCircuitCrypto([keys(i) for i in (1, 2, 3)])
    message = encode_message(Command.DATA, data, capacity(3))
    assert client.wrap_forward(3, message) == (links[0].seq, links[0].body)
    assert links[0].seq == 1
    for i in (1, 2):
        layer = ForwardLayer(keys(i))
        result = layer.process(links[i - 1].seq, links[i - 1].body)
        assert result == ("forward", links[i].seq, links[i].body)
        assert forward_by_hand(i, links[i - 1].seq, links[i - 1].body) == (
            links[i].seq,
            links[i].body,
        )
        with pytest.raises(OnionError, match="replay"):
            layer.process(links[i - 1].seq, links[i - 1].body)
    result = ForwardLayer(keys(3)).process(links[2].seq, links[2].body)
    assert result[0] == "deliver"
    delivered = result[1]
    assert forward_by_hand(3, links[2].seq, links[2].body) == delivered
    assert delivered.hex() == V["data"]["delivered"]
    for filler in V["data"]["fillers"]:  # what hops 1 and 2 appended
        i = filler["hop"]
        assert filler["seq"] == links[i - 1].seq
        assert links[i].body[-16:].hex() == filler["filler"]
    assert decode_message(delivered) == (Command.DATA, data)
    # cmd || len || data || zeros, then the 32-byte tail the fillers of hops 1, 2 made.
    assert delivered[:3] == bytes([Command.DATA]) + len(data).to_bytes(2, "big")
    assert delivered[3 : 3 + len(data)] == data
    assert delivered[3 + len(data) : -32] == bytes(len(delivered) - 35 - len(data))
    # A tampered cell fails at hop 1, whatever byte was changed.
    tampered = bytearray(links[0].body)
    tampered[-1] ^= 1
    with pytest.raises(OnionError, match="bad_tag"):
        ForwardLayer(keys(1)).process(links[0].seq, bytes(tampered))


def test_probe_and_its_reply() -> None:
    probe = V["probe"]
    hop = probe["hop"]
    assert hop == 2
    probe_data = h(probe["data"])
    assert probe_data == h(probe["nonce"]) + probe["timestamp_us"].to_bytes(8, "big")
    assert probe["nonce"] == chunk("client", "probe nonce").hex()
    assert probe["timestamp_us"] == TIMES["probe"] * 1_000_000
    links = cells("probe")
    client = ClientCircuitCrypto([keys(i) for i in (1, 2, 3)])
    client.wrap_forward(3, encode_message(Command.DATA, h(INPUTS["data"]), capacity(3)))  # seq 1
    message = encode_message(Command.PROBE, probe_data, capacity(hop))
    assert client.wrap_forward(hop, message) == (2, links[0].body)
    assert links[0].seq == 2
    assert ForwardLayer(keys(1)).process(links[0].seq, links[0].body) == (
        "forward", links[1].seq, links[1].body,
    )  # fmt: skip
    result = ForwardLayer(keys(2)).process(links[1].seq, links[1].body)
    assert result[0] == "deliver"
    assert decode_message(result[1]) == (Command.PROBE, probe_data)
    # Hop 2 answers with its own backward key, counter 1; hop 1 relays it.
    back = cells("probe_reply")  # link 2, link 1
    reply = encode_message(Command.PROBE_REPLY, probe_data, BACKWARD_CAPACITY)
    assert BackwardOrigin(keys(2)).seal(reply) == (1, back[0].body)
    assert back[0].seq == 1
    assert BackwardRelay(keys(1)).relay(back[0].seq, back[0].body) == (back[1].seq, back[1].body)
    assert back[1].seq == (1 + keys(1).off_b) % U64
    assert back[1].body == xor(back[0].body, keystream(keys(1).kb_relay, nonce(1), BODY_BYTES))
    assert client.unwrap_backward(back[1].seq, back[1].body) == (2, reply)
    assert aead_open(keys(2).kb_seal, 1, back[0].body) == reply
    assert reply[:19] == bytes([Command.PROBE_REPLY]) + (16).to_bytes(2, "big") + probe_data
    with pytest.raises(OnionError, match="replay"):
        client.unwrap_backward(back[1].seq, back[1].body)


def test_data_from_the_exit() -> None:
    data = h(INPUTS["data_reply"])
    back = cells("data_reply")  # link 3, 2, 1
    message = encode_message(Command.DATA, data, BACKWARD_CAPACITY)
    assert BackwardOrigin(keys(3)).seal(message) == (1, back[0].body)
    for i, (into, out) in ((2, (back[0], back[1])), (1, (back[1], back[2]))):
        assert BackwardRelay(keys(i)).relay(into.seq, into.body) == (out.seq, out.body)
        assert out.seq == (into.seq + keys(i).off_b) % U64
        assert out.body == xor(into.body, keystream(keys(i).kb_relay, nonce(into.seq), BODY_BYTES))
    client = ClientCircuitCrypto([keys(i) for i in (1, 2, 3)])
    origin, plain = client.unwrap_backward(back[2].seq, back[2].body)
    assert origin == 3
    assert decode_message(plain) == (Command.DATA, data)
    # The client's depth search by hand: strip hop 1's and hop 2's keystreams, open.
    seq2 = (back[2].seq - keys(1).off_b) % U64
    seq3 = (seq2 - keys(2).off_b) % U64
    assert (seq2, seq3) == (back[1].seq, back[0].seq)
    assert aead_open(keys(3).kb_seal, seq3, back[0].body) == plain


def test_destroy() -> None:
    destroys = cells("destroy")
    reason = V["destroy"]["reason"]
    assert reason == INPUTS["destroy_reason"] == 1
    first = destroy_cell(destroys[0].circ_id, reason, Tape("client", 10))
    assert first == destroys[0]
    assert first.body == bytes([reason]) + chunk("client", "DESTROY filler on link 1")
    for i in (1, 2):
        assert destroys[i].body == bytes([reason]) + chunk(
            f"hop{i}", f"DESTROY filler on link {i + 1}"
        )


# --- The relays on the vectors' cells -----------------------------------------------------


def test_relays_process_the_vector_cells() -> None:
    """Three relays, each fed only the vector cells addressed to it (from the JSON, not
    from each other), send exactly the vector cells on, and nothing else."""
    tapes = {f"hop{i}": Tape(f"hop{i}", 2) for i in (1, 2, 3)}
    relays = {
        f"hop{i}": Relay(keyring(i), random_bytes=tapes[f"hop{i}"], link_key=spec(i).link_key)
        for i in (1, 2, 3)
    }

    def deliver(name: str, n: int, at: int) -> list[Extend | SendCell]:
        c = V[name]["cells"][n]
        relay = relays[c["to"]]
        relay.receive(link_key(c["from"]), cells(name)[n], at)
        return relay.cells_to_send()

    def sends(outs: list[Extend | SendCell], name: str, n: int) -> None:
        (out,) = outs
        c = V[name]["cells"][n]
        peer = out.next_hop.link_key if isinstance(out, Extend) else out.peer
        assert isinstance(out, Extend) == (name == "build")
        assert (peer, out.cell) == (link_key(c["to"]), cells(name)[n])

    sends(deliver("build", 0, TIMES["build_at_hop1"]), "build", 1)
    sends(deliver("build", 1, TIMES["build_at_hop2"]), "build", 2)
    sends(deliver("build", 2, TIMES["build_at_hop3"]), "build_reply", 0)
    sends(deliver("build_reply", 0, TIMES["reply_at_hop2"]), "build_reply", 1)
    sends(deliver("build_reply", 1, TIMES["reply_at_hop1"]), "build_reply", 2)
    sends(deliver("data", 0, TIMES["data"]), "data", 1)
    sends(deliver("data", 1, TIMES["data"]), "data", 2)
    assert deliver("data", 2, TIMES["data"]) == []
    event = relays["hop3"].next_event()
    assert isinstance(event, CircuitData)
    assert event.data == h(INPUTS["data"])
    sends(deliver("probe", 0, TIMES["probe"]), "probe", 1)
    sends(deliver("probe", 1, TIMES["probe"]), "probe_reply", 0)
    sends(deliver("probe_reply", 0, TIMES["probe"]), "probe_reply", 1)
    assert relays["hop3"].send_data(event.handle, h(INPUTS["data_reply"]))
    sends(relays["hop3"].cells_to_send(), "data_reply", 0)
    sends(deliver("data_reply", 0, TIMES["data_reply"]), "data_reply", 1)
    sends(deliver("data_reply", 1, TIMES["data_reply"]), "data_reply", 2)
    sends(deliver("destroy", 0, TIMES["destroy"]), "destroy", 1)
    sends(deliver("destroy", 1, TIMES["destroy"]), "destroy", 2)
    assert deliver("destroy", 2, TIMES["destroy"]) == []
    assert relays["hop3"].next_event() == CircuitClosed(event.handle, 1)
    for relay in relays.values():
        assert relay.circuit_count == 0
        assert not {k: v for k, v in relay.stats.items() if k.startswith("relay.drop.") and v}
    assert all(tape.used_up for tape in tapes.values())


# --- The document --------------------------------------------------------------------------


def test_protocol_md_quotes_the_vectors() -> None:
    """Every hex value in the code blocks of docs/protocol.md §12 is in circuit.json."""
    text = (REPO / "docs" / "protocol.md").read_text("utf-8")
    section = text[text.index("## 12. Circuits") :]
    known = json.dumps(V)
    checked = 0
    for block in section.split("```")[1::2]:
        for line in block.splitlines():
            value = line.rsplit("= ", 1)[-1].strip() if "= " in line else line.strip()
            value = value.split()[0] if value else value
            if len(value) >= 8 and all(c in "0123456789abcdef" for c in value):
                assert value in known, line
                checked += 1
    assert checked > 40
