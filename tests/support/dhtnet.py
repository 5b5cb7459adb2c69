"""Small DHT networks in one process over discovery.transport.MemoryNetwork, for tests.

Each node is a real :class:`discovery.dht.DhtNode` with a distinct identity; the clock
for descriptors is the wall clock (tests are short), RPC timeouts are short.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from discovery.descriptor import DescriptorRole, NodeDescriptor, SignedDescriptor, sign
from discovery.dht import DhtConfig, DhtNode
from discovery.transport import LinkAddress, MemoryNetwork, MemoryTransport
from meshnode import crypto
from meshnode.identity import Identity

ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
FAST = DhtConfig(rpc_timeout_s=0.3)


def identity(n: int) -> Identity:
    seed = hashlib.sha256(b"dhtnet-%d" % n).digest()
    return Identity(identity_seed=seed, link_private=hashlib.sha256(seed).digest())


def address(n: int) -> tuple[str, int]:
    return (f"127.50.{n // 200}.{n % 200 + 1}", 7000)


@dataclass
class SimNode:
    n: int
    identity: Identity
    addr: tuple[str, int]
    transport: MemoryTransport
    dht: DhtNode

    @property
    def link_address(self) -> LinkAddress:
        return LinkAddress(self.addr[0], self.addr[1], self.identity.link_public)

    def descriptor(self, *, exit: bool = False, **fields: Any) -> SignedDescriptor:
        now = int(time.time())
        roles = {DescriptorRole.RELAY, DescriptorRole.EXIT} if exit else {DescriptorRole.RELAY}
        values: dict[str, Any] = {
            "version": now,
            "identity_key": self.identity.identity_public,
            "link_key": self.identity.link_public,
            "onion_key": ONION,
            "addresses": (self.addr,),
            "roles": frozenset(roles),
            "published_at": now,
            "expires_at": now + 3000,
        }
        values.update(fields)
        return sign(NodeDescriptor(**values), self.identity)


def make_node(net: MemoryNetwork, n: int, config: DhtConfig = FAST, **kwargs: Any) -> SimNode:
    ident = identity(n)
    addr = address(n)
    transport = net.transport(ident.node_id, ident.link_public, addr)
    dht = DhtNode(ident.node_id, ident.link_public, transport, config=config, **kwargs)
    return SimNode(n, ident, addr, transport, dht)


async def make_network(
    count: int, *, config: DhtConfig = FAST
) -> tuple[MemoryNetwork, list[SimNode]]:
    """``count`` nodes, each joined through node 0."""
    net = MemoryNetwork()
    nodes = [make_node(net, n, config) for n in range(count)]
    for node in nodes[1:]:
        await node.dht.bootstrap([nodes[0].link_address])
    return net, nodes
