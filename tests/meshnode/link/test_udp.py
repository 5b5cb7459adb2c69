"""LinkService over real loopback sockets (127.0.0.1 only): bursts, batched reads, and the
bounded send queue when the kernel refuses datagrams."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from meshnode.errors import MeshError
from meshnode.identity import Identity
from meshnode.link import constants as C
from meshnode.link import udp
from meshnode.link.events import FrameReceived
from meshnode.link.udp import LinkService

KIND = C.KIND_DHT
HOST = "127.0.0.1"


class RefusingSocket:
    """Wraps the service's socket; ``sendto`` raises BlockingIOError while ``full``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family = sock.family
        self.full = False
        self.refused = 0

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.full:
            self.refused += 1
            raise BlockingIOError
        return self._sock.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def pair() -> tuple[LinkService, LinkService, list[FrameReceived]]:
    a = await LinkService.open(Identity.generate(), (HOST, 0))
    b = await LinkService.open(Identity.generate(), (HOST, 0))
    got: list[FrameReceived] = []
    a.register(KIND, lambda event: None)
    b.register(KIND, got.append)
    await a.connect(b.endpoint.identity.link_public, b.local_addr, timeout=5.0)
    return a, b, got


async def wait_for_frames(got: list[FrameReceived], count: int, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(got) < count and loop.time() < end:
        await asyncio.sleep(0.005)


async def test_send_many_and_send_arrive_in_order() -> None:
    a, b, got = await pair()
    try:
        key = b.endpoint.identity.link_public
        burst = [i.to_bytes(2, "big") * 50 for i in range(40)]
        a.send_many(key, KIND, burst)
        a.send(key, KIND, b"last")
        await wait_for_frames(got, 41)
        assert [e.payload for e in got] == [*burst, b"last"]
        assert all(e.node_id == a.endpoint.identity.node_id for e in got)
        assert b.endpoint.stats["rx.transport"] >= 41
    finally:
        a.close()
        b.close()


async def test_refused_datagrams_wait_in_the_queue_and_go_out_in_order() -> None:
    a, b, got = await pair()
    try:
        key = b.endpoint.identity.link_public
        wrapped = RefusingSocket(a._sock)
        a._sock = wrapped  # type: ignore[assignment]
        a.send_many(key, KIND, [b"first"])
        wrapped.full = True
        a.send_many(key, KIND, [b"q1", b"q2", b"q3"])
        assert wrapped.refused == 1  # the rest queued behind it without trying the socket
        a.send(key, KIND, b"q4")
        assert wrapped.refused == 1
        assert a.get_write_buffer_size() > 0
        wrapped.full = False
        await wait_for_frames(got, 5)  # the writer callback flushes the queue
        assert [e.payload for e in got] == [b"first", b"q1", b"q2", b"q3", b"q4"]
        assert a.get_write_buffer_size() == 0
    finally:
        a.close()
        b.close()


async def test_send_queue_is_bounded_and_drops_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "SEND_QUEUE_MAX", 8)
    a, b, got = await pair()
    try:
        key = b.endpoint.identity.link_public
        wrapped = RefusingSocket(a._sock)
        a._sock = wrapped  # type: ignore[assignment]
        wrapped.full = True
        a.send_many(key, KIND, [bytes([i]) for i in range(12)])
        assert a.endpoint.stats["drop.tx_queue_full"] == 4
        wrapped.full = False
        await wait_for_frames(got, 8)
        await asyncio.sleep(0.05)
        assert [e.payload for e in got] == [bytes([i]) for i in range(8)]
    finally:
        a.close()
        b.close()


async def test_batched_reads_deliver_a_burst_larger_than_one_read() -> None:
    a, b, got = await pair()
    try:
        key = b.endpoint.identity.link_public
        count = udp.READ_BATCH * 3 + 5
        a.send_many(key, KIND, [i.to_bytes(4, "big") for i in range(count)])
        await wait_for_frames(got, count)
        assert [int.from_bytes(e.payload, "big") for e in got] == list(range(count))
    finally:
        a.close()
        b.close()


async def test_a_raising_handler_is_counted_and_later_frames_still_arrive() -> None:
    a, b, _ = await pair()
    got: list[bytes] = []

    def handler(event: FrameReceived) -> None:
        if event.payload == b"boom":
            raise RuntimeError("broken handler")
        got.append(event.payload)

    b.register(KIND, handler)
    try:
        a.send_many(b.endpoint.identity.link_public, KIND, [b"one", b"boom", b"two"])
        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0
        while len(got) < 2 and loop.time() < end:
            await asyncio.sleep(0.005)
        assert got == [b"one", b"two"]
        assert b.endpoint.stats["error.handler"] == 1
    finally:
        a.close()
        b.close()


async def test_delay_impairment_is_off_by_default() -> None:
    a = await LinkService.open(Identity.generate(), (HOST, 0))
    try:
        assert a.delay_s == 0.0
        assert a._send_out == a._transmit  # the pump goes straight to the socket
    finally:
        a.close()
    with pytest.raises(MeshError, match="delay_s"):
        await LinkService.open(Identity.generate(), (HOST, 0), delay_s=-1.0)


async def test_delay_impairment_holds_every_datagram_in_order() -> None:
    """``delay_s`` (tests and benchmarks only): each side's outgoing datagrams wait that
    long, so a ping's round trip takes at least twice the delay and frames keep order."""
    delay = 0.05
    loop = asyncio.get_running_loop()
    a = await LinkService.open(Identity.generate(), (HOST, 0), delay_s=delay)
    b = await LinkService.open(Identity.generate(), (HOST, 0), delay_s=delay)
    got: list[tuple[float, bytes]] = []
    a.register(KIND, lambda event: None)
    b.register(KIND, lambda event: got.append((loop.time(), event.payload)))
    try:
        key = b.endpoint.identity.link_public
        started = loop.time()
        await a.connect(key, b.local_addr, timeout=5.0)
        assert loop.time() - started >= 2 * delay  # initiation out, response back
        rtt = await a.ping(key, timeout=5.0)
        assert 2 * delay <= rtt < 2 * delay + 1.0
        sent_at = loop.time()
        a.send_many(key, KIND, [bytes([i]) for i in range(20)])
        a.send(key, KIND, b"last")
        assert not got  # nothing left before the delay
        end = loop.time() + 5.0
        while len(got) < 21 and loop.time() < end:
            await asyncio.sleep(0.005)
        assert [p for _, p in got] == [*(bytes([i]) for i in range(20)), b"last"]
        assert min(t for t, _ in got) - sent_at >= delay
        # Closing with datagrams still held sends nothing more and raises nothing.
        a.send(key, KIND, b"never")
        a.close()
        await asyncio.sleep(2 * delay)
        assert got[-1][1] == b"last"
        assert not a._delayed
    finally:
        a.close()
        b.close()
