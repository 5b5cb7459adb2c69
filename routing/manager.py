"""CircuitManager: the asyncio driver of circuits, for the node's own and for those it relays.

It owns nothing but glue: the sans-IO cores decide, this module moves cells and time.

- **Cells in.** It registers link frames of kind 0x20 (:data:`routing.cells.KIND_CELL`) on
  the node's :class:`~meshnode.link.udp.LinkService` and decodes each into a
  :class:`~routing.cells.Cell` (a malformed frame is dropped and counted,
  ``routing.drop.<reason>``). A BUILD_REPLY, BACKWARD or DESTROY arriving from the first
  hop of a circuit we built, on that circuit's id, goes to our
  :class:`~routing.circuit.ClientCircuit`; every other cell goes to the
  :class:`~routing.relay.Relay` (relays and exits), or is dropped and counted on a node
  that relays nothing (a client).
- **Cells out.** The relay's :class:`~routing.relay.SendCell` becomes ``link.send``; an
  :class:`~routing.relay.Extend` connects on demand first, as the DHT shim does
  (discovery/transport.py): the frame waits behind the handshake, and a handshake that
  gives up is the link's :class:`~meshnode.link.events.PeerUnreachable`, which this module
  forwards to :meth:`Relay.peer_unreachable` (and fails our own circuits through that
  peer).
- **Time.** One ``loop.call_later`` armed for the earliest of the relay's and the
  circuits' ``get_timer()`` (Unix seconds, like every routing core).
- **Building.** :meth:`CircuitManager.build` chooses a path (routing/path.py: entry
  guards, exit policy, distinct families and subnets unless ``[circuits]`` relaxes them
  for a loopback testnet), connects to the first hop, sends the one-round-trip BUILD
  and waits for the reply within the build timeout (learned, routing/health.py, unless
  configured). A failed attempt blames the hop it can name (a refusal names it; a hop
  that answers NEXT_HOP_UNREACHABLE blames the hop after it; a timeout blames every hop
  but the entry, whose link did come up), records it in the :class:`HealthBook` (and
  the guard's record), and is retried up to ``build_retries`` times through other
  relays, the blamed ones excluded.
- **Health.** Every ``probe_interval_s`` each open circuit probes every hop; replies feed
  the health book (RTT) and the circuit's own per-hop record. When a hop's probes are
  lost ``probe_failures`` times in a row the circuit is declared failed, the first
  silent hop is blamed (the hops after it cannot answer through it) and avoided by new
  builds for ``suspect_s``, and a DESTROY releases the hops before it.

Rules that are ours: a node's own client circuits pick circ ids unused on the link
either way (and the relay avoids ours, through ``local_circ_ids``); every background
task lives in one set and is cancelled by :meth:`CircuitManager.close`; every input is
processed through one queue, so a link event raised while we are sending (the link
pumps on every send) waits for the current step instead of re-entering it. A FORWARD,
or a BACKWARD on no circuit of ours, arriving outside a step is one step of its own
without a :class:`~routing.cells.Cell`: the header is parsed once and the relay's
``forward_frame`` / ``backward_frame`` return the bytes to send on; the timer is
re-armed only if the cell did anything but go on (idle expiry is the relay's sweep).

Counters (:attr:`CircuitManager.stats`): ``routing.drop.<reason>`` for every cell or
frame dropped here, ``routing.build.*``, ``routing.probe.*``, ``routing.circuits.*``,
plus the relay's ``relay.*`` and the circuits' ``circuit.drop.*``.

Not here: the byte formats and cryptography (routing/cells.py, onion.py, build.py), the
relay table (relay.py), path rules (path.py), what exits do with data (issue 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from discovery.descriptor import DescriptorRole, SignedDescriptor
from discovery.directory import Directory
from meshnode import crypto
from meshnode.contact import format_hostport
from meshnode.errors import LocalProtocolError, MeshError
from meshnode.identity import NodeId, b32encode
from meshnode.link.events import Addr, FrameReceived, LinkEvent, PeerUnreachable
from meshnode.link.udp import LinkService, LinkUnreachableError
from routing.build import BuildStatus, HopSpec
from routing.cells import (
    CELL_BYTES,
    HEADER_BYTES,
    KIND_CELL,
    MAX_CIRC_ID,
    Cell,
    CellError,
    CellType,
    unpack_header,
)
from routing.circuit import (
    CircuitDestroyed,
    CircuitEvent,
    CircuitFailed,
    CircuitOpened,
    CircuitState,
    ClientCircuit,
    DataReceived,
    ProbeLost,
    ProbeReplied,
)
from routing.health import BuildTimeout, HealthBook
from routing.onion import MAX_HOPS
from routing.onionkeys import OnionKeyring, RandomBytes
from routing.path import (
    AnyExitSelector,
    ExitSelector,
    GuardSet,
    PathConstraints,
    PathError,
    PortExitSelector,
    select_path,
)
from routing.relay import DestroyReason, Extend, Relay, RelayEvent, RelayLimits, SendCell

__all__ = [
    "CircuitConfig",
    "CircuitError",
    "CircuitErrorKind",
    "CircuitInfo",
    "CircuitManager",
    "HopInfo",
]

log = structlog.get_logger("meshnode.routing")

_MAX_ENDED = 32  # ended circuits still listed (state failed / destroyed / closed)
_MAX_INBOX = 256  # DATA cells a circuit keeps for a reader that is not reading
_MAX_ADDRESSES = 4096  # peers whose address we remember to reconnect for cells
_MAX_ID_TRIES = 64
_PROBE_GRACE_S = 1.0  # extra wait past the probe timeout for the timer to count a loss

CircuitErrorKind = Literal[
    "bad_request",  # the caller asked for something impossible (hops out of range ...)
    "unknown_exit",  # the chosen exit is not in the directory
    "no_path",  # the directory offers no path that keeps the rules
    "timeout",  # every attempt timed out
    "failed",  # attempts failed (refused, unreachable), the last not by a timeout
    "unknown_circuit",  # no circuit with that id
    "not_open",  # the circuit is not open (probes, data)
]


class CircuitError(MeshError):
    """A circuit could not be built or used; ``kind`` says why (:data:`CircuitErrorKind`),
    the message says it for people ("no exit accepts port 25")."""

    def __init__(self, kind: CircuitErrorKind, message: str) -> None:
        self.kind: CircuitErrorKind = kind
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitConfig:
    """Circuit tunables: the ``[circuits]`` table of config.toml."""

    hops: int = 3
    """Hops of a circuit built without an explicit count (1 to 5)."""

    build_timeout_s: float = 0.0
    """Seconds to wait for a build (link handshake and BUILD_REPLY); 0 = learned from
    observed build times (10 s until enough are known)."""

    build_retries: int = 2
    """Further attempts after a failed build, each avoiding the hops blamed so far."""

    allow_same_subnet: bool = False
    """Testnets only: let the hops of a circuit share an IPv4 /16 or IPv6 /32 (loopback)."""

    allow_same_operator_family: bool = False
    """Testnets only: let the hops of a circuit share an operator family."""

    probe_interval_s: float = 30.0
    """Probe every hop of every open circuit this often (0 = never; keeps circuits alive)."""

    probe_timeout_s: float = 10.0
    """A probe not answered within this many seconds is counted lost."""

    probe_failures: int = 3
    """Lost probes in a row after which a hop, and its circuit, count as failed."""

    suspect_s: float = 600.0
    """How long a hop blamed for a failed build or circuit is left out of new paths."""

    def __post_init__(self) -> None:
        if type(self.hops) is not int or not 1 <= self.hops <= MAX_HOPS:
            raise ValueError(f"hops must be an integer from 1 to {MAX_HOPS}")
        if type(self.build_retries) is not int or not 0 <= self.build_retries <= 10:
            raise ValueError("build_retries must be an integer from 0 to 10")
        if type(self.probe_failures) is not int or self.probe_failures < 1:
            raise ValueError("probe_failures must be an integer of at least 1")
        for name in ("build_timeout_s", "probe_interval_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be 0 or a positive number of seconds")
        for name in ("probe_timeout_s", "suspect_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")


# --- What callers see -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HopInfo:
    """One hop of a circuit, from its descriptor and our probes."""

    index: int
    node_id: NodeId
    operator: str
    region: str
    country: str
    address: tuple[str, int]
    roles: tuple[str, ...]
    rtt_s: float | None
    """Median of this circuit's last probe RTTs to the hop; None before a reply."""
    probes_sent: int
    probes_answered: int
    probes_lost: int
    weight_factor: float
    """The relay's health factor in the health book (1 = nothing against it)."""

    def to_json(self) -> dict[str, object]:
        return {
            "hop": self.index,
            "node_id": b32encode(self.node_id),
            "operator": self.operator,
            "region": self.region,
            "country": self.country,
            "address": format_hostport(*self.address),
            "roles": list(self.roles),
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 3),
            "probes_sent": self.probes_sent,
            "probes_answered": self.probes_answered,
            "probes_lost": self.probes_lost,
            "health": round(self.weight_factor, 3),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitInfo:
    """A circuit of this node, as :meth:`CircuitManager.circuits` lists it."""

    id: int
    state: str
    """``building``, ``open``, ``failed`` (we found it broken), ``destroyed`` (a hop
    tore it down) or ``closed`` (we closed it)."""
    reason: str | None
    hops: tuple[HopInfo, ...]
    port: int | None
    build_time_s: float | None
    attempts: int
    failed_attempts: tuple[str, ...]
    created_at: float
    opened_at: float | None
    ended_at: float | None

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "hops": [h.to_json() for h in self.hops],
            "exit": b32encode(self.hops[-1].node_id) if self.hops else None,
            "port": self.port,
            "build_ms": None if self.build_time_s is None else round(self.build_time_s * 1000, 3),
            "attempts": self.attempts,
            "failed_attempts": list(self.failed_attempts),
            "created_at": round(self.created_at, 3),
            "opened_at": None if self.opened_at is None else round(self.opened_at, 3),
            "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
            "age_s": round(max(0.0, now - self.created_at), 3),
        }


# --- Internal state -------------------------------------------------------------------


class _Managed:
    """One circuit of ours and what the manager knows about it."""

    __slots__ = (
        "attempts",
        "build_time_s",
        "circuit",
        "created_at",
        "descriptors",
        "done",
        "ended_at",
        "failed_attempts",
        "id",
        "inbox",
        "lost_streak",
        "opened_at",
        "port",
        "probe_waiters",
        "readers",
        "reason",
        "state",
    )

    def __init__(
        self,
        local_id: int,
        circuit: ClientCircuit,
        descriptors: Sequence[SignedDescriptor],
        port: int | None,
        created_at: float,
        done: asyncio.Future[CircuitEvent],
    ) -> None:
        self.id = local_id
        self.circuit = circuit
        self.descriptors = tuple(descriptors)
        self.port = port
        self.created_at = created_at
        self.opened_at: float | None = None
        self.ended_at: float | None = None
        self.build_time_s: float | None = None
        self.state = "building"
        self.reason: str | None = None
        self.attempts = 1
        self.failed_attempts: tuple[str, ...] = ()
        self.done = done
        self.inbox: deque[bytes] = deque(maxlen=_MAX_INBOX)
        self.readers: list[asyncio.Future[None]] = []
        self.probe_waiters: dict[int, list[asyncio.Future[float | None]]] = {}
        self.lost_streak = [0] * len(descriptors)

    @property
    def key(self) -> tuple[bytes, int]:
        return self.circuit.first_hop, self.circuit.circ_id

    def node_id(self, hop: int) -> NodeId:
        return self.descriptors[hop - 1].node_id


class _AttemptFailed(Exception):
    """One build attempt failed; ``blame`` are the node ids to avoid on the retry."""

    def __init__(self, message: str, blame: Iterable[NodeId], *, timed_out: bool) -> None:
        self.blame = tuple(blame)
        self.timed_out = timed_out
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class _ChosenExit:
    """An exit selector that accepts one node (and, with ``port``, only if its policy
    allows it)."""

    node_id: NodeId
    port: int | None

    def accepts(self, descriptor: SignedDescriptor) -> bool:
        if descriptor.node_id != self.node_id:
            return False
        return self.port is None or PortExitSelector(self.port).accepts(descriptor)

    def describe(self) -> str:
        return f"is {_short(self.node_id)}"


def _short(node_id: bytes) -> str:
    return b32encode(node_id)[:16]


def _hop_name(descriptor: SignedDescriptor) -> str:
    return _short(descriptor.node_id)


# --- The manager ----------------------------------------------------------------------


class CircuitManager:
    """Circuits of one node over its link service. :meth:`start`, then :meth:`close`."""

    def __init__(
        self,
        link: LinkService,
        *,
        node_id: NodeId,
        directory: Callable[[], Directory],
        keyring: OnionKeyring | None = None,
        config: CircuitConfig | None = None,
        relay_limits: RelayLimits | None = None,
        guards: GuardSet | None = None,
        health: HealthBook | None = None,
        build_timeout: BuildTimeout | None = None,
        on_relay_event: Callable[[RelayEvent], None] | None = None,
        random_bytes: RandomBytes = crypto.random_bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``keyring``: the node's onion keys; with it the node relays (a Relay serves
        other nodes' circuits), without it (a client) cells for others are dropped.
        ``directory`` returns the current directory snapshot for path selection.
        ``on_relay_event``: circuits that end here (the exit service; issue 6)."""
        self.link = link
        self.node_id = node_id
        self.config = config or CircuitConfig()
        self.guards = guards if guards is not None else GuardSet()
        self.health = health if health is not None else HealthBook()
        self.build_timeout = build_timeout if build_timeout is not None else BuildTimeout()
        self._directory = directory
        self._random = random_bytes
        self._clock = clock
        self._on_relay_event = on_relay_event
        self.relay: Relay | None = None
        if keyring is not None:
            self.relay = Relay(
                keyring,
                random_bytes=random_bytes,
                limits=relay_limits,
                link_key=link.endpoint.identity.link_public,
                local_circ_ids=self._own_circ_id,
            )
        self._stats: Counter[str] = Counter()
        self._rx_cells = 0  # routing.rx.cells and routing.tx.cells: plain ints per cell
        self._tx_cells = 0
        self._own: dict[tuple[bytes, int], _Managed] = {}
        self._circuits: dict[int, _Managed] = {}
        self._ended: deque[_Managed] = deque(maxlen=_MAX_ENDED)
        self._next_id = 1
        self._suspects: dict[NodeId, float] = {}
        self._addresses: OrderedDict[bytes, Addr] = OrderedDict()
        self._queue: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Register for cells and link events; start the probe loop. Call on the loop."""
        self._loop = asyncio.get_running_loop()
        self.link.register(KIND_CELL, self._on_frame)
        self.link.add_listener(self._on_link_event)
        if self.config.probe_interval_s > 0:
            self._spawn(self._monitor())

    @property
    def relaying(self) -> bool:
        return self.relay is not None

    async def close(self, *, graceful: bool = True) -> None:
        """Cancel every task; with ``graceful``, first tell the neighbours: every circuit
        we relay is destroyed toward both sides (reason SHUTDOWN) and each of our own gets
        a DESTROY to its first hop, so nobody waits for an idle timeout or a dead-peer
        detection. The cells are handed to the link before this returns."""
        if self._closed:
            return
        if self._loop is not None:
            self._submit(self._teardown, graceful)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _teardown(self, graceful: bool) -> None:
        if graceful and self.relay is not None:
            self.relay.close_all(DestroyReason.SHUTDOWN)
        for managed in list(self._circuits.values()):
            if graceful and managed.circuit.state is not CircuitState.CLOSED:
                self._send(managed.circuit.first_hop, managed.circuit.destroy())
            self._end(managed, "closed", "the node is shutting down")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._stats["routing.error.task"] += 1
            log.error("routing.task_failed", error=repr(task.exception()))

    # --- queries ------------------------------------------------------------------------

    @property
    def stats(self) -> Counter[str]:
        """Every routing counter: ours, the relay's and the circuits' (a new Counter)."""
        merged = Counter(self._stats)
        merged["routing.rx.cells"] += self._rx_cells
        merged["routing.tx.cells"] += self._tx_cells
        merged["routing.circuits.open"] = sum(
            1 for m in self._circuits.values() if m.state == "open"
        )
        merged["routing.suspects"] = len(self._live_suspects())
        for managed in self._circuits.values():
            merged.update(managed.circuit.stats)
        if self.relay is not None:
            merged.update(self.relay.stats)
        return Counter({k: v for k, v in merged.items() if v})

    def circuits(self) -> list[CircuitInfo]:
        """Our circuits: building and open ones, then the last ended ones (newest first)."""
        live = sorted(self._circuits.values(), key=lambda m: m.id)
        ended = sorted(self._ended, key=lambda m: m.id, reverse=True)
        return [self._info(m) for m in (*live, *ended)]

    def circuit(self, circuit_id: int) -> CircuitInfo:
        managed = self._find(circuit_id)
        return self._info(managed)

    def _find(self, circuit_id: int) -> _Managed:
        managed = self._circuits.get(circuit_id)
        if managed is None:
            managed = next((m for m in self._ended if m.id == circuit_id), None)
        if managed is None:
            raise CircuitError("unknown_circuit", f"no circuit {circuit_id}")
        return managed

    def _info(self, managed: _Managed) -> CircuitInfo:
        circuit = managed.circuit
        now = self._clock()
        hops = []
        for index, descriptor in enumerate(managed.descriptors, start=1):
            body = descriptor.body
            health = circuit.health(index)
            hops.append(
                HopInfo(
                    index=index,
                    node_id=descriptor.node_id,
                    operator=body.operator.name,
                    region=body.region,
                    country=body.country,
                    address=circuit.hops[index - 1].address,
                    roles=tuple(sorted(r.value for r in body.roles)),
                    rtt_s=health.median_rtt,
                    probes_sent=health.sent,
                    probes_answered=health.answered,
                    probes_lost=health.lost,
                    weight_factor=self.health.weight_factor(descriptor.node_id, now=now),
                )
            )
        return CircuitInfo(
            id=managed.id,
            state=managed.state,
            reason=managed.reason,
            hops=tuple(hops),
            port=managed.port,
            build_time_s=managed.build_time_s,
            attempts=managed.attempts,
            failed_attempts=managed.failed_attempts,
            created_at=managed.created_at,
            opened_at=managed.opened_at,
            ended_at=managed.ended_at,
        )

    def _own_circ_id(self, peer: bytes, circ_id: int) -> bool:
        return (peer, circ_id) in self._own

    def _live_suspects(self) -> set[NodeId]:
        now = self._clock()
        for node_id in [n for n, until in self._suspects.items() if until <= now]:
            del self._suspects[node_id]
        return set(self._suspects)

    # --- building -----------------------------------------------------------------------

    async def build(
        self, hops: int | None = None, exit_node_id: NodeId | None = None, port: int | None = None
    ) -> CircuitInfo:
        """Build a circuit of ``hops`` hops (default ``[circuits] hops``) ending at
        ``exit_node_id`` (any exit by default) whose exit policy allows ``port`` (any
        port by default). Retries up to ``build_retries`` times avoiding the hops blamed.

        Raises :class:`CircuitError`: ``bad_request``, ``unknown_exit``, ``no_path``,
        ``timeout`` or ``failed``, with a message for people.
        """
        if self._closed:
            raise CircuitError("failed", "the circuit manager is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        hops = self.config.hops if hops is None else hops
        if type(hops) is not int or not 1 <= hops <= MAX_HOPS:
            raise CircuitError("bad_request", f"hops must be an integer from 1 to {MAX_HOPS}")
        if port is not None and (type(port) is not int or not 1 <= port <= 65535):
            raise CircuitError("bad_request", "port must be an integer from 1 to 65535")
        blamed: set[NodeId] = set()
        failures: list[str] = []
        timed_out = True
        attempts = 1 + self.config.build_retries
        for attempt in range(1, attempts + 1):
            path = self._choose(hops, exit_node_id, port, blamed, failures)
            self._stats["routing.build.attempts"] += 1
            try:
                managed = await self._attempt(path, port)
            except _AttemptFailed as exc:
                if self._closed:
                    raise CircuitError("failed", "the node is shutting down") from None
                self._stats["routing.build.failed"] += 1
                failures.append(f"attempt {attempt}: {exc}")
                log.info("routing.build_failed", attempt=attempt, error=str(exc))
                blamed.update(exc.blame)
                if exit_node_id is not None:
                    blamed.discard(exit_node_id)  # the caller's choice: blame the others
                timed_out = exc.timed_out
                continue
            managed.attempts = attempt
            managed.failed_attempts = tuple(failures)
            self._stats["routing.build.ok"] += 1
            log.info(
                "routing.circuit_built",
                circuit=managed.id,
                hops=[_hop_name(d) for d in managed.descriptors],
                build_ms=round((managed.build_time_s or 0) * 1000, 3),
                attempt=attempt,
            )
            return self._info(managed)
        kind: CircuitErrorKind = "timeout" if timed_out else "failed"
        self._stats[f"routing.build.gave_up_{kind}"] += 1
        raise CircuitError(
            kind,
            f"circuit build failed after {attempts} attempt{'s' if attempts > 1 else ''}: "
            + "; ".join(failures),
        )

    def _choose(
        self,
        hops: int,
        exit_node_id: NodeId | None,
        port: int | None,
        blamed: set[NodeId],
        failures: list[str],
    ) -> list[SignedDescriptor]:
        directory = self._directory()
        selector: ExitSelector
        if exit_node_id is not None:
            chosen = directory.get(exit_node_id)
            if chosen is None:
                raise CircuitError(
                    "unknown_exit",
                    f"exit {b32encode(exit_node_id)} is not in this node's directory",
                )
            if DescriptorRole.EXIT not in chosen.body.roles:
                raise CircuitError("no_path", f"node {b32encode(exit_node_id)} is not an exit")
            if port is not None and not PortExitSelector(port).accepts(chosen):
                raise CircuitError(
                    "no_path", f"exit {b32encode(exit_node_id)} does not accept port {port}"
                )
            selector = _ChosenExit(exit_node_id, port)
        elif port is not None:
            selector = PortExitSelector(port)
        else:
            selector = AnyExitSelector()
        constraints = PathConstraints(
            hops=hops,
            allow_same_subnet=self.config.allow_same_subnet,
            allow_same_operator_family=self.config.allow_same_operator_family,
        )
        suspects = self._live_suspects() - blamed
        if exit_node_id is not None:
            suspects.discard(exit_node_id)

        def select(exclude: set[NodeId]) -> list[SignedDescriptor]:
            return select_path(
                directory,
                constraints=constraints,
                exit_selector=selector,
                guards=self.guards,
                health=self.health,
                random_bytes=self._random,
                exclude=exclude,
                own_node_id=self.node_id,
            )

        try:
            return select(blamed | suspects)
        except PathError as exc:
            if suspects:
                # Relays recently blamed are a preference, not a rule: without them
                # there is no path, so try them again.
                with contextlib.suppress(PathError):
                    self._stats["routing.build.used_suspects"] += 1
                    return select(set(blamed))
            message = str(exc)
            if failures:
                message += " (after " + "; ".join(failures) + ")"
            raise CircuitError("no_path", message) from None

    def _fresh_circ_id(self, peer: bytes) -> int:
        relay = self.relay
        for _ in range(_MAX_ID_TRIES):
            circ_id = int.from_bytes(self._random(4), "big") & MAX_CIRC_ID
            if (
                circ_id
                and (peer, circ_id) not in self._own
                and (relay is None or not relay.circ_id_in_use(peer, circ_id))
            ):
                return circ_id
        raise LocalProtocolError("no free circ_id: is random_bytes random?")

    async def _attempt(self, path: Sequence[SignedDescriptor], port: int | None) -> _Managed:
        """Build one circuit along ``path``; the open circuit, or :class:`_AttemptFailed`."""
        loop = asyncio.get_running_loop()
        specs = [HopSpec.from_descriptor(d.body) for d in path]
        first = specs[0]
        timeout = self.config.build_timeout_s or self.build_timeout.timeout_s
        started = loop.time()
        now = self._clock()
        names = " > ".join(_hop_name(d) for d in path)
        try:
            await self.link.connect(first.link_key, first.address, timeout=timeout)
        except (LinkUnreachableError, LocalProtocolError) as exc:
            self._record_failure(path, blame=[1], now=self._clock())
            raise _AttemptFailed(
                f"build timed out at hop 1 ({_hop_name(path[0])}): no link to it "
                f"within {timeout:g} s ({exc})",
                [path[0].node_id],
                timed_out=True,
            ) from None
        if self._closed:
            raise _AttemptFailed("the circuit manager closed", (), timed_out=False)
        circuit = ClientCircuit(
            specs,
            now=now,
            random_bytes=self._random,
            circ_id=self._fresh_circ_id(first.link_key),
            probe_timeout_s=self.config.probe_timeout_s,
        )
        managed = _Managed(self._next_id, circuit, path, port, now, loop.create_future())
        self._next_id += 1
        self._own[managed.key] = managed
        self._circuits[managed.id] = managed
        self._remember(first.link_key, first.address)
        self._submit(self._send, first.link_key, circuit.build_cell())
        remaining = max(0.0, timeout - (loop.time() - started))
        try:
            event = await asyncio.wait_for(asyncio.shield(managed.done), remaining)
        except TimeoutError:
            waited = loop.time() - started
            self.build_timeout.record_timeout(waited)
            self._stats["routing.build.timeout"] += 1
            self._submit(self._abandon, managed, "build timed out")
            self._record_failure(path, blame=range(2, len(path) + 1), now=self._clock())
            raise _AttemptFailed(
                f"build timed out after {waited:.1f} s on path {names} "
                f"(the link to hop 1 is up; hops 2..{len(path)} blamed)"
                if len(path) > 1
                else f"build timed out after {waited:.1f} s at hop 1 ({names})",
                [d.node_id for d in path[1:]] or [path[0].node_id],
                timed_out=True,
            ) from None
        except asyncio.CancelledError:
            self._submit(self._abandon, managed, "build cancelled")
            raise
        if isinstance(event, CircuitOpened):
            duration = loop.time() - started
            managed.build_time_s = duration
            managed.opened_at = self._clock()
            managed.state = "open"
            self.build_timeout.record_success(duration)
            now = self._clock()
            for descriptor in path:
                self.health.record_build(descriptor.node_id, ok=True, now=now)
            self.guards.record_success(path[0].node_id)
            return managed
        message, blame = self._explain(managed, event)
        self._submit(self._abandon, managed, message)
        self._record_failure(path, blame=blame, now=self._clock())
        raise _AttemptFailed(
            message, [path[i - 1].node_id for i in blame], timed_out=False
        ) from None

    def _explain(self, managed: _Managed, event: CircuitEvent) -> tuple[str, list[int]]:
        """A failed build in words, and the hops (1-based) to blame."""
        path = managed.descriptors
        n = len(path)
        if isinstance(event, CircuitFailed):
            hop = event.hop
            if event.reason == "closed":
                return "the circuit was closed during the build", []
            if hop is None:
                return f"malformed build reply ({event.reason})", list(range(1, n + 1))
            name = f"hop {hop} ({_hop_name(path[hop - 1])})"
            if event.reason == "refused":
                if event.status == BuildStatus.NEXT_HOP_UNREACHABLE and hop < n:
                    nxt = f"hop {hop + 1} ({_hop_name(path[hop])})"
                    return f"build failed at {nxt}: unreachable from {name}", [hop + 1]
                status = _status_name(event.status)
                return f"build refused at {name}: {status}", [hop]
            if event.reason == "unreachable":
                return f"build failed at {name}: the link to it was lost", [hop]
            return f"build failed at {name}: its status did not verify ({event.reason})", [hop]
        if isinstance(event, CircuitDestroyed):
            reason = _destroy_reason(event.reason)
            return f"the path destroyed the circuit during the build ({reason})", [1]
        return f"build failed ({type(event).__name__})", list(range(1, n + 1))

    def _record_failure(
        self, path: Sequence[SignedDescriptor], *, blame: Iterable[int], now: float
    ) -> None:
        """Count a failed build against the blamed hops (1-based) and avoid them."""
        until = now + self.config.suspect_s
        for hop in blame:
            node_id = path[hop - 1].node_id
            self.health.record_build(node_id, ok=False, now=now)
            self._suspects[node_id] = until
            if hop == 1:
                self.guards.record_failure(node_id, now=now)

    def _abandon(self, managed: _Managed, reason: str) -> None:
        """A build that will not be used: release whatever hops hold it, forget it."""
        if managed.circuit.state is not CircuitState.CLOSED:
            self._send(
                managed.circuit.first_hop, managed.circuit.destroy(DestroyReason.BUILD_FAILED)
            )
        self._forget(managed)

    # --- using circuits -----------------------------------------------------------------

    async def probe_all(self, circuit_id: int, *, rounds: int = 1) -> list[float | None]:
        """Probe every hop ``rounds`` times (rounds one after another); the last round's
        RTT per hop in seconds (None: lost). Results also go to the health book and the
        circuit's per-hop record (median RTT, counts)."""
        managed = self._open(circuit_id)
        results: list[float | None] = []
        for _ in range(max(1, rounds)):
            loop = asyncio.get_running_loop()
            waiters: list[asyncio.Future[float | None]] = []
            for hop in range(1, managed.circuit.hop_count + 1):
                fut: asyncio.Future[float | None] = loop.create_future()
                managed.probe_waiters.setdefault(hop, []).append(fut)
                waiters.append(fut)
            self._submit(self._probe, managed)
            timeout = self.config.probe_timeout_s + _PROBE_GRACE_S
            done, pending = await asyncio.wait(waiters, timeout=timeout)
            for fut in pending:
                fut.cancel()
            results = [
                fut.result() if fut in done and not fut.cancelled() else None for fut in waiters
            ]
            if managed.state != "open":
                break
        return results

    def send_data(self, circuit_id: int, data: bytes) -> None:
        """Send ``data`` (at most one cell's worth) to the exit of an open circuit."""
        managed = self._open(circuit_id)
        self._submit(self._send_data, managed, bytes(data))

    async def receive(self, circuit_id: int, *, timeout: float | None = None) -> bytes:
        """The next DATA the exit sent on the circuit (TimeoutError after ``timeout``)."""
        managed = self._find(circuit_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not managed.inbox:
            if managed.state not in {"open", "building"}:
                raise CircuitError("not_open", f"circuit {circuit_id} is {managed.state}")
            fut: asyncio.Future[None] = loop.create_future()
            managed.readers.append(fut)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(fut, left)
            finally:
                if fut in managed.readers:
                    managed.readers.remove(fut)
        return managed.inbox.popleft()

    def destroy(self, circuit_id: int) -> bool:
        """Close one of our circuits (DESTROY to its first hop). False if already ended."""
        managed = self._find(circuit_id)
        if managed.id not in self._circuits:
            return False
        self._submit(self._close_circuit, managed)
        return True

    def relay_send(self, handle: int, data: bytes) -> bool:
        """Exit side: send ``data`` back to the client of circuit ``handle`` (from a
        :class:`~routing.relay.CircuitData` event); False when the circuit is gone."""
        relay = self.relay
        if relay is None:
            return False
        sent = relay.send_data(handle, bytes(data))
        self._submit(_nothing)
        return sent

    def relay_close(self, handle: int) -> bool:
        """Exit side: destroy circuit ``handle`` toward its client; False when gone."""
        relay = self.relay
        if relay is None:
            return False
        closed = relay.close(handle)
        self._submit(_nothing)
        return closed

    def _open(self, circuit_id: int) -> _Managed:
        managed = self._find(circuit_id)
        if managed.state != "open":
            raise CircuitError("not_open", f"circuit {circuit_id} is {managed.state}")
        return managed

    def _close_circuit(self, managed: _Managed) -> None:
        if managed.circuit.state is not CircuitState.CLOSED:
            self._send(managed.circuit.first_hop, managed.circuit.destroy())
        self._end(managed, "closed", "closed on request")

    def _send_data(self, managed: _Managed, data: bytes) -> None:
        if managed.circuit.state is not CircuitState.OPEN:
            self._stats["routing.drop.data_not_open"] += 1
            return
        self._send(managed.circuit.first_hop, managed.circuit.send_data(data))

    def _probe(self, managed: _Managed) -> None:
        circuit = managed.circuit
        if circuit.state is not CircuitState.OPEN:
            return
        now = self._clock()
        for hop in range(1, circuit.hop_count + 1):
            self._stats["routing.probe.sent"] += 1
            self._send(circuit.first_hop, circuit.probe(hop, now))
        self._drain(managed)

    async def _monitor(self) -> None:
        interval = self.config.probe_interval_s
        while True:
            await asyncio.sleep(interval)
            for managed in list(self._circuits.values()):
                if managed.state == "open":
                    self._submit(self._probe, managed)

    # --- input --------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` now, or after the step in progress if called from inside one;
        then run the relay's outputs and re-arm the timer."""
        self._queue.append((fn, args))
        if self._busy:
            return
        self._busy = True
        try:
            self._run_queue()
        finally:
            self._busy = False
        self._reschedule()

    def _run_queue(self) -> None:
        while self._queue:
            call, call_args = self._queue.popleft()
            try:
                call(*call_args)
                self._flush()
            except Exception:  # a bug must not stop the link's dispatch loop
                self._stats["routing.error.handler"] += 1
                log.exception("routing.handler_failed", call=getattr(call, "__name__", "?"))

    def _on_frame(self, event: FrameReceived) -> None:
        """A cell frame. A well-formed FORWARD, or BACKWARD on no circuit of ours, takes
        the relay's fast path (no :class:`Cell` objects; :meth:`_receive` is the general
        one), and re-arms no timer when relayed on: that moves no deadline (idle expiry
        is a sweep); whatever else may have happened goes through :meth:`_reschedule`."""
        if self._closed:
            return
        payload = event.payload
        relay = self.relay
        if relay is None or self._busy or len(payload) != CELL_BYTES:
            self._submit(self._receive, event.peer, event.addr, payload)
            return
        circ_id, kind, seq = unpack_header(payload)
        peer = event.peer
        if not circ_id or not (
            kind == _FORWARD or (kind == _BACKWARD and (peer, circ_id) not in self._own)
        ):
            self._submit(self._receive, peer, event.addr, payload)
            return
        self._busy = True
        settled = False
        try:
            self._rx_cells += 1
            addresses = self._addresses
            addr = event.addr
            if addresses.get(peer) == addr:
                addresses.move_to_end(peer)
            else:
                self._remember(peer, addr)
            if kind == _FORWARD:
                view = memoryview(payload)[HEADER_BYTES:]
                out = relay.forward_frame(peer, circ_id, seq, view, self._clock())
            else:
                out = relay.backward_frame(
                    peer, circ_id, seq, payload[HEADER_BYTES:], self._clock()
                )
            if out is None:
                self._flush()  # a drop, or a delivery here (probe reply, exit data)
            else:
                next_peer, cell_bytes = out
                try:
                    self.link.send(next_peer, KIND_CELL, cell_bytes)
                except LocalProtocolError:
                    self._resend(next_peer, cell_bytes)
                else:
                    self._tx_cells += 1
                settled = not self._queue
        except Exception:  # a bug must not stop the link's dispatch loop
            self._stats["routing.error.handler"] += 1
            log.exception("routing.handler_failed", call="_on_frame")
        if settled:
            self._busy = False
            return
        try:
            self._run_queue()
        finally:
            self._busy = False
        self._reschedule()

    def _on_link_event(self, event: LinkEvent) -> None:
        if isinstance(event, PeerUnreachable) and not self._closed:
            self._submit(self._peer_lost, event.peer, "no link handshake response")

    def _receive(self, peer: bytes, addr: Addr, payload: bytes) -> None:
        try:
            cell = Cell.decode(payload)
        except CellError as exc:
            self._stats["routing.drop." + exc.reason] += 1
            return
        self._rx_cells += 1
        self._remember(peer, addr)
        now = self._clock()
        managed = None
        if cell.type in (CellType.BUILD_REPLY, CellType.BACKWARD, CellType.DESTROY):
            managed = self._own.get((peer, cell.circ_id))
        if managed is not None:
            managed.circuit.receive(cell, now)
            self._drain(managed)
            relay = self.relay
            if (
                cell.type is CellType.DESTROY
                and relay is not None
                and relay.circ_id_in_use(peer, cell.circ_id)
            ):
                relay.receive(peer, cell, now)  # the same id both ways: it closes both
            return
        if self.relay is None:
            reason = "not_a_relay" if cell.type is CellType.BUILD else "unknown_circuit"
            self._stats["routing.drop." + reason] += 1
            return
        self.relay.receive(peer, cell, now)

    def _peer_lost(self, peer: bytes, why: str) -> None:
        now = self._clock()
        if self.relay is not None:
            self.relay.peer_unreachable(peer, now)
        self._addresses.pop(peer, None)
        for managed in [m for m in self._circuits.values() if m.circuit.first_hop == peer]:
            circuit = managed.circuit
            if circuit.state is CircuitState.BUILDING:
                if not managed.done.done():
                    managed.done.set_result(CircuitFailed(1, "unreachable", None))
                continue
            if circuit.state is not CircuitState.CLOSED:
                circuit.destroy(DestroyReason.PEER_LOST)  # the link is gone: nothing to send
            first = managed.descriptors[0]
            self._suspect(first.node_id, now)
            self.guards.record_failure(first.node_id, now=now)
            self._stats["routing.circuits.failed"] += 1
            self._end(managed, "failed", f"the link to hop 1 ({_hop_name(first)}) was lost ({why})")

    # --- circuit events -----------------------------------------------------------------

    def _drain(self, managed: _Managed) -> None:
        circuit = managed.circuit
        event = circuit.next_event()
        while event is not None:
            self._on_circuit_event(managed, event)
            event = circuit.next_event()

    def _on_circuit_event(self, managed: _Managed, event: CircuitEvent) -> None:
        now = self._clock()
        if isinstance(event, CircuitOpened | CircuitFailed):
            if not managed.done.done():
                managed.done.set_result(event)
        elif isinstance(event, DataReceived):
            if len(managed.inbox) >= _MAX_INBOX:
                self._stats["routing.drop.inbox_full"] += 1
            managed.inbox.append(event.data)
            self._stats["routing.rx.data"] += 1
            self._wake(managed)
        elif isinstance(event, ProbeReplied):
            self._stats["routing.probe.answered"] += 1
            self.health.record_probe(managed.node_id(event.hop), rtt_s=event.rtt, now=now)
            managed.lost_streak[event.hop - 1] = 0
            self._probe_result(managed, event.hop, event.rtt)
        elif isinstance(event, ProbeLost):
            self._stats["routing.probe.lost"] += 1
            self.health.record_probe(managed.node_id(event.hop), rtt_s=None, now=now)
            managed.lost_streak[event.hop - 1] += 1
            self._probe_result(managed, event.hop, None)
            self._check_streaks(managed, now)
        elif isinstance(event, CircuitDestroyed):
            if not managed.done.done():
                managed.done.set_result(event)
                return
            reason = _destroy_reason(event.reason)
            self._stats["routing.circuits.destroyed"] += 1
            self._end(managed, "destroyed", f"destroyed by the path ({reason})")

    def _probe_result(self, managed: _Managed, hop: int, rtt: float | None) -> None:
        waiters = managed.probe_waiters.pop(hop, [])
        for fut in waiters:
            if not fut.done():
                fut.set_result(rtt)

    def _check_streaks(self, managed: _Managed, now: float) -> None:
        limit = self.config.probe_failures
        if managed.state != "open":
            return
        for hop, streak in enumerate(managed.lost_streak, start=1):
            if streak >= limit:
                descriptor = managed.descriptors[hop - 1]
                self._suspect(descriptor.node_id, now)
                if hop == 1:
                    self.guards.record_failure(descriptor.node_id, now=now)
                self._stats["routing.circuits.failed"] += 1
                log.info("routing.circuit_failed", circuit=managed.id, hop=hop)
                if managed.circuit.state is not CircuitState.CLOSED:
                    cell = managed.circuit.destroy(DestroyReason.PEER_LOST)
                    self._send(managed.circuit.first_hop, cell)
                self._end(
                    managed,
                    "failed",
                    f"hop {hop} ({_hop_name(descriptor)}) stopped answering probes "
                    f"({streak} lost in a row)",
                )
                return

    def _suspect(self, node_id: NodeId, now: float) -> None:
        self._suspects[node_id] = now + self.config.suspect_s

    def _end(self, managed: _Managed, state: str, reason: str) -> None:
        if managed.id not in self._circuits:
            return
        managed.state = state
        managed.reason = reason
        managed.ended_at = self._clock()
        self._forget(managed)
        self._ended.append(managed)

    def _forget(self, managed: _Managed) -> None:
        if self._own.get(managed.key) is managed:
            del self._own[managed.key]
        self._circuits.pop(managed.id, None)
        if not managed.done.done():  # a build still waiting: it ends here
            managed.done.set_result(CircuitFailed(None, "closed", None))
        self._stats.update(managed.circuit.stats)
        managed.circuit.stats.clear()
        for waiters in managed.probe_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        managed.probe_waiters.clear()
        self._wake(managed)

    def _wake(self, managed: _Managed) -> None:
        for fut in managed.readers:
            if not fut.done():
                fut.set_result(None)
        managed.readers.clear()

    # --- output -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Carry out everything the relay asked for (it may ask more as we go)."""
        relay = self.relay
        if relay is None:
            return
        while True:
            outputs = relay.cells_to_send()
            if not outputs:
                break
            for out in outputs:
                if isinstance(out, SendCell):
                    self._send(out.peer, out.cell)
                else:
                    self._extend(out)
        event = relay.next_event()
        while event is not None:
            if self._on_relay_event is not None:
                self._on_relay_event(event)
            else:
                self._stats["routing.exit.unhandled." + type(event).__name__] += 1
            event = relay.next_event()

    def _send(self, peer: bytes, cell: Cell) -> bool:
        """Send ``cell`` to ``peer`` over the link; reconnect from a remembered address if
        the link forgot the peer; a peer we cannot reach is reported unreachable."""
        return self._send_payload(peer, cell.encode())

    def _send_payload(self, peer: bytes, payload: bytes) -> bool:
        """:meth:`_send` of a cell's CELL_BYTES."""
        try:
            self.link.send(peer, KIND_CELL, payload)
        except LocalProtocolError:
            return self._resend(peer, payload)
        self._tx_cells += 1
        return True

    def _resend(self, peer: bytes, payload: bytes) -> bool:
        """The link refused to send to ``peer``: reconnect from its remembered address
        and send again, or report it unreachable (False)."""
        link = self.link
        addr = self._addresses.get(peer)
        try:
            if addr is None:
                raise LocalProtocolError("no remembered address")
            link.endpoint.connect(peer, addr, asyncio.get_running_loop().time())
            link.send(peer, KIND_CELL, payload)
        except LocalProtocolError:
            self._stats["routing.drop.no_link"] += 1
            self._queue.append((self._peer_lost, (peer, "no link to the peer")))
            return False
        self._tx_cells += 1
        return True

    def _extend(self, out: Extend) -> None:
        nxt = out.next_hop
        endpoint = self.link.endpoint
        now = asyncio.get_running_loop().time()
        try:
            if not endpoint.has_session(nxt.link_key, now):
                endpoint.connect(nxt.link_key, nxt.address, now)
            self.link.send(nxt.link_key, KIND_CELL, out.cell.encode())
        except LocalProtocolError:
            self._stats["routing.drop.extend_refused"] += 1
            if self.relay is not None:
                self.relay.peer_unreachable(nxt.link_key, self._clock())
            return
        self._remember(nxt.link_key, nxt.address)
        self._tx_cells += 1
        self._stats["routing.extend"] += 1

    def _remember(self, peer: bytes, addr: Addr) -> None:
        addresses = self._addresses
        addresses[peer] = addr
        addresses.move_to_end(peer)
        while len(addresses) > _MAX_ADDRESSES:
            addresses.popitem(last=False)

    # --- timers -------------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._closed or self._loop is None:
            return
        deadlines = [c.circuit.get_timer() for c in self._circuits.values()]
        if self.relay is not None:
            deadlines.append(self.relay.get_timer())
        due = min((d for d in deadlines if d is not None), default=None)
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due is not None:
            delay = max(0.0, due - self._clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._submit(self._handle_timers)

    def _handle_timers(self) -> None:
        now = self._clock()
        if self.relay is not None:
            deadline = self.relay.get_timer()
            if deadline is not None and deadline <= now:
                self.relay.handle_timer(now)
        for managed in list(self._circuits.values()):
            deadline = managed.circuit.get_timer()
            if deadline is not None and deadline <= now:
                managed.circuit.handle_timer(now)
                self._drain(managed)


_FORWARD = int(CellType.FORWARD)
_BACKWARD = int(CellType.BACKWARD)


def _nothing() -> None:
    """A step that only lets :meth:`CircuitManager._submit` flush the relay's outputs."""


def _status_name(status: int | None) -> str:
    if status is None:
        return "refused"
    try:
        return BuildStatus(status).name.lower().replace("_", " ")
    except ValueError:
        return f"status {status}"


def _destroy_reason(reason: int) -> str:
    try:
        return DestroyReason(reason).name.lower().replace("_", " ")
    except ValueError:
        return f"reason {reason}"
