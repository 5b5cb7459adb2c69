"""routing/relay.py: several Relays and ClientCircuits wired by an in-memory loop, no sockets.

:class:`Net` moves cells between cores by link key, as the driver would: a relay's
:class:`SendCell` goes to that peer, an :class:`Extend` goes to the next hop (after
checking the record named it correctly), a cell for a client key goes to the client
circuit with that circ_id. Each delivery advances the clock by ``latency``, so round
trips are exact. Nodes in ``down`` cannot be reached (an Extend toward one is answered
with ``peer_unreachable``); cells to nodes in ``hold`` wait in ``held``.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import tracemalloc
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import LocalProtocolError
from meshnode.identity import NodeId
from routing import build as build_mod
from routing import cells as cells_mod
from routing import onion as onion_mod
from routing.build import BuildStatus, HopSpec, create_build
from routing.cells import BODY_BYTES, MAX_CIRC_ID, MAX_SEQ, Cell, CellType
from routing.circuit import (
    CircuitDestroyed,
    CircuitEvent,
    CircuitFailed,
    CircuitOpened,
    CircuitState,
    ClientCircuit,
    DataReceived,
    ProbeReplied,
)
from routing.onion import BACKWARD_CAPACITY
from routing.onionkeys import OnionKeyring
from routing.relay import (
    DROP_REASONS,
    CircuitClosed,
    CircuitData,
    DestroyReason,
    Extend,
    Relay,
    RelayEvent,
    RelayLimits,
    SendCell,
    destroy_cell,
)
from tests.conftest import DeterministicBytes

T0 = 1_700_000_000.0
LATENCY = 0.01
CLIENT = hashlib.sha256(b"client link key").digest()
STRANGER = hashlib.sha256(b"a third peer").digest()
KNOWN_REASONS = (
    set(DROP_REASONS) | set(cells_mod.REASONS) | set(onion_mod.REASONS) | set(build_mod.REASONS)
)


@dataclass
class RelayNode:
    spec: HopSpec
    ring: OnionKeyring
    relay: Relay
    events: list[RelayEvent] = field(default_factory=list)


class Net:
    """Relays 0..n-1 and any number of client circuits, moved by hand."""

    def __init__(
        self,
        n: int = 5,
        *,
        seed: bytes = b"net",
        limits: RelayLimits | None = None,
        per_relay: dict[int, RelayLimits] | None = None,
    ) -> None:
        self.now = T0
        self.rng = DeterministicBytes(seed + b"/client")
        self.nodes: list[RelayNode] = []
        self.by_key: dict[bytes, RelayNode] = {}
        for i in range(n):
            rng = DeterministicBytes(seed + b"/relay/%d" % i)
            ring = OnionKeyring.generate(now=T0, random_bytes=rng)
            link_key = hashlib.sha256(seed + b"/link/%d" % i).digest()
            spec = HopSpec(
                node_id=NodeId(hashlib.sha256(seed + b"/id/%d" % i).digest()[:20]),
                link_key=link_key,
                onion_key=ring.publics()[0],
                address=(f"192.0.2.{i + 1}", 4000 + i),
            )
            relay_limits = (per_relay or {}).get(i, limits)
            relay = Relay(ring, random_bytes=rng, limits=relay_limits, link_key=link_key)
            node = RelayNode(spec, ring, relay)
            self.nodes.append(node)
            self.by_key[link_key] = node
        self.clients: dict[tuple[bytes, int], ClientCircuit] = {}
        self.queue: deque[tuple[bytes, bytes, Cell]] = deque()  # (from, to, cell)
        self.log: list[tuple[bytes, bytes, Cell]] = []
        self.down: set[bytes] = set()
        self.hold: set[bytes] = set()
        self.held: list[tuple[bytes, bytes, Cell]] = []
        self.client_events: dict[int, list[CircuitEvent]] = {}

    def key(self, i: int) -> bytes:
        return self.nodes[i].spec.link_key

    def relay(self, i: int) -> Relay:
        return self.nodes[i].relay

    def open_circuit(
        self, path: list[int], *, client: bytes = CLIENT, pump: bool = True
    ) -> ClientCircuit:
        circuit = ClientCircuit(
            [self.nodes[i].spec for i in path], now=self.now, random_bytes=self.rng
        )
        self.clients[(client, circuit.circ_id)] = circuit
        self.send(circuit, circuit.build_cell(), client=client)
        if pump:
            self.pump()
        return circuit

    def send(self, circuit: ClientCircuit, cell: Cell, *, client: bytes = CLIENT) -> None:
        self.queue.append((client, circuit.first_hop, cell))

    def collect(self) -> bool:
        """Move every relay's outputs onto the wire, and its events into ``events``;
        True if there were any (a peer_unreachable call may make more)."""
        moved = False
        for node in self.nodes:
            src = node.spec.link_key
            for out in node.relay.cells_to_send():
                moved = True
                if isinstance(out, Extend):
                    target = self.by_key.get(out.next_hop.link_key)
                    assert target is not None, "an Extend to a node nobody named"
                    assert out.next_hop.address == target.spec.address
                    assert out.next_hop.node_id == target.spec.node_id
                    assert out.cell.type is CellType.BUILD
                    if out.next_hop.link_key in self.down:
                        node.relay.peer_unreachable(out.next_hop.link_key, self.now)
                        continue
                    self.queue.append((src, out.next_hop.link_key, out.cell))
                else:
                    assert isinstance(out, SendCell)
                    self.queue.append((src, out.peer, out.cell))
            while (event := node.relay.next_event()) is not None:
                node.events.append(event)
        return moved

    def pump(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.collect() or self.queue:
            if not self.queue:
                continue
            steps += 1
            assert steps <= max_steps, "cells keep flowing"
            src, dst, cell = self.queue.popleft()
            self.log.append((src, dst, cell))
            self.now += LATENCY
            if dst in self.down:
                continue
            if dst in self.hold:
                self.held.append((src, dst, cell))
                continue
            node = self.by_key.get(dst)
            if node is not None:
                node.relay.receive(src, cell, self.now)
            else:
                circuit = self.clients.get((dst, cell.circ_id))
                if circuit is not None:
                    circuit.receive(cell, self.now)
                    events = self.client_events.setdefault(id(circuit), [])
                    while (event := circuit.next_event()) is not None:
                        events.append(event)
        return steps

    def advance(self, dt: float) -> None:
        """Move the clock and run every due timer, then deliver what that sent."""
        self.now += dt
        for node in self.nodes:
            deadline = node.relay.get_timer()
            if deadline is not None and deadline <= self.now:
                node.relay.handle_timer(self.now)
        for circuit in self.clients.values():
            deadline = circuit.get_timer()
            if deadline is not None and deadline <= self.now:
                circuit.handle_timer(self.now)
        self.pump()

    def events_of(self, circuit: ClientCircuit) -> list[CircuitEvent]:
        events = self.client_events.setdefault(id(circuit), [])
        while (event := circuit.next_event()) is not None:
            events.append(event)
        return events

    def links(self, path: list[int], client: bytes = CLIENT) -> list[tuple[bytes, bytes]]:
        """(from, to) of every link along ``path``, client first."""
        keys = [self.key(i) for i in path]
        return list(zip([client, *keys[:-1]], keys, strict=True))

    def total_circuits(self) -> int:
        return sum(node.relay.circuit_count for node in self.nodes)


def state(circuit: ClientCircuit) -> CircuitState:
    """The circuit's state, read afresh (mypy keeps an attribute narrowed across calls)."""
    return circuit.state


def drops(relay: Relay) -> dict[str, int]:
    return {k: v for k, v in relay.stats.items() if k.startswith("relay.drop.") and v}


# --- Build, probe, data, destroy -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5])
def test_build_probe_data_destroy(n: int) -> None:
    net = Net(5)
    path = list(range(n))
    circuit = net.open_circuit(path)
    assert state(circuit) is CircuitState.OPEN
    opened = net.events_of(circuit)
    assert len(opened) == 1
    assert isinstance(opened[0], CircuitOpened)
    assert opened[0].rtt == pytest.approx(2 * n * LATENCY)
    for i in path:
        assert net.relay(i).circuit_count == 1
        assert net.relay(i).stats["relay.built"] == 1
        assert net.relay(i).stats["relay.pending"] == 0
    # The record told each hop exactly the next one: the wire shows the path.
    builds = [(s, d) for s, d, c in net.log if c.type is CellType.BUILD]
    assert builds == net.links(path)

    # A probe to every hop gets that hop's own reply, with an exact round trip.
    for hop in range(1, n + 1):
        net.send(circuit, circuit.probe(hop, net.now))
        net.pump()
        reply = net.events_of(circuit)[-1]
        assert isinstance(reply, ProbeReplied)
        assert reply.hop == hop
        assert reply.rtt == pytest.approx(2 * hop * LATENCY)
        health = circuit.health(hop)
        assert (health.sent, health.answered, health.lost) == (1, 1, 0)
        assert health.median_rtt == pytest.approx(2 * hop * LATENCY)

    # DATA surfaces at the last hop only, and the exit can answer.
    net.send(circuit, circuit.send_data(b"hello exit"))
    net.pump()
    exit_node = net.nodes[path[-1]]
    assert len(exit_node.events) == 1
    event = exit_node.events[0]
    assert isinstance(event, CircuitData)
    assert event.data == b"hello exit"
    assert all(not net.nodes[i].events for i in path[:-1])
    assert exit_node.relay.send_data(event.handle, b"hello client")
    net.pump()
    assert net.events_of(circuit)[-1] == DataReceived(b"hello client")

    # DESTROY from the client reaches every hop; every table is empty afterwards.
    net.send(circuit, circuit.destroy())
    net.pump()
    assert state(circuit) is CircuitState.CLOSED
    assert net.total_circuits() == 0
    for i in path:
        assert net.relay(i).stats["relay.circuits"] == 0
        assert net.relay(i).circuits_from(CLIENT) == 0
        assert net.relay(i).get_timer() is None or net.relay(i).circuit_count == 0
        assert not drops(net.relay(i)), drops(net.relay(i))
    destroys = [(s, d) for s, d, c in net.log if c.type is CellType.DESTROY]
    assert destroys == net.links(path)
    assert exit_node.events[-1] == CircuitClosed(event.handle, DestroyReason.REQUESTED)
    assert not exit_node.relay.send_data(event.handle, b"too late")


def test_nothing_repeats_across_links() -> None:
    """circ_ids are chosen per link and every body changes at every hop (circuits.md §1)."""
    net = Net(3)
    circuit = net.open_circuit([0, 1, 2])
    net.send(circuit, circuit.send_data(b"x"))
    net.pump()
    for kind in (CellType.BUILD, CellType.BUILD_REPLY, CellType.FORWARD):
        cells = [c for _, _, c in net.log if c.type is kind]
        assert len(cells) == 3
        assert len({c.circ_id for c in cells}) == 3
        assert len({c.body for c in cells}) == 3


def test_two_circuits_share_relays_independently() -> None:
    net = Net(3)
    a = net.open_circuit([0, 1, 2])
    b = net.open_circuit([0, 1, 2])
    assert a.circ_id != b.circ_id
    assert [net.relay(i).circuit_count for i in range(3)] == [2, 2, 2]
    net.send(a, a.send_data(b"from a"))
    net.send(b, b.send_data(b"from b"))
    net.pump()
    handles = {e.handle for e in net.nodes[2].events if isinstance(e, CircuitData)}
    assert len(handles) == 2
    net.send(a, a.destroy())
    net.pump()
    assert [net.relay(i).circuit_count for i in range(3)] == [1, 1, 1]
    net.send(b, b.probe(3, net.now))
    net.pump()
    assert isinstance(net.events_of(b)[-1], ProbeReplied)


def test_padding_is_counted_and_goes_nowhere() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    crypto = circuit._crypto
    assert crypto is not None
    message = cells_mod.encode_message(cells_mod.Command.PADDING, b"", onion_mod.capacity(1))
    seq, body = crypto.wrap_forward(1, message)
    net.send(circuit, Cell(circuit.circ_id, CellType.FORWARD, seq, body))
    before = len(net.log)
    net.pump()
    assert len(net.log) == before + 1  # delivered to hop 1, nothing sent on or back
    assert net.relay(0).stats["relay.rx.padding"] == 1
    # DATA for a hop that is not the last is dropped there.
    message = cells_mod.encode_message(cells_mod.Command.DATA, b"x", onion_mod.capacity(1))
    seq, body = crypto.wrap_forward(1, message)
    net.send(circuit, Cell(circuit.circ_id, CellType.FORWARD, seq, body))
    net.pump()
    assert drops(net.relay(0)) == {"relay.drop.data_not_exit": 1}
    assert not net.nodes[0].events


# --- Timers ----------------------------------------------------------------------------


def test_idle_timeout_destroys_toward_both_sides() -> None:
    short = RelayLimits(idle_timeout_s=60, idle_check_interval_s=1)
    net = Net(3, per_relay={1: short})
    circuit = net.open_circuit([0, 1, 2])
    deadline = net.relay(1).get_timer()
    assert deadline is not None
    # Activity keeps it alive: a probe through the middle hop at 50 s.
    net.advance(50)
    net.send(circuit, circuit.probe(3, net.now))
    net.pump()
    net.advance(30)  # 80 s after the build, 30 s after the probe
    assert state(circuit) is CircuitState.OPEN
    assert net.relay(1).circuit_count == 1
    net.advance(31)
    assert net.relay(1).stats["relay.idle_timeout"] == 1
    assert net.total_circuits() == 0
    assert state(circuit) is CircuitState.CLOSED
    assert net.events_of(circuit)[-1] == CircuitDestroyed(DestroyReason.IDLE)
    closed = [e for e in net.nodes[2].events if isinstance(e, CircuitClosed)]
    assert [e.reason for e in closed] == [DestroyReason.IDLE]
    assert all(net.relay(i).get_timer() is None for i in range(3))
    assert all(not drops(net.relay(i)) for i in range(3))


def test_timer_is_one_deadline_and_sweeps_are_spaced() -> None:
    limits = RelayLimits(idle_timeout_s=10, idle_check_interval_s=2)
    net = Net(1, limits=limits)
    relay = net.relay(0)
    assert relay.get_timer() is None
    a = net.open_circuit([0])
    built_at = net.now
    assert relay.get_timer() == pytest.approx(built_at - LATENCY + 10, abs=0.05)
    net.advance(5)
    b = net.open_circuit([0])
    net.advance(5.5)  # a expires, b has ~4.5 s left
    assert state(a) is CircuitState.CLOSED
    assert state(b) is CircuitState.OPEN
    timer = relay.get_timer()
    assert timer is not None
    assert timer >= net.now + 2 - 1e-9  # never sooner than the check interval
    net.advance(5)
    assert state(b) is CircuitState.CLOSED
    assert relay.get_timer() is None


def test_build_timeout_answers_the_client_and_releases_the_next_hop() -> None:
    # Hop 1 waits longer than hop 2 (it waits for hop 2 and everything after it).
    net = Net(3, per_relay={1: RelayLimits(build_timeout_s=5)})
    net.hold.add(net.key(2))
    circuit = net.open_circuit([0, 1, 2])
    assert state(circuit) is CircuitState.BUILDING
    assert net.relay(1).stats["relay.pending"] == 1
    assert net.relay(1).get_timer() == pytest.approx(T0 + 2 * LATENCY + 5)
    net.advance(5)
    assert state(circuit) is CircuitState.FAILED
    assert circuit.failure == CircuitFailed(2, "refused", BuildStatus.NEXT_HOP_UNREACHABLE)
    assert net.relay(1).stats["relay.build_timeout"] == 1
    assert net.relay(1).circuit_count == 0
    # The held node got a DESTROY for the BUILD it may have answered.
    assert [c.type for _, _, c in net.held] == [CellType.BUILD, CellType.DESTROY]
    assert net.held[0][2].circ_id == net.held[1][2].circ_id
    # A late reply is unknown; the client releases hop 1.
    net.send(circuit, circuit.destroy())
    net.pump()
    assert net.total_circuits() == 0


# --- Refusals and drops ----------------------------------------------------------------


def test_forged_destroy_from_a_third_peer_is_dropped() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    relay = net.relay(0)
    forged = destroy_cell(circuit.circ_id, DestroyReason.REQUESTED, net.rng)
    relay.receive(STRANGER, forged, net.now)
    # The successor may not destroy it by the predecessor's id either (wrong side).
    relay.receive(net.key(1), forged, net.now)
    assert drops(relay) == {"relay.drop.forged_destroy": 2}
    assert relay.cells_to_send() == []
    # A DESTROY for an id nobody uses is a stale one, not a forgery.
    relay.receive(STRANGER, destroy_cell(12345, 0, net.rng), net.now)
    assert drops(relay)["relay.drop.unknown_circuit"] == 1
    net.send(circuit, circuit.probe(2, net.now))
    net.pump()
    assert isinstance(net.events_of(circuit)[-1], ProbeReplied)


def test_cells_for_unknown_circuits_are_counted() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    relay = net.relay(0)
    cell = circuit.send_data(b"x")
    relay.receive(STRANGER, cell, net.now)  # right id, wrong peer
    relay.receive(CLIENT, Cell(cell.circ_id ^ 1, CellType.FORWARD, cell.seq, cell.body), net.now)
    relay.receive(CLIENT, Cell(cell.circ_id, CellType.BACKWARD, 1, cell.body), net.now)
    relay.receive(CLIENT, Cell(cell.circ_id, CellType.BUILD_REPLY, 0, cell.body), net.now)
    assert drops(relay) == {"relay.drop.unknown_circuit": 4}
    assert relay.cells_to_send() == []


def test_tampered_forward_cell_is_dropped_at_the_first_hop() -> None:
    net = Net(3)
    circuit = net.open_circuit([0, 1, 2])
    cell = circuit.send_data(b"secret")
    body = bytearray(cell.body)
    body[700] ^= 0x40
    net.send(circuit, Cell(cell.circ_id, cell.type, cell.seq, bytes(body)))
    before = len(net.log)
    net.pump()
    assert len(net.log) == before + 1  # it went no further than hop 1
    assert drops(net.relay(0)) == {"relay.drop.bad_tag": 1}
    assert not net.nodes[2].events
    # The untouched cell still goes through, once.
    net.send(circuit, cell)
    net.send(circuit, cell)
    net.pump()
    assert [e.data for e in net.nodes[2].events if isinstance(e, CircuitData)] == [b"secret"]
    assert drops(net.relay(0)) == {"relay.drop.bad_tag": 1, "relay.drop.replay": 1}


def test_replayed_build_is_refused() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    build = circuit.build_cell()
    relay = net.relay(0)
    relay.receive(CLIENT, build, net.now)  # same link, same id: in use
    relay.receive(CLIENT, Cell(build.circ_id + 1, CellType.BUILD, 0, build.body), net.now)
    relay.receive(STRANGER, build, net.now)  # from anyone else
    assert drops(relay) == {"relay.drop.circ_id_in_use": 1, "relay.drop.replay": 2}
    assert relay.cells_to_send() == []
    assert relay.circuit_count == 1
    # After the circuit is gone the replay cache still refuses it.
    net.send(circuit, circuit.destroy())
    net.pump()
    relay.receive(CLIENT, build, net.now)
    assert drops(relay)["relay.drop.replay"] == 3
    assert net.total_circuits() == 0


def test_builds_that_do_not_open_are_dropped_without_answer() -> None:
    net = Net(2)
    relay = net.relay(0)
    relay.receive(CLIENT, Cell(1, CellType.BUILD, 0, bytes(BODY_BYTES)), net.now)
    relay.receive(CLIENT, Cell(2, CellType.BUILD, 0, b"\x01" * BODY_BYTES), net.now)
    stale = Net(2)  # same keys (same seed), a build sealed an hour ago
    old = ClientCircuit([stale.nodes[0].spec], now=T0 - 3600, random_bytes=stale.rng)
    relay.receive(CLIENT, old.build_cell(), net.now)
    assert drops(relay) == {
        "relay.drop.bad_record": 1,
        "relay.drop.bad_padding": 1,
        "relay.drop.stale_timestamp": 1,
    }
    assert relay.cells_to_send() == []
    assert relay.circuit_count == 0


def overloaded(circuit: ClientCircuit, hop: int) -> bool:
    return state(circuit) is CircuitState.FAILED and circuit.failure == CircuitFailed(
        hop, "refused", BuildStatus.OVERLOADED
    )


def test_per_peer_cap_refuses_with_overloaded_naming_the_hop() -> None:
    net = Net(3, per_relay={1: RelayLimits(max_circuits_per_peer=2)})
    first = [net.open_circuit([0, 1, 2]) for _ in range(2)]
    assert all(state(c) is CircuitState.OPEN for c in first)
    third = net.open_circuit([0, 1, 2])
    assert overloaded(third, 2)
    assert drops(net.relay(1)) == {"relay.drop.peer_circuit_limit": 1}
    assert net.relay(1).circuits_from(net.key(0)) == 2
    # Another predecessor is not capped by hop 1's circuits.
    other = net.open_circuit([2, 1])
    assert state(other) is CircuitState.OPEN
    # The failed circuit still holds hop 1 until the client releases it.
    assert net.relay(0).circuit_count == 3
    net.send(third, third.destroy())
    net.pump()
    assert net.relay(0).circuit_count == 2
    # One closes: room again.
    net.send(first[0], first[0].destroy())
    net.pump()
    assert state(net.open_circuit([0, 1, 2])) is CircuitState.OPEN


def test_total_cap_refuses_with_overloaded() -> None:
    net = Net(2, per_relay={0: RelayLimits(max_circuits=2)})
    peers = [hashlib.sha256(b"client %d" % i).digest() for i in range(3)]
    circuits = [net.open_circuit([0, 1], client=p) for p in peers]
    assert [c.state for c in circuits[:2]] == [CircuitState.OPEN] * 2
    assert overloaded(circuits[2], 1)
    assert drops(net.relay(0)) == {"relay.drop.circuit_limit": 1}
    assert net.relay(0).circuit_count == 2
    assert net.relay(1).circuit_count == 2


def test_pending_cap_refuses_with_overloaded() -> None:
    net = Net(3, per_relay={0: RelayLimits(max_pending_builds=1)})
    net.hold.add(net.key(1))
    waiting = net.open_circuit([0, 1])
    refused = net.open_circuit([0, 2])
    exit_only = net.open_circuit([0])  # a last hop needs no pending slot
    assert state(waiting) is CircuitState.BUILDING
    assert overloaded(refused, 1)
    assert state(exit_only) is CircuitState.OPEN
    assert drops(net.relay(0)) == {"relay.drop.pending_limit": 1}


def test_record_naming_this_node_as_next_hop_is_refused() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 0])
    assert circuit.failure == CircuitFailed(1, "refused", BuildStatus.REFUSED)
    assert drops(net.relay(0)) == {"relay.drop.extend_to_self": 1}
    assert net.total_circuits() == 0


def test_rate_limit_per_circuit() -> None:
    net = Net(2, per_relay={0: RelayLimits(cell_rate_per_s=1, cell_burst=3)})
    circuit = net.open_circuit([0, 1])
    for _ in range(5):
        net.send(circuit, circuit.probe(1, net.now))
    net.pump()
    replies = [e for e in net.events_of(circuit) if isinstance(e, ProbeReplied)]
    assert len(replies) == 3
    assert drops(net.relay(0)) == {"relay.drop.rate_limited": 2}
    net.advance(1.0)
    net.send(circuit, circuit.probe(2, net.now))
    net.pump()
    assert isinstance(net.events_of(circuit)[-1], ProbeReplied)


# --- Links going away ------------------------------------------------------------------


def test_unreachable_next_hop_fails_the_build_naming_the_hop() -> None:
    net = Net(3)
    net.down.add(net.key(2))
    circuit = net.open_circuit([0, 1, 2])
    assert circuit.failure == CircuitFailed(2, "refused", BuildStatus.NEXT_HOP_UNREACHABLE)
    assert net.relay(1).circuit_count == 0
    assert net.relay(1).stats["relay.extend_failed"] == 1
    assert net.relay(0).circuit_count == 1  # until the client lets go
    net.send(circuit, circuit.destroy())
    net.pump()
    assert net.total_circuits() == 0
    assert drops(net.relay(1)) == {"relay.drop.unknown_circuit": 1}  # the DESTROY after


def test_unreachable_first_hop_of_the_path_at_hop_one() -> None:
    net = Net(2)
    net.down.add(net.key(1))
    circuit = net.open_circuit([0, 1])
    assert circuit.failure == CircuitFailed(1, "refused", BuildStatus.NEXT_HOP_UNREACHABLE)
    assert net.total_circuits() == 0


def test_peer_unreachable_destroys_circuits_both_ways() -> None:
    net = Net(4)
    through = net.open_circuit([0, 1, 2])
    other = net.open_circuit([3, 1])
    # Hop 1 loses its link to hop 2: the client hears of it, hop 2 is told nothing
    # (it cannot be reached) and expires the circuit itself.
    net.relay(1).peer_unreachable(net.key(2), net.now)
    net.pump()
    assert state(through) is CircuitState.CLOSED
    assert net.events_of(through)[-1] == CircuitDestroyed(DestroyReason.PEER_LOST)
    assert [net.relay(i).circuit_count for i in range(4)] == [0, 1, 1, 1]
    assert state(other) is CircuitState.OPEN
    # Losing a predecessor destroys toward the successor.
    net.relay(1).peer_unreachable(net.key(3), net.now)
    net.pump()
    assert [net.relay(i).circuit_count for i in range(4)] == [0, 0, 1, 1]
    assert not any(dst == net.key(3) for _, dst, c in net.log if c.type is CellType.DESTROY)
    # Unknown peers change nothing.
    net.relay(1).peer_unreachable(STRANGER, net.now)
    assert net.relay(1).cells_to_send() == []


def test_circuit_through_the_same_neighbour_twice() -> None:
    """A -> B -> A is legal; losing A destroys it once and sends A nothing."""
    net = Net(2)
    circuit = net.open_circuit([0, 1, 0])
    assert state(circuit) is CircuitState.OPEN
    assert net.relay(0).circuit_count == 2
    relay = net.relay(1)
    relay.peer_unreachable(net.key(0), net.now)
    assert relay.cells_to_send() == []
    assert relay.circuit_count == 0


def test_exit_service_closes_a_circuit() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    net.send(circuit, circuit.send_data(b"hi"))
    net.pump()
    (event,) = net.nodes[1].events
    assert isinstance(event, CircuitData)
    with pytest.raises(LocalProtocolError):
        net.relay(1).send_data(event.handle, bytes(BACKWARD_CAPACITY + 1))
    assert net.relay(1).close(event.handle)
    assert not net.relay(1).close(event.handle)
    net.pump()
    assert state(circuit) is CircuitState.CLOSED
    assert net.total_circuits() == 0
    assert len(net.nodes[1].events) == 1  # the exit asked; no event back


def test_close_all_destroys_every_circuit_toward_both_sides() -> None:
    """A relay shutting down tells every neighbour at once: middle, exit and pending
    circuits alike, with reason SHUTDOWN; circuits that do not pass through it stay."""
    net = Net(4)
    through = net.open_circuit([0, 1, 2])  # relay 1 in the middle
    ending = net.open_circuit([2, 1])  # relay 1 the exit
    net.send(ending, ending.send_data(b"to the exit"))
    net.hold.add(net.key(3))
    pending = net.open_circuit([1, 3])  # relay 1 waiting for relay 3's BUILD_REPLY
    elsewhere = net.open_circuit([0, 2])
    net.pump()
    relay = net.relay(1)
    (data,) = net.nodes[1].events
    assert isinstance(data, CircuitData)
    assert relay.circuit_count == 3
    assert relay.stats["relay.pending"] == 1

    relay.close_all()
    outs = [o for o in relay.cells_to_send() if isinstance(o, SendCell)]
    assert len(outs) == 5
    assert all(o.cell.type is CellType.DESTROY for o in outs)
    assert all(o.cell.body[0] == DestroyReason.SHUTDOWN for o in outs)
    # Both sides of the middle circuit, the exit's predecessor, both sides of the pending one.
    assert sorted(o.peer for o in outs) == sorted(
        [net.key(0), net.key(2), net.key(2), CLIENT, net.key(3)]
    )
    assert relay.circuit_count == 0
    assert relay.stats["relay.pending"] == 0
    assert relay.stats["relay.shutdown"] == 3
    assert relay.get_timer() is None
    assert relay.next_event() == CircuitClosed(data.handle, DestroyReason.SHUTDOWN)
    assert relay.next_event() is None

    # Deliver them: the clients hear at once, the neighbours release their halves.
    for out in outs:
        net.queue.append((net.key(1), out.peer, out.cell))
    net.pump()
    for circuit in (through, ending, pending):
        assert state(circuit) is CircuitState.CLOSED
        assert net.events_of(circuit)[-1] == CircuitDestroyed(DestroyReason.SHUTDOWN)
    assert state(elsewhere) is CircuitState.OPEN
    assert [net.relay(i).circuit_count for i in range(4)] == [1, 0, 1, 0]
    # The held next hop gets its BUILD, then the DESTROY that releases it; its late
    # reply finds nothing at relay 1.
    assert [c.type for _, _, c in net.held] == [CellType.BUILD, CellType.DESTROY]
    net.hold.clear()
    net.queue.extend(net.held)
    net.pump()
    assert net.total_circuits() == 2
    assert drops(relay) == {"relay.drop.unknown_circuit": 1}
    assert all(not drops(net.relay(i)) for i in (0, 2, 3))
    net.send(elsewhere, elsewhere.probe(2, net.now))
    net.pump()
    assert isinstance(net.events_of(elsewhere)[-1], ProbeReplied)

    # Nothing left: a second call sends nothing; a bad reason is our bug.
    relay.close_all()
    assert relay.cells_to_send() == []
    with pytest.raises(LocalProtocolError):
        relay.close_all(256)


def test_limits_are_validated() -> None:
    with pytest.raises(LocalProtocolError):
        RelayLimits(max_circuits=0)
    with pytest.raises(LocalProtocolError):
        RelayLimits(idle_timeout_s=float("nan"))
    with pytest.raises(LocalProtocolError):
        destroy_cell(1, 256, DeterministicBytes(b"x"))


def test_drop_counters_have_stable_names() -> None:
    net = Net(3, per_relay={1: RelayLimits(max_circuits_per_peer=1)})
    circuit = net.open_circuit([0, 1, 2])
    net.open_circuit([0, 1, 2])
    relay = net.relay(0)
    relay.receive(STRANGER, circuit.send_data(b"x"), net.now)
    relay.receive(STRANGER, destroy_cell(circuit.circ_id, 0, net.rng), net.now)
    names = set()
    for node in net.nodes:
        names |= {k.removeprefix("relay.drop.") for k in drops(node.relay)}
    assert names == {"unknown_circuit", "forged_destroy", "peer_circuit_limit"}
    assert names <= KNOWN_REASONS


# --- Anything a neighbour sends ----------------------------------------------------------


@functools.cache
def fuzz_net() -> tuple[Net, list[int], list[bytes]]:
    """A net with open circuits and the cells seen on it, to fuzz from."""
    net = Net(3, seed=b"fuzz")
    circuits = [net.open_circuit([0, 1, 2]), net.open_circuit([1, 0])]
    for c in circuits:
        net.send(c, c.probe(1, net.now))
        net.send(c, c.send_data(b"data"))
    net.pump()
    ids = sorted({c.circ_id for _, _, c in net.log})
    bodies = sorted({c.body for _, _, c in net.log})
    return net, ids, bodies


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    peer=st.sampled_from([CLIENT, STRANGER, 0, 1, 2]),
    kind=st.sampled_from(list(CellType)),
    seq=st.one_of(st.integers(0, 8), st.integers(0, MAX_SEQ)),
)
def test_random_cells_never_raise(
    data: st.DataObject, peer: bytes | int, kind: CellType, seq: int
) -> None:
    net, ids, bodies = fuzz_net()
    target = data.draw(st.integers(0, 2), label="relay")
    relay = net.relay(target)
    source = net.key(peer) if isinstance(peer, int) else peer
    circ_id = data.draw(st.one_of(st.sampled_from(ids), st.integers(1, MAX_CIRC_ID)))
    body = data.draw(
        st.one_of(
            st.sampled_from(bodies),
            st.binary(min_size=BODY_BYTES, max_size=BODY_BYTES),
            st.sampled_from(bodies).map(lambda b: bytes([b[0] ^ 1]) + b[1:]),
            st.just(bytes(BODY_BYTES)),
        )
    )
    relay.receive(source, Cell(circ_id, kind, seq, body), net.now)
    for out in relay.cells_to_send():
        assert isinstance(out, SendCell | Extend)
        assert isinstance(out.cell, Cell)
    while relay.next_event() is not None:
        pass
    relay.handle_timer(net.now + 1)
    assert set(drops(relay)) <= {"relay.drop." + r for r in KNOWN_REASONS}
    assert relay.circuit_count >= 0


# --- Memory ------------------------------------------------------------------------------

MEMORY_CIRCUITS = 10_000
STREAM_SPACING = 2**62  # backward seq streams far apart, as the secret offsets make them


def test_memory_per_circuit_for_10000_circuits(capsys: pytest.CaptureFixture[str]) -> None:
    """Middle-hop circuits (the largest: both link bindings and a backward relay), built
    through real BUILD cells from 20 neighbours, measured fresh and again after traffic:
    a probe through each (forward window used, backward origin counting) and backward
    cells filling all four backward stream windows, each 256 values wide (the worst case).

    The keyring's replay cache is per build, not per circuit (it outlives circuits and
    has its own bound), so it is measured apart, on a clone of the keyring given the
    same builds, and reported next to the circuit state."""
    rng = DeterministicBytes(b"memory")
    ring = OnionKeyring.generate(now=T0, random_bytes=rng)
    clone = OnionKeyring.from_json(ring.to_json())
    next_ring = OnionKeyring.generate(now=T0, random_bytes=rng)
    me = HopSpec(
        node_id=NodeId(bytes(20)),
        link_key=b"\x01" * 32,
        onion_key=ring.publics()[0],
        address=("192.0.2.1", 1),
    )
    nxt = HopSpec(
        node_id=NodeId(b"\x02" * 20),
        link_key=b"\x02" * 32,
        onion_key=next_ring.publics()[0],
        address=("192.0.2.2", 2),
    )
    peers = [hashlib.sha256(b"peer %d" % i).digest() for i in range(20)]
    builds = []
    for i in range(MEMORY_CIRCUITS):
        body, pending = create_build([me, nxt], now=T0, random_bytes=rng)
        builds.append((peers[i % 20], Cell(i + 1, CellType.BUILD, 0, body), pending))
    zeros = bytes(BODY_BYTES)  # a reply's padding is all extend_reply checks
    limits = RelayLimits(max_circuits=MEMORY_CIRCUITS, max_pending_builds=MEMORY_CIRCUITS)
    relay = Relay(ring, random_bytes=rng, limits=limits)
    next_ids: list[int] = []

    def replay_only() -> None:
        for _, cell, _ in builds:
            build_mod.process_build(cell.body, clone, now=T0, random_bytes=rng)

    def build_all() -> None:
        for peer, cell, _ in builds:
            relay.receive(peer, cell, T0)
            (out,) = relay.cells_to_send()
            assert isinstance(out, Extend)
            next_ids.append(out.cell.circ_id)
            reply = Cell(out.cell.circ_id, CellType.BUILD_REPLY, 0, zeros)
            relay.receive(out.next_hop.link_key, reply, T0)
            relay.cells_to_send()

    def traffic() -> None:
        for (peer, cell, pending), next_id in zip(builds, next_ids, strict=True):
            probe = cells_mod.encode_message(
                cells_mod.Command.PROBE, bytes(16), onion_mod.capacity(1)
            )
            seq, body = onion_mod.ClientCircuitCrypto(pending.keys).wrap_forward(1, probe)
            relay.receive(peer, Cell(cell.circ_id, CellType.FORWARD, seq, body), T0)
            for stream in range(onion_mod.MAX_BACKWARD_STREAMS):
                for step in (1, onion_mod.REPLAY_WINDOW):
                    back = Cell(next_id, CellType.BACKWARD, stream * STREAM_SPACING + step, zeros)
                    relay.receive(nxt.link_key, back, T0)
            assert len(relay.cells_to_send()) == 1 + 2 * onion_mod.MAX_BACKWARD_STREAMS

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        replay_only()
        gc.collect()
        replay_bytes = tracemalloc.get_traced_memory()[0] - start
        start = tracemalloc.get_traced_memory()[0]
        build_all()
        gc.collect()
        built_bytes = tracemalloc.get_traced_memory()[0] - start
        traffic()
        gc.collect()
        used_bytes = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert relay.circuit_count == MEMORY_CIRCUITS
    assert relay.stats["relay.pending"] == 0
    assert not drops(relay)
    fresh = (built_bytes - replay_bytes) / MEMORY_CIRCUITS
    worst = (used_bytes - replay_bytes) / MEMORY_CIRCUITS
    with capsys.disabled():
        print(
            f"\nrelay memory per middle-hop circuit, {MEMORY_CIRCUITS} circuits: "
            f"{fresh:.0f} bytes built, {worst:.0f} bytes after traffic with every backward "
            f"stream window in use; + {replay_bytes / MEMORY_CIRCUITS:.0f} bytes per build in the "
            f"keyring's replay cache (for its 10-minute window)"
        )
    assert fresh <= 1024
    assert worst <= 2048
