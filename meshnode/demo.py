"""The local demo: two nodes on loopback complete a Noise handshake and talk, explained.

Run by ``./run-demo`` (``meshnode demo``). Uses real UDP sockets on two loopback
addresses, fresh throwaway identities, and stops everything it started. When the local
mesh (discovery, circuits, exits) lands, this grows into the mesh demo.

Not here: anything a node needs in production.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from meshnode.contact import Contact, format_hostport
from meshnode.identity import Identity, b32encode
from meshnode.link import constants as C
from meshnode.link.events import FrameReceived
from meshnode.link.udp import LinkService

DEMO_KIND = C.KIND_DHT
DEMO_ADDRS = ("127.10.0.1", "127.11.0.1")


async def run_demo(out: Callable[[str], None] = print, *, frames: int = 5, pings: int = 5) -> bool:
    """Run the demo, printing as it goes; True when every step worked."""
    a_id, b_id = Identity.generate(), Identity.generate()
    a = await LinkService.open(a_id, (DEMO_ADDRS[0], 0))
    b = await LinkService.open(b_id, (DEMO_ADDRS[1], 0))
    ok = True
    try:
        got_b: list[bytes] = []
        got_a: list[bytes] = []
        b.register(DEMO_KIND, lambda ev: got_b.append(ev.payload))
        a.register(DEMO_KIND, lambda ev: got_a.append(ev.payload))
        b_contact = Contact(host=DEMO_ADDRS[1], port=b.local_addr[1], static_key=b_id.link_public)
        out("meshnode demo: two nodes on loopback, Noise IK links over UDP")
        out(f"  node A  id {b32encode(a_id.node_id)}  on {format_hostport(*a.local_addr)}")
        out(f"  node B  id {b32encode(b_id.node_id)}  on {format_hostport(*b.local_addr)}")
        out(f"  B's contact string: {b_contact}")
        out("")

        out(f"[1] A handshakes with B ({C.PROTOCOL_NAME.decode()}, one round trip)")
        t0 = time.perf_counter()
        est = await a.connect(b_id.link_public, b.local_addr, timeout=10.0)
        dt = (time.perf_counter() - t0) * 1000
        if est is None:  # pragma: no cover - fresh endpoints have no session
            out("    unexpected: a session already existed")
            return False
        out(f"    done in {dt:.2f} ms; A verified B's identity: node id {b32encode(est.node_id)}")
        out(f"    (initiation {C.INITIATION_BYTES} B, response {C.RESPONSE_BYTES} B on the wire)")

        out(f"[2] A sends {frames} frames to B; each is sealed with ChaCha20-Poly1305")
        for i in range(frames):
            a.send(b_id.link_public, DEMO_KIND, f"hello B, this is A #{i + 1}".encode())
        await _until(lambda: len(got_b) >= frames)
        expected = [f"hello B, this is A #{i + 1}".encode() for i in range(frames)]
        ok &= _report(out, "B received", got_b, expected)
        seen = b.endpoint.peer_info(a_id.link_public)
        if seen is not None and seen.node_id is not None:
            out(f"    B knows the sender as node id {b32encode(seen.node_id)} (authenticated)")

        out("[3] B answers over the same session")
        b.send(a_id.link_public, DEMO_KIND, b"hi A, B here")
        await _until(lambda: len(got_a) >= 1)
        ok &= _report(out, "A received", got_a, [b"hi A, B here"])

        out(f"[4] {pings} link pings A -> B")
        rtts = []
        for _ in range(pings):
            rtts.append(await a.ping(b_id.link_public, timeout=5.0) * 1000)
        out("    rtt ms: " + ", ".join(f"{r:.3f}" for r in rtts))

        out("[5] a stranger floods B with 500 garbage datagrams")
        await _flood(b.local_addr, 500)
        await asyncio.sleep(0.2)
        drops = {k: v for k, v in b.endpoint.stats.items() if k.startswith("drop.")}
        out(f"    B dropped and counted them: {drops}")
        before = len(got_b)
        a.send(b_id.link_public, DEMO_KIND, b"still there?")
        await _until(lambda: len(got_b) > before)
        ok &= _report(out, "after the flood B received", got_b[before:], [b"still there?"])

        out("")
        for name, svc in (("A", a), ("B", b)):
            counters = ", ".join(f"{k}={v}" for k, v in sorted(svc.endpoint.stats.items()))
            out(f"counters {name}: {counters}")
        out("")
        out("demo finished: OK" if ok else "demo finished: FAILED")
        return ok
    except Exception as exc:  # the demo explains failures instead of dumping a traceback
        out(f"demo failed: {type(exc).__name__}: {exc}")
        return False
    finally:
        a.close()
        b.close()


def _report(out: Callable[[str], None], what: str, got: list[bytes], want: list[bytes]) -> bool:
    good = got == want
    mark = "ok" if good else "MISMATCH"
    out(f"    {what} {len(got)}/{len(want)} frames, intact and in order: {mark}")
    return good


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("timed out waiting for the peer")
        await asyncio.sleep(0.005)


async def _flood(addr: tuple[str, int], count: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.12.0.1", 0)
    )
    try:
        for i in range(count):
            size = 1 + (i * 37) % 1400
            transport.sendto(bytes([1 + i % 4]) + os.urandom(size), addr)
            if i % 50 == 0:
                await asyncio.sleep(0)
    finally:
        transport.close()


def demo_frame_handler(_: FrameReceived) -> None:  # pragma: no cover - kept for API symmetry
    return None
