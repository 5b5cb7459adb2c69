"""Link-layer benchmark: encrypted link throughput against plain UDP, and handshakes/s.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_link            # about a minute, best of 3
    .venv/bin/python -m benchmarks.bench_link --quick    # a few seconds (smoke test)
    .venv/bin/python -m benchmarks.bench_link --json     # JSON on stdout, table on stderr

What it measures, every sender and receiver in its own process (multiprocessing, 'spawn'),
all traffic on 127.0.0.0/8:

1. Throughput of 1,300-byte datagrams, receiver on 127.21.0.1, sender on 127.20.0.1:
   a. plain UDP written like the link driver (asyncio ``DatagramProtocol``, ``max_size``
      2 KiB, 4 MiB ``SO_RCVBUF``; the sender calls ``transport.sendto`` in bursts and
      yields to the loop after each burst);
   b. plain UDP with batched reads, the I/O technique the link driver uses: the
      same non-blocking socket (4 MiB ``SO_RCVBUF``) registered with ``loop.add_reader``,
      whose callback calls ``sock.recvfrom(2048)`` up to 64 times (until
      ``BlockingIOError``), counting datagrams; the same sender as (a);
   c. two ``LinkService`` endpoints: the sender handshakes, then sends the same bursts
      with one ``service.send_many(peer, KIND_BENCH, payloads)`` call each (the bulk
      sender's API; ``--link-sender send`` calls ``service.send`` per frame instead,
      which costs more per datagram); the receiver counts ``FrameReceived`` through
      ``service.register``.
   Rates are counted in a window after a warm-up (snapshots of both processes' counters);
   loss is exact over the whole run (the receiver drains before it reports). The ratio
   encrypted/plain is reported against both baselines; the 70% target is judged against
   (a), the plain Python UDP sender/receiver the issue names. (b) is a reference: the
   link driver's own read technique with no crypto at all. 70% of (b) is out of reach
   for any per-datagram AEAD in Python: it leaves ~2.7 us per datagram, less than an
   open (~1.8 us) plus that read loop (~1.7 us); benchmarks/README.md has the numbers.
2. Handshakes/s a responder ``LinkService`` completes (rate limiter set out of the way):
   an initiator process drives sans-IO ``LinkEndpoint`` objects over a raw socket, a
   window of handshakes in flight. Also the responder's CPU time per handshake, so its
   capacity is known even when the initiator, not the responder, is the bottleneck.
3. The cookie path: a responder with the default ``LinkConfig`` flooded with initiations
   that carry no cookie; it is under load and answers each with a cookie reply.

Every process started here is stopped by PID on the way out (also on Ctrl-C and errors),
and each child also exits on its own when its parent goes away or its time is up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import pstats
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

PAYLOAD_BYTES = 1300
KIND_BENCH = 0x7E  # a frame kind of our own: not reserved, not used by the layers above
TARGET_RATIO = 0.70

SENDER_HOST = "127.20.0.1"
RECEIVER_HOST = "127.21.0.1"
INITIATOR_HOST = "127.22.0.1"
RESPONDER_HOST = "127.23.0.1"

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # as meshnode.link.udp asks for
RECV_MAX_SIZE = 2048  # asyncio's per-recvfrom size; the link driver uses 1,453
RECV_BATCH = 64  # datagrams the batched baseline reads per wakeup, as the link driver does
WRITE_BUFFER_LIMIT = 256 * 1024  # a sender waits when asyncio had to buffer this much
DRAIN_S = 0.3  # after the sender stops, time the receiver gets to empty its socket
READY_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 15.0
CHILD_SLACK_S = 30.0  # a child exits on its own this long after its planned end

Conn = multiprocessing.connection.Connection
Snap = dict[str, Any]


class BenchError(Exception):
    """A benchmark process failed or did not answer."""


@dataclass(frozen=True, slots=True)
class Plan:
    duration_s: float
    warmup_s: float
    repeats: int
    hs_duration_s: float
    cookie_duration_s: float
    burst: int
    rate: float
    pool: int
    window: int
    link_sender: str = "send_many"


QUICK = Plan(
    duration_s=1.0,
    warmup_s=0.25,
    repeats=1,
    hs_duration_s=0.8,
    cookie_duration_s=0.5,
    burst=64,
    rate=0.0,
    pool=512,
    window=32,
)
DEFAULT = Plan(
    duration_s=5.0,
    warmup_s=0.5,
    repeats=3,
    hs_duration_s=3.0,
    cookie_duration_s=2.0,
    burst=64,
    rate=0.0,
    pool=1024,
    window=32,
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
        if role == "hs_initiator":
            _role_hs_initiator(conn, params)
        else:
            asyncio.run(ASYNC_ROLES[role](conn, params))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role}: {traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _quiet_logging() -> None:
    """Warnings and up to stderr; debug calls (one per session) become no-ops."""
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _snap(**counts: Any) -> Snap:
    return {"t": time.perf_counter(), "cpu": time.process_time(), **counts}


async def _serve(
    conn: Conn,
    snap: Callable[[], Snap],
    stop: Callable[[], Awaitable[Snap]],
    max_s: float,
) -> None:
    """Answer the parent's commands until 'exit', EOF on the pipe, or ``max_s`` elapsed."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("exit",))

    loop.add_reader(conn.fileno(), readable)
    deadline = loop.time() + max_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                msg = await asyncio.wait_for(inbox.get(), remaining)
            except TimeoutError:
                return
            if msg[0] == "snap":
                conn.send(("snap", snap()))
            elif msg[0] == "stop":
                conn.send(("stopped", await stop()))
            else:
                return
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())


def _udp_socket(host: str) -> socket.socket:
    """A non-blocking UDP socket on ``host`` with 4 MiB buffers, like the link driver's."""
    from meshnode.link.udp import set_buffer_sizes

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_buffer_sizes(sock, SOCKET_BUFFER_BYTES, SOCKET_BUFFER_BYTES)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


class _PlainReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1


class _FrameCounter:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def on_frame(self, event: Any) -> None:
        self.count += 1


async def _role_udp_rx(conn: Conn, p: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sock = _udp_socket(p["host"])
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    proto = _PlainReceiver()
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    transport.max_size = RECV_MAX_SIZE  # type: ignore[attr-defined]
    try:
        conn.send(("ready", {"addr": transport.get_extra_info("sockname"), "rcvbuf": rcvbuf}))

        def snap() -> Snap:
            return _snap(count=proto.count)

        async def stop() -> Snap:
            return snap()

        await _serve(conn, snap, stop, p["max_s"])
    finally:
        transport.close()


async def _role_udp_rx_batched(conn: Conn, p: dict[str, Any]) -> None:
    """Plain UDP receiver reading like the link driver does: ``loop.add_reader`` on the
    non-blocking socket, up to ``RECV_BATCH`` ``recvfrom`` calls per wakeup."""
    loop = asyncio.get_running_loop()
    sock = _udp_socket(p["host"])
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    fd = sock.fileno()
    recvfrom = sock.recvfrom
    state = {"count": 0}

    def readable() -> None:
        n = 0
        for _ in range(RECV_BATCH):
            try:
                recvfrom(RECV_MAX_SIZE)
            except BlockingIOError:
                break
            n += 1
        state["count"] += n

    loop.add_reader(fd, readable)
    try:
        conn.send(("ready", {"addr": sock.getsockname(), "rcvbuf": rcvbuf}))

        def snap() -> Snap:
            return _snap(count=state["count"])

        async def stop() -> Snap:
            return snap()

        await _serve(conn, snap, stop, p["max_s"])
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        sock.close()


async def _role_link_rx(conn: Conn, p: dict[str, Any]) -> None:
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService

    identity = Identity.generate()
    service = await LinkService.open(identity, (p["host"], 0))
    counter = _FrameCounter()
    service.register(KIND_BENCH, counter.on_frame)
    profile_path: str | None = p.get("profile")
    profiler = cProfile.Profile() if profile_path else None
    try:
        conn.send(("ready", {"addr": service.local_addr, "key": identity.link_public}))
        if profiler is not None:
            profiler.enable()

        def snap() -> Snap:
            return _snap(count=counter.count, stats=dict(service.endpoint.stats))

        async def stop() -> Snap:
            if profiler is not None and profile_path:
                profiler.disable()
                profiler.dump_stats(profile_path)
            return snap()

        await _serve(conn, snap, stop, p["max_s"])
    finally:
        service.close()


async def _run_sender(
    conn: Conn,
    p: dict[str, Any],
    send_burst: Callable[[int], None],
    transport: Any,
    extra: Callable[[], dict[str, Any]],
) -> None:
    """Send bursts until told to stop; yield to the loop after every burst."""
    burst: int = p["burst"]
    rate: float = p["rate"]
    state = {"sent": 0, "waits": 0, "stop": False}

    async def pump() -> None:
        start = time.perf_counter()
        end = start + p["max_s"]
        sent = 0
        while not state["stop"]:
            now = time.perf_counter()
            if now >= end:
                return
            send_burst(burst)
            sent += burst
            state["sent"] = sent
            if rate > 0:
                ahead = start + sent / rate - now
                if ahead > 0:
                    await asyncio.sleep(ahead)
                    continue
            if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                state["waits"] += 1
                await asyncio.sleep(0.001)
            else:
                await asyncio.sleep(0)

    task = asyncio.create_task(pump())

    def snap() -> Snap:
        return _snap(sent=state["sent"], **extra())

    profile_path: str | None = p.get("profile")
    profiler = cProfile.Profile() if profile_path else None

    async def stop() -> Snap:
        state["stop"] = True
        await task
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        return _snap(sent=state["sent"], backpressure_waits=state["waits"], **extra())

    try:
        if profiler is not None:
            profiler.enable()
        conn.send(("ready", {}))
        await _serve(conn, snap, stop, p["max_s"] + CHILD_SLACK_S)
    finally:
        state["stop"] = True
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _role_udp_tx(conn: Conn, p: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sock = _udp_socket(p["host"])
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    dest = tuple(p["addr"])
    payload = bytes(PAYLOAD_BYTES)
    sendto = transport.sendto

    def send_burst(n: int) -> None:
        for _ in range(n):
            sendto(payload, dest)

    try:
        await _run_sender(conn, p, send_burst, transport, dict)
    finally:
        transport.close()


async def _role_link_tx(conn: Conn, p: dict[str, Any]) -> None:
    from meshnode.identity import Identity
    from meshnode.link.udp import LinkService

    identity = Identity.generate()
    service = await LinkService.open(identity, (p["host"], 0))
    try:
        service.register(KIND_BENCH, lambda event: None)
        peer: bytes = p["key"]
        await service.connect(peer, tuple(p["addr"]), timeout=10.0)
        payload = bytes(PAYLOAD_BYTES)
        send_many = service.send_many
        send = service.send
        bursts: dict[int, list[bytes]] = {}

        def send_burst_many(n: int) -> None:
            # The bulk sender's API: one call per burst (LinkService.send_many), as a
            # caller holding n frames for one peer would write it.
            payloads = bursts.get(n)
            if payloads is None:
                payloads = bursts[n] = [payload] * n
            send_many(peer, KIND_BENCH, payloads)

        def send_burst_each(n: int) -> None:
            for _ in range(n):
                send(peer, KIND_BENCH, payload)

        send_burst = send_burst_each if p.get("link_sender") == "send" else send_burst_many

        # The service reports asyncio's write buffer (back-pressure) like a transport.
        await _run_sender(
            conn, p, send_burst, service, lambda: {"stats": dict(service.endpoint.stats)}
        )
    finally:
        service.close()


async def _role_hs_responder(conn: Conn, p: dict[str, Any]) -> None:
    from meshnode.identity import Identity
    from meshnode.link.config import LinkConfig
    from meshnode.link.udp import LinkService

    if p["cookie_path"]:
        config = LinkConfig()  # defaults: under load above 500 initiations/s
    else:
        # Rate limiter out of the way (this row measures handshakes, not the cookie path);
        # room for every initiator so eviction's O(n) scan never runs.
        config = LinkConfig(
            handshake_rate_per_s=1e9,
            handshake_burst=10**9,
            max_peers=10**6,
        )
    identity = Identity.generate()
    service = await LinkService.open(identity, (p["host"], 0), config=config)
    try:
        conn.send(("ready", {"addr": service.local_addr, "key": identity.link_public}))

        def snap() -> Snap:
            return _snap(stats=dict(service.endpoint.stats), peers=service.endpoint.peer_count)

        async def stop() -> Snap:
            return snap()

        await _serve(conn, snap, stop, p["max_s"])
    finally:
        service.close()


def _role_hs_initiator(conn: Conn, p: dict[str, Any]) -> None:
    """Handshakes as fast as one process can drive them (mode 'complete'), or a flood of
    initiations without cookies (mode 'flood'). A plain select loop, no asyncio."""
    from meshnode.identity import Identity
    from meshnode.link import constants as C
    from meshnode.link.endpoint import LinkEndpoint

    peer_key: bytes = p["key"]
    peer_addr = (p["addr"][0], int(p["addr"][1]))
    end = time.perf_counter() + p["max_s"]
    # One endpoint per identity, reused round-robin (close, then connect again): a
    # responder sees each identity again only after `pool` handshakes, far more than its
    # 50 ms per-peer initiation limit at any rate one process can reach.
    now = time.perf_counter()
    endpoints = [
        LinkEndpoint(identity=Identity.generate(), now=now, wallclock_ns=time.time_ns)
        for _ in range(p["pool"])
    ]
    sock = _udp_socket(p["host"])
    sock_fd = sock.fileno()
    state = {"initiated": 0, "completed": 0, "failed": 0, "timeouts": 0, "cookies": 0, "sent": 0}
    flood: list[bytes] = []
    if p["mode"] == "flood":
        for ep in endpoints[:64]:
            ep.connect(peer_key, peer_addr, now)
            flood.extend(d for d, _ in ep.datagrams_to_send())
    busy: dict[int, tuple[int, float]] = {}  # our sender index -> (endpoint, started)
    free = deque(range(len(endpoints)))
    window: int = p["window"]
    next_expiry = 0.0
    try:
        conn.send(("ready", {}))
        while time.perf_counter() < end:
            now = time.perf_counter()
            if flood:
                for i in range(64):
                    with contextlib.suppress(BlockingIOError):
                        sock.sendto(flood[(state["sent"] + i) % len(flood)], peer_addr)
                state["sent"] += 64
                state["initiated"] = state["sent"]
                ready = [sock_fd] if _readable(sock, 0) else []
            else:
                while len(busy) < window and free:
                    index = free.popleft()
                    ep = endpoints[index]
                    ep.close(peer_key)
                    while ep.next_event() is not None:
                        pass
                    ep.connect(peer_key, peer_addr, now)
                    for data, addr in ep.datagrams_to_send():
                        sock.sendto(data, addr)
                        if data[0] == C.MSG_INITIATION:
                            busy[int.from_bytes(data[1:5], "big")] = (index, now)
                    state["initiated"] += 1
                ready, _, _ = select.select([sock_fd, conn.fileno()], [], [], 0.01)
            if sock_fd in ready:
                for _ in range(256):
                    try:
                        data, addr = sock.recvfrom(RECV_MAX_SIZE)
                    except BlockingIOError:
                        break
                    if not data:
                        continue
                    if data[0] == C.MSG_COOKIE_REPLY:
                        state["cookies"] += 1
                        continue
                    if data[0] != C.MSG_RESPONSE or len(data) < 9:
                        continue
                    entry = busy.pop(int.from_bytes(data[5:9], "big"), None)
                    if entry is None:
                        continue
                    ep = endpoints[entry[0]]
                    ep.receive_datagram(data, (addr[0], addr[1]), now)
                    for out, dest in ep.datagrams_to_send():
                        sock.sendto(out, dest)  # the keepalive that confirms the session
                    if ep.has_session(peer_key, now):
                        state["completed"] += 1
                    else:
                        state["failed"] += 1
                    free.append(entry[0])
            if now >= next_expiry:
                next_expiry = now + 0.1
                for idx, (index, started) in list(busy.items()):
                    if now - started > 1.0:
                        del busy[idx]
                        free.append(index)
                        state["timeouts"] += 1
            if conn.poll():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return
                if msg[0] == "snap":
                    conn.send(("snap", _snap(**state)))
                elif msg[0] == "stop":
                    conn.send(("stopped", _snap(**state)))
                else:
                    return
    finally:
        sock.close()


def _readable(sock: socket.socket, timeout: float) -> bool:
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


ASYNC_ROLES: dict[str, Callable[[Conn, dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "udp_rx": _role_udp_rx,
    "udp_rx_batched": _role_udp_rx_batched,
    "udp_tx": _role_udp_tx,
    "link_rx": _role_link_rx,
    "link_tx": _role_link_tx,
    "hs_responder": _role_hs_responder,
}


# ============================================================================================
# Parent side
# ============================================================================================


def _progress(text: str) -> None:
    print(f"[bench_link] {text}", file=sys.stderr, flush=True)


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

    def receive(self, expect: str, timeout: float) -> dict[str, Any]:
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
        result: dict[str, Any] = body
        return result

    def send(self, command: str) -> None:
        self.conn.send((command,))

    def request(self, command: str, expect: str, timeout: float = REPLY_TIMEOUT_S) -> Snap:
        self.send(command)
        return self.receive(expect, timeout)

    def stop_process(self) -> None:
        """Ask it to exit, then SIGTERM and SIGKILL by PID if it does not."""
        with contextlib.suppress(Exception):
            self.conn.send(("exit",))
        self.proc.join(2.0)
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

    def stop_all(self) -> None:
        while self._children:
            self._children.pop().stop_process()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _rate(before: Snap, after: Snap, key: str) -> tuple[float, float, float]:
    """(events/s, CPU µs per event, CPU share) between two snapshots."""
    count = _get(after, key) - _get(before, key)
    elapsed = after["t"] - before["t"]
    cpu = after["cpu"] - before["cpu"]
    per_s = count / elapsed if elapsed > 0 else 0.0
    cpu_us = cpu / count * 1e6 if count > 0 else 0.0
    share = cpu / elapsed if elapsed > 0 else 0.0
    return per_s, cpu_us, share


def _get(snap: Snap, key: str) -> float:
    if key.startswith("stats."):
        return float(snap["stats"].get(key[6:], 0))
    return float(snap[key])


THROUGHPUT_ROLES = {
    "plain": ("udp_rx", "udp_tx"),
    "batched": ("udp_rx_batched", "udp_tx"),
    "link": ("link_rx", "link_tx"),
}


def run_throughput(
    kind: str, plan: Plan, profile: str | None = None, profile_sender: str | None = None
) -> dict[str, Any]:
    """One sender/receiver run; ``kind`` is 'plain', 'batched' or 'link'.

    ``profile`` / ``profile_sender``: run the receiver / the sender under cProfile and
    dump its stats to that path (only the link roles honour them).
    """
    rx_role, tx_role = THROUGHPUT_ROLES[kind]
    total_s = plan.warmup_s + plan.duration_s
    with Children() as children:
        rx = children.start(
            rx_role, host=RECEIVER_HOST, max_s=total_s + CHILD_SLACK_S, profile=profile
        )
        info = rx.receive("ready", READY_TIMEOUT_S)
        tx = children.start(
            tx_role,
            host=SENDER_HOST,
            addr=info["addr"],
            key=info.get("key"),
            burst=plan.burst,
            rate=plan.rate,
            link_sender=plan.link_sender,
            max_s=total_s + 10.0,
            profile=profile_sender,
        )
        tx.receive("ready", READY_TIMEOUT_S)
        time.sleep(plan.warmup_s)
        rx.send("snap")
        tx.send("snap")
        rx0, tx0 = rx.receive("snap", REPLY_TIMEOUT_S), tx.receive("snap", REPLY_TIMEOUT_S)
        time.sleep(plan.duration_s)
        rx.send("snap")
        tx.send("snap")
        rx1, tx1 = rx.receive("snap", REPLY_TIMEOUT_S), tx.receive("snap", REPLY_TIMEOUT_S)
        tx_end = tx.request("stop", "stopped")
        time.sleep(DRAIN_S)
        rx_end = rx.request("stop", "stopped")
    rx_per_s, rx_cpu_us, rx_cpu = _rate(rx0, rx1, "count")
    tx_per_s, tx_cpu_us, tx_cpu = _rate(tx0, tx1, "sent")
    sent, received = tx_end["sent"], rx_end["count"]
    result: dict[str, Any] = {
        "rx_per_s": rx_per_s,
        "mbit_per_s": rx_per_s * PAYLOAD_BYTES * 8 / 1e6,
        "tx_per_s": tx_per_s,
        "loss": max(0.0, 1.0 - received / sent) if sent else 0.0,
        "window_loss": max(0.0, 1.0 - (rx1["count"] - rx0["count"]) / (tx1["sent"] - tx0["sent"]))
        if tx1["sent"] > tx0["sent"]
        else 0.0,
        "rx_cpu_us_per_datagram": rx_cpu_us,
        "tx_cpu_us_per_datagram": tx_cpu_us,
        "rx_cpu_share": rx_cpu,
        "tx_cpu_share": tx_cpu,
        "sent": sent,
        "received": received,
        "window_s": rx1["t"] - rx0["t"],
        "backpressure_waits": tx_end.get("backpressure_waits", 0),
    }
    if "rcvbuf" in info:
        result["rcvbuf_bytes"] = info["rcvbuf"]
    if kind == "link":
        rx_stats = rx_end["stats"]
        result["rx_drops"] = {k: v for k, v in rx_stats.items() if k.startswith("drop.")}
        result["rx_transport"] = rx_stats.get("rx.transport", 0)
    return result


def run_handshakes(plan: Plan, *, cookie_path: bool) -> dict[str, Any]:
    duration = plan.cookie_duration_s if cookie_path else plan.hs_duration_s
    total_s = plan.warmup_s + duration
    with Children() as children:
        responder = children.start(
            "hs_responder",
            host=RESPONDER_HOST,
            cookie_path=cookie_path,
            max_s=total_s + CHILD_SLACK_S,
        )
        info = responder.receive("ready", READY_TIMEOUT_S)
        initiator = children.start(
            "hs_initiator",
            host=INITIATOR_HOST,
            addr=info["addr"],
            key=info["key"],
            mode="flood" if cookie_path else "complete",
            pool=plan.pool,
            window=plan.window,
            max_s=total_s + 10.0,
        )
        initiator.receive("ready", READY_TIMEOUT_S)
        time.sleep(plan.warmup_s)
        responder.send("snap")
        initiator.send("snap")
        r0 = responder.receive("snap", REPLY_TIMEOUT_S)
        i0 = initiator.receive("snap", REPLY_TIMEOUT_S)
        time.sleep(duration)
        responder.send("snap")
        initiator.send("snap")
        r1 = responder.receive("snap", REPLY_TIMEOUT_S)
        i1 = initiator.receive("snap", REPLY_TIMEOUT_S)
        initiator.request("stop", "stopped")
    elapsed = r1["t"] - r0["t"]
    cpu = r1["cpu"] - r0["cpu"]
    stats0, stats1 = r0["stats"], r1["stats"]

    def delta(key: str) -> int:
        return int(stats1.get(key, 0) - stats0.get(key, 0))

    drops = {
        k: int(v - stats0.get(k, 0))
        for k, v in stats1.items()
        if k.startswith("drop.") and v != stats0.get(k, 0)
    }
    if cookie_path:
        cookies = delta("handshake.cookie_sent")
        handled = cookies + delta("handshake.responded") + sum(drops.values())
        return {
            "cookie_replies_per_s": cookies / elapsed,
            "initiations_handled_per_s": handled / elapsed,
            "responded_per_s": delta("handshake.responded") / elapsed,
            "offered_per_s": _rate(i0, i1, "sent")[0],
            "initiator_cookies_per_s": _rate(i0, i1, "cookies")[0],
            "responder_cpu_share": cpu / elapsed,
            "responder_cpu_us_per_initiation": cpu / handled * 1e6 if handled else 0.0,
            "responder_drops": drops,
        }
    responded = delta("handshake.responded")
    return {
        "responder_per_s": responded / elapsed,
        "responder_completed_per_s": delta("handshake.completed") / elapsed,
        "initiator_per_s": _rate(i0, i1, "completed")[0],
        "initiator_failed": int(i1["failed"] - i0["failed"]),
        "initiator_timeouts": int(i1["timeouts"] - i0["timeouts"]),
        "responder_cpu_share": cpu / elapsed,
        "responder_cpu_us_per_handshake": cpu / responded * 1e6 if responded else 0.0,
        "responder_capacity_per_s": responded / cpu if cpu > 0 else 0.0,
        "responder_drops": drops,
        "responder_peers": r1["peers"],
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(max(runs, key=lambda r: r["rx_per_s"]))
    best["runs"] = runs
    return best


def _describe(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name}: {r['rx_per_s']:,.0f} datagrams/s received ({r['mbit_per_s']:.1f} Mbit/s), "
        f"sent {r['tx_per_s']:,.0f}/s, loss {r['loss']:.1%}, "
        f"CPU rx {r['rx_cpu_us_per_datagram']:.1f} us/dgram ({r['rx_cpu_share']:.0%}), "
        f"tx {r['tx_cpu_us_per_datagram']:.1f} us/dgram ({r['tx_cpu_share']:.0%})"
    )


def run_all(plan: Plan, profile: str | None, profile_sender: str | None = None) -> dict[str, Any]:
    names = {
        "plain": "plain UDP (asyncio)",
        "batched": "plain UDP, batched reads",
        "link": "encrypted link",
    }
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in names}
    for i in range(plan.repeats):
        # Interleaved, so a slow spell of the machine does not hit one side only.
        for kind, name in names.items():
            _progress(f"{name} run {i + 1}/{plan.repeats} ({plan.duration_s:g} s)")
            runs[kind].append(run_throughput(kind, plan))
            _progress("  " + _describe(name, runs[kind][-1]))
    baseline, batched = _best(runs["plain"]), _best(runs["batched"])
    encrypted = _best(runs["link"])

    def ratio_to(base: dict[str, Any]) -> float:
        return encrypted["rx_per_s"] / base["rx_per_s"] if base["rx_per_s"] > 0 else 0.0

    judged = "baseline"  # the plain Python UDP sender/receiver; batched is a reference
    ratio = ratio_to(baseline)

    _progress(f"handshakes ({plan.hs_duration_s:g} s, {plan.window} in flight)")
    handshakes = run_handshakes(plan, cookie_path=False)
    _progress(
        f"  responder {handshakes['responder_per_s']:,.0f}/s, "
        f"initiator {handshakes['initiator_per_s']:,.0f}/s, "
        f"responder CPU {handshakes['responder_cpu_share']:.0%}"
    )
    _progress(f"initiation flood, default LinkConfig ({plan.cookie_duration_s:g} s)")
    cookie = run_handshakes(plan, cookie_path=True)
    _progress(
        f"  cookie replies {cookie['cookie_replies_per_s']:,.0f}/s "
        f"(offered {cookie['offered_per_s']:,.0f}/s)"
    )
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
        },
        "params": {
            "payload_bytes": PAYLOAD_BYTES,
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "repeats": plan.repeats,
            "burst": plan.burst,
            "link_sender": plan.link_sender,
            "rate_limit_per_s": plan.rate or None,
            "handshake_duration_s": plan.hs_duration_s,
            "cookie_duration_s": plan.cookie_duration_s,
            "handshake_window": plan.window,
            "initiator_pool": plan.pool,
        },
        "baseline": baseline,
        "baseline_batched": batched,
        "encrypted": encrypted,
        # encrypted / baseline (the plain asyncio sender/receiver): the target is judged on it.
        "ratio": ratio,
        "ratio_asyncio": ratio_to(baseline),
        "ratio_batched": ratio_to(batched),
        "judged_baseline": judged,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "handshakes": handshakes,
        "cookie_path": cookie,
    }
    if profile:
        _progress(f"encrypted link run under cProfile (receiver) -> {profile}")
        result["profiled_run"] = run_throughput("link", plan, profile=profile)
        _progress("  " + _describe("encrypted link (profiled)", result["profiled_run"]))
    if profile_sender:
        _progress(f"encrypted link run under cProfile (sender) -> {profile_sender}")
        sender_run = run_throughput("link", plan, profile_sender=profile_sender)
        result["profiled_sender_run"] = sender_run
        _progress("  " + _describe("encrypted link (sender profiled)", sender_run))
    return result


def format_table(res: dict[str, Any]) -> str:
    p, m = res["params"], res["machine"]
    best = f", best of {p['repeats']}" if p["repeats"] > 1 else ""
    w = 31
    lines = [
        f"meshnode link benchmark ({m['cpus']} cores, Python {m['python']}, "
        f"{p['payload_bytes']}-byte datagrams, {p['duration_s']:.1f} s each{best})",
        f"{'test':<{w}}{'datagrams/s':>12}{'Mbit/s':>10}{'loss':>7}{'sent/s':>11}"
        f"{'rx us':>8}{'tx us':>8}",
    ]
    link_api = p.get("link_sender", "send_many")
    for name, key in (
        ("plain UDP (baseline)", "baseline"),
        ("plain UDP, batched reads", "baseline_batched"),
        (f"encrypted link ({link_api})", "encrypted"),
    ):
        r = res[key]
        lines.append(
            f"{name:<{w}}{r['rx_per_s']:>12,.0f}{r['mbit_per_s']:>10.1f}{r['loss']:>7.1%}"
            f"{r['tx_per_s']:>11,.0f}{r['rx_cpu_us_per_datagram']:>8.1f}"
            f"{r['tx_cpu_us_per_datagram']:>8.1f}"
        )
    verdict = "PASS" if res["meets_target"] else "BELOW TARGET"
    for name, key, base in (
        ("ratio vs asyncio baseline", "ratio_asyncio", "baseline"),
        ("ratio vs batched baseline", "ratio_batched", "baseline_batched"),
    ):
        if base == res["judged_baseline"]:
            note = f"the plain baseline; target >= {res['target_ratio']:.0%}: {verdict}"
        else:
            note = "reference: the driver's read technique without crypto; not judged"
        lines.append(f"{name:<{w}}{res[key]:>12.1%}   ({note})")
    h = res["handshakes"]
    lines.append(
        f"{'handshakes/s (responder)':<{w}}{h['responder_per_s']:>12,.0f}   "
        f"initiator {h['initiator_per_s']:,.0f}/s; responder CPU "
        f"{h['responder_cpu_share']:.0%}, {h['responder_cpu_us_per_handshake']:,.0f} us each"
    )
    c = res["cookie_path"]
    lines.append(
        f"{'cookie replies/s (under load)':<{w}}{c['cookie_replies_per_s']:>12,.0f}   "
        f"flood {c['offered_per_s']:,.0f}/s; responder CPU "
        f"{c['responder_cpu_share']:.0%}, {c['responder_cpu_us_per_initiation']:,.1f} us each"
    )
    lines.append(
        "(rx us / tx us: CPU microseconds per datagram of the receiving / sending process; "
        "sent/s: sender's rate)"
    )
    lines.append(
        "(ratios: encrypted received/s over each baseline's; the target is judged against "
        "the plain asyncio sender/receiver)"
    )
    return "\n".join(lines)


def _profile_summary(path: str, limit: int = 25) -> str:
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
        prog="python -m benchmarks.bench_link", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds, one run each")
    parser.add_argument("--json", action="store_true", help="JSON on stdout (table on stderr)")
    parser.add_argument("--duration", type=float, help="seconds per throughput run")
    parser.add_argument("--repeats", type=int, help="throughput runs per test (best is kept)")
    parser.add_argument("--burst", type=int, help="datagrams per burst between loop yields")
    parser.add_argument(
        "--link-sender",
        choices=("send_many", "send"),
        help="the encrypted sender's API: one send_many per burst (default) or send per frame",
    )
    parser.add_argument("--rate", type=float, help="pace senders to this many datagrams/s")
    parser.add_argument(
        "--profile-receiver",
        metavar="PATH",
        help="one more encrypted run with the receiver under cProfile; stats to PATH",
    )
    parser.add_argument(
        "--profile-sender",
        metavar="PATH",
        help="one more encrypted run with the sender under cProfile; stats to PATH",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    overrides = {
        "duration_s": args.duration,
        "repeats": args.repeats,
        "burst": args.burst,
        "link_sender": args.link_sender,
        "rate": args.rate,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if plan.duration_s <= 0 or plan.duration_s > 600 or not 1 <= plan.repeats <= 20:
        parser.error("--duration must be in (0, 600] and --repeats in [1, 20]")
    if not 1 <= plan.burst <= 10_000 or plan.rate < 0:
        parser.error("--burst must be in [1, 10000] and --rate >= 0")
    try:
        with _sigterm_as_exit():
            result = run_all(plan, args.profile_receiver, args.profile_sender)
    except KeyboardInterrupt:
        _progress("interrupted; benchmark processes stopped")
        return 130
    except BenchError as exc:
        _progress(f"failed: {exc}")
        return 1
    table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table)
    for label, path in (("receiver", args.profile_receiver), ("sender", args.profile_sender)):
        if path:
            print(f"[bench_link] cProfile of the {label}:", file=sys.stderr)
            print(_profile_summary(path), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
