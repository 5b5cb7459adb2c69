"""routing/circuit.py: the client's side of a circuit, against real Relays in memory.

Uses the in-memory :class:`Net` of test_relay.py: every delivery advances the clock by
LATENCY, so a probe to hop k comes back after exactly 2k * LATENCY.
"""

from __future__ import annotations

import functools
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import LocalProtocolError
from routing.build import BuildStatus
from routing.cells import BODY_BYTES, MAX_CIRC_ID, MAX_SEQ, Cell, CellType, Command, encode_message
from routing.circuit import (
    CircuitDestroyed,
    CircuitFailed,
    CircuitOpened,
    CircuitState,
    ClientCircuit,
    DataReceived,
    HopHealth,
    ProbeLost,
    ProbeReplied,
)
from routing.onion import capacity
from routing.relay import DestroyReason, RelayLimits, destroy_cell
from tests.conftest import DeterministicBytes
from tests.routing.test_relay import CLIENT, LATENCY, T0, Net


def client_drops(circuit: ClientCircuit) -> dict[str, int]:
    return {k: v for k, v in circuit.stats.items() if k.startswith("circuit.drop.") and v}


def test_new_circuit_is_building() -> None:
    net = Net(3)
    circuit = ClientCircuit([n.spec for n in net.nodes], now=T0, random_bytes=net.rng, circ_id=77)
    assert circuit.state == CircuitState.BUILDING
    assert circuit.circ_id == 77
    assert circuit.first_hop == net.key(0)
    assert circuit.hop_count == 3
    assert circuit.build_started_at == T0
    cell = circuit.build_cell()
    assert (cell.circ_id, cell.type, cell.seq) == (77, CellType.BUILD, 0)
    assert circuit.build_cell() is cell
    assert circuit.get_timer() is None
    assert circuit.next_event() is None
    with pytest.raises(LocalProtocolError):
        circuit.send_data(b"x")
    with pytest.raises(LocalProtocolError):
        circuit.probe(1, T0)
    with pytest.raises(LocalProtocolError):
        ClientCircuit([net.nodes[0].spec], now=T0, random_bytes=net.rng, circ_id=MAX_CIRC_ID + 1)
    with pytest.raises(LocalProtocolError):
        ClientCircuit([], now=T0, random_bytes=net.rng)
    assert "building" in repr(circuit)


def test_open_reports_the_build_round_trip() -> None:
    net = Net(5)
    circuit = net.open_circuit([0, 1, 2, 3, 4])
    assert circuit.state == CircuitState.OPEN
    assert circuit.failure is None
    (opened,) = net.events_of(circuit)
    assert isinstance(opened, CircuitOpened)
    assert opened.rtt == pytest.approx(10 * LATENCY)


def test_probe_rtts_median_and_bounded_samples() -> None:
    net = Net(3)
    circuit = ClientCircuit(
        [n.spec for n in net.nodes], now=net.now, random_bytes=net.rng, rtt_samples=4
    )
    net.clients[(b"c" * 32, circuit.circ_id)] = circuit
    net.send(circuit, circuit.build_cell(), client=b"c" * 32)
    net.pump()
    assert circuit.state == CircuitState.OPEN
    for _ in range(6):
        net.send(circuit, circuit.probe(2, net.now), client=b"c" * 32)
        net.pump()
    health = circuit.health(2)
    assert (health.sent, health.answered, health.lost) == (6, 6, 0)
    assert len(health.rtts) == 4
    assert health.median_rtt == pytest.approx(4 * LATENCY)
    assert circuit.health(1).median_rtt is None
    assert "sent=6" in repr(health)
    with pytest.raises(LocalProtocolError):
        circuit.probe(0, net.now)
    with pytest.raises(LocalProtocolError):
        circuit.health(4)


def test_median_of_even_and_odd_samples() -> None:
    health = HopHealth(8)
    for rtt in (0.3, 0.1, 0.2):
        health.rtts.append(rtt)
    assert health.median_rtt == pytest.approx(0.2)
    health.rtts.append(0.5)
    assert health.median_rtt == pytest.approx(statistics.median([0.3, 0.1, 0.2, 0.5]))


def test_probe_timeout_counts_loss_and_a_late_reply_is_dropped() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    net.hold.add(net.key(1))  # hop 2 hears nothing for now
    cell = circuit.probe(2, net.now)
    net.send(circuit, cell)
    net.pump()
    sent_at = net.now - LATENCY  # the probe left before the first delivery
    timer = circuit.get_timer()
    assert timer == pytest.approx(sent_at + 10.0)
    net.advance(9.9)
    assert circuit.health(2).lost == 0
    net.advance(0.2)
    assert net.events_of(circuit)[-1] == ProbeLost(2)
    assert (circuit.health(2).sent, circuit.health(2).lost) == (1, 1)
    assert circuit.get_timer() is None
    # The held probe arrives now; its reply is too late to count.
    net.hold.clear()
    held, net.held = net.held, []
    net.queue.extend(held)
    net.pump()
    assert client_drops(circuit) == {"circuit.drop.unknown_probe": 1}
    assert circuit.health(2).answered == 0


def test_outstanding_probes_are_bounded() -> None:
    net = Net(1)
    circuit = ClientCircuit(
        [net.nodes[0].spec], now=net.now, random_bytes=net.rng, max_outstanding_probes=3
    )
    net.clients[(b"c" * 32, circuit.circ_id)] = circuit
    net.send(circuit, circuit.build_cell(), client=b"c" * 32)
    net.pump()
    for _ in range(5):
        circuit.probe(1, net.now)  # never sent
    events = net.events_of(circuit)
    assert events[1:] == [ProbeLost(1), ProbeLost(1)]
    assert (circuit.health(1).sent, circuit.health(1).lost) == (5, 2)


def test_data_capacity_is_the_last_hops() -> None:
    net = Net(5)
    circuit = net.open_circuit([0, 1, 2, 3, 4])
    room = capacity(5)
    assert room >= 1280
    net.send(circuit, circuit.send_data(b"\xaa" * room))
    net.pump()
    assert net.nodes[4].events[-1].data == b"\xaa" * room  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        circuit.send_data(bytes(room + 1))


def test_destroy_from_the_network_closes_it() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    circuit.receive(destroy_cell(circuit.circ_id, DestroyReason.IDLE, net.rng), net.now)
    assert circuit.state == CircuitState.CLOSED
    assert circuit.close_reason == DestroyReason.IDLE
    assert circuit.next_event() == CircuitDestroyed(DestroyReason.IDLE)
    circuit.receive(destroy_cell(circuit.circ_id, 0, net.rng), net.now)
    assert client_drops(circuit) == {"circuit.drop.closed": 1}
    with pytest.raises(LocalProtocolError):
        circuit.destroy()
    with pytest.raises(LocalProtocolError):
        circuit.send_data(b"x")


def test_destroy_while_building_releases_the_pending_hops() -> None:
    net = Net(3)
    net.hold.add(net.key(2))
    circuit = net.open_circuit([0, 1, 2])
    assert [net.relay(i).circuit_count for i in range(3)] == [1, 1, 0]
    cell = circuit.destroy(DestroyReason.BUILD_FAILED)
    assert cell.type is CellType.DESTROY
    assert cell.body[0] == DestroyReason.BUILD_FAILED
    net.send(circuit, cell)
    net.pump()
    assert net.total_circuits() == 0
    # The BUILD_REPLY that comes later finds nothing, anywhere.
    net.hold.clear()
    net.queue.extend(net.held)
    net.held = []
    net.pump()
    assert net.total_circuits() == 0
    assert circuit.state == CircuitState.CLOSED


def test_failed_build_then_destroy_releases_hops_before_the_failure() -> None:
    net = Net(3, per_relay={2: RelayLimits(max_circuits=1)})
    net.open_circuit([2])
    circuit = net.open_circuit([0, 1, 2])
    assert circuit.state == CircuitState.FAILED
    assert circuit.failure == CircuitFailed(3, "refused", BuildStatus.OVERLOADED)
    assert net.events_of(circuit) == [circuit.failure]
    assert [net.relay(i).circuit_count for i in range(3)] == [1, 1, 1]
    net.send(circuit, circuit.destroy())
    net.pump()
    assert [net.relay(i).circuit_count for i in range(3)] == [0, 0, 1]


def test_malformed_build_replies_fail_the_build() -> None:
    net = Net(2)
    specs = [n.spec for n in net.nodes]
    padding = ClientCircuit(specs, now=T0, random_bytes=net.rng, circ_id=5)
    padding.receive(Cell(5, CellType.BUILD_REPLY, 0, b"\x01" * BODY_BYTES), T0)
    assert padding.failure == CircuitFailed(None, "bad_padding", None)
    garbage = ClientCircuit(specs, now=T0, random_bytes=net.rng, circ_id=6)
    garbage.receive(Cell(6, CellType.BUILD_REPLY, 0, bytes(BODY_BYTES)), T0)
    assert garbage.failure == CircuitFailed(1, "bad_reply", None)
    # A second reply, or one for an open circuit, is unexpected.
    garbage.receive(Cell(6, CellType.BUILD_REPLY, 0, bytes(BODY_BYTES)), T0)
    assert client_drops(garbage) == {"circuit.drop.unexpected_reply": 1}


def test_cells_the_client_drops() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    net.send(circuit, circuit.send_data(b"ping"))
    net.pump()
    handle = net.nodes[1].events[-1].handle
    net.relay(1).send_data(handle, b"pong")
    net.pump()
    assert net.events_of(circuit)[-1] == DataReceived(b"pong")
    # The BACKWARD cell as the client got it, to replay and tamper with.
    cell = next(c for _, dst, c in reversed(net.log) if dst == CLIENT)
    circuit.receive(cell, net.now)  # replayed
    tampered = Cell(cell.circ_id, cell.type, cell.seq, bytes([cell.body[0] ^ 1]) + cell.body[1:])
    circuit.receive(tampered, net.now)
    circuit.receive(Cell(circuit.circ_id ^ 1, CellType.BACKWARD, 1, cell.body), net.now)
    circuit.receive(Cell(circuit.circ_id, CellType.FORWARD, 1, cell.body), net.now)
    circuit.receive(Cell(circuit.circ_id, CellType.BUILD, 0, cell.body), net.now)
    assert client_drops(circuit) == {
        "circuit.drop.replay": 1,
        "circuit.drop.bad_tag": 1,
        "circuit.drop.wrong_circuit": 1,
        "circuit.drop.unexpected_cell": 2,
    }
    fresh = ClientCircuit([net.nodes[0].spec], now=T0, random_bytes=net.rng, circ_id=9)
    fresh.receive(Cell(9, CellType.BACKWARD, 1, cell.body), T0)
    assert client_drops(fresh) == {"circuit.drop.not_open": 1}


def test_probe_reply_from_the_wrong_hop_is_dropped() -> None:
    net = Net(2)
    circuit = net.open_circuit([0, 1])
    probe_2 = circuit.probe(2, net.now)
    # Hop 1 answers a probe carrying the same nonce, as if it were hop 2's.
    nonce = next(iter(circuit._probes))
    crypto = circuit._crypto
    assert crypto is not None
    message = encode_message(Command.PROBE, nonce + bytes(8), capacity(1))
    seq, body = crypto.wrap_forward(1, message)
    net.send(circuit, Cell(circuit.circ_id, CellType.FORWARD, seq, body))
    net.pump()
    assert client_drops(circuit) == {"circuit.drop.probe_mismatch": 1}
    net.send(circuit, probe_2)
    net.pump()
    assert isinstance(net.events_of(circuit)[-1], ProbeReplied)


@functools.cache
def open_circuit() -> tuple[Net, ClientCircuit, list[bytes]]:
    net = Net(3, seed=b"client-fuzz")
    circuit = net.open_circuit([0, 1, 2])
    for hop in (1, 2, 3):
        net.send(circuit, circuit.probe(hop, net.now))
    net.pump()
    return net, circuit, sorted({c.body for _, _, c in net.log})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(list(CellType)),
    seq=st.one_of(st.integers(0, 8), st.integers(0, MAX_SEQ)),
    data=st.data(),
)
def test_random_cells_never_raise(kind: CellType, seq: int, data: st.DataObject) -> None:
    net, circuit, bodies = open_circuit()
    if kind is CellType.DESTROY:
        kind = CellType.BACKWARD  # keep the circuit open for the next example
    circ_id = data.draw(st.one_of(st.just(circuit.circ_id), st.integers(1, MAX_CIRC_ID)))
    body = data.draw(
        st.one_of(st.sampled_from(bodies), st.binary(min_size=BODY_BYTES, max_size=BODY_BYTES))
    )
    circuit.receive(Cell(circ_id, kind, seq, body), net.now)
    assert circuit.state == CircuitState.OPEN
    while circuit.next_event() is not None:
        pass


def test_random_circ_ids_are_nonzero_and_vary() -> None:
    net = Net(1)
    rng = DeterministicBytes(b"ids")
    ids = {ClientCircuit([net.nodes[0].spec], now=T0, random_bytes=rng).circ_id for _ in range(20)}
    assert len(ids) == 20
    assert 0 not in ids
