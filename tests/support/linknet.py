"""In-memory datagram network for sans-IO link endpoints: no sockets, no sleeps.

``LinkNet`` delivers datagrams between endpoints by address with a hand-stepped clock
and optional loss, duplication and reordering (as a function, so tests stay exact).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from meshnode.identity import Identity
from meshnode.link.config import LinkConfig
from meshnode.link.endpoint import LinkEndpoint
from meshnode.link.events import Addr, LinkEvent

Filter = Callable[[bytes, Addr, Addr], bool]


def det_random(seed: bytes) -> Callable[[int], bytes]:
    """Deterministic random_bytes: SHA-256 in counter mode."""
    state = {"n": 0}

    def rnd(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(seed + state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return rnd


def det_identity(name: str) -> Identity:
    h = hashlib.sha256(name.encode()).digest()
    return Identity(identity_seed=h, link_private=hashlib.sha256(h).digest())


@dataclass
class Node:
    name: str
    addr: Addr
    endpoint: LinkEndpoint
    events: list[LinkEvent] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.endpoint.identity.link_public


class LinkNet:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_ns = 1_700_000_000_000_000_000
        self.nodes: dict[Addr, Node] = {}
        self.in_flight: list[tuple[bytes, Addr, Addr]] = []  # (data, src, dst)
        self.drop: Filter | None = None
        self.log: list[tuple[bytes, Addr, Addr]] = []

    def add(self, name: str, *, config: LinkConfig | None = None, port: int = 7000) -> Node:
        addr = (f"127.0.{len(self.nodes) + 1}.1", port)
        ep = LinkEndpoint(
            identity=det_identity(name),
            now=self.now,
            config=config,
            wallclock_ns=self.wallclock,
            random_bytes=det_random(name.encode()),
        )
        node = Node(name=name, addr=addr, endpoint=ep)
        self.nodes[addr] = node
        return node

    def wallclock(self) -> int:
        return self.wall_ns + int(self.now * 1e9)

    def collect(self) -> None:
        for node in self.nodes.values():
            for data, dst in node.endpoint.datagrams_to_send():
                self.log.append((data, node.addr, dst))
                if self.drop is not None and self.drop(data, node.addr, dst):
                    continue
                self.in_flight.append((data, node.addr, dst))
            ev = node.endpoint.next_event()
            while ev is not None:
                node.events.append(ev)
                ev = node.endpoint.next_event()

    def deliver_all(self, *, reverse: bool = False) -> int:
        """Deliver what is in flight (optionally in reverse order); returns the count."""
        batch, self.in_flight = self.in_flight, []
        if reverse:
            batch.reverse()
        for data, src, dst in batch:
            node = self.nodes.get(dst)
            if node is not None:
                node.endpoint.receive_datagram(data, src, self.now)
        self.collect()
        return len(batch)

    def run(self, rounds: int = 20) -> None:
        """Collect and deliver until quiet (gives up after ``rounds``)."""
        self.collect()
        for _ in range(rounds):
            if not self.deliver_all():
                return
        raise AssertionError("network did not go quiet")

    def advance(self, dt: float, *, step: float = 0.5) -> None:
        """Move time forward in steps, firing due timers and delivering traffic."""
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in list(self.nodes.values()):
                t = node.endpoint.get_timer()
                if t is not None and t <= self.now:
                    node.endpoint.handle_timer(self.now)
            self.run()

    def events(self, node: Node, kind: type) -> list:
        return [e for e in node.events if isinstance(e, kind)]
