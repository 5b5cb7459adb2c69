"""The relay's fast path: ``Relay.forward_frame`` / ``backward_frame``, the forward
layers' AEAD cache, and CircuitManager's frame handler that uses them.

The fast path must be the general path with fewer objects: the same bytes on the wire,
the same checks in the same order (tag before the window moves, replays, rate limits)
and the same counters.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from discovery.directory import Directory
from meshnode.identity import NodeId
from meshnode.link.events import FrameReceived
from routing import onion as onion_mod
from routing.build import HopSpec, create_build
from routing.cells import (
    BODY_BYTES,
    CELL_BYTES,
    HEADER_BYTES,
    KIND_CELL,
    Cell,
    CellType,
    Command,
    encode_message,
    unpack_header,
)
from routing.manager import CircuitConfig, CircuitManager
from routing.onion import ClientCircuitCrypto, ForwardLayer, capacity
from routing.onionkeys import OnionKeyring
from routing.relay import Relay, RelayLimits, SendCell
from tests.conftest import DeterministicBytes

T0 = 1_700_000_000.0
KEYS = [hashlib.sha256(b"fast path %d" % i).digest() for i in range(3)]  # prev, me, next
ADDR = ("192.0.2.9", 9)


def _setup(seed: bytes) -> tuple[OnionKeyring, Any, ClientCircuitCrypto, bytes]:
    rng = DeterministicBytes(seed)
    rings = [OnionKeyring.generate(now=T0, random_bytes=rng) for _ in range(2)]
    specs = [
        HopSpec(
            node_id=NodeId(KEYS[i + 1][:20]),
            link_key=KEYS[i + 1],
            onion_key=rings[i].publics()[0],
            address=(f"192.0.2.{i + 1}", 9),
        )
        for i in range(2)
    ]
    body, pending = create_build(specs, now=T0, random_bytes=rng)
    return rings[0], pending, ClientCircuitCrypto(pending.keys), body


def _open_relay(seed: bytes, limits: RelayLimits | None = None) -> tuple[Relay, int, Any]:
    """A middle relay with one open circuit (KEYS[0] -> me -> KEYS[2]); its out circ_id."""
    ring, _, client, body = _setup(seed)
    relay = Relay(ring, random_bytes=DeterministicBytes(seed + b"/r"), limits=limits)
    relay.receive(KEYS[0], Cell(1, CellType.BUILD, 0, body), T0)
    (extend,) = relay.cells_to_send()
    out_id = extend.cell.circ_id
    relay.receive(KEYS[2], Cell(out_id, CellType.BUILD_REPLY, 0, bytes(BODY_BYTES)), T0)
    relay.cells_to_send()
    return relay, out_id, client


def _drops(relay: Relay) -> dict[str, int]:
    return {k: v for k, v in relay.stats.items() if k.startswith("relay.drop.") and v}


def test_forward_and_backward_frames_match_the_general_path() -> None:
    slow, out_id, client = _open_relay(b"twin")
    fast, fast_out_id, twin = _open_relay(b"twin")
    assert fast_out_id == out_id
    message = encode_message(Command.DATA, b"x" * 700, capacity(2))
    for _ in range(20):
        seq, body = client.wrap_forward(2, message)
        assert twin.wrap_forward(2, message) == (seq, body)
        slow.receive(KEYS[0], Cell(1, CellType.FORWARD, seq, body), T0)
        (sent,) = slow.cells_to_send()
        assert isinstance(sent, SendCell)
        frame = Cell(1, CellType.FORWARD, seq, body).encode()
        out = fast.forward_frame(KEYS[0], 1, seq, memoryview(frame)[HEADER_BYTES:], T0)
        assert out == (KEYS[2], sent.cell.encode())
        assert len(out[1]) == CELL_BYTES
    for seq in (7, 8, 2**40):
        body = hashlib.sha256(b"%d" % seq).digest() * 44 + bytes(1)
        slow.receive(KEYS[2], Cell(out_id, CellType.BACKWARD, seq, body), T0)
        (sent,) = slow.cells_to_send()
        assert isinstance(sent, SendCell)
        assert fast.backward_frame(KEYS[2], out_id, seq, body, T0) == (
            KEYS[0],
            sent.cell.encode(),
        )
    assert not _drops(slow) and not _drops(fast)
    assert not fast.cells_to_send()


def test_forward_frame_drops_like_receive() -> None:
    relay, out_id, client = _open_relay(b"drops", RelayLimits(cell_burst=3, cell_rate_per_s=1))
    message = encode_message(Command.DATA, b"y", capacity(2))
    seq, body = client.wrap_forward(2, message)
    assert relay.forward_frame(KEYS[1], 1, seq, body, T0) is None  # wrong peer
    assert relay.forward_frame(KEYS[0], 99, seq, body, T0) is None  # unknown circuit
    tampered = body[:-1] + bytes((body[-1] ^ 1,))
    assert relay.forward_frame(KEYS[0], 1, seq, tampered, T0) is None  # bad tag, no window move
    assert relay.forward_frame(KEYS[0], 1, seq, body, T0) is not None
    assert relay.forward_frame(KEYS[0], 1, seq, body, T0) is None  # replay
    assert relay.forward_frame(KEYS[0], 1, *client.wrap_forward(2, message), T0) is None
    assert relay.backward_frame(KEYS[0], out_id, 5, body, T0) is None  # wrong side
    assert _drops(relay) == {
        "relay.drop.unknown_circuit": 3,
        "relay.drop.bad_tag": 1,
        "relay.drop.replay": 1,
        "relay.drop.rate_limited": 1,
    }
    assert not relay.cells_to_send()


def test_forward_frame_delivers_probes_through_the_outputs() -> None:
    relay, _, client = _open_relay(b"probe")
    probe = encode_message(Command.PROBE, bytes(16), capacity(1))
    seq, body = client.wrap_forward(1, probe)
    assert relay.forward_frame(KEYS[0], 1, seq, body, T0) is None
    (reply,) = relay.cells_to_send()
    assert isinstance(reply, SendCell)
    assert reply.peer == KEYS[0]
    assert reply.cell.type is CellType.BACKWARD
    assert client.unwrap_backward(reply.cell.seq, reply.cell.body)[0] == 1


def test_active_layers_are_bounded_and_discarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onion_mod, "ACTIVE_LAYERS", 3)
    monkeypatch.setattr(onion_mod, "_ACTIVE", type(onion_mod._ACTIVE)())
    _, pending, _, _ = _setup(b"lru")
    message = encode_message(Command.DATA, b"z", capacity(2))
    clients = [ClientCircuitCrypto(pending.keys) for _ in range(5)]
    layers = [ForwardLayer(pending.keys[0]) for _ in range(5)]
    reference = ForwardLayer(pending.keys[0])
    for _ in range(3):  # each round evicts every layer before it is used again
        for client, layer in zip(clients, layers, strict=True):
            seq, body = client.wrap_forward(2, message)
            result = layer.process(seq, body)
            assert result[0] == "forward"
            assert len(onion_mod._ACTIVE) <= 3
        assert reference.process(seq, body) == result
        reference = ForwardLayer(pending.keys[0])
    assert layers[-1] in onion_mod._ACTIVE
    layers[-1].discard()
    assert layers[-1] not in onion_mod._ACTIVE


def test_closing_a_circuit_discards_its_layer() -> None:
    relay, _, client = _open_relay(b"close")
    message = encode_message(Command.DATA, b"w", capacity(2))
    assert relay.forward_frame(KEYS[0], 1, *client.wrap_forward(2, message), T0) is not None
    layer = relay._links[KEYS[0]].inbound[1].forward
    assert layer in onion_mod._ACTIVE
    relay.peer_unreachable(KEYS[0], T0)
    assert relay.circuit_count == 0
    assert layer not in onion_mod._ACTIVE


class _Link:
    def __init__(self) -> None:
        self.endpoint = _Endpoint()
        self.sent: list[tuple[bytes, int, bytes]] = []
        self.handlers: dict[int, Callable[[Any], None]] = {}

    def register(self, kind: int, handler: Callable[[Any], None]) -> None:
        self.handlers[kind] = handler

    def add_listener(self, listener: Callable[[Any], None]) -> None:
        pass

    def send(self, peer: bytes, kind: int, payload: bytes) -> None:
        self.sent.append((peer, kind, bytes(payload)))


class _Identity:
    link_public = KEYS[1]


class _Endpoint:
    identity = _Identity()

    def has_session(self, key: bytes, now: float) -> bool:
        return True


async def test_manager_fast_path() -> None:
    ring, pending, client, body = _setup(b"manager")
    link = _Link()
    manager = CircuitManager(
        link,  # type: ignore[arg-type]
        node_id=NodeId(KEYS[1][:20]),
        directory=lambda: Directory((), now=time.time()),
        keyring=ring,
        config=CircuitConfig(allow_same_subnet=True, probe_interval_s=0),
        clock=lambda: T0,
    )
    manager.start()
    deliver = link.handlers[KIND_CELL]

    def frame(peer: bytes, payload: bytes) -> FrameReceived:
        return FrameReceived(
            peer=peer, node_id=NodeId(peer[:20]), kind=KIND_CELL, payload=payload, addr=ADDR
        )

    deliver(frame(KEYS[0], Cell(1, CellType.BUILD, 0, body).encode()))
    ((peer, _, build),) = link.sent
    out_id = unpack_header(build)[0]
    deliver(frame(KEYS[2], Cell(out_id, CellType.BUILD_REPLY, 0, bytes(BODY_BYTES)).encode()))
    timer_at = manager._timer_at
    link.sent.clear()

    message = encode_message(Command.DATA, b"v" * 100, capacity(2))
    seq, fwd_body = client.wrap_forward(2, message)
    payload = Cell(1, CellType.FORWARD, seq, fwd_body).encode()
    deliver(frame(KEYS[0], payload))
    deliver(frame(KEYS[0], payload))  # a replay
    ((peer, kind, out),) = link.sent
    assert (peer, kind, len(out)) == (KEYS[2], KIND_CELL, CELL_BYTES)
    circ_id, type_byte, next_seq = unpack_header(out)
    assert (circ_id, type_byte) == (out_id, CellType.FORWARD)
    expected = ForwardLayer(pending.keys[0]).process(seq, fwd_body)
    assert expected == ("forward", next_seq, out[HEADER_BYTES:])

    back_body = bytes(range(256)) * 5 + bytes(BODY_BYTES - 1280)
    deliver(frame(KEYS[2], Cell(out_id, CellType.BACKWARD, 3, back_body).encode()))
    assert link.sent[-1][0] == KEYS[0]
    assert unpack_header(link.sent[-1][2])[:2] == (1, CellType.BACKWARD)

    deliver(frame(KEYS[0], payload[:-1]))  # the general path refuses a short cell
    stats = manager.stats
    assert stats["routing.rx.cells"] == 5  # build, reply, forward, replay, backward
    assert stats["routing.tx.cells"] == 4  # build, its reply, forward, backward
    assert stats["relay.drop.replay"] == 1
    assert stats["routing.drop.wrong_size"] == 1
    assert manager._addresses[KEYS[0]] == ADDR
    assert manager._timer_at == timer_at  # relaying moved no deadline
    await manager.close(graceful=False)
