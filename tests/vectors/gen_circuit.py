"""Print the circuit test vectors (tests/vectors/circuit.json) as JSON on stdout.

Run by hand from the repository root when the circuit wire format changes on purpose::

    .venv/bin/python tests/vectors/gen_circuit.py > tests/vectors/circuit.json

One 3-hop circuit, worked through end to end by the real cores: a client
(:class:`routing.circuit.ClientCircuit`) and three :class:`routing.relay.Relay` objects,
with cells carried between them by hand. It builds (BUILD out, BUILD_REPLY back), sends
DATA to the exit, probes hop 2, gets DATA back from the exit, and is destroyed.

Every input is fixed: identities and onion keys come from fixed seeds (byte ``0xNM``
repeated 32 times), the clocks are fixed Unix seconds, and every ``random_bytes`` the
cores call is a :class:`Tape`: a list of chunks handed out in order, each the exact size
the code asks for (a call of another size fails, so the tape also pins which random
bytes the code draws, and where). The client's three ephemeral X25519 private keys and
the hops' onion private keys are fixed bytes on the tapes; the other chunks (record
fillers, random slots, circ_ids, a probe nonce, DESTROY fillers) are SHA-256 in counter
mode (as tests/conftest.py's DeterministicBytes) over a label naming their use. The
tapes are written out in the JSON, so no reader needs this file to get the inputs.

tests/routing/test_vectors.py checks that this prints circuit.json, then rebuilds every
output from the JSON's inputs with the lower-level cores (create_build, process_build,
start_reply / extend_reply, ForwardLayer, BackwardRelay, BackwardOrigin,
ClientCircuitCrypto), recomputes the key derivation, the layers and the filler with
hashlib and `cryptography` directly, and drives a ClientCircuit and the relays over the
cells. docs/protocol.md §12 walks through the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from meshnode import crypto
from meshnode.identity import Identity
from routing.build import HopSpec
from routing.cells import HEADER_BYTES, Cell
from routing.circuit import (
    CircuitOpened,
    ClientCircuit,
    DataReceived,
    ProbeReplied,
)
from routing.keys import HopKeys, derive_hop_keys
from routing.onionkeys import OnionKeyring
from routing.relay import CircuitData, DestroyReason, Extend, Relay, RelayOutput, SendCell

# --- Inputs (fixed bytes) ----------------------------------------------------------------

STREAM_DOMAIN = b"meshnode/vectors/circuit/"

CLIENT: dict[str, Any] = {
    "identity_seed": (b"\xc1" * 32).hex(),
    "link_private": (b"\xc2" * 32).hex(),
}
HOPS: list[dict[str, Any]] = [
    {
        "identity_seed": (b"\x11" * 32).hex(),
        "link_private": (b"\x12" * 32).hex(),
        "onion_private": (b"\x13" * 32).hex(),
        "next_onion_private": (b"\x14" * 32).hex(),
        "host": "192.0.2.1",
        "port": 7001,
    },
    {
        "identity_seed": (b"\x21" * 32).hex(),
        "link_private": (b"\x22" * 32).hex(),
        "onion_private": (b"\x23" * 32).hex(),
        "next_onion_private": (b"\x24" * 32).hex(),
        "host": "2001:db8::2",
        "port": 7002,
    },
    {
        "identity_seed": (b"\x31" * 32).hex(),
        "link_private": (b"\x32" * 32).hex(),
        "onion_private": (b"\x33" * 32).hex(),
        "next_onion_private": (b"\x34" * 32).hex(),
        "host": "198.51.100.3",
        "port": 7003,
    },
]
EPHEMERAL_PRIVATES = [(bytes([0xE0 + i]) * 32).hex() for i in (1, 2, 3)]

T0 = 1_700_000_000  # the client's clock when it builds: the records' timestamp
TIMES = {
    "keyrings": T0 - 3600,  # when the hops' onion keys were made
    "build": T0,  # the client seals the BUILD
    "build_at_hop1": T0 + 1,
    "build_at_hop2": T0 + 2,
    "build_at_hop3": T0 + 3,  # the last hop answers at once
    "reply_at_hop2": T0 + 4,
    "reply_at_hop1": T0 + 5,
    "reply_at_client": T0 + 6,
    "data": T0 + 10,  # the client's DATA, carried to the exit at this time
    "probe": T0 + 20,  # the client's PROBE to hop 2 and its reply
    "data_reply": T0 + 30,  # the exit's DATA back to the client
    "destroy": T0 + 40,
}
DATA = b"meshnode circuit vector: client to exit"
DATA_REPLY = b"meshnode circuit vector: exit to client"
PROBE_HOP = 2
DESTROY_REASON = DestroyReason.REQUESTED

# Chunk sizes the cores ask for.
_KEY = 32
_RECORD_FILLER = 16
_SLOT = 281
_CIRC_ID = 4
_PROBE_NONCE = 8
_DESTROY_FILLER = 1408
_REPLY_SLOTS = 4 * _SLOT


def stream(label: str, n: int) -> bytes:
    """``n`` bytes of SHA-256 in counter mode: ``sha256(domain || label || counter_be64)``."""
    seed = STREAM_DOMAIN + label.encode()
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return out[:n]


def tape_chunks() -> dict[str, list[tuple[str, bytes]]]:
    """Every party's random bytes, in the order its code asks for them."""
    client: list[tuple[str, bytes]] = []
    for i in (1, 2, 3):  # create_build: per hop, the ephemeral key, then the record filler
        client.append(
            (f"ephemeral private key for hop {i}", bytes.fromhex(EPHEMERAL_PRIVATES[i - 1]))
        )
        filler = stream(f"client/record-filler/{i}", _RECORD_FILLER)
        client.append((f"ignored bytes of hop {i}'s record slot", filler))
    for slot in (3, 4):  # create_build: the slots no hop reads (slots are numbered from 0)
        client.append((f"random slot {slot} of the BUILD", stream(f"client/slot/{slot}", _SLOT)))
    client.append(("circ_id on link 1", stream("client/circ-id", _CIRC_ID)))  # ClientCircuit
    client.append(("probe nonce", stream("client/probe-nonce", _PROBE_NONCE)))
    client.append(("DESTROY filler on link 1", stream("client/destroy", _DESTROY_FILLER)))
    tapes = {"client": client}
    for i, hop in enumerate(HOPS, start=1):
        name = f"hop{i}"
        chunks = [  # OnionKeyring.generate: current, then next
            ("onion private key (current)", bytes.fromhex(hop["onion_private"])),
            ("onion private key (next)", bytes.fromhex(hop["next_onion_private"])),
        ]
        if i < len(HOPS):  # process_build's random slot, Relay._fresh_id, a DESTROY on
            link = i + 1
            chunks.append(
                (f"random slot 4 of the BUILD on link {link}", stream(f"{name}/slot", _SLOT))
            )
            chunks.append((f"circ_id on link {link}", stream(f"{name}/circ-id", _CIRC_ID)))
            chunks.append(
                (f"DESTROY filler on link {link}", stream(f"{name}/destroy", _DESTROY_FILLER))
            )
        else:  # start_reply: the four slots after the last hop's status
            slots = stream(f"{name}/reply-slots", _REPLY_SLOTS)
            chunks.append(("random slots 1-4 of the BUILD_REPLY", slots))
        tapes[name] = chunks
    return tapes


class Tape:
    """A ``random_bytes`` that hands out fixed chunks in order; a call of the wrong size,
    or past the end, is an error (the vectors pin what the code draws)."""

    def __init__(self, name: str, chunks: list[tuple[str, bytes]]) -> None:
        self.name = name
        self._chunks = list(chunks)
        self._next = 0

    def __call__(self, n: int) -> bytes:
        if self._next >= len(self._chunks):
            raise AssertionError(f"{self.name}: {n} bytes asked past the end of the tape")
        use, data = self._chunks[self._next]
        if len(data) != n:
            raise AssertionError(f"{self.name}: {n} bytes asked, next is {use} ({len(data)})")
        self._next += 1
        return data

    @property
    def used_up(self) -> bool:
        return self._next == len(self._chunks)


def tapes_from(random: dict[str, list[dict[str, str]]]) -> dict[str, Tape]:
    """The tapes the JSON ``inputs.random`` lists."""
    return {
        name: Tape(name, [(c["use"], bytes.fromhex(c["hex"])) for c in chunks])
        for name, chunks in random.items()
    }


def identity_from(inputs: dict[str, Any]) -> Identity:
    return Identity(
        identity_seed=bytes.fromhex(inputs["identity_seed"]),
        link_private=bytes.fromhex(inputs["link_private"]),
    )


def hop_spec(inputs: dict[str, Any]) -> HopSpec:
    ident = identity_from(inputs)
    onion = crypto.x25519_public_from_private(bytes.fromhex(inputs["onion_private"]))
    return HopSpec(
        node_id=ident.node_id,
        link_key=ident.link_public,
        onion_key=onion,
        address=(inputs["host"], inputs["port"]),
    )


# --- Outputs -------------------------------------------------------------------------------


def keys_out(keys: HopKeys) -> dict[str, str]:
    return {
        "record": keys.record.hex(),
        "kf": keys.kf.hex(),
        "kf_fill": keys.kf_fill.hex(),
        "kb_seal": keys.kb_seal.hex(),
        "kb_relay": keys.kb_relay.hex(),
        "k_slots": keys.k_slots.hex(),
        "k_reply": keys.k_reply.hex(),
        "off_f": keys.off_f.to_bytes(8, "big").hex(),
        "off_b": keys.off_b.to_bytes(8, "big").hex(),
    }


def cell_out(link: int, sender: str, receiver: str, cell: Cell) -> dict[str, Any]:
    header = cell.encode()[:HEADER_BYTES]
    return {
        "link": link,
        "from": sender,
        "to": receiver,
        "circ_id": cell.circ_id.to_bytes(4, "big").hex(),
        "type": cell.type.value,
        "seq": cell.seq,
        "header": header.hex(),
        "body": cell.body.hex(),
    }


def record_out(plain: bytes) -> dict[str, Any]:
    return {
        "plaintext": plain.hex(),
        "version": plain[0],
        "flags": plain[1],
        "next_node_id": plain[2:22].hex(),
        "next_link_key": plain[22:54].hex(),
        "next_address": plain[54:70].hex(),
        "next_port": int.from_bytes(plain[70:72], "big"),
        "timestamp": int.from_bytes(plain[72:80], "big"),
    }


def hop_keys(index: int) -> tuple[bytes, bytes, HopKeys]:
    """(eph public, shared secret, keys) of hop ``index`` (0-based), from the inputs."""
    eph_private = bytes.fromhex(EPHEMERAL_PRIVATES[index])
    eph = crypto.x25519_public_from_private(eph_private)
    onion = crypto.x25519_public_from_private(bytes.fromhex(HOPS[index]["onion_private"]))
    shared = crypto.x25519_shared(eph_private, onion)
    assert shared is not None
    return eph, shared, derive_hop_keys(shared, eph, onion)


def layer_nonce(seq: int) -> bytes:
    return bytes(4) + seq.to_bytes(8, "big")


def only(outputs: list[RelayOutput]) -> RelayOutput:
    assert len(outputs) == 1, outputs
    return outputs[0]


def build() -> dict[str, Any]:
    chunks = tape_chunks()
    tapes = {name: Tape(name, c) for name, c in chunks.items()}
    client_id = identity_from(CLIENT)
    specs = [hop_spec(h) for h in HOPS]
    names = ["client", "hop1", "hop2", "hop3"]
    keys_of_link = [client_id.link_public, *(s.link_key for s in specs)]  # index = node
    relays = []
    for i, spec in enumerate(specs, start=1):
        ring = OnionKeyring.generate(now=TIMES["keyrings"], random_bytes=tapes[f"hop{i}"])
        assert ring.publics()[0] == spec.onion_key
        relays.append(Relay(ring, random_bytes=tapes[f"hop{i}"], link_key=spec.link_key))

    # --- Build: BUILD hop by hop, BUILD_REPLY back ----------------------------------------
    circuit = ClientCircuit(specs, now=TIMES["build"], random_bytes=tapes["client"])
    build_cells = [circuit.build_cell()]
    for i in (1, 2):
        relays[i - 1].receive(keys_of_link[i - 1], build_cells[-1], TIMES[f"build_at_hop{i}"])
        extend = only(relays[i - 1].cells_to_send())
        assert isinstance(extend, Extend)
        assert extend.next_hop == specs[i].next_hop()
        build_cells.append(extend.cell)
    relays[2].receive(keys_of_link[2], build_cells[2], TIMES["build_at_hop3"])
    reply = only(relays[2].cells_to_send())
    assert isinstance(reply, SendCell) and reply.peer == keys_of_link[2]
    reply_cells = [reply.cell]  # link 3 first
    for i, at in ((2, "reply_at_hop2"), (1, "reply_at_hop1")):
        relays[i - 1].receive(keys_of_link[i + 1], reply_cells[-1], TIMES[at])
        back = only(relays[i - 1].cells_to_send())
        assert isinstance(back, SendCell) and back.peer == keys_of_link[i - 1]
        reply_cells.append(back.cell)
    circuit.receive(reply_cells[-1], TIMES["reply_at_client"])
    opened = circuit.next_event()
    assert isinstance(opened, CircuitOpened)

    # --- DATA to the exit ----------------------------------------------------------------
    def forward(cell: Cell, upto: int, at: float) -> list[Cell]:
        """The cell on links 1..upto (delivered at hop ``upto``)."""
        cells = [cell]
        for i in range(1, upto):
            relays[i - 1].receive(keys_of_link[i - 1], cells[-1], at)
            out = only(relays[i - 1].cells_to_send())
            assert isinstance(out, SendCell) and out.peer == keys_of_link[i + 1]
            cells.append(out.cell)
        relays[upto - 1].receive(keys_of_link[upto - 1], cells[-1], at)
        return cells

    def backward(origin: int, at: float) -> list[Cell]:
        """A cell hop ``origin`` sent, on links origin..1 (the client's last)."""
        out = only(relays[origin - 1].cells_to_send())
        assert isinstance(out, SendCell) and out.peer == keys_of_link[origin - 1]
        cells = [out.cell]
        for i in range(origin - 1, 0, -1):
            relays[i - 1].receive(keys_of_link[i + 1], cells[-1], at)
            out = only(relays[i - 1].cells_to_send())
            assert isinstance(out, SendCell) and out.peer == keys_of_link[i - 1]
            cells.append(out.cell)
        circuit.receive(cells[-1], at)
        return cells

    data_cells = forward(circuit.send_data(DATA), 3, TIMES["data"])
    delivered = relays[2].next_event()
    assert isinstance(delivered, CircuitData) and delivered.data == DATA

    # --- PROBE to hop 2, and its reply -----------------------------------------------------
    probe_cells = forward(circuit.probe(PROBE_HOP, TIMES["probe"]), PROBE_HOP, TIMES["probe"])
    probe_reply_cells = backward(PROBE_HOP, TIMES["probe"])
    answered = circuit.next_event()
    assert answered == ProbeReplied(PROBE_HOP, 0.0)
    (nonce,) = [data for use, data in chunks["client"] if use == "probe nonce"]
    stamp = TIMES["probe"] * 1_000_000

    # --- DATA from the exit --------------------------------------------------------------
    assert relays[2].send_data(delivered.handle, DATA_REPLY)
    data_reply_cells = backward(3, TIMES["data_reply"])
    assert circuit.next_event() == DataReceived(DATA_REPLY)

    # --- DESTROY ---------------------------------------------------------------------------
    destroy_cells = [circuit.destroy(DESTROY_REASON)]
    for i in (1, 2, 3):
        relays[i - 1].receive(keys_of_link[i - 1], destroy_cells[-1], TIMES["destroy"])
        if i < 3:
            out = only(relays[i - 1].cells_to_send())
            assert isinstance(out, SendCell) and out.peer == keys_of_link[i + 1]
            destroy_cells.append(out.cell)
    assert relays[2].cells_to_send() == []
    assert all(r.circuit_count == 0 for r in relays)
    assert all(
        not any(k.startswith("relay.drop.") and v for k, v in r.stats.items()) for r in relays
    )
    assert not circuit.stats
    assert all(t.used_up for t in tapes.values()), {n: t.used_up for n, t in tapes.items()}

    # --- What the hops saw ------------------------------------------------------------------
    hops_out = []
    records = []
    for i in range(3):
        eph, shared, keys = hop_keys(i)
        secret = crypto.hash_bytes(
            b"meshnode/circuit/v1\0" + shared + eph + specs[i].onion_key, size=32
        )
        hops_out.append(
            {
                "hop": i + 1,
                "ephemeral_public": eph.hex(),
                "shared": shared.hex(),
                "kdf_secret": secret.hex(),
                "keys": keys_out(keys),
            }
        )
        slot = build_cells[i].body[:_SLOT]
        assert slot[:32] == eph
        plain = crypto.Aead(keys.record).open(bytes(12), slot[32:265], eph)
        assert plain is not None
        records.append({"hop": i + 1, "slot": slot.hex(), **record_out(plain)})
    # Each hop's status (OK) carries its clock when it wrote it.
    answered_at = ("reply_at_hop1", "reply_at_hop2", "build_at_hop3")
    statuses = []
    for i in range(3):
        # Hop i+1 wrote its sealed status in slot 0 of the reply it sent (link i+1).
        sealed = reply_cells[2 - i].body[:_SLOT]
        status = crypto.Aead(hop_keys(i)[2].k_reply).open((1).to_bytes(12, "big"), sealed)
        assert status is not None and status[9:] == bytes(256)
        statuses.append(
            {
                "hop": i + 1,
                "status": status[0],
                "timestamp": int.from_bytes(status[1:9], "big"),
                "record": status[:9].hex(),
                "sealed": sealed.hex(),
            }
        )
        assert statuses[-1]["timestamp"] == TIMES[answered_at[i]]
    # What each forwarding hop appended to the DATA cell, and what the exit delivered.
    fillers = []
    for i in range(2):
        keys = hop_keys(i)[2]
        filler = crypto.mac(keys.kf_fill, data_cells[i].seq.to_bytes(8, "big"), size=16)
        assert data_cells[i + 1].body[-16:] == filler
        fillers.append({"hop": i + 1, "seq": data_cells[i].seq, "filler": filler.hex()})
    exit_plain = crypto.Aead(hop_keys(2)[2].kf).open(
        layer_nonce(data_cells[2].seq), data_cells[2].body[16:] + data_cells[2].body[:16]
    )
    assert exit_plain is not None and exit_plain[:16] == bytes(16)

    links = [(i, names[i - 1], names[i]) for i in (1, 2, 3)]  # (link, from, to) forward

    def fwd(cells: list[Cell]) -> list[dict[str, Any]]:
        return [cell_out(n, a, b, c) for (n, a, b), c in zip(links, cells, strict=False)]

    def bwd(cells: list[Cell]) -> list[dict[str, Any]]:
        back = [(n, b, a) for n, a, b in reversed(links[: len(cells)])]
        return [cell_out(n, a, b, c) for (n, a, b), c in zip(back, cells, strict=True)]

    nodes: dict[str, Any] = {
        "client": {"inputs": CLIENT, "outputs": {"link_public": client_id.link_public.hex()}},
    }
    for i, (inputs, spec) in enumerate(zip(HOPS, specs, strict=True), start=1):
        next_onion = crypto.x25519_public_from_private(bytes.fromhex(inputs["next_onion_private"]))
        nodes[f"hop{i}"] = {
            "inputs": inputs,
            "outputs": {
                "node_id": spec.node_id.hex(),
                "link_public": spec.link_key.hex(),
                "onion_public": spec.onion_key.hex(),
                "next_onion_public": next_onion.hex(),
            },
        }
    return {
        "about": (
            "meshnode circuit test vectors: one 3-hop circuit built, used and destroyed "
            "(cells are link frames of kind 0x20); byte strings are hex, seq and "
            "timestamps decimal. Layout: docs/protocol.md section 12. Regenerate with "
            "tests/vectors/gen_circuit.py; checked by tests/routing/test_vectors.py."
        ),
        "inputs": {
            "times": TIMES,
            "ephemeral_privates": EPHEMERAL_PRIVATES,
            "data": DATA.hex(),
            "data_reply": DATA_REPLY.hex(),
            "probe_hop": PROBE_HOP,
            "destroy_reason": int(DESTROY_REASON),
            "random": {
                name: [{"use": use, "hex": data.hex()} for use, data in c]
                for name, c in chunks.items()
            },
        },
        "nodes": nodes,
        "hops": hops_out,
        "build": {"cells": fwd(build_cells), "records": records},
        "build_reply": {"cells": bwd(reply_cells), "statuses": statuses},
        "data": {"cells": fwd(data_cells), "fillers": fillers, "delivered": exit_plain[16:].hex()},
        "probe": {
            "hop": PROBE_HOP,
            "nonce": nonce.hex(),
            "timestamp_us": stamp,
            "data": (nonce + stamp.to_bytes(8, "big")).hex(),
            "cells": fwd(probe_cells),
        },
        "probe_reply": {"cells": bwd(probe_reply_cells)},
        "data_reply": {"cells": bwd(data_reply_cells)},
        "destroy": {"reason": int(DESTROY_REASON), "cells": fwd(destroy_cells)},
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
