"""Where the DHT's messages travel: the link layer, or an in-memory network for tests.

kademlia's protocol talks through ``transport.sendto(data, address)``. Ours does the same,
but ``address`` is a :class:`LinkAddress` (host, port *and* the peer's static link key,
which a Noise IK handshake needs), and what comes back is not a bare datagram: the
receiver is told which node id the link *authenticated* for the sender, so the DHT can
check the id a peer claims against the key it proved.

- :class:`LinkTransport` is the shim over :class:`meshnode.link.udp.LinkService`: DHT
  messages are link frames of kind 0x10 on the node's one UDP socket, encrypted; it
  starts a handshake with a peer it has no session with (frames wait behind it).
- :class:`MemoryNetwork` / :class:`MemoryTransport` carry the same frames between DHT
  nodes in one process, with simulated latency and loss and with nodes that can be
  switched off (churn), on the asyncio loop's clock: the simulation benchmark and the
  DHT tests run the real DHT code over it. Its "authentication" is by construction: a
  frame is delivered with the sender's real node id.

Not here: what the frames contain (discovery/rpc.py), the DHT itself (discovery/dht.py).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple, Protocol

from meshnode.errors import LocalProtocolError
from meshnode.link.constants import KIND_DHT
from meshnode.link.events import FrameReceived
from meshnode.link.udp import LinkService

__all__ = [
    "FrameReceiver",
    "LinkAddress",
    "LinkTransport",
    "MemoryNetwork",
    "MemoryTransport",
    "Transport",
]


class LinkAddress(NamedTuple):
    """Where a DHT peer is: an IP address, a UDP port and its static link key."""

    host: str
    port: int
    link_key: bytes


# (authenticated node id, the sender's link key, where it came from, the frame payload)
FrameReceiver = Callable[[bytes, bytes, tuple[str, int], bytes], None]


class Transport(Protocol):
    """What the DHT needs from the layer below."""

    def set_receiver(self, receiver: FrameReceiver) -> None: ...

    def sendto(self, data: bytes, address: LinkAddress) -> None: ...


class LinkTransport:
    """The shim: DHT frames as link frames of kind 0x10 through a :class:`LinkService`."""

    def __init__(self, link: LinkService) -> None:
        self.link = link
        self.stats: Counter[str] = Counter()

    def set_receiver(self, receiver: FrameReceiver) -> None:
        def on_frame(event: FrameReceived) -> None:
            receiver(event.node_id, event.peer, event.addr, event.payload)

        self.link.register(KIND_DHT, on_frame)

    def sendto(self, data: bytes, address: LinkAddress) -> None:
        endpoint = self.link.endpoint
        now = asyncio.get_running_loop().time()
        try:
            if not endpoint.has_session(address.link_key, now):
                endpoint.connect(address.link_key, (address.host, address.port), now)
            self.link.send(address.link_key, KIND_DHT, data)
        except LocalProtocolError:
            # Our own key, or a key the link refuses: the RPC simply times out.
            self.stats["dht.transport.refused"] += 1


class MemoryNetwork:
    """DHT nodes in one process, with latency, loss and churn; see the module docstring.

    ``latency_s`` is a fixed one-way delay or a callable drawing one per frame. A node
    that is :meth:`down` neither sends nor receives (a churned-away node), as if its
    process were gone.
    """

    def __init__(
        self,
        *,
        latency_s: float | Callable[[], float] = 0.0,
        loss: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._latency = latency_s
        self.loss = loss
        self._rng = rng if rng is not None else random.Random(0)  # noqa: S311 (simulation)
        self._nodes: dict[bytes, MemoryTransport] = {}
        self.frames = 0
        self.dropped = 0

    def transport(self, node_id: bytes, link_key: bytes, addr: tuple[str, int]) -> MemoryTransport:
        t = MemoryTransport(self, node_id, link_key, addr)
        self._nodes[link_key] = t
        return t

    def down(self, link_key: bytes) -> None:
        self._nodes[link_key].up = False

    def up(self, link_key: bytes) -> None:
        self._nodes[link_key].up = True

    def _deliver(self, sender: MemoryTransport, data: bytes, address: LinkAddress) -> None:
        self.frames += 1
        target = self._nodes.get(address.link_key)
        if (
            not sender.up
            or target is None
            or not target.up
            or target.receiver is None
            or (self.loss and self._rng.random() < self.loss)
        ):
            self.dropped += 1
            return
        delay = self._latency() if callable(self._latency) else self._latency
        loop = asyncio.get_running_loop()
        args = (sender.node_id, sender.link_key, sender.addr, bytes(data))
        if delay > 0:
            loop.call_later(delay, target.receive, *args)
        else:
            loop.call_soon(target.receive, *args)


class MemoryTransport:
    """One node's attachment to a :class:`MemoryNetwork`."""

    def __init__(
        self, network: MemoryNetwork, node_id: bytes, link_key: bytes, addr: tuple[str, int]
    ) -> None:
        self.network = network
        self.node_id = node_id
        self.link_key = link_key
        self.addr = addr
        self.up = True
        self.receiver: FrameReceiver | None = None

    def set_receiver(self, receiver: FrameReceiver) -> None:
        self.receiver = receiver

    def sendto(self, data: bytes, address: LinkAddress) -> None:
        self.network._deliver(self, data, address)

    def receive(self, node_id: bytes, link_key: bytes, addr: tuple[str, int], data: bytes) -> None:
        if self.up and self.receiver is not None:
            self.receiver(node_id, link_key, addr, data)
