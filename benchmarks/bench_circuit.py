"""Circuit benchmark (issue 5): build time, relay forwarding rate, memory per circuit.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_circuit            # about 80 s on 2 cores
    .venv/bin/python -m benchmarks.bench_circuit --quick    # about 15 s (smoke test)
    .venv/bin/python -m benchmarks.bench_circuit --json     # JSON on stdout, table on stderr

Every node is its own process (multiprocessing, 'spawn') running the project's own code:
a ``LinkService`` on 127.0.0.0/8 and, for relays and exits, a ``CircuitManager`` with a
``Relay`` and an ``OnionKeyring``. Nothing of the routing is re-implemented here.

1. Build time of a 3-hop circuit. Two relays and one exit (each a process, a signed
   descriptor each) and a client process whose ``CircuitManager.build(hops=3)`` chooses
   the path from that directory (guards, exit selection, loopback subnet rule relaxed).
   After a few warm-up builds (every link of the path up), ``--builds`` builds one after
   another, each timed around ``build()``; then each circuit is probed (``probe_all``,
   3 rounds: the exit's median probe RTT is the circuit's own round trip, onion
   processing at every hop included), and every pair of nodes pings over its link
   (median of 10) to get the path's network round trip, client->entry->middle->exit and
   back, as the sum of its three link RTTs. Run twice: on plain loopback, and with a
   one-way delay on every link. This kernel has no netem, so the delay is the link
   driver's own impairment hook (``LinkService.open(..., delay_s=0.010)``, in
   meshnode/link/udp.py): every node holds each outgoing datagram 10 ms, so each
   direction of each link gets 10 ms. Target: median build <= 1.3 x one path round trip
   + 10 ms, judged against the link RTT sum (the stricter of the two round trips).
2. Relay forwarding rate. Three processes: a sender, a middle, a sink. Relay run: the
   sender builds 64 two-hop circuits (middle, sink) with ``ClientCircuit`` and sends
   FORWARD cells of DATA for the sink as fast as it can; the middle is a relay
   (``CircuitManager`` + ``Relay``, default limits) that opens its layer and forwards each
   cell; the sink is an exit that counts DATA. Link-only run: the same three roles with
   plain ``LinkService`` endpoints; the middle's handler sends every 1,422-byte frame on
   to the sink (``LinkService.send``, one frame at a time, as the relay does): link
   decryption and encryption, no onion processing. Measured in a window after a
   warm-up: the middle's forwarded/s and its CPU microseconds per forwarded item (user +
   system); "one core" capacity is 1e6 / that. Target: relay capacity >= 60% of the
   link-only forwarding capacity (the CPU measure, robust to other load on the machine).
   Beside them, the link benchmark's own encrypted row (benchmarks.bench_link,
   ``send_many`` sender, receive-only receiver) runs in the same session, as a reference.
   Then where the relay's time goes: in one process without sockets, the CPU per cell of
   ``ForwardLayer.process`` alone, of ``Relay.receive`` (+ ``cells_to_send``), and of the
   manager's frame handler over a stub link (decode, relay, encode), on the same cells.
3. Memory per circuit at a relay holding 10,000 circuits. A client process builds
   10,000 3-hop circuits (entry, middle, exit processes; limits raised to hold them all,
   at most 256 builds in flight) and then sends one DATA through each, which the exit
   answers with one DATA back (so the forward and one backward replay window are in
   use). The entry runs under tracemalloc (its circuit state is the same as a middle
   hop's: both link bindings and a backward relay); the middle and the exit report
   their RSS growth. The keyring's build replay cache (one entry per build for 10
   minutes, with its own bound) is shown apart, but counted. Target: <= 2 KiB per
   circuit, judged on the entry's tracemalloc growth; the RSS growth has its own verdict.

Every process started here is stopped by PID on the way out (also on Ctrl-C and
errors), and each one also exits on its own when its parent goes away or its time is up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import pstats
import resource
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

# Hosts: one /24 of 127.0.0.0/8 per part, nothing leaves loopback.
BUILD_HOST = "127.64.0.{}"
FORWARD_HOST = "127.65.0.{}"
MEMORY_HOST = "127.66.0.{}"

KIND_BENCH = 0x7E  # the link-only run's frame kind (bench_link's)
FRAME_BYTES = 1422  # a cell: the link's largest frame payload
DATA_BYTES = 1024  # DATA carried by each forwarded cell (cells are fixed-size anyway)
DELAY_S = 0.010  # one-way delay per link in the delayed build run
BUILD_TARGET_FACTOR = 1.3
BUILD_TARGET_EXTRA_S = 0.010
FORWARD_TARGET_RATIO = 0.60
MEMORY_TARGET_BYTES = 2048
FORWARD_CIRCUITS = 64  # sender circuits: 64 x 2,000 cells/s, far above what one core moves
BURST = 64
WRITE_BUFFER_LIMIT = 256 * 1024
MEMORY_WINDOW = 256  # builds (and DATA round trips) in flight in the memory run
DRAIN_S = 0.3
READY_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
CHILD_SLACK_S = 60.0

Conn = multiprocessing.connection.Connection
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class BenchError(Exception):
    """A benchmark process failed or did not answer."""


@dataclass(frozen=True, slots=True)
class Plan:
    builds: int
    warmup_builds: int
    probe_rounds: int
    ping_rounds: int
    duration_s: float
    warmup_s: float
    repeats: int
    memory_circuits: int
    breakdown_cells: int = 20_000
    link_reference: bool = True


QUICK = Plan(
    builds=10,
    warmup_builds=3,
    probe_rounds=2,
    ping_rounds=5,
    duration_s=1.0,
    warmup_s=0.3,
    repeats=1,
    memory_circuits=1_000,
    breakdown_cells=5_000,
)
DEFAULT = Plan(
    builds=50,
    warmup_builds=5,
    probe_rounds=3,
    ping_rounds=10,
    duration_s=4.0,
    warmup_s=0.5,
    repeats=3,
    memory_circuits=10_000,
)


# ============================================================================================
# Child processes
# ============================================================================================


def _child_main(role: str, conn: Conn, params: dict[str, Any]) -> None:
    """Entry point of every child process (spawned: imports this module afresh)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    sys.stdout = sys.stderr  # stdout belongs to the parent's table / JSON
    _quiet_logging()
    try:
        asyncio.run(ROLES[role](conn, params))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role}: {traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _quiet_logging() -> None:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snap(**counts: Any) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "t": time.perf_counter(),
        "cpu": time.process_time(),
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "sleeps": usage.ru_nvcsw,  # voluntary context switches: waits for the socket
        **counts,
    }


async def _serve(conn: Conn, handlers: dict[str, Handler], max_s: float) -> None:
    """Answer the parent's commands, one at a time, until 'exit', EOF or ``max_s``."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("exit", {}))

    loop.add_reader(conn.fileno(), readable)
    deadline = loop.time() + max_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                command, args = await asyncio.wait_for(inbox.get(), remaining)
            except TimeoutError:
                return
            if command == "exit":
                return
            try:
                result = await handlers[command](args)
            except Exception:
                conn.send(("error", f"{command}: {traceback.format_exc()}"))
                continue
            conn.send(("ok", result))
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())


def _ping_handler(link: Any) -> Handler:
    """'ping': link-level pings to each (key, addr), connecting first if needed; the
    median RTT in seconds per peer."""

    async def ping(args: dict[str, Any]) -> list[float | None]:
        out: list[float | None] = []
        for key, addr in args["peers"]:
            try:
                await link.connect(key, tuple(addr), timeout=10.0)
                rtts = [await link.ping(key, timeout=5.0) for _ in range(args["rounds"])]
            except Exception:
                out.append(None)
                continue
            out.append(statistics.median(rtts))
        return out

    return ping


def _profiler_handlers(path: str | None) -> dict[str, Handler]:
    profiler = cProfile.Profile() if path else None

    async def start(args: dict[str, Any]) -> None:
        if profiler is not None:
            profiler.enable()

    async def stop(args: dict[str, Any]) -> None:
        if profiler is not None and path:
            profiler.disable()
            profiler.dump_stats(path)

    return {"profile_start": start, "profile_stop": stop}


def _replay_cache_bytes(keyring: Any) -> int:
    """What the keyring's build replay caches hold, by sys.getsizeof (sets, heaps, and
    each entry's tuple, float and key). Looks inside private fields: a measurement."""
    total = 0
    for cache in keyring._caches.values():
        total += sys.getsizeof(cache._seen) + sys.getsizeof(cache._heap)
        for entry in cache._heap:
            total += sys.getsizeof(entry) + sys.getsizeof(entry[0]) + sys.getsizeof(entry[1])
    return total


async def _role_relay(conn: Conn, p: dict[str, Any]) -> None:
    """A relay or exit: LinkService + OnionKeyring + CircuitManager with a Relay."""
    import tracemalloc

    from discovery.descriptor import DescriptorRole, NodeDescriptor, Operator, sign
    from discovery.directory import Directory
    from meshnode import crypto
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService
    from routing.manager import CircuitConfig, CircuitManager
    from routing.onionkeys import OnionKeyring
    from routing.relay import CircuitData, RelayEvent, RelayLimits

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0), delay_s=p.get("delay_s", 0.0))
    keyring = OnionKeyring.generate(now=time.time(), random_bytes=crypto.random_bytes)
    empty = Directory((), now=time.time())
    counts = {"data": 0}
    reply = bool(p.get("reply_data"))
    managers: list[CircuitManager] = []

    def on_event(event: RelayEvent) -> None:
        if isinstance(event, CircuitData):
            counts["data"] += 1
            if reply:
                managers[0].relay_send(event.handle, b"pong")

    limits = RelayLimits(**p["limits"]) if p.get("limits") else None
    manager = CircuitManager(
        link,
        node_id=identity.node_id,
        directory=lambda: empty,
        keyring=keyring,
        config=CircuitConfig(allow_same_subnet=True, probe_interval_s=0),
        relay_limits=limits,
        on_relay_event=on_event,
    )
    managers.append(manager)
    manager.start()
    now = int(time.time())
    onion, next_onion = keyring.publics()
    is_exit = bool(p.get("exit"))
    roles = {DescriptorRole.RELAY} | ({DescriptorRole.EXIT} if is_exit else set())
    descriptor = sign(
        NodeDescriptor(
            version=now,
            identity_key=identity.identity_public,
            link_key=identity.link_public,
            onion_key=onion,
            next_onion_key=next_onion,
            addresses=(link.local_addr,),
            roles=frozenset(roles),
            exit_policy=((1, 65535),) if is_exit else (),
            operator=Operator(name=f"bench{p.get('index', 0)}"),
            published_at=now,
            expires_at=now + 3600,
        ),
        identity,
    )
    traced = bool(p.get("tracemalloc"))
    baseline: dict[str, Any] = {}

    def stats() -> dict[str, int]:
        return {k: int(v) for k, v in manager.stats.items()}

    async def snap(args: dict[str, Any]) -> dict[str, Any]:
        s = manager.stats
        return _snap(
            rx=s["routing.rx.cells"],
            tx=s["routing.tx.cells"],
            data=counts["data"],
            circuits=s["relay.circuits"],
        )

    async def mem_start(args: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        if traced:
            tracemalloc.start()
            baseline["snapshot"] = tracemalloc.take_snapshot()
        return {"rss": _rss_bytes(), "traced": tracemalloc.get_traced_memory()[0]}

    async def mem(args: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        out: dict[str, Any] = {
            "rss": _rss_bytes(),
            "traced": tracemalloc.get_traced_memory()[0] if traced else 0,
            "circuits": manager.relay.circuit_count if manager.relay else 0,
            "replay_entries": keyring.replay_entries(),
            "replay_bytes": _replay_cache_bytes(keyring),
            "stats": stats(),
        }
        if traced and "snapshot" in baseline:
            diff = tracemalloc.take_snapshot().compare_to(baseline["snapshot"], "filename")
            out["by_file"] = [
                (_short_path(d.traceback[0].filename), d.size_diff)
                for d in diff[:12]
                if d.size_diff
            ]
        return out

    async def get_stats(args: dict[str, Any]) -> dict[str, int]:
        return stats()

    handlers: dict[str, Handler] = {
        "snap": snap,
        "mem_start": mem_start,
        "mem": mem,
        "stats": get_stats,
        "ping": _ping_handler(link),
        **_profiler_handlers(p.get("profile")),
    }
    try:
        conn.send(
            (
                "ready",
                {
                    "descriptor": descriptor.encode(),
                    "key": identity.link_public,
                    "addr": link.local_addr,
                    "node_id": bytes(identity.node_id),
                    "onion_key": onion,
                },
            )
        )
        await _serve(conn, handlers, p["max_s"])
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await manager.close(graceful=False)
        link.close()


def _short_path(filename: str) -> str:
    for marker in ("/routing/", "/meshnode/", "/discovery/", "/benchmarks/"):
        if marker in filename:
            return filename[filename.index(marker) + 1 :]
    return filename.rsplit("/", 1)[-1]


async def _role_build_client(conn: Conn, p: dict[str, Any]) -> None:
    """The client of the build-time run: a CircuitManager that relays nothing."""
    from discovery.descriptor import SignedDescriptor
    from discovery.directory import Directory
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService
    from routing.manager import CircuitConfig, CircuitError, CircuitManager

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0), delay_s=p.get("delay_s", 0.0))
    now = time.time()
    directory = Directory([SignedDescriptor.decode(d, now=now) for d in p["descriptors"]], now=now)
    manager = CircuitManager(
        link,
        node_id=identity.node_id,
        directory=lambda: directory,
        config=CircuitConfig(
            allow_same_subnet=True,
            build_timeout_s=5.0,
            build_retries=2,
            probe_interval_s=0,  # no background probes: we probe when told
            probe_timeout_s=2.0,
        ),
    )
    manager.start()
    loop = asyncio.get_running_loop()
    built: list[int] = []

    async def builds(args: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(args["n"]):
            cpu0 = time.process_time()
            t0 = loop.time()
            try:
                info = await manager.build(hops=3)
            except CircuitError as exc:
                out.append({"ok": False, "error": str(exc), "s": loop.time() - t0})
                continue
            elapsed = loop.time() - t0
            cpu = time.process_time() - cpu0
            built.append(info.id)
            out.append(
                {
                    "ok": True,
                    "id": info.id,
                    "s": elapsed,
                    "manager_s": info.build_time_s,
                    "cpu_s": cpu,
                    "attempts": info.attempts,
                    "path": [bytes(h.node_id) for h in info.hops],
                }
            )
            await asyncio.sleep(args.get("gap_s", 0.0))
        return out

    async def probe(args: dict[str, Any]) -> dict[int, list[float | None]]:
        """Probe each circuit listed, ``rounds`` times; per circuit the per-hop medians."""
        out: dict[int, list[float | None]] = {}
        for circuit_id in args["ids"]:
            await manager.probe_all(circuit_id, rounds=args["rounds"])
            out[circuit_id] = [h.rtt_s for h in manager.circuit(circuit_id).hops]
        return out

    async def close_all(args: dict[str, Any]) -> int:
        closed = sum(1 for circuit_id in built if manager.destroy(circuit_id))
        built.clear()
        await asyncio.sleep(0.2)
        return closed

    async def snap(args: dict[str, Any]) -> dict[str, Any]:
        return _snap()

    async def get_stats(args: dict[str, Any]) -> dict[str, int]:
        return {k: int(v) for k, v in manager.stats.items()}

    handlers: dict[str, Handler] = {
        "builds": builds,
        "probe": probe,
        "close_all": close_all,
        "snap": snap,
        "stats": get_stats,
        "ping": _ping_handler(link),
    }
    try:
        conn.send(("ready", {"key": identity.link_public, "addr": link.local_addr}))
        await _serve(conn, handlers, p["max_s"])
    finally:
        await manager.close(graceful=False)
        link.close()


class _Circuits:
    """ClientCircuits over one LinkService, without a manager: the forwarding sender and
    the memory run's builder. Cells from the first hop go to the circuit by circ_id."""

    def __init__(self, link: Any, first_hop: bytes) -> None:
        from meshnode.link.events import FrameReceived
        from routing.cells import KIND_CELL

        self.link = link
        self.first_hop = first_hop
        self.circuits: dict[int, Any] = {}
        self.opened = 0
        self.failed = 0
        self.replies = 0
        self.waiters: list[asyncio.Future[None]] = []

        def on_frame(event: FrameReceived) -> None:
            self._receive(event.payload)

        link.register(KIND_CELL, on_frame)

    def _receive(self, payload: bytes) -> None:
        from routing.cells import Cell, CellError
        from routing.circuit import CircuitFailed, CircuitOpened, DataReceived

        try:
            cell = Cell.decode(payload)
        except CellError:
            return
        circuit = self.circuits.get(cell.circ_id)
        if circuit is None:
            return
        circuit.receive(cell, time.time())
        while (event := circuit.next_event()) is not None:
            if isinstance(event, CircuitOpened):
                self.opened += 1
            elif isinstance(event, CircuitFailed):
                self.failed += 1
            elif isinstance(event, DataReceived):
                self.replies += 1
            self._wake()

    def _wake(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()

    async def wait(self, check: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            left = deadline - loop.time()
            if left <= 0:
                raise BenchError("timed out waiting for circuits")
            fut: asyncio.Future[None] = loop.create_future()
            self.waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, min(left, 0.5))

    def new_circuit(self, specs: list[Any]) -> Any:
        from meshnode import crypto
        from routing.circuit import ClientCircuit

        while True:
            circ_id = int.from_bytes(crypto.random_bytes(4), "big")
            if circ_id and circ_id not in self.circuits:
                break
        circuit = ClientCircuit(
            specs, now=time.time(), random_bytes=crypto.random_bytes, circ_id=circ_id
        )
        self.circuits[circ_id] = circuit
        return circuit

    async def build(self, specs: list[Any], n: int, window: int, timeout: float) -> float:
        """Build ``n`` circuits over ``specs``, at most ``window`` in flight; seconds taken."""
        from routing.cells import KIND_CELL

        loop = asyncio.get_running_loop()
        started = loop.time()
        base = self.opened + self.failed
        sent = {"n": 0}

        def room() -> bool:
            return sent["n"] - (self.opened + self.failed - base) < window

        for _ in range(n):
            await self.wait(room, timeout)
            sent["n"] += 1
            circuit = self.new_circuit(specs)
            self.link.send(self.first_hop, KIND_CELL, circuit.build_cell().encode())
        await self.wait(lambda: self.opened + self.failed >= base + n, timeout)
        return loop.time() - started


def _hop_specs(hops: list[dict[str, Any]]) -> list[Any]:
    from meshnode.identity import NodeId
    from routing.build import HopSpec

    return [
        HopSpec(
            node_id=NodeId(h["node_id"]),
            link_key=h["key"],
            onion_key=h["onion_key"],
            address=tuple(h["addr"]),
        )
        for h in hops
    ]


async def _role_onion_sender(conn: Conn, p: dict[str, Any]) -> None:
    """Builds FORWARD_CIRCUITS two-hop circuits, then sends DATA cells for the last hop
    as fast as it can, round-robin over the circuits, BURST per send_many call."""
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService
    from routing.cells import KIND_CELL

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0))
    specs = _hop_specs(p["hops"])
    first = specs[0].link_key
    circuits = _Circuits(link, first)
    state = {"sent": 0, "stop": False}
    tasks: list[asyncio.Task[None]] = []
    try:
        await link.connect(first, specs[0].address, timeout=10.0)
        await circuits.build(specs, FORWARD_CIRCUITS, FORWARD_CIRCUITS, 20.0)
        if circuits.failed:
            raise BenchError(f"{circuits.failed} sender circuits failed to build")
        open_circuits = list(circuits.circuits.values())
        data = bytes(DATA_BYTES)

        async def pump() -> None:
            send_many = link.send_many
            index = 0
            count = len(open_circuits)
            while not state["stop"]:
                payloads = []
                for _ in range(BURST):
                    payloads.append(open_circuits[index].send_data(data).encode())
                    index = (index + 1) % count
                send_many(first, KIND_CELL, payloads)
                state["sent"] += BURST
                if link.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                    await asyncio.sleep(0.001)
                else:
                    await asyncio.sleep(0)

        async def start(args: dict[str, Any]) -> None:
            tasks.append(asyncio.create_task(pump()))

        async def stop(args: dict[str, Any]) -> dict[str, Any]:
            state["stop"] = True
            for task in tasks:
                await task
            return _snap(sent=state["sent"])

        async def snap(args: dict[str, Any]) -> dict[str, Any]:
            return _snap(sent=state["sent"])

        conn.send(("ready", {}))
        await _serve(conn, {"start": start, "stop": stop, "snap": snap}, p["max_s"])
    finally:
        state["stop"] = True
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        link.close()


async def _role_link_sender(conn: Conn, p: dict[str, Any]) -> None:
    """The link-only run's sender: BURST frames of FRAME_BYTES per send_many call."""
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0))
    link.register(KIND_BENCH, lambda event: None)
    peer: bytes = p["key"]
    state = {"sent": 0, "stop": False}
    tasks: list[asyncio.Task[None]] = []
    try:
        await link.connect(peer, tuple(p["addr"]), timeout=10.0)
        payloads = [bytes(FRAME_BYTES)] * BURST

        async def pump() -> None:
            send_many = link.send_many
            while not state["stop"]:
                send_many(peer, KIND_BENCH, payloads)
                state["sent"] += BURST
                if link.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                    await asyncio.sleep(0.001)
                else:
                    await asyncio.sleep(0)

        async def start(args: dict[str, Any]) -> None:
            tasks.append(asyncio.create_task(pump()))

        async def stop(args: dict[str, Any]) -> dict[str, Any]:
            state["stop"] = True
            for task in tasks:
                await task
            return _snap(sent=state["sent"])

        async def snap(args: dict[str, Any]) -> dict[str, Any]:
            return _snap(sent=state["sent"])

        conn.send(("ready", {}))
        await _serve(conn, {"start": start, "stop": stop, "snap": snap}, p["max_s"])
    finally:
        state["stop"] = True
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        link.close()


async def _role_link_node(conn: Conn, p: dict[str, Any]) -> None:
    """The link-only run's middle (with ``next``: forwards every frame there with
    ``LinkService.send``) or sink (counts frames)."""
    from meshnode.identity import Identity
    from meshnode.link.events import FrameReceived
    from meshnode.link.udp import LinkService

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0))
    counts = {"rx": 0, "tx": 0}
    nxt = p.get("next")
    if nxt is not None:
        next_key: bytes = nxt["key"]
        send = link.send

        def forward(event: FrameReceived) -> None:
            counts["rx"] += 1
            send(next_key, KIND_BENCH, event.payload)
            counts["tx"] += 1

        link.register(KIND_BENCH, forward)
        await link.connect(next_key, tuple(nxt["addr"]), timeout=10.0)
    else:

        def count(event: FrameReceived) -> None:
            counts["rx"] += 1

        link.register(KIND_BENCH, count)

    async def snap(args: dict[str, Any]) -> dict[str, Any]:
        return _snap(rx=counts["rx"], tx=counts["tx"], data=counts["rx"])

    try:
        conn.send(("ready", {"key": identity.link_public, "addr": link.local_addr}))
        handlers: dict[str, Handler] = {"snap": snap, **_profiler_handlers(p.get("profile"))}
        await _serve(conn, handlers, p["max_s"])
    finally:
        link.close()


async def _role_memory_client(conn: Conn, p: dict[str, Any]) -> None:
    """Builds many 3-hop circuits with ClientCircuit, then one DATA round trip on each."""
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService
    from routing.cells import KIND_CELL
    from routing.circuit import CircuitState

    identity = Identity.generate()
    link = await LinkService.open(identity, (p["host"], 0))
    specs = _hop_specs(p["hops"])
    first = specs[0].link_key
    circuits = _Circuits(link, first)
    try:
        await link.connect(first, specs[0].address, timeout=10.0)

        async def build(args: dict[str, Any]) -> dict[str, Any]:
            seconds = await circuits.build(specs, args["n"], MEMORY_WINDOW, args["limit_s"])
            return {"opened": circuits.opened, "failed": circuits.failed, "s": seconds}

        async def traffic(args: dict[str, Any]) -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            count = {"sent": 0}

            def room() -> bool:
                return count["sent"] - circuits.replies < MEMORY_WINDOW

            for circuit in circuits.circuits.values():
                if circuit.state is not CircuitState.OPEN:
                    continue
                with contextlib.suppress(BenchError):
                    await circuits.wait(room, 5.0)
                link.send(first, KIND_CELL, circuit.send_data(b"ping").encode())
                count["sent"] += 1
            with contextlib.suppress(BenchError):
                await circuits.wait(lambda: circuits.replies >= count["sent"], 10.0)
            return {"sent": count["sent"], "replies": circuits.replies, "s": loop.time() - started}

        conn.send(("ready", {}))
        await _serve(conn, {"build": build, "traffic": traffic}, p["max_s"])
    finally:
        link.close()


class _StubEndpoint:
    def __init__(self, link_public: bytes) -> None:
        from types import SimpleNamespace

        self.identity = SimpleNamespace(link_public=link_public)

    def has_session(self, key: bytes, now: float) -> bool:
        return True


class _StubLink:
    """What CircuitManager uses of a LinkService, with sends that go nowhere: the
    breakdown measures the routing code without link crypto or sockets."""

    def __init__(self, link_public: bytes) -> None:
        self.endpoint = _StubEndpoint(link_public)
        self.sent = 0
        self.handlers: dict[int, Callable[[Any], None]] = {}

    def register(self, kind: int, handler: Callable[[Any], None]) -> None:
        self.handlers[kind] = handler

    def add_listener(self, listener: Callable[[Any], None]) -> None:
        pass

    def send(self, peer: bytes, kind: int, payload: bytes) -> None:
        self.sent += 1


async def _role_breakdown(conn: Conn, p: dict[str, Any]) -> None:
    """In one process, no sockets: the CPU per forwarded cell of each layer of the relay's
    code, on the same kind of cell the relay run forwards (DATA for the next hop)."""
    import hashlib

    from discovery.directory import Directory
    from meshnode import crypto
    from meshnode.identity import NodeId
    from meshnode.link.events import FrameReceived
    from routing.build import HopSpec, create_build
    from routing.cells import BODY_BYTES, KIND_CELL, Cell, CellType, Command, encode_message
    from routing.manager import CircuitConfig, CircuitManager
    from routing.onion import ClientCircuitCrypto, ForwardLayer, capacity
    from routing.onionkeys import OnionKeyring
    from routing.relay import Extend, Relay, RelayLimits

    n: int = p["cells"]
    now = time.time()
    rings = [OnionKeyring.generate(now=now, random_bytes=crypto.random_bytes) for _ in range(2)]
    keys = [hashlib.sha256(b"breakdown %d" % i).digest() for i in range(3)]  # client, me, next
    specs = [
        HopSpec(
            node_id=NodeId(keys[i + 1][:20]),
            link_key=keys[i + 1],
            onion_key=rings[i].publics()[0],
            address=(f"192.0.2.{i + 1}", 9),
        )
        for i in range(2)
    ]
    body, pending = create_build(specs, now=now, random_bytes=crypto.random_bytes)
    client = ClientCircuitCrypto(pending.keys)
    message = encode_message(Command.DATA, bytes(DATA_BYTES), capacity(2))
    cells = [client.wrap_forward(2, message) for _ in range(n)]
    zeros = bytes(BODY_BYTES)  # a BUILD_REPLY's body: all the relay checks is its size

    def measure(step: Callable[[int, bytes], object]) -> float:
        gc.collect()
        start = time.process_time()
        for seq, cell_body in cells:
            step(seq, cell_body)
        return (time.process_time() - start) / n * 1e6

    # The token bucket still runs for every cell; only its rate is out of the way of a
    # loop that offers cells faster than any link would.
    limits = RelayLimits(cell_rate_per_s=1e9, cell_burst=1e9)

    def open_relay() -> tuple[Relay, int]:
        ring = OnionKeyring.from_json(rings[0].to_json())  # a fresh replay cache
        relay = Relay(ring, random_bytes=crypto.random_bytes, link_key=keys[1], limits=limits)
        relay.receive(keys[0], Cell(1, CellType.BUILD, 0, body), now)
        (out,) = relay.cells_to_send()
        assert isinstance(out, Extend)
        relay.receive(keys[2], Cell(out.cell.circ_id, CellType.BUILD_REPLY, 0, zeros), now)
        relay.cells_to_send()
        return relay, out.cell.circ_id

    def relay_step(relay: Relay) -> Callable[[int, bytes], None]:
        def step(seq: int, b: bytes) -> None:
            relay.receive(keys[0], Cell(1, CellType.FORWARD, seq, b), now)
            if not relay.cells_to_send():
                raise BenchError(f"breakdown: the relay dropped a cell: {dict(relay.stats)}")

        return step

    # Fresh state for every pass (replay windows); the best of 3 passes each, interleaved.
    onion_runs: list[float] = []
    relay_runs: list[float] = []
    for _ in range(3):
        onion_runs.append(measure(ForwardLayer(pending.keys[0]).process))
        relay_runs.append(measure(relay_step(open_relay()[0])))
    onion_us, relay_us = min(onion_runs), min(relay_runs)

    empty = Directory((), now=now)
    client_addr = ("192.0.2.9", 9)

    def frame(peer: bytes, payload: bytes) -> FrameReceived:
        return FrameReceived(
            peer=peer, node_id=NodeId(peer[:20]), kind=KIND_CELL, payload=payload, addr=client_addr
        )

    manager_runs: list[float] = []
    forwarded = 0
    for _ in range(3):
        link = _StubLink(keys[1])
        manager = CircuitManager(
            link,  # type: ignore[arg-type]
            node_id=NodeId(keys[1][:20]),
            directory=lambda: empty,
            keyring=OnionKeyring.from_json(rings[0].to_json()),
            config=CircuitConfig(allow_same_subnet=True, probe_interval_s=0),
            relay_limits=limits,
        )
        manager.start()
        deliver = link.handlers[KIND_CELL]
        deliver(frame(keys[0], Cell(1, CellType.BUILD, 0, body).encode()))
        assert manager.relay is not None
        out_id = next(iter(manager.relay._links[keys[2]].outbound))  # a measurement: peek
        deliver(frame(keys[2], Cell(out_id, CellType.BUILD_REPLY, 0, zeros).encode()))
        sent_before = link.sent

        def manager_step(seq: int, b: bytes, deliver: Callable[[Any], None] = deliver) -> None:
            deliver(frame(keys[0], Cell(1, CellType.FORWARD, seq, b).encode()))

        manager_runs.append(measure(manager_step))
        forwarded = link.sent - sent_before
        if forwarded != n:
            raise BenchError(f"breakdown: the manager forwarded {forwarded} of {n} cells")
        await manager.close(graceful=False)
    manager_us = min(manager_runs)
    # What the manager adds, step by step, per cell (same cells, sans the relay):
    encoded = [Cell(1, CellType.FORWARD, seq, b).encode() for seq, b in cells[:2000]]
    start = time.process_time()
    for payload in encoded:
        Cell.decode(payload).encode()
    codec_us = (time.process_time() - start) / len(encoded) * 1e6
    conn.send(
        (
            "ok",
            {
                "cells": n,
                "onion_us": onion_us,
                "relay_us": relay_us,
                "manager_us": manager_us,
                "codec_us": codec_us,
                "forwarded": forwarded,
            },
        )
    )


ROLES: dict[str, Callable[[Conn, dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "relay": _role_relay,
    "build_client": _role_build_client,
    "onion_sender": _role_onion_sender,
    "link_sender": _role_link_sender,
    "link_node": _role_link_node,
    "memory_client": _role_memory_client,
    "breakdown": _role_breakdown,
}


# ============================================================================================
# Parent side
# ============================================================================================


def _progress(text: str) -> None:
    print(f"[bench_circuit] {text}", file=sys.stderr, flush=True)


class Child:
    """One benchmark process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, role: str, params: dict[str, Any]) -> None:
        self.role = role
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child_main, args=(role, child_conn, params), name=f"bench-{role}", daemon=True
        )
        self.proc.start()
        child_conn.close()

    def _receive(self, expect: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.role} (pid {self.proc.pid}) did not answer in {timeout:g}s")
        try:
            kind, body = self.conn.recv()
        except (EOFError, OSError):
            raise BenchError(f"{self.role} (pid {self.proc.pid}) exited unexpectedly") from None
        if kind == "error":
            raise BenchError(body)
        if kind != expect:
            raise BenchError(f"{self.role}: expected {expect!r}, got {kind!r}")
        return body

    def ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        result: dict[str, Any] = self._receive("ready", timeout)
        return result

    def send(self, command: str, **args: Any) -> None:
        self.conn.send((command, args))

    def result(self, timeout: float = REPLY_TIMEOUT_S) -> Any:
        return self._receive("ok", timeout)

    def call(self, command: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> Any:
        self.send(command, **args)
        return self.result(timeout)

    def stop_process(self) -> None:
        """Ask it to exit, then SIGTERM and SIGKILL by PID if it does not."""
        with contextlib.suppress(Exception):
            self.conn.send(("exit", {}))
        self.proc.join(3.0)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM to self.proc.pid
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL to self.proc.pid
            self.proc.join(2.0)
        self.conn.close()


class Children:
    """Starts children and stops every one of them on the way out, whatever happened."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[Child] = []

    def start(self, role: str, **params: Any) -> Child:
        child = Child(self._ctx, role, params)
        self._children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._children:
            self._children.pop().stop_process()


def _all(children: list[Child], command: str, **args: Any) -> list[Any]:
    """Send ``command`` to every child first, then collect the answers (snapshots of
    several processes taken as close together as the pipes allow)."""
    for child in children:
        child.send(command, **args)
    return [child.result() for child in children]


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- 1. build time ---------------------------------------------------------------------------


def run_build(plan: Plan, delay_s: float) -> dict[str, Any]:
    label = f"{delay_s * 1000:g} ms one-way delay per link" if delay_s else "loopback"
    max_s = 600.0
    with Children() as children:
        relays = [
            children.start(
                "relay",
                host=BUILD_HOST.format(i + 1),
                delay_s=delay_s,
                exit=(i == 2),
                index=i,
                max_s=max_s,
            )
            for i in range(3)
        ]
        infos = [r.ready() for r in relays]
        client = children.start(
            "build_client",
            host=BUILD_HOST.format(10),
            delay_s=delay_s,
            descriptors=[info["descriptor"] for info in infos],
            max_s=max_s,
        )
        client.ready()
        names = {info["node_id"]: i for i, info in enumerate(infos)}
        _progress(f"build ({label}): {plan.warmup_builds} warm-up builds")
        warm = client.call("builds", n=plan.warmup_builds, timeout=120.0)
        procs = [client, *relays]
        _progress(f"build ({label}): {plan.builds} builds")
        before = _all(procs, "snap")
        results = client.call("builds", n=plan.builds, timeout=60.0 + plan.builds * 20.0)
        after = _all(procs, "snap")
        ok = [r for r in results if r["ok"]]
        _progress(f"build ({label}): probing {len(ok)} circuits ({plan.probe_rounds} rounds)")
        probes = client.call(
            "probe",
            ids=[r["id"] for r in ok],
            rounds=plan.probe_rounds,
            timeout=60.0 + len(ok) * plan.probe_rounds * 5.0,
        )
        client.call("close_all")
        _progress(f"build ({label}): link pings ({plan.ping_rounds} each)")
        peers = [(info["key"], info["addr"]) for info in infos]
        client_rtts = client.call("ping", peers=peers, rounds=plan.ping_rounds, timeout=120.0)
        relay_rtts: list[list[float | None]] = []
        for i, r in enumerate(relays):
            others = [peer for j, peer in enumerate(peers) if j != i]
            row = r.call("ping", peers=others, rounds=plan.ping_rounds, timeout=120.0)
            row.insert(i, None)  # back to one column per relay
            relay_rtts.append(row)
        client_stats = client.call("stats")
    # Link RTT of each pair, a path's network round trip = the sum along it.
    rtt: dict[tuple[int, int], float] = {}
    for j, value in enumerate(client_rtts):
        if value is not None:
            rtt[(-1, j)] = value
    for i, row in enumerate(relay_rtts):
        for j, value in enumerate(row):
            if value is not None and i != j:
                rtt[(i, j)] = value
    link_sums: list[float] = []
    probe_rtts: list[float] = []
    paths: dict[str, int] = {}
    for r in ok:
        hops = [names[node_id] for node_id in r["path"]]
        paths["-".join(f"r{h}" for h in hops)] = paths.get("-".join(f"r{h}" for h in hops), 0) + 1
        legs = [(-1, hops[0]), (hops[0], hops[1]), (hops[1], hops[2])]
        if all(leg in rtt for leg in legs):
            link_sums.append(sum(rtt[leg] for leg in legs))
        exit_rtt = probes.get(r["id"], [None])[-1]
        if exit_rtt is not None:
            probe_rtts.append(exit_rtt)
    times = [r["s"] for r in ok]
    n_ok = max(len(ok), 1)
    cpu_ms = [(a["cpu"] - b["cpu"]) / n_ok * 1000 for a, b in zip(after, before, strict=True)]
    median = statistics.median(times) if times else 0.0
    p95 = _pct(times, 0.95)
    link_rtt = statistics.median(link_sums) if link_sums else 0.0
    probe_rtt = statistics.median(probe_rtts) if probe_rtts else 0.0
    target = BUILD_TARGET_FACTOR * link_rtt + BUILD_TARGET_EXTRA_S
    first_warm = warm[0]["s"] if warm and warm[0]["ok"] else None
    return {
        "label": label,
        "delay_s": delay_s,
        "builds": len(results),
        "failed": len(results) - len(ok),
        "retried": sum(1 for r in ok if r["attempts"] > 1),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "build_s_median": median,
        "build_s_p95": p95,
        "build_s_min": min(times) if times else 0.0,
        "build_s_max": max(times) if times else 0.0,
        "manager_build_s_median": statistics.median([r["manager_s"] for r in ok]) if ok else 0.0,
        "first_build_s": first_warm,
        "path_rtt_links_s": link_rtt,
        "path_rtt_probe_s": probe_rtt,
        "link_rtts_ms": {f"{a}->{b}": round(v * 1000, 3) for (a, b), v in sorted(rtt.items())},
        "paths": paths,
        "target_s": target,
        "meets_target": bool(times) and median <= target,
        "p95_meets_target": bool(times) and p95 <= target,
        "cpu_ms_per_build": {
            "client": cpu_ms[0],
            "relays": cpu_ms[1:],
            "client_in_build_call": statistics.median([r["cpu_s"] for r in ok]) * 1000
            if ok
            else 0.0,
        },
        "client_stats": {k: v for k, v in client_stats.items() if k.startswith("routing.build")},
    }


# --- 2. forwarding ---------------------------------------------------------------------------


def run_forward(kind: str, plan: Plan, profile: str | None = None) -> dict[str, Any]:
    """One sender -> middle -> sink run; ``kind`` 'relay' (onion) or 'link' (frames)."""
    total_s = plan.warmup_s + plan.duration_s
    max_s = total_s + CHILD_SLACK_S + 60.0
    with Children() as children:
        if kind == "relay":
            sink = children.start("relay", host=FORWARD_HOST.format(3), exit=True, max_s=max_s)
            sink_info = sink.ready()
            middle = children.start(
                "relay", host=FORWARD_HOST.format(2), max_s=max_s, profile=profile
            )
            middle_info = middle.ready()
            sender = children.start(
                "onion_sender",
                host=FORWARD_HOST.format(1),
                hops=[middle_info, sink_info],
                max_s=max_s,
            )
        else:
            sink = children.start("link_node", host=FORWARD_HOST.format(3), max_s=max_s)
            sink_info = sink.ready()
            middle = children.start(
                "link_node", host=FORWARD_HOST.format(2), next=sink_info, max_s=max_s
            )
            middle_info = middle.ready()
            sender = children.start(
                "link_sender",
                host=FORWARD_HOST.format(1),
                key=middle_info["key"],
                addr=middle_info["addr"],
                max_s=max_s,
            )
        sender.ready()
        procs = [sender, middle, sink]
        if profile:
            middle.call("profile_start")
        sender.call("start")
        time.sleep(plan.warmup_s)
        s0, m0, k0 = _all(procs, "snap")
        time.sleep(plan.duration_s)
        s1, m1, k1 = _all(procs, "snap")
        s_end = sender.call("stop")
        time.sleep(DRAIN_S)
        k_end = sink.call("snap")
        m_end = middle.call("snap")
        if profile:
            middle.call("profile_stop")
        middle_stats = middle.call("stats") if kind == "relay" else {}
    elapsed = m1["t"] - m0["t"]
    forwarded = m1["tx"] - m0["tx"]
    middle_cpu = m1["cpu"] - m0["cpu"]
    sent = s1["sent"] - s0["sent"]
    delivered = k1["data"] - k0["data"]
    us = middle_cpu / forwarded * 1e6 if forwarded else 0.0
    return {
        "kind": kind,
        "window_s": elapsed,
        "middle_per_s": forwarded / elapsed if elapsed > 0 else 0.0,
        "middle_cpu_us": us,
        "middle_cpu_share": middle_cpu / elapsed if elapsed > 0 else 0.0,
        "middle_sys_us": (m1["sys"] - m0["sys"]) / forwarded * 1e6 if forwarded else 0.0,
        "middle_sleeps_per_1k": (m1["sleeps"] - m0["sleeps"]) / forwarded * 1e3 if forwarded else 0,
        "one_core_per_s": 1e6 / us if us else 0.0,
        "sink_per_s": delivered / elapsed if elapsed > 0 else 0.0,
        "sink_cpu_us": (k1["cpu"] - k0["cpu"]) / delivered * 1e6 if delivered else 0.0,
        "sender_per_s": sent / elapsed if elapsed > 0 else 0.0,
        "sender_cpu_us": (s1["cpu"] - s0["cpu"]) / sent * 1e6 if sent else 0.0,
        "sent_total": s_end["sent"],
        "middle_received_total": m_end["rx"],
        "delivered_total": k_end["data"],
        "loss": max(0.0, 1.0 - k_end["data"] / s_end["sent"]) if s_end["sent"] else 0.0,
        "middle_drops": {k: v for k, v in middle_stats.items() if ".drop." in k},
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["middle_cpu_us"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs"] = runs
    return chosen


def run_forwarding(plan: Plan, profile: str | None) -> dict[str, Any]:
    from benchmarks import bench_link

    runs: dict[str, list[dict[str, Any]]] = {"link": [], "relay": []}
    references: list[dict[str, Any]] = []
    link_plan = dataclasses.replace(
        bench_link.QUICK if plan.repeats == 1 else bench_link.DEFAULT,
        duration_s=plan.duration_s,
        warmup_s=plan.warmup_s,
        repeats=1,
    )
    for i in range(plan.repeats):
        # Interleaved, so a slow spell of the machine does not hit one side only.
        for kind in ("link", "relay"):
            _progress(f"forwarding, {kind} run {i + 1}/{plan.repeats} ({plan.duration_s:g} s)")
            r = run_forward(kind, plan)
            runs[kind].append(r)
            _progress(
                f"  middle {r['middle_per_s']:,.0f}/s, {r['middle_cpu_us']:.1f} us CPU each "
                f"({r['middle_cpu_share']:.0%} CPU), sink {r['sink_per_s']:,.0f}/s, "
                f"sender {r['sender_per_s']:,.0f}/s"
            )
        if plan.link_reference:
            _progress(f"bench_link encrypted row, run {i + 1}/{plan.repeats}")
            ref = bench_link.run_throughput("link", link_plan)
            references.append(ref)
            _progress("  " + bench_link._describe("encrypted link", ref))
    link, relay = _median_run(runs["link"]), _median_run(runs["relay"])
    ratio = link["middle_cpu_us"] / relay["middle_cpu_us"] if relay["middle_cpu_us"] else 0.0
    result: dict[str, Any] = {
        "link_forward": link,
        "relay_forward": relay,
        "ratio": ratio,
        "wall_ratio": relay["middle_per_s"] / link["middle_per_s"] if link["middle_per_s"] else 0,
        "target_ratio": FORWARD_TARGET_RATIO,
        "meets_target": ratio >= FORWARD_TARGET_RATIO,
    }
    if references:
        ref = dict(
            sorted(references, key=lambda r: r["rx_cpu_us_per_datagram"])[
                (len(references) - 1) // 2
            ]
        )
        ref["runs"] = references
        result["bench_link"] = ref
        rx_us = ref["rx_cpu_us_per_datagram"]
        result["ratio_vs_bench_link_rx"] = rx_us / relay["middle_cpu_us"] if rx_us else 0.0
    _progress("where a relay's time goes: the routing code per cell, in one process, no sockets")
    with Children() as children:
        breakdown = children.start("breakdown", cells=plan.breakdown_cells).result(300.0)
    total, link_us = relay["middle_cpu_us"], link["middle_cpu_us"]
    breakdown["onion_layer_us"] = breakdown["onion_us"]
    breakdown["relay_core_us"] = breakdown["relay_us"] - breakdown["onion_us"]
    breakdown["manager_glue_us"] = breakdown["manager_us"] - breakdown["relay_us"]
    breakdown["link_us"] = link_us
    breakdown["rest_us"] = total - link_us - breakdown["manager_us"]
    # If the routing code cost only its onion layer, the relay would reach this ratio:
    breakdown["ratio_if_only_onion"] = link_us / (link_us + breakdown["onion_us"])
    result["breakdown"] = breakdown
    if profile:
        _progress(f"relay run with the middle under cProfile -> {profile}")
        result["profiled_run"] = run_forward("relay", plan, profile=profile)
    return result


# --- 3. memory -------------------------------------------------------------------------------


def run_memory(plan: Plan) -> dict[str, Any]:
    n = plan.memory_circuits
    limits = {
        "max_circuits": n,
        "max_circuits_per_peer": n,  # every circuit of the middle comes from one entry
        "idle_timeout_s": 3600.0,  # the run must not expire circuits while it measures
    }
    max_s = 1800.0
    with Children() as children:
        exit_ = children.start(
            "relay",
            host=MEMORY_HOST.format(3),
            exit=True,
            reply_data=True,
            limits=limits,
            max_s=max_s,
        )
        middle = children.start("relay", host=MEMORY_HOST.format(2), limits=limits, max_s=max_s)
        entry = children.start(
            "relay", host=MEMORY_HOST.format(1), limits=limits, tracemalloc=True, max_s=max_s
        )
        hops = [entry.ready(), middle.ready(), exit_.ready()]
        client = children.start(
            "memory_client", host=MEMORY_HOST.format(10), hops=hops, max_s=max_s
        )
        client.ready()
        relays = [entry, middle, exit_]
        base = _all(relays, "mem_start")
        _progress(f"memory: building {n:,} 3-hop circuits ({MEMORY_WINDOW} in flight)")
        built = client.call("build", timeout=900.0, n=n, limit_s=900.0)
        _progress(f"  {built['opened']:,} open, {built['failed']} failed in {built['s']:.1f} s")
        after_build = [r.call("mem", timeout=300.0) for r in relays]
        _progress("memory: one DATA round trip on every circuit")
        traffic = client.call("traffic", timeout=900.0)
        _progress(
            f"  {traffic['replies']:,} replies to {traffic['sent']:,} in {traffic['s']:.1f} s"
        )
        after_traffic = [r.call("mem", timeout=300.0) for r in relays]
    names = ("entry", "middle", "exit")
    per: dict[str, Any] = {}
    for name, b, built_mem, used_mem in zip(names, base, after_build, after_traffic, strict=True):
        circuits = max(built_mem["circuits"], 1)
        row = {
            "circuits": built_mem["circuits"],
            "circuits_after_traffic": used_mem["circuits"],
            "rss_delta_built": (built_mem["rss"] - b["rss"]) / circuits,
            "rss_delta_used": (used_mem["rss"] - b["rss"]) / circuits,
            "replay_entries": built_mem["replay_entries"],
            "replay_bytes": used_mem["replay_bytes"] / circuits,
            "drops": {k: v for k, v in used_mem["stats"].items() if ".drop." in k},
        }
        if name == "entry":
            row["traced_built"] = (built_mem["traced"] - b["traced"]) / circuits
            row["traced_used"] = (used_mem["traced"] - b["traced"]) / circuits
            row["traced_used_without_replay"] = row["traced_used"] - row["replay_bytes"]
            row["by_file"] = [(f, size / circuits) for f, size in used_mem.get("by_file", [])]
        per[name] = row
    entry_row = per["entry"]
    judged = entry_row["traced_used"]  # everything the relay allocated, replay cache included
    return {
        "circuits": n,
        "built": built,
        "traffic": traffic,
        "relays": per,
        "judged_bytes": judged,
        "target_bytes": MEMORY_TARGET_BYTES,
        "meets_target": built["opened"] == n and judged <= MEMORY_TARGET_BYTES,
        "rss_meets_target": all(
            per[name]["rss_delta_used"] <= MEMORY_TARGET_BYTES for name in ("middle", "exit")
        ),
    }


# --- all -------------------------------------------------------------------------------------


def _load() -> float | None:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


def run_all(plan: Plan, parts: set[str], profile: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_before": _load(),
        },
        "params": dataclasses.asdict(plan),
    }
    if "build" in parts:
        result["build"] = [run_build(plan, 0.0), run_build(plan, DELAY_S)]
    if "forward" in parts:
        result["forward"] = run_forwarding(plan, profile)
    if "memory" in parts:
        result["memory"] = run_memory(plan)
    result["machine"]["load_after"] = _load()
    result["wall_s"] = time.perf_counter() - started
    return result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "NOT MET"


def format_table(res: dict[str, Any]) -> str:
    m, p = res["machine"], res["params"]
    load = m.get("load_before")
    lines = [
        f"meshnode circuit benchmark ({m['cpus']} cores, Python {m['python']}"
        + (f", load average {load:.2f} before the run" if load is not None else "")
        + ")"
    ]
    if "build" in res:
        lines += [
            "",
            f"1. 3-hop circuit build: {p['builds']} builds after {p['warmup_builds']} warm-up, "
            "one process per node (client, 2 relays, 1 exit)",
            f"{'links':<22}{'median':>9}{'p95':>9}{'max':>9}{'path RTT':>10}{'probe RTT':>11}"
            f"{'target':>9}{'median':>9}{'p95':>9}   CPU ms/build: client, relays",
        ]
        for row in res["build"]:
            name = "loopback" if not row["delay_s"] else f"+{row['delay_s'] * 1000:g} ms each way"
            cpu = row["cpu_ms_per_build"]
            lines.append(
                f"{name:<22}{row['build_s_median'] * 1000:>7.1f}ms"
                f"{row['build_s_p95'] * 1000:>7.1f}ms"
                f"{row['build_s_max'] * 1000:>7.1f}ms{row['path_rtt_links_s'] * 1000:>8.1f}ms"
                f"{row['path_rtt_probe_s'] * 1000:>9.1f}ms{row['target_s'] * 1000:>7.1f}ms"
                f"{_verdict(row['meets_target']):>9}{_verdict(row['p95_meets_target']):>9}   "
                f"{cpu['client']:.2f}, " + ", ".join(f"{c:.2f}" for c in cpu["relays"])
            )
        for row in res["build"]:
            if row["failed"] or row["retried"]:
                lines.append(
                    f"  {row['label']}: {row['failed']} builds failed, {row['retried']} retried"
                )
        firsts = ", ".join(
            f"{r['label']} {r['first_build_s'] * 1000:.1f} ms"
            for r in res["build"]
            if r["first_build_s"] is not None
        )
        lines += [
            f"  first build, links still handshaking: {firsts}",
            "  (path RTT: sum of the median link pings client->entry->middle->exit, each way;"
            " probe RTT: median",
            "  probe round trip to the exit through the circuit; target: 1.3 x path RTT + 10 ms"
            " on the median;",
            "  the delay is the link driver's impairment hook, LinkService delay_s, on every"
            " node: no netem here)",
        ]
    if "forward" in res:
        f = res["forward"]
        w = 34
        lines += [
            "",
            "2. forwarding: sender -> middle -> sink processes, 1,422-byte frames / cells "
            f"(median of {p['repeats']} by middle CPU)",
            f"{'middle':<{w}}{'fwd/s':>10}{'CPU us':>8}{'1-core/s':>10}{'CPU':>6}{'sink/s':>10}"
            f"{'loss':>7}{'sender/s':>10}{'tx us':>7}",
        ]
        for name, key in (
            ("link only (LinkService.send)", "link_forward"),
            ("relay (CircuitManager + Relay)", "relay_forward"),
        ):
            r = f[key]
            lines.append(
                f"{name:<{w}}{r['middle_per_s']:>10,.0f}{r['middle_cpu_us']:>8.1f}"
                f"{r['one_core_per_s']:>10,.0f}{r['middle_cpu_share']:>6.0%}{r['sink_per_s']:>10,.0f}"
                f"{r['loss']:>7.1%}{r['sender_per_s']:>10,.0f}{r['sender_cpu_us']:>7.1f}"
            )
        if "bench_link" in f:
            b = f["bench_link"]
            lines.append(
                f"{'bench_link encrypted, rx only':<{w}}{b['rx_per_s']:>10,.0f}"
                f"{b['rx_cpu_us_per_datagram']:>8.1f}{1e6 / b['rx_cpu_us_per_datagram']:>10,.0f}"
                f"{b['rx_cpu_share']:>6.0%}{'':>10}{b['loss']:>7.1%}{b['tx_per_s']:>10,.0f}"
                f"{b['tx_cpu_us_per_datagram']:>7.1f}"
            )
        lines.append(
            f"{'relay / link-only forwarding':<{w}}{f['ratio']:>10.1%}   (one-core capacity, by "
            f"CPU per item; target >= {f['target_ratio']:.0%}: {_verdict(f['meets_target'])}; "
            f"by wall rate {f['wall_ratio']:.1%})"
        )
        if "ratio_vs_bench_link_rx" in f:
            lines.append(
                f"{'relay / bench_link receive-only':<{w}}{f['ratio_vs_bench_link_rx']:>10.1%}"
                "   (reference, not judged: that receiver sends nothing)"
            )
        lines.append(
            "  (CPU us: the middle's user+system CPU per forwarded item; 1-core/s = 1e6 / it;"
            " CPU: its share of one core)"
        )
        if "breakdown" in f:
            b = f["breakdown"]
            lines += [
                f"  where the relay's {f['relay_forward']['middle_cpu_us']:.1f} us per cell go: "
                f"link receive+send {b['link_us']:.1f} (the link-only run), onion layer "
                f"{b['onion_layer_us']:.1f} (ForwardLayer.process),",
                f"  relay core {b['relay_core_us']:.1f} (lookups, token bucket, Cell objects), "
                f"manager glue {b['manager_glue_us']:.1f} (of which Cell decode+encode "
                f"{b['codec_us']:.1f}), rest {b['rest_us']:.1f}",
                f"  (routing code measured in one process without sockets, {b['cells']:,} cells;"
                f" with only the onion layer on top of the link: "
                f"{b['ratio_if_only_onion']:.0%})",
            ]
    if "memory" in res:
        mem = res["memory"]
        e = mem["relays"]["entry"]
        lines += [
            "",
            f"3. memory per circuit, {mem['circuits']:,} 3-hop circuits at each relay "
            f"({mem['built']['opened']:,} opened in {mem['built']['s']:.1f} s; "
            f"{mem['traffic']['replies']:,} DATA round trips)",
            f"  entry, tracemalloc: {e['traced_built']:,.0f} B built, "
            f"{e['traced_used']:,.0f} B after traffic, of which "
            f"{e['replay_bytes']:,.0f} B the build replay cache "
            f"({e['traced_used_without_replay']:,.0f} B without it)",
        ]
        for name in ("middle", "exit"):
            r = mem["relays"][name]
            lines.append(
                f"  {name}, RSS growth: {r['rss_delta_built']:,.0f} B per circuit built, "
                f"{r['rss_delta_used']:,.0f} B after traffic (everything: replay cache, allocator)"
            )
        top = ", ".join(f"{f} {b:,.0f}" for f, b in e.get("by_file", [])[:6])
        lines += [
            f"  entry allocations by file (B per circuit): {top}",
            f"  target <= {mem['target_bytes']:,} B per circuit (tracemalloc, everything the "
            f"relay allocated): {_verdict(mem['meets_target'])}; RSS growth: "
            f"{_verdict(mem['rss_meets_target'])}",
        ]
    lines.append(f"(wall time {res['wall_s']:.0f} s)")
    return "\n".join(lines)


def _profile_summary(path: str, limit: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the children are stopped on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_circuit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (smoke test)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout (table on stderr)")
    parser.add_argument("--builds", type=int, help="timed builds per link setting")
    parser.add_argument("--duration", type=float, help="seconds per forwarding run")
    parser.add_argument("--repeats", type=int, help="forwarding runs per kind (median kept)")
    parser.add_argument("--circuits", type=int, help="circuits in the memory run")
    parser.add_argument(
        "--only",
        action="append",
        choices=("build", "forward", "memory"),
        help="run only this part (repeatable)",
    )
    parser.add_argument(
        "--no-link-reference", action="store_true", help="skip the bench_link encrypted row"
    )
    parser.add_argument(
        "--profile-relay",
        metavar="PATH",
        help="one more relay forwarding run with the middle under cProfile; stats to PATH",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    overrides = {
        "builds": args.builds,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "memory_circuits": args.circuits,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_link_reference:
        plan = dataclasses.replace(plan, link_reference=False)
    if not 1 <= plan.builds <= 10_000 or not 1 <= plan.repeats <= 20:
        parser.error("--builds must be in [1, 10000] and --repeats in [1, 20]")
    if not 0 < plan.duration_s <= 600 or not 1 <= plan.memory_circuits <= 100_000:
        parser.error("--duration must be in (0, 600] and --circuits in [1, 100000]")
    parts = set(args.only or ("build", "forward", "memory"))
    try:
        with _sigterm_as_exit():
            result = run_all(plan, parts, args.profile_relay)
    except KeyboardInterrupt:
        _progress("interrupted; benchmark processes stopped")
        return 130
    except BenchError as exc:
        _progress(f"failed: {exc}")
        return 1
    table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=2, sort_keys=True, default=_json_default))
    else:
        print(table)
    if args.profile_relay:
        print("[bench_circuit] cProfile of the relay (middle) process:", file=sys.stderr)
        print(_profile_summary(args.profile_relay), file=sys.stderr)
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
