"""LinkService: the asyncio driver for :class:`LinkEndpoint` — one UDP socket, one timer.

A boring driver in aioquic's shape: the socket's reader feeds the endpoint, then
``_pump`` sends what it produced, dispatches its events and re-arms one timer. No
protocol decisions live here.

It owns a non-blocking socket through ``loop.add_reader`` rather than asyncio's datagram
transport, so that one wakeup reads up to ``READ_BATCH`` datagrams and pumps once: the
transport's one-datagram-per-callback path cost about 2 us per datagram more, a third of
the link's receive budget (benchmarks/README.md); the batch goes to the endpoint in one
``receive_datagrams`` call and its events are dispatched in one pass. Sends go straight
to ``sendto`` from the pump that follows each user call (``send``, or ``send_many`` for
a burst: one endpoint call and one pump for many frames); when the kernel buffer is
full, datagrams wait in a bounded queue flushed by ``add_writer``, and beyond it they are
dropped and counted (UDP semantics, never unbounded memory).

Impairment for tests and benchmarks (off by default): ``delay_s`` holds every outgoing
datagram for that many seconds before it goes to the socket (``loop.call_at``, in order,
behind one timer), so a loopback testnet gets a one-way delay per link where no netem is
available (benchmarks/bench_circuit.py). Off, the send path is the same call as without
it (the pump calls :meth:`LinkService._transmit` through an attribute chosen once).

IPv4 and IPv6 share one socket when listening on ``::``
(dual stack); addresses are normalised to ``(host, port)`` with IPv4-mapped IPv6 turned
back into plain IPv4.

Not here: what frames mean (callers register handlers per kind).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from meshnode.errors import MeshError
from meshnode.identity import Identity, b32encode
from meshnode.link import constants as C
from meshnode.link.config import LinkConfig
from meshnode.link.endpoint import LinkEndpoint
from meshnode.link.events import (
    Addr,
    FrameReceived,
    LinkEvent,
    PeerUnreachable,
    PongReceived,
    SessionEstablished,
)

log = structlog.get_logger("meshnode.link")

RECV_BUFFER_BYTES = 4 * 1024 * 1024
SEND_BUFFER_BYTES = 4 * 1024 * 1024
READ_BATCH = 64
SEND_QUEUE_MAX = 1024
_RECV_BYTES = C.MAX_DATAGRAM_BYTES + 1  # one byte over the limit: oversized gets noticed


class LinkUnreachableError(MeshError):
    """A peer did not answer handshakes in time (down, wrong key, or filtered)."""


class LinkService:
    """Owns the socket and timer of one :class:`LinkEndpoint`. Create with :meth:`open`."""

    def __init__(
        self,
        endpoint: LinkEndpoint,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        *,
        delay_s: float = 0.0,
    ) -> None:
        if not isinstance(delay_s, int | float) or not 0 <= delay_s <= 60:
            raise MeshError("delay_s must be a number of seconds from 0 to 60")
        self.endpoint = endpoint
        self._loop = loop
        self._sock = sock
        self._family = sock.family
        self._ipv4 = sock.family == socket.AF_INET
        self._send_queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._send_queue_bytes = 0
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._handlers: dict[int, Callable[[FrameReceived], None]] = {}
        self._listeners: list[Callable[[LinkEvent], None]] = []
        self._session_waiters: dict[bytes, list[asyncio.Future[SessionEstablished]]] = {}
        self._pong_waiters: dict[int, asyncio.Future[float]] = {}
        self._closed = False
        self.delay_s = float(delay_s)
        """Impairment (tests, benchmarks): seconds every outgoing datagram is held; 0 = off."""
        self._delayed: deque[tuple[float, list[tuple[bytes, Addr]]]] = deque()
        self._delay_timer: asyncio.TimerHandle | None = None
        # The pump's way out: straight to the socket, or through the delay line.
        self._send_out: Callable[[list[tuple[bytes, Addr]]], None] = (
            self._transmit_later if self.delay_s > 0 else self._transmit
        )

    # --- construction ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        identity: Identity,
        listen: Addr,
        *,
        config: LinkConfig | None = None,
        delay_s: float = 0.0,
    ) -> LinkService:
        """Bind ``listen`` (``("::", port)`` for dual stack) and start serving.

        ``delay_s``: tests and benchmarks only, an impairment that holds every outgoing
        datagram this many seconds (a one-way delay on every link of this node); 0, the
        default, sends at once.
        """
        loop = asyncio.get_running_loop()
        endpoint = LinkEndpoint(
            identity=identity, now=loop.time(), wallclock_ns=time.time_ns, config=config
        )
        sock = _bind(listen)
        try:
            service = cls(endpoint, loop, sock, delay_s=delay_s)
        except MeshError:
            sock.close()
            raise
        loop.add_reader(service._sock.fileno(), service._on_readable)
        return service

    @property
    def local_addr(self) -> Addr:
        if self._closed:
            raise MeshError("link service is closed")
        return _normalise(self._sock.getsockname())

    # --- socket callbacks -------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Read up to READ_BATCH datagrams, feed them all in one call, then pump once."""
        if self._closed:
            return
        recvfrom = self._sock.recvfrom
        now = self._loop.time()
        batch: list[tuple[bytes, Any]] = []
        append = batch.append
        for _ in range(READ_BATCH):
            try:
                append(recvfrom(_RECV_BYTES))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP errors for earlier sends (port unreachable, ...): counted, not fatal.
                self.endpoint.stats["error.socket"] += 1
                log.debug("link.socket_error", error=str(exc))
                break
        if batch:
            # An IPv4 socket already reports (str, int); only IPv6 needs normalising.
            if not self._ipv4:
                batch = [(data, _normalise(addr)) for data, addr in batch]
            self.endpoint.receive_datagrams(batch, now)
        self._pump()

    def _on_writable(self) -> None:
        self._flush_send_queue()
        if not self._send_queue and self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False

    def _transmit(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        """Send the endpoint's datagrams in order: straight to ``sendto`` while the kernel
        takes them, into the bounded queue (behind anything already queued) once not."""
        sendto = self._sock.sendto
        ipv4 = self._ipv4
        blocked = bool(self._send_queue)
        last_addr: Addr | None = None
        dest: tuple[str, int] | None = None
        for datagram, addr in datagrams:
            if addr is not last_addr:  # a burst to one peer shares one address object
                last_addr = addr
                dest = addr if ipv4 and ":" not in addr[0] else self._destination(addr)
            if dest is None:
                self.endpoint.stats["drop.tx_unsupported_family"] += 1
                continue
            if blocked:
                self._enqueue(datagram, dest)
                continue
            try:
                sendto(datagram, dest)
            except (BlockingIOError, InterruptedError):
                blocked = True
                self._enqueue(datagram, dest)
            except OSError as exc:
                self.endpoint.stats["error.socket_send"] += 1
                log.debug("link.send_failed", error=str(exc))

    def _transmit_later(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        """The delay line (``delay_s`` > 0): hold a pump's datagrams, then transmit them
        in order. One timer for the line: the delay is constant, so due times only grow."""
        due = self._loop.time() + self.delay_s
        self._delayed.append((due, datagrams))
        if self._delay_timer is None:
            self._delay_timer = self._loop.call_at(due, self._release_delayed)

    def _release_delayed(self) -> None:
        self._delay_timer = None
        if self._closed:
            return
        delayed = self._delayed
        now = self._loop.time()
        while delayed and delayed[0][0] <= now:
            self._transmit(delayed.popleft()[1])
        if delayed:
            self._delay_timer = self._loop.call_at(delayed[0][0], self._release_delayed)

    def _enqueue(self, datagram: bytes, dest: tuple[str, int]) -> None:
        if len(self._send_queue) >= SEND_QUEUE_MAX:
            self.endpoint.stats["drop.tx_queue_full"] += 1
            return
        self._send_queue.append((datagram, dest))
        self._send_queue_bytes += len(datagram)
        if not self._writing:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            self._writing = True

    def _flush_send_queue(self) -> None:
        queue = self._send_queue
        while queue:
            datagram, dest = queue[0]
            try:
                self._sock.sendto(datagram, dest)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.endpoint.stats["error.socket_send"] += 1
                log.debug("link.send_failed", error=str(exc))
            queue.popleft()
            self._send_queue_bytes -= len(datagram)

    # --- user API ---------------------------------------------------------------------------

    def register(self, kind: int, handler: Callable[[FrameReceived], None]) -> None:
        """Deliver frames of ``kind`` to ``handler`` (called on the event loop)."""
        self.endpoint.register_kind(kind)
        self._handlers[kind] = handler

    def add_listener(self, listener: Callable[[LinkEvent], None]) -> None:
        """Call ``listener`` with every link event (sessions, roaming, unreachable...)."""
        self._listeners.append(listener)

    async def resolve(self, host: str, port: int) -> Addr:
        """Resolve a name to an address this socket can reach."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return (host, port)
        family = socket.AF_UNSPEC if self._family == socket.AF_INET6 else socket.AF_INET
        try:
            infos = await self._loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise LinkUnreachableError(f"cannot resolve {host!r}: {exc}") from None
        if not infos:
            raise LinkUnreachableError(f"cannot resolve {host!r}")
        return _normalise(infos[0][4])

    async def connect(
        self, static_key: bytes, addr: Addr, *, timeout: float | None = None
    ) -> SessionEstablished | None:
        """Handshake with a peer (if no session yet) and wait for the session.

        Returns the :class:`SessionEstablished` event, or None if a session already
        existed. Raises :class:`LinkUnreachableError` when the handshake gives up.
        """
        now = self._loop.time()
        if self.endpoint.has_session(static_key, now):
            return None
        self.endpoint.connect(static_key, addr, now)
        fut: asyncio.Future[SessionEstablished] = self._loop.create_future()
        self._session_waiters.setdefault(static_key, []).append(fut)
        self._pump()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise LinkUnreachableError(
                f"no handshake response from {addr[0]}:{addr[1]} within {timeout:g}s"
            ) from None
        finally:
            waiters = self._session_waiters.get(static_key, [])
            if fut in waiters:
                waiters.remove(fut)

    def send(self, static_key: bytes, kind: int, payload: bytes) -> None:
        """Send one frame (queued behind a handshake if needed)."""
        self.endpoint.send(static_key, kind, payload, self._loop.time())
        self._pump()

    def send_many(self, static_key: bytes, kind: int, payloads: Sequence[bytes]) -> None:
        """Send several frames of one kind to one peer, in order; for bulk senders.

        The same as :meth:`send` on each payload (see :meth:`LinkEndpoint.send_many`),
        with one endpoint call and one pump for the whole burst. Check
        :meth:`get_write_buffer_size` between bursts for back-pressure.
        """
        self.endpoint.send_many(static_key, kind, payloads, self._loop.time())
        self._pump()

    async def ping(self, static_key: bytes, *, timeout: float = 5.0) -> float:
        """One link-level ping over an existing session; returns the RTT in seconds."""
        seq = self.endpoint.ping(static_key, self._loop.time())
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pong_waiters[seq] = fut
        self._pump()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pong_waiters.pop(seq, None)

    def get_write_buffer_size(self) -> int:
        """Bytes waiting because the kernel send buffer is full: back-pressure for bulk senders."""
        return self._send_queue_bytes

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        self._delayed.clear()
        if not self._closed:
            fd = self._sock.fileno()
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
                self._writing = False
            self._sock.close()
            self._send_queue.clear()
            self._send_queue_bytes = 0
        self._closed = True
        for waiters in self._session_waiters.values():
            for fut in waiters:
                fut.cancel()
        self._session_waiters.clear()
        for pong in self._pong_waiters.values():
            pong.cancel()
        self._pong_waiters.clear()

    # --- the pump ---------------------------------------------------------------------------

    def _pump(self) -> None:
        endpoint = self.endpoint
        datagrams = endpoint.datagrams_to_send()
        if datagrams and not self._closed:
            self._send_out(datagrams)
        events = endpoint.take_events()
        if events:
            handlers = self._handlers
            for event in events:
                # Frames are nearly every event: their handler is called right here, as
                # `_dispatch` would (frames go to their kind's handler, not to listeners).
                if type(event) is FrameReceived:
                    handler = handlers.get(event.kind)
                    if handler is not None:
                        try:
                            handler(event)
                        except Exception:  # a broken handler must not stop the link
                            endpoint.stats["error.handler"] += 1
                            log.exception("link.handler_failed", kind=event.kind)
                else:
                    self._dispatch(event)
        deadline = endpoint.get_timer()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None and not self._closed:
                self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.endpoint.handle_timer(self._loop.time())
        self._pump()

    def _dispatch(self, event: LinkEvent) -> None:
        if isinstance(event, FrameReceived):
            handler = self._handlers.get(event.kind)
            if handler is not None:
                try:
                    handler(event)
                except Exception:  # a broken handler must not stop the link
                    self.endpoint.stats["error.handler"] += 1
                    log.exception("link.handler_failed", kind=event.kind)
            return
        if isinstance(event, SessionEstablished):
            log.debug(
                "link.session_established",
                peer=b32encode(event.peer)[:12],
                initiator=event.initiator,
                rekey=event.rekey,
            )
            for fut in self._session_waiters.pop(event.peer, []):
                if not fut.done():
                    fut.set_result(event)
        elif isinstance(event, PongReceived):
            pong = self._pong_waiters.pop(event.seq, None)
            if pong is not None and not pong.done():
                pong.set_result(event.rtt)
        elif isinstance(event, PeerUnreachable):
            log.info("link.peer_unreachable", peer=b32encode(event.peer)[:12], reason=event.reason)
            for fut in self._session_waiters.pop(event.peer, []):
                if not fut.done():
                    fut.set_exception(
                        LinkUnreachableError(
                            f"no handshake response from {event.addr[0]}:{event.addr[1]} "
                            "(peer down, wrong key, or traffic filtered)"
                        )
                    )
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                self.endpoint.stats["error.listener"] += 1
                log.exception("link.listener_failed")

    def _destination(self, addr: Addr) -> tuple[str, int] | None:
        host, port = addr
        if self._family == socket.AF_INET6:
            if ":" not in host:
                return (f"::ffff:{host}", port)
            return (host, port)
        if ":" in host:
            return None
        return (host, port)


def _normalise(addr: Any) -> Addr:
    host, port = str(addr[0]), int(addr[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, port)


def set_buffer_sizes(
    sock: socket.socket, recv: int = RECV_BUFFER_BYTES, send: int = SEND_BUFFER_BYTES
) -> None:
    """Ask for large socket buffers: the default 208 KiB holds only ~92 full datagrams.

    As root, the FORCE variants pass the sysctl limits; otherwise the kernel caps them.
    """
    for opt, force, size in (
        (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None), recv),
        (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None), send),
    ):
        try:
            if force is None:
                raise OSError
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _bind(listen: Addr) -> socket.socket:
    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_buffer_sizes(sock)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise MeshError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
