"""ClientCircuit: the client's side of one circuit (sans-IO).

Built from :func:`routing.build.create_build`; it names the first hop's link key and
our circ_id on that link, and moves through :class:`CircuitState`::

    BUILDING --BUILD_REPLY, every hop OK--> OPEN --DESTROY / destroy()--> CLOSED
        \\--BUILD_REPLY refused or bad--> FAILED --destroy()--> CLOSED

Inputs: ``receive(cell, now)`` for the cells the first hop sends on our circ_id;
``send_data(data)``, ``probe(hop, now)`` and ``destroy()`` return the cell to send to
:attr:`ClientCircuit.first_hop`; ``handle_timer(now)`` when ``get_timer()`` is due
(probes that timed out count as lost). Outputs: those cells and ``next_event()``.

Probes (circuits.md §6): a PROBE carries an 8-byte random nonce and our 8-byte
timestamp (microseconds); hop i answers with a PROBE_REPLY sealed with its own backward
key, so the reply proves which hop answered and gives that hop's round-trip time. Each
hop keeps its last RTT samples and counts of probes sent, answered and lost
(:class:`HopHealth`). At most ``max_outstanding_probes`` are in flight: a new probe past
that counts the oldest as lost.

After FAILED, hops before the one that failed hold the circuit until their idle
timeout: call :meth:`ClientCircuit.destroy` to release them now. The build timeout is
the caller's (it knows its policy): :attr:`ClientCircuit.build_started_at` says when.
``now`` is Unix seconds, as everywhere in routing (build records carry Unix time).

Not here: choosing hops (routing/path.py), circuit ids across circuits and retries (the
manager), what DATA carries (the client front ends).
"""

from __future__ import annotations

import enum
import math
import struct
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from meshnode.errors import LocalProtocolError
from routing.build import BuildError, HopSpec, PendingBuild, create_build
from routing.cells import (
    MAX_CIRC_ID,
    Cell,
    CellError,
    CellType,
    Command,
    decode_message,
    encode_message,
)
from routing.onion import ClientCircuitCrypto, OnionError, capacity
from routing.onionkeys import RandomBytes
from routing.relay import DestroyReason, destroy_cell

__all__ = [
    "CircuitDestroyed",
    "CircuitEvent",
    "CircuitFailed",
    "CircuitOpened",
    "CircuitState",
    "ClientCircuit",
    "DataReceived",
    "HopHealth",
    "ProbeLost",
    "ProbeReplied",
]

_CONTROL_SEQ = 0
_PROBE = struct.Struct("!8sQ")  # nonce || timestamp in microseconds
_MAX_U64 = 2**64 - 1


class CircuitState(enum.Enum):
    BUILDING = "building"
    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


# --- Events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CircuitEvent:
    """Base of a client circuit's events."""


@dataclass(frozen=True, slots=True)
class CircuitOpened(CircuitEvent):
    """Every hop accepted the build; the circuit carries data now."""

    rtt: float
    """Seconds from the BUILD to its reply (one round trip over the whole path)."""


@dataclass(frozen=True, slots=True)
class CircuitFailed(CircuitEvent):
    """The build failed."""

    hop: int | None
    """The 1-based hop that refused or whose status did not open; None if the reply as a
    whole was malformed."""
    reason: str
    """A :class:`routing.build.BuildError` reason: ``refused``, ``bad_reply`` ..."""
    status: int | None
    """For ``refused``: the :class:`routing.build.BuildStatus` the hop sent."""


@dataclass(frozen=True, slots=True)
class DataReceived(CircuitEvent):
    """The last hop sent DATA."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ProbeReplied(CircuitEvent):
    hop: int
    rtt: float


@dataclass(frozen=True, slots=True)
class ProbeLost(CircuitEvent):
    hop: int


@dataclass(frozen=True, slots=True)
class CircuitDestroyed(CircuitEvent):
    """A hop destroyed the circuit (the first hop passed its DESTROY on to us)."""

    reason: int
    """A :class:`routing.relay.DestroyReason` value, or an unknown byte."""


# --- Health ------------------------------------------------------------------------------


class HopHealth:
    """Probe results for one hop: the last RTT samples and counts."""

    __slots__ = ("answered", "lost", "rtts", "sent")

    def __init__(self, samples: int) -> None:
        self.rtts: deque[float] = deque(maxlen=samples)
        self.sent = 0
        self.answered = 0
        self.lost = 0

    @property
    def median_rtt(self) -> float | None:
        """The median of the kept samples; None before the first reply."""
        ordered = sorted(self.rtts)
        if not ordered:
            return None
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def __repr__(self) -> str:
        return (
            f"HopHealth(sent={self.sent}, answered={self.answered}, lost={self.lost}, "
            f"median_rtt={self.median_rtt})"
        )


# --- The circuit -------------------------------------------------------------------------


class ClientCircuit:
    """One circuit as its client sees it. Not thread-safe; call from one task."""

    def __init__(
        self,
        hops: Sequence[HopSpec],
        *,
        now: float,
        random_bytes: RandomBytes,
        circ_id: int | None = None,
        probe_timeout_s: float = 10.0,
        max_outstanding_probes: int = 16,
        rtt_samples: int = 16,
    ) -> None:
        """``circ_id``: ours on the link to the first hop; the manager should pick one
        unused on that link (see :meth:`routing.relay.Relay.circ_id_in_use`); a random
        one by default."""
        if not isinstance(probe_timeout_s, int | float) or not math.isfinite(probe_timeout_s):
            raise LocalProtocolError("probe_timeout_s must be a finite number")
        if probe_timeout_s <= 0 or max_outstanding_probes < 1 or rtt_samples < 1:
            raise LocalProtocolError("probe settings must be positive")
        self._random = random_bytes
        body, pending = create_build(hops, now=now, random_bytes=random_bytes)
        if circ_id is None:
            while not circ_id:
                circ_id = int.from_bytes(self._rand(4), "big")
        if not 0 < circ_id <= MAX_CIRC_ID:
            raise LocalProtocolError(f"circ_id out of range: {circ_id}")
        self.circ_id = circ_id
        self.first_hop: bytes = hops[0].link_key
        self.hops: tuple[HopSpec, ...] = tuple(hops)
        self.build_started_at = float(now)
        self.state = CircuitState.BUILDING
        self.failure: CircuitFailed | None = None
        self.close_reason: int | None = None
        self._build = Cell(circ_id, CellType.BUILD, _CONTROL_SEQ, body)
        self._pending: PendingBuild | None = pending
        self._crypto: ClientCircuitCrypto | None = None
        self._probe_timeout_s = float(probe_timeout_s)
        self._max_probes = max_outstanding_probes
        self._probes: dict[bytes, tuple[int, float]] = {}  # nonce -> (hop, sent at)
        self._health = tuple(HopHealth(rtt_samples) for _ in hops)
        self._events: deque[CircuitEvent] = deque()
        self.stats: Counter[str] = Counter()
        """Counters: ``circuit.drop.<reason>`` for every cell dropped."""

    @property
    def hop_count(self) -> int:
        return len(self.hops)

    def health(self, hop: int) -> HopHealth:
        """Probe results of hop ``hop`` (1-based)."""
        self._check_hop(hop)
        return self._health[hop - 1]

    def build_cell(self) -> Cell:
        """The BUILD to send to :attr:`first_hop` (the same cell every call)."""
        return self._build

    def next_event(self) -> CircuitEvent | None:
        return self._events.popleft() if self._events else None

    # --- network input ------------------------------------------------------------------

    def receive(self, cell: Cell, now: float) -> None:
        """Handle a cell from the first hop. Never raises for anything it sends."""
        if cell.circ_id != self.circ_id:
            self._drop("wrong_circuit")
        elif cell.type is CellType.BACKWARD:
            self._on_backward(cell, now)
        elif cell.type is CellType.BUILD_REPLY:
            self._on_build_reply(cell, now)
        elif cell.type is CellType.DESTROY:
            if self.state is CircuitState.CLOSED:
                self._drop("closed")
                return
            self._shut(CircuitState.CLOSED)
            self.close_reason = cell.body[0]
            self._events.append(CircuitDestroyed(cell.body[0]))
        else:
            self._drop("unexpected_cell")

    def _drop(self, reason: str) -> None:
        self.stats["circuit.drop." + reason] += 1

    def _on_build_reply(self, cell: Cell, now: float) -> None:
        pending = self._pending
        if self.state is not CircuitState.BUILDING or pending is None:
            self._drop("unexpected_reply")
            return
        self._pending = None
        try:
            keys = pending.finish(cell.body)
        except BuildError as exc:
            self.state = CircuitState.FAILED
            self.failure = CircuitFailed(exc.hop, exc.reason, exc.status)
            self._events.append(self.failure)
            return
        self._crypto = ClientCircuitCrypto(keys)
        self.state = CircuitState.OPEN
        self._events.append(CircuitOpened(now - self.build_started_at))

    def _on_backward(self, cell: Cell, now: float) -> None:
        crypto = self._crypto
        if self.state is not CircuitState.OPEN or crypto is None:
            self._drop("not_open")
            return
        try:
            hop, message = crypto.unwrap_backward(cell.seq, cell.body)
            command, data = decode_message(message)
        except (OnionError, CellError) as exc:
            self._drop(exc.reason)
            return
        if command is Command.DATA:
            if hop != self.hop_count:
                self._drop("data_not_exit")
                return
            self._events.append(DataReceived(data))
        elif command is Command.PROBE_REPLY:
            nonce, _ = _PROBE.unpack(data)
            outstanding = self._probes.get(nonce)
            if outstanding is None:
                self._drop("unknown_probe")  # late (already counted lost) or never sent
                return
            probed, sent_at = outstanding
            if probed != hop:
                self._drop("probe_mismatch")
                return
            del self._probes[nonce]
            health = self._health[hop - 1]
            rtt = max(now - sent_at, 0.0)
            health.answered += 1
            health.rtts.append(rtt)
            self._events.append(ProbeReplied(hop, rtt))
        elif command is Command.PADDING:
            self.stats["circuit.rx.padding"] += 1
        else:
            self._drop("unexpected_command")

    # --- user calls ---------------------------------------------------------------------

    def send_data(self, data: bytes) -> Cell:
        """A FORWARD cell carrying ``data`` (at most ``capacity(hop_count)`` bytes) to
        the last hop."""
        crypto = self._open_crypto()
        room = capacity(self.hop_count)
        if len(data) > room:
            raise LocalProtocolError(f"{len(data)} bytes > {room} per cell on this circuit")
        seq, body = crypto.wrap_forward(self.hop_count, encode_message(Command.DATA, data, room))
        return Cell(self.circ_id, CellType.FORWARD, seq, body)

    def probe(self, hop: int, now: float) -> Cell:
        """A FORWARD cell carrying a PROBE for hop ``hop`` (1-based)."""
        crypto = self._open_crypto()
        self._check_hop(hop)
        if len(self._probes) >= self._max_probes:
            oldest = next(iter(self._probes))
            self._lose(oldest)
        nonce = self._rand(8)
        stamp = min(max(int(now * 1_000_000), 0), _MAX_U64)
        message = encode_message(Command.PROBE, _PROBE.pack(nonce, stamp), capacity(hop))
        seq, body = crypto.wrap_forward(hop, message)
        self._probes[nonce] = (hop, float(now))
        self._health[hop - 1].sent += 1
        return Cell(self.circ_id, CellType.FORWARD, seq, body)

    def destroy(self, reason: int = DestroyReason.REQUESTED) -> Cell:
        """The DESTROY to send to the first hop; the circuit is CLOSED afterwards."""
        if self.state is CircuitState.CLOSED:
            raise LocalProtocolError("the circuit is already closed")
        self._shut(CircuitState.CLOSED)
        self.close_reason = reason
        return destroy_cell(self.circ_id, reason, self._random)

    # --- timers -------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the oldest outstanding probe times out; None without probes."""
        if not self._probes:
            return None
        return next(iter(self._probes.values()))[1] + self._probe_timeout_s

    def handle_timer(self, now: float) -> None:
        """Count probes older than ``probe_timeout_s`` as lost."""
        timeout = self._probe_timeout_s
        while self._probes:
            nonce, (_, sent_at) = next(iter(self._probes.items()))
            if sent_at + timeout > now:
                break
            self._lose(nonce)

    # --- helpers ------------------------------------------------------------------------

    def _rand(self, n: int) -> bytes:
        data = self._random(n)
        if not isinstance(data, bytes) or len(data) != n:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        return data

    def _check_hop(self, hop: int) -> None:
        if type(hop) is not int or not 1 <= hop <= self.hop_count:
            raise LocalProtocolError(f"hop index {hop} outside 1..{self.hop_count}")

    def _open_crypto(self) -> ClientCircuitCrypto:
        if self.state is not CircuitState.OPEN or self._crypto is None:
            raise LocalProtocolError(f"the circuit is {self.state.value}, not open")
        return self._crypto

    def _lose(self, nonce: bytes) -> None:
        hop, _ = self._probes.pop(nonce)
        self._health[hop - 1].lost += 1
        self._events.append(ProbeLost(hop))

    def _shut(self, state: CircuitState) -> None:
        self.state = state
        self._pending = None
        self._crypto = None
        self._probes.clear()  # neither answered nor lost: the circuit is gone

    def __repr__(self) -> str:
        return (
            f"ClientCircuit(circ_id={self.circ_id}, hops={self.hop_count}, "
            f"state={self.state.value})"
        )
