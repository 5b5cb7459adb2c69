"""Relay: the hop side of every circuit that passes through this node (sans-IO).

Inputs, as in every core (docs/circuits.md; STYLE.md §7):

- ``receive(peer, cell, now)``: a cell from a neighbour, named by its link key;
- ``peer_unreachable(peer, now)``: the link to a neighbour is gone (or could not be made);
- ``send_data(handle, data)`` / ``close(handle, reason)``: the exit service's calls;
- ``close_all(reason)``: the node is shutting down; every circuit is destroyed both ways;
- ``handle_timer(now)`` when ``get_timer()`` is due.

Outputs: ``cells_to_send()`` returns :class:`SendCell` (send ``cell`` to ``peer`` on its
link) and :class:`Extend` (connect to ``next_hop`` first if no link exists, then send
the BUILD), in order; ``next_event()`` returns :class:`CircuitData` and
:class:`CircuitClosed` for circuits that end here (the exit service's business).

A circuit is bound on each link to ``(peer, circ_id, side)`` (circuits.md §1): the
predecessor sent us its BUILD, so it alone sends FORWARD and receives BACKWARD; we chose
the circ_id toward the successor, which alone sends BUILD_REPLY and BACKWARD. Each
neighbour has one :class:`_Link` holding two tables by circ_id, ``inbound`` (circuits it
created) and ``outbound`` (ours toward it), so every lookup, the per-peer cap and
``peer_unreachable`` touch only that neighbour's circuits. Every circuit is in exactly
one ``inbound`` table.

Rules that are ours, not the spec's word for word:

- A build that opens (so we hold its keys) but cannot be served is answered with a
  BUILD_REPLY carrying a non-zero status (``start_reply``): OVERLOADED past a cap,
  NEXT_HOP_UNREACHABLE when the link to the next hop fails or its reply does not come
  within ``build_timeout_s``, REFUSED for a record that names this node as next hop. A
  build that does not open cannot be answered (no keys): it is dropped and counted.
  Caps are checked after the record opened (one X25519 per refused build), since only
  then can the refusal name this hop to the client.
- DESTROY carries no direction. When a neighbour uses the same circ_id for a circuit
  toward us as we use toward it (both sides pick ids avoiding both tables, so only a
  race does this), its DESTROY closes both: it is bound to both. A DESTROY that matches
  nothing on the sender's link is ``forged_destroy`` when that id is bound on another
  link (checked by scanning the links: only authenticated neighbours reach it) and
  ``unknown_circuit`` otherwise (the benign crossing of two DESTROYs).
- Idle circuits expire after ``idle_timeout_s`` without an accepted cell either way; the
  check is a sweep over the table at most every ``idle_check_interval_s``, so one deadline
  is all :meth:`Relay.get_timer` ever tracks and no per-circuit timer structure exists.
- ``now`` is Unix seconds (wall clock) throughout: build records carry Unix timestamps
  (circuits.md §5). A clock jump forward expires circuits early; never anything worse.

Counters (:attr:`Relay.stats`): every dropped cell under ``relay.drop.<reason>`` with the
reasons of :class:`routing.cells.CellError`, :class:`routing.onion.OnionError` and
:class:`routing.build.BuildError` as they are (so ``replay`` counts forward replays and
replayed builds alike) plus :data:`DROP_REASONS`; ``relay.circuits`` and
``relay.pending`` are gauges, refreshed when ``stats`` is read.

Not here: sockets and links (the driver connects, sends, and reports failures), the
client side of a circuit (routing/circuit.py), what the exit does with data.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from meshnode.errors import LocalProtocolError
from meshnode.link.ratelimit import TokenBucket
from routing.build import (
    BuildError,
    BuildStatus,
    NextHop,
    extend_reply,
    process_build,
    start_reply,
)
from routing.cells import (
    BODY_BYTES,
    Cell,
    CellError,
    CellType,
    Command,
    decode_message,
    encode_message,
    pack_header,
)
from routing.keys import HopKeys
from routing.onion import (
    BACKWARD_CAPACITY,
    BackwardOrigin,
    BackwardRelay,
    ForwardLayer,
    OnionError,
)
from routing.onionkeys import OnionKeyring, RandomBytes

__all__ = [
    "DROP_REASONS",
    "CircuitClosed",
    "CircuitData",
    "DestroyReason",
    "Extend",
    "Relay",
    "RelayEvent",
    "RelayLimits",
    "RelayOutput",
    "SendCell",
    "destroy_cell",
]

DROP_REASONS = (
    "unknown_circuit",  # no circuit bound to (peer, circ_id) on that side
    "forged_destroy",  # a DESTROY for a circ_id bound on another neighbour's link
    "circ_id_in_use",  # a BUILD for a circ_id the sender already uses toward us
    "not_open",  # FORWARD / BACKWARD on a circuit whose extension is still pending
    "unexpected_reply",  # BUILD_REPLY on a circuit that is not waiting for one
    "rate_limited",  # the circuit's token bucket is empty
    "circuit_limit",  # BUILD past max_circuits (answered OVERLOADED)
    "peer_circuit_limit",  # BUILD past max_circuits_per_peer (answered OVERLOADED)
    "pending_limit",  # BUILD past max_pending_builds (answered OVERLOADED)
    "extend_to_self",  # a record naming this node as next hop (answered REFUSED)
    "no_next_hop",  # a FORWARD to pass on at the last hop
    "data_not_exit",  # DATA for a hop that is not the last
    "unexpected_command",  # PROBE_REPLY travelling forward
)
"""Drop reasons of the relay itself, next to those of CellError, OnionError, BuildError."""

_CONTROL_SEQ = 0  # BUILD, BUILD_REPLY and DESTROY carry no sequence value
_MAX_ID_TRIES = 64


class DestroyReason(enum.IntEnum):
    """The first body byte of a DESTROY (circuits.md §7). Unknown values are passed on."""

    NONE = 0  # unspecified
    REQUESTED = 1  # the client (or the exit service) closed the circuit
    IDLE = 2  # no cell for the idle timeout
    PEER_LOST = 3  # a link on the path went down
    BUILD_FAILED = 4  # the build did not complete
    SHUTDOWN = 5  # the relay is shutting down (:meth:`Relay.close_all`)


def destroy_cell(circ_id: int, reason: int, random_bytes: RandomBytes) -> Cell:
    """A DESTROY cell: ``reason`` (0..255) in the first body byte, random bytes after it."""
    if not 0 <= reason <= 255:
        raise LocalProtocolError(f"destroy reason {reason} is not a byte")
    rest = random_bytes(BODY_BYTES - 1)
    if not isinstance(rest, bytes) or len(rest) != BODY_BYTES - 1:
        raise LocalProtocolError("random_bytes returned the wrong number of bytes")
    return Cell(circ_id, CellType.DESTROY, _CONTROL_SEQ, bytes((reason,)) + rest)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayLimits:
    """Caps and timers of one relay; the defaults suit a well-provisioned node."""

    max_circuits: int = 10_000
    """Circuits through this node in total; builds past it are answered OVERLOADED."""
    max_circuits_per_peer: int = 512
    """Circuits one neighbour may create through us (it is their predecessor)."""
    max_pending_builds: int = 1_024
    """Extensions waiting for the next hop's BUILD_REPLY."""
    idle_timeout_s: float = 300.0
    """A circuit with no accepted cell for this long is destroyed both ways."""
    build_timeout_s: float = 120.0
    """How long an extension waits for the next hop's BUILD_REPLY: a backstop for a next
    hop that is linked but silent. A hop that cannot be reached is reported sooner, by the
    link's handshake timeout (20 s) and :meth:`Relay.peer_unreachable`. Every hop waits
    for all the hops after it, so this exceeds four such timeouts: else a hop further up
    would time out first and the client would blame the wrong hop."""
    cell_rate_per_s: float = 2_000.0
    """Token bucket per circuit (FORWARD and BACKWARD together): ~2.8 MB/s of cells."""
    cell_burst: float = 500.0
    """The bucket's size: cells a circuit may send back to back."""
    idle_check_interval_s: float = 1.0
    """The idle sweep runs at most this often (the idle timeout's precision)."""

    def __post_init__(self) -> None:
        for name in ("max_circuits", "max_circuits_per_peer", "max_pending_builds"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LocalProtocolError(f"{name} must be a positive integer")
        for name in (
            "idle_timeout_s",
            "build_timeout_s",
            "cell_rate_per_s",
            "cell_burst",
            "idle_check_interval_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise LocalProtocolError(f"{name} must be a positive number")


# --- Outputs and events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCell:
    """Send ``cell`` (``cell.encode()`` in a link frame of kind KIND_CELL) to ``peer``."""

    peer: bytes
    """The neighbour's link key; it has a link (it sent us something on this circuit)."""
    cell: Cell


@dataclass(frozen=True, slots=True)
class Extend:
    """Connect to ``next_hop`` (its link key at its address) unless linked, then send
    ``cell`` (a BUILD) to it. If no link can be made, call :meth:`Relay.peer_unreachable`
    with ``next_hop.link_key``."""

    next_hop: NextHop
    cell: Cell


RelayOutput = SendCell | Extend


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """Base of the relay's events; only circuits that end here produce them."""

    handle: int
    """The circuit, as the exit service names it: unique for the relay's lifetime."""


@dataclass(frozen=True, slots=True)
class CircuitData(RelayEvent):
    """The client sent DATA to this node, the circuit's last hop."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CircuitClosed(RelayEvent):
    """A circuit ending here is gone; ``handle`` is no longer valid."""

    reason: int
    """A :class:`DestroyReason` value (or an unknown byte a DESTROY carried)."""


# --- State -------------------------------------------------------------------------------


class _Circuit:
    """One circuit through this node. ``next_peer`` is None at the last hop;
    ``pending`` holds the hop keys while the next hop's BUILD_REPLY is awaited."""

    __slots__ = (
        "backward",
        "bucket",
        "forward",
        "handle",
        "last_active",
        "next_id",
        "next_peer",
        "origin",
        "pending",
        "prev_id",
        "prev_peer",
    )

    def __init__(
        self, prev_peer: bytes, prev_id: int, keys: HopKeys, bucket: TokenBucket, now: float
    ) -> None:
        self.prev_peer = prev_peer
        self.prev_id = prev_id
        self.next_peer: bytes | None = None
        self.next_id = 0
        self.forward = ForwardLayer(keys)
        self.backward: BackwardRelay | None = None
        self.origin = BackwardOrigin(keys)
        self.bucket = bucket
        self.last_active = now
        self.pending: HopKeys | None = None
        self.handle = 0  # nonzero for circuits ending here


class _Link:
    """A neighbour's circuits: ``inbound`` it created toward us, ``outbound`` ours toward it."""

    __slots__ = ("inbound", "outbound", "peer")

    def __init__(self, peer: bytes) -> None:
        self.peer = peer  # the one bytes object every circuit on this link refers to
        self.inbound: dict[int, _Circuit] = {}
        self.outbound: dict[int, _Circuit] = {}


class Relay:
    """Every circuit through this node. Not thread-safe; call from one task."""

    def __init__(
        self,
        keyring: OnionKeyring,
        *,
        random_bytes: RandomBytes,
        limits: RelayLimits | None = None,
        link_key: bytes | None = None,
        local_circ_ids: Callable[[bytes, int], bool] | None = None,
    ) -> None:
        """``link_key``: this node's own link key, so a record naming us as next hop is
        refused instead of asking the driver to connect to itself. ``local_circ_ids``:
        True when the node's own client circuits use ``circ_id`` toward ``peer``; ids we
        choose avoid those too, so the driver can tell whose a BUILD_REPLY is."""
        self._keyring = keyring
        self._random = random_bytes
        self.limits = limits or RelayLimits()
        self._link_key = link_key
        self._local_circ_ids = local_circ_ids
        self._links: dict[bytes, _Link] = {}
        self._count = 0
        self._pending: dict[_Circuit, None] = {}  # insertion order = deadline order
        self._exits: dict[int, _Circuit] = {}
        self._next_handle = 1
        self._next_sweep: float | None = None
        self._out: list[RelayOutput] = []
        self._events: deque[RelayEvent] = deque()
        self._stats: Counter[str] = Counter()

    # --- queries ------------------------------------------------------------------------

    @property
    def stats(self) -> Counter[str]:
        """Counters (``relay.drop.<reason>``, ``relay.built`` ...) and the gauges
        ``relay.circuits`` and ``relay.pending``. The same Counter every time."""
        self._stats["relay.circuits"] = self._count
        self._stats["relay.pending"] = len(self._pending)
        return self._stats

    @property
    def circuit_count(self) -> int:
        return self._count

    def circuits_from(self, peer: bytes) -> int:
        """Circuits ``peer`` created through us (what max_circuits_per_peer caps)."""
        link = self._links.get(peer)
        return 0 if link is None else len(link.inbound)

    def circ_id_in_use(self, peer: bytes, circ_id: int) -> bool:
        """True if ``circ_id`` names a circuit on the link with ``peer`` either way; a
        client circuit toward ``peer`` should pick an id for which this is False."""
        link = self._links.get(peer)
        return link is not None and (circ_id in link.inbound or circ_id in link.outbound)

    # --- outputs ------------------------------------------------------------------------

    def cells_to_send(self) -> list[RelayOutput]:
        """Everything to send since the last call, in order."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> RelayEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has work (a build timing out, an idle sweep)."""
        deadline = self._next_sweep
        if self._pending:
            first = next(iter(self._pending)).last_active + self.limits.build_timeout_s
            deadline = first if deadline is None else min(deadline, first)
        return deadline

    # --- network input ------------------------------------------------------------------

    def receive(self, peer: bytes, cell: Cell, now: float) -> None:
        """Handle one cell from neighbour ``peer``. Never raises for anything it sends."""
        kind = cell.type
        if kind is CellType.FORWARD:
            self._on_forward(peer, cell, now)
        elif kind is CellType.BACKWARD:
            self._on_backward(peer, cell, now)
        elif kind is CellType.BUILD:
            self._on_build(peer, cell, now)
        elif kind is CellType.BUILD_REPLY:
            self._on_build_reply(peer, cell, now)
        else:
            self._on_destroy(peer, cell)

    def _drop(self, reason: str) -> None:
        self._stats["relay.drop." + reason] += 1

    def _on_build(self, peer: bytes, cell: Cell, now: float) -> None:
        link = self._links.get(peer)
        circ_id = cell.circ_id
        if link is not None and circ_id in link.inbound:
            self._drop("circ_id_in_use")
            return
        try:
            result = process_build(cell.body, self._keyring, now=now, random_bytes=self._random)
        except BuildError as exc:
            self._drop(exc.reason)
            return
        keys, next_hop = result.keys, result.next_hop
        refusal: BuildStatus | None = None
        if next_hop is not None and next_hop.link_key == self._link_key:
            self._drop("extend_to_self")
            refusal = BuildStatus.REFUSED
        elif self._count >= self.limits.max_circuits:
            self._drop("circuit_limit")
            refusal = BuildStatus.OVERLOADED
        elif link is not None and len(link.inbound) >= self.limits.max_circuits_per_peer:
            self._drop("peer_circuit_limit")
            refusal = BuildStatus.OVERLOADED
        elif next_hop is not None and len(self._pending) >= self.limits.max_pending_builds:
            self._drop("pending_limit")
            refusal = BuildStatus.OVERLOADED
        if refusal is not None:
            self._reply(peer, circ_id, keys, refusal, now)
            return
        if link is None:
            link = self._links[peer] = _Link(peer)
        out_link: _Link | None = None
        next_id = 0
        if next_hop is not None:
            out_link = self._links.get(next_hop.link_key)
            if out_link is None:
                out_link = self._links[next_hop.link_key] = _Link(next_hop.link_key)
            next_id = self._fresh_id(out_link)
        limits = self.limits
        bucket = TokenBucket(rate_per_s=limits.cell_rate_per_s, burst=limits.cell_burst, now=now)
        circuit = _Circuit(link.peer, circ_id, keys, bucket, now)
        link.inbound[circ_id] = circuit
        self._count += 1
        if self._next_sweep is None:
            self._next_sweep = now + limits.idle_timeout_s
        if next_hop is None or out_link is None or result.out_body is None:
            circuit.handle = handle = self._next_handle
            self._next_handle += 1
            self._exits[handle] = circuit
            self._stats["relay.built"] += 1
            self._reply(peer, circ_id, keys, BuildStatus.OK, now)
            return
        circuit.next_peer = out_link.peer
        circuit.next_id = next_id
        circuit.backward = BackwardRelay(keys)
        circuit.pending = keys
        out_link.outbound[next_id] = circuit
        self._pending[circuit] = None
        self._stats["relay.extending"] += 1
        build = Cell(next_id, CellType.BUILD, _CONTROL_SEQ, result.out_body)
        self._out.append(Extend(next_hop, build))

    def _on_build_reply(self, peer: bytes, cell: Cell, now: float) -> None:
        link = self._links.get(peer)
        circuit = None if link is None else link.outbound.get(cell.circ_id)
        if circuit is None:
            self._drop("unknown_circuit")
            return
        keys = circuit.pending
        if keys is None:
            self._drop("unexpected_reply")
            return
        try:
            body = extend_reply(keys, cell.body, BuildStatus.OK, now=now)
        except BuildError as exc:  # the pending build times out and is answered then
            self._drop(exc.reason)
            return
        circuit.pending = None
        del self._pending[circuit]
        circuit.last_active = now
        self._stats["relay.built"] += 1
        reply = Cell(circuit.prev_id, CellType.BUILD_REPLY, _CONTROL_SEQ, body)
        self._out.append(SendCell(circuit.prev_peer, reply))

    def forward_frame(
        self, peer: bytes, circ_id: int, seq: int, body: bytes | memoryview, now: float
    ) -> tuple[bytes, bytes] | None:
        """:meth:`receive` of a FORWARD cell, its header already parsed (the fast path
        builds no :class:`Cell`): ``(next_peer, payload)`` when the cell goes on (send
        ``payload``, the next cell's CELL_BYTES, to ``next_peer`` in a KIND_CELL frame);
        None when it went nowhere now (dropped and counted, or delivered here: see
        :meth:`cells_to_send` and :meth:`next_event`)."""
        link = self._links.get(peer)
        circuit = None if link is None else link.inbound.get(circ_id)
        if circuit is None:
            self._drop("unknown_circuit")
            return None
        if circuit.pending is not None:
            self._drop("not_open")
            return None
        if not circuit.bucket.take(now):
            self._drop("rate_limited")
            return None
        try:
            result = circuit.forward.open_layer(seq, body)  # window checked and updated
        except OnionError as exc:
            self._drop(exc.reason)
            return None
        circuit.last_active = now
        if isinstance(result, bytes):
            self._deliver(circuit, result)
            return None
        next_peer = circuit.next_peer
        if next_peer is None:
            self._drop("no_next_hop")
            return None
        next_seq, pt, filler = result
        header = pack_header(circuit.next_id, CellType.FORWARD, next_seq)
        return next_peer, b"".join((header, pt, filler))

    def backward_frame(
        self, peer: bytes, circ_id: int, seq: int, body: bytes, now: float
    ) -> tuple[bytes, bytes] | None:
        """:meth:`forward_frame` for a BACKWARD cell: ``(prev_peer, payload)`` or None."""
        link = self._links.get(peer)
        circuit = None if link is None else link.outbound.get(circ_id)
        if circuit is None:
            self._drop("unknown_circuit")
            return None
        backward = circuit.backward
        if circuit.pending is not None or backward is None:
            self._drop("not_open")
            return None
        if not circuit.bucket.take(now):
            self._drop("rate_limited")
            return None
        try:
            out_seq, out_body = backward.relay(seq, body)
        except OnionError as exc:
            self._drop(exc.reason)
            return None
        circuit.last_active = now
        return circuit.prev_peer, pack_header(
            circuit.prev_id, CellType.BACKWARD, out_seq
        ) + out_body

    def _on_forward(self, peer: bytes, cell: Cell, now: float) -> None:
        out = self.forward_frame(peer, cell.circ_id, cell.seq, cell.body, now)
        if out is not None:
            self._out.append(SendCell(out[0], Cell.decode(out[1])))

    def _on_backward(self, peer: bytes, cell: Cell, now: float) -> None:
        out = self.backward_frame(peer, cell.circ_id, cell.seq, cell.body, now)
        if out is not None:
            self._out.append(SendCell(out[0], Cell.decode(out[1])))

    def _deliver(self, circuit: _Circuit, message: bytes) -> None:
        try:
            command, data = decode_message(message)
        except CellError as exc:
            self._drop(exc.reason)
            return
        if command is Command.PROBE:
            message = encode_message(Command.PROBE_REPLY, data, BACKWARD_CAPACITY)
            self._send_backward(circuit, message)
        elif command is Command.DATA:
            if circuit.next_peer is not None:
                self._drop("data_not_exit")
                return
            self._events.append(CircuitData(circuit.handle, data))
        elif command is Command.PADDING:
            self._stats["relay.rx.padding"] += 1
        else:
            self._drop("unexpected_command")

    def _on_destroy(self, peer: bytes, cell: Cell) -> None:
        circ_id = cell.circ_id
        reason = cell.body[0]
        link = self._links.get(peer)
        from_prev = None if link is None else link.inbound.get(circ_id)
        from_next = None if link is None else link.outbound.get(circ_id)
        if from_prev is None and from_next is None:
            forged = any(
                circ_id in other.inbound or circ_id in other.outbound
                for other in self._links.values()
            )
            self._drop("forged_destroy" if forged else "unknown_circuit")
            return
        if from_prev is not None:
            self._close(from_prev, reason, to_prev=False, to_next=True)
        if from_next is not None and from_next is not from_prev:
            self._close(from_next, reason, to_prev=True, to_next=False)

    # --- link and exit input ------------------------------------------------------------

    def peer_unreachable(self, peer: bytes, now: float) -> None:
        """The link to ``peer`` is gone or could not be made: its circuits are destroyed
        toward their other side; extensions waiting on it are answered
        NEXT_HOP_UNREACHABLE."""
        link = self._links.get(peer)
        if link is None:
            return
        start = len(self._out)
        for circuit in list(link.inbound.values()):
            self._close(circuit, DestroyReason.PEER_LOST, to_prev=False, to_next=True)
        for circuit in list(link.outbound.values()):
            if link.outbound.get(circuit.next_id) is not circuit:
                continue  # closed above: it came from this peer too
            if circuit.pending is not None:
                self._fail_pending(circuit, now, destroy_next=False)
            else:
                self._close(circuit, DestroyReason.PEER_LOST, to_prev=True, to_next=False)
        self._links.pop(peer, None)
        # A circuit may come from and go to the same neighbour: send it nothing.
        self._out[start:] = [
            o for o in self._out[start:] if not (isinstance(o, SendCell) and o.peer == peer)
        ]

    def send_data(self, handle: int, data: bytes) -> bool:
        """Send ``data`` (at most BACKWARD_CAPACITY bytes) to the client of a circuit
        ending here; False when the circuit is gone."""
        circuit = self._exits.get(handle)
        if circuit is None:
            return False
        if len(data) > BACKWARD_CAPACITY:
            raise LocalProtocolError(f"{len(data)} bytes > {BACKWARD_CAPACITY} per cell")
        self._send_backward(circuit, encode_message(Command.DATA, data, BACKWARD_CAPACITY))
        return True

    def close(self, handle: int, reason: int = DestroyReason.REQUESTED) -> bool:
        """Destroy a circuit ending here (the exit service is done); False if gone."""
        circuit = self._exits.get(handle)
        if circuit is None:
            return False
        self._close(circuit, reason, to_prev=True, to_next=False, event=False)
        return True

    def close_all(self, reason: int = DestroyReason.SHUTDOWN) -> None:
        """Destroy every circuit through this node at once, for a shutdown: a DESTROY
        carrying ``reason`` to each circuit's predecessor and (if any) successor, so the
        neighbours release them now rather than at their idle timeout or when the link is
        found dead. Extensions still waiting for a BUILD_REPLY are destroyed the same way
        (the client sees its build destroyed); circuits ending here produce
        :class:`CircuitClosed`. The relay is empty afterwards; it keeps serving builds
        given to it later (the driver stops feeding it)."""
        if not 0 <= reason <= 255:
            raise LocalProtocolError(f"destroy reason {reason} is not a byte")
        circuits = [c for link in self._links.values() for c in link.inbound.values()]
        for circuit in circuits:  # every circuit is in exactly one inbound table
            self._close(circuit, reason, to_prev=True, to_next=True)
        self._stats["relay.shutdown"] += len(circuits)

    # --- timers -------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Answer extensions whose next hop did not reply, destroy idle circuits."""
        timeout = self.limits.build_timeout_s
        while self._pending:
            circuit = next(iter(self._pending))
            if circuit.last_active + timeout > now:
                break
            self._stats["relay.build_timeout"] += 1
            self._fail_pending(circuit, now, destroy_next=True)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        idle = self.limits.idle_timeout_s
        expired: list[_Circuit] = []
        earliest: float | None = None
        for link in self._links.values():
            for circuit in link.inbound.values():
                if circuit.pending is not None:
                    continue  # the build timeout handles it
                deadline = circuit.last_active + idle
                if deadline <= now:
                    expired.append(circuit)
                elif earliest is None or deadline < earliest:
                    earliest = deadline
        for circuit in expired:
            self._stats["relay.idle_timeout"] += 1
            self._close(circuit, DestroyReason.IDLE, to_prev=True, to_next=True)
        if self._count == 0:
            self._next_sweep = None
        else:
            # A pending circuit opens with deadline >= now + idle, after any earliest.
            soonest = now + self.limits.idle_check_interval_s
            self._next_sweep = soonest if earliest is None else max(earliest, soonest)

    # --- helpers ------------------------------------------------------------------------

    def _fresh_id(self, link: _Link) -> int:
        """A random nonzero circ_id unused on ``link`` either way (and by our clients)."""
        local = self._local_circ_ids
        for _ in range(_MAX_ID_TRIES):
            circ_id = int.from_bytes(self._random(4), "big")
            if (
                circ_id
                and circ_id not in link.outbound
                and circ_id not in link.inbound
                and (local is None or not local(link.peer, circ_id))
            ):
                return circ_id
        raise LocalProtocolError("no free circ_id: is random_bytes random?")

    def _reply(self, peer: bytes, circ_id: int, keys: HopKeys, status: int, now: float) -> None:
        body = start_reply(keys, status, now=now, random_bytes=self._random)
        self._out.append(SendCell(peer, Cell(circ_id, CellType.BUILD_REPLY, _CONTROL_SEQ, body)))

    def _send_backward(self, circuit: _Circuit, message: bytes) -> None:
        seq, body = circuit.origin.seal(message)
        cell = Cell(circuit.prev_id, CellType.BACKWARD, seq, body)
        self._out.append(SendCell(circuit.prev_peer, cell))

    def _fail_pending(self, circuit: _Circuit, now: float, *, destroy_next: bool) -> None:
        """The next hop did not answer: tell the predecessor (the client learns which hop
        failed from the status), and release whatever the next hop may hold."""
        keys = circuit.pending
        if keys is None:
            raise LocalProtocolError("not a pending circuit")
        self._stats["relay.extend_failed"] += 1
        self._remove(circuit)
        self._reply(circuit.prev_peer, circuit.prev_id, keys, BuildStatus.NEXT_HOP_UNREACHABLE, now)
        if destroy_next and circuit.next_peer is not None:
            cell = destroy_cell(circuit.next_id, DestroyReason.BUILD_FAILED, self._random)
            self._out.append(SendCell(circuit.next_peer, cell))

    def _close(
        self, circuit: _Circuit, reason: int, *, to_prev: bool, to_next: bool, event: bool = True
    ) -> None:
        self._remove(circuit)
        self._stats["relay.closed"] += 1
        if to_prev:
            cell = destroy_cell(circuit.prev_id, reason, self._random)
            self._out.append(SendCell(circuit.prev_peer, cell))
        if to_next and circuit.next_peer is not None:
            cell = destroy_cell(circuit.next_id, reason, self._random)
            self._out.append(SendCell(circuit.next_peer, cell))
        if circuit.handle and event:
            self._events.append(CircuitClosed(circuit.handle, reason))

    def _remove(self, circuit: _Circuit) -> None:
        links = self._links
        prev = links.get(circuit.prev_peer)
        if prev is not None and prev.inbound.get(circuit.prev_id) is circuit:
            del prev.inbound[circuit.prev_id]
            self._count -= 1
            if not self._count:
                self._next_sweep = None
            if not prev.inbound and not prev.outbound:
                del links[circuit.prev_peer]
        if circuit.next_peer is not None:
            nxt = links.get(circuit.next_peer)
            if nxt is not None and nxt.outbound.get(circuit.next_id) is circuit:
                del nxt.outbound[circuit.next_id]
                if not nxt.inbound and not nxt.outbound:
                    del links[circuit.next_peer]
        self._pending.pop(circuit, None)
        circuit.forward.discard()
        if circuit.handle:
            self._exits.pop(circuit.handle, None)
