"""CircuitManager in one process: real LinkService sockets on 127.62.0.x, real relays.

Four relays and two exits (each a LinkService, an OnionKeyring and a CircuitManager
with a Relay) and a client manager without one. The directory is built from their
descriptors, signed with their identities and carrying their keyrings' onion keys.
The loopback testnet sits in one /16, so path selection is told ``allow_same_subnet``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from discovery.descriptor import DescriptorRole, NodeDescriptor, Operator, SignedDescriptor, sign
from discovery.directory import Directory
from meshnode import crypto
from meshnode.identity import Identity, NodeId, b32encode
from meshnode.link.config import LinkConfig
from meshnode.link.udp import LinkService
from routing.cells import KIND_CELL
from routing.manager import CircuitConfig, CircuitError, CircuitManager
from routing.onionkeys import OnionKeyring
from routing.relay import CircuitClosed, CircuitData, RelayEvent

HOST = "127.62.0.{}"
RELAYS = 4
EXITS = 2
EXIT_POLICY = ((1, 24), (26, 65535))  # every port but SMTP, as the node's default
LINK = LinkConfig(handshake_timeout_s=2.0)


@dataclass
class Peer:
    """One node of the testnet."""

    index: int
    identity: Identity
    link: LinkService
    manager: CircuitManager
    keyring: OnionKeyring | None
    events: list[RelayEvent] = field(default_factory=list)
    descriptor: SignedDescriptor | None = None

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id


@dataclass
class Net:
    relays: list[Peer]
    client: Peer
    directory: Directory
    descriptors: list[SignedDescriptor]

    def by_id(self, node_id: str | bytes) -> Peer:
        key = node_id if isinstance(node_id, bytes) else None
        for peer in self.relays:
            if peer.node_id == key or b32encode(peer.node_id) == node_id:
                return peer
        raise KeyError(node_id)


def descriptor_of(peer: Peer, *, exit_: bool, now: int) -> SignedDescriptor:
    assert peer.keyring is not None
    onion, next_onion = peer.keyring.publics()
    roles = {DescriptorRole.RELAY} | ({DescriptorRole.EXIT} if exit_ else set())
    body = NodeDescriptor(
        version=now,
        identity_key=peer.identity.identity_public,
        link_key=peer.identity.link_public,
        onion_key=onion,
        next_onion_key=next_onion,
        addresses=(peer.link.local_addr,),
        roles=frozenset(roles),
        exit_policy=EXIT_POLICY if exit_ else (),
        region="EU" if exit_ else "",
        country="DE" if exit_ else "",
        operator=Operator(name=f"op{peer.index}"),
        published_at=now,
        expires_at=now + 3600,
    )
    return sign(body, peer.identity)


CLIENT_CONFIG = CircuitConfig(
    allow_same_subnet=True,
    build_timeout_s=2.0,
    probe_interval_s=0.2,
    probe_timeout_s=0.5,
    probe_failures=2,
)


async def open_peer(
    index: int, directory: list[Directory], *, relay: bool, config: CircuitConfig
) -> Peer:
    identity = Identity.generate()
    link = await LinkService.open(identity, (HOST.format(index), 0), config=LINK)
    keyring = (
        OnionKeyring.generate(now=time.time(), random_bytes=crypto.random_bytes) if relay else None
    )
    events: list[RelayEvent] = []
    manager = CircuitManager(
        link,
        node_id=identity.node_id,
        directory=lambda: directory[0],
        keyring=keyring,
        config=config,
        on_relay_event=events.append,
    )
    manager.start()
    return Peer(index, identity, link, manager, keyring, events)


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    holder = [Directory((), now=time.time())]
    relay_config = CircuitConfig(allow_same_subnet=True, probe_interval_s=0)
    peers = [
        await open_peer(i, holder, relay=True, config=relay_config)
        for i in range(1, RELAYS + EXITS + 1)
    ]
    client = await open_peer(50, holder, relay=False, config=CLIENT_CONFIG)
    now = int(time.time())
    descriptors = []
    for peer in peers:
        peer.descriptor = descriptor_of(peer, exit_=peer.index > RELAYS, now=now)
        descriptors.append(peer.descriptor)
    holder[0] = Directory(descriptors, now=time.time())
    try:
        yield Net(peers, client, holder[0], descriptors)
    finally:
        for peer in (*peers, client):
            await peer.manager.close()
            peer.link.close()


async def wait_until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


async def test_build_probe_data_destroy(net: Net) -> None:
    client = net.client.manager
    info = await client.build(hops=3)
    assert info.state == "open"
    assert len(info.hops) == 3
    ids = [h.node_id for h in info.hops]
    assert len(set(ids)) == 3
    assert net.client.node_id not in ids
    exit_peer = net.by_id(ids[-1])
    assert exit_peer.index > RELAYS  # the last hop is an exit
    assert "exit" in info.hops[-1].roles
    assert info.build_time_s is not None and 0 < info.build_time_s < 2.0
    assert info.attempts == 1
    # The per-hop info comes from the descriptors.
    assert info.hops[0].operator == f"op{net.by_id(ids[0]).index}"
    assert info.hops[0].address == net.by_id(ids[0]).link.local_addr

    rtts = await client.probe_all(info.id, rounds=3)
    assert len(rtts) == 3 and all(r is not None and 0 <= r < 1.0 for r in rtts)
    probed = client.circuit(info.id)
    assert all(h.probes_answered >= 3 and h.rtt_s is not None for h in probed.hops)
    assert all(client.health.get(h) is not None for h in ids)

    client.send_data(info.id, b"hello exit")
    await wait_until(lambda: any(isinstance(e, CircuitData) for e in exit_peer.events))
    data = next(e for e in exit_peer.events if isinstance(e, CircuitData))
    assert data.data == b"hello exit"
    assert exit_peer.manager.relay_send(data.handle, b"hello client")
    assert await client.receive(info.id, timeout=2.0) == b"hello client"
    # Middle hops carried it but saw nothing of it.
    for peer in net.relays:
        if peer is not exit_peer:
            assert not any(isinstance(e, CircuitData) for e in peer.events)

    assert [c.id for c in client.circuits()] == [info.id]
    assert client.destroy(info.id)
    await wait_until(lambda: any(isinstance(e, CircuitClosed) for e in exit_peer.events))
    assert client.circuit(info.id).state == "closed"
    for peer in net.relays:
        relay = peer.manager.relay
        assert relay is not None
        await wait_until(lambda relay=relay: relay.circuit_count == 0)
    stats = client.stats
    assert stats["routing.build.ok"] == 1
    assert stats["routing.probe.answered"] >= 9
    assert sum(p.manager.stats["relay.built"] for p in net.relays) == 3


async def test_relay_lost_mid_circuit_then_rebuild_avoids_it(net: Net) -> None:
    client = net.client.manager
    info = await client.build(hops=3)
    middle = net.by_id(info.hops[1].node_id)
    # The middle relay dies without a word (as after SIGKILL).
    await middle.manager.close(graceful=False)
    middle.link.close()
    await wait_until(lambda: client.circuit(info.id).state != "open", timeout=10.0)
    failed = client.circuit(info.id)
    assert failed.state == "failed"
    assert failed.reason is not None
    assert f"hop 2 ({b32encode(middle.node_id)[:16]})" in failed.reason
    assert "stopped answering probes" in failed.reason
    assert client.stats["routing.circuits.failed"] == 1
    # The directory still lists the dead relay; new builds avoid it anyway.
    assert middle.node_id in net.directory
    for _ in range(3):
        rebuilt = await client.build(hops=3)
        assert rebuilt.state == "open"
        assert middle.node_id not in [h.node_id for h in rebuilt.hops]
        rtts = await client.probe_all(rebuilt.id)
        assert all(r is not None for r in rtts)
    listed = {c.id: c.state for c in client.circuits()}
    assert listed[info.id] == "failed"
    assert sum(1 for state in listed.values() if state == "open") == 3


async def test_build_errors_say_why(net: Net) -> None:
    client = net.client.manager
    with pytest.raises(CircuitError, match="no exit accepts port 25") as caught:
        await client.build(hops=3, port=25)
    assert caught.value.kind == "no_path"
    unknown = NodeId(bytes(20))
    with pytest.raises(CircuitError, match="not in this node's directory") as caught:
        await client.build(exit_node_id=unknown)
    assert caught.value.kind == "unknown_exit"
    relay_only = net.relays[0].node_id
    with pytest.raises(CircuitError, match="is not an exit"):
        await client.build(exit_node_id=relay_only)
    with pytest.raises(CircuitError, match="hops must be"):
        await client.build(hops=6)
    # A chosen exit and port.
    exit_peer = net.relays[-1]
    info = await client.build(hops=2, exit_node_id=exit_peer.node_id, port=443)
    assert info.hops[-1].node_id == exit_peer.node_id
    assert info.port == 443
    assert len(info.hops) == 2


async def test_too_few_relays(net: Net) -> None:
    small = Directory(net.descriptors[-3:], now=time.time())  # one relay and two exits
    manager = CircuitManager(
        net.client.link, node_id=net.client.node_id, directory=lambda: small, config=CLIENT_CONFIG
    )
    with pytest.raises(CircuitError, match="only 3 relays usable for a 5-hop path") as caught:
        await manager.build(hops=5)
    assert caught.value.kind == "no_path"


def ghost_descriptor() -> SignedDescriptor:
    """A relay and exit in the directory that does not run: no socket at its address."""
    ghost_identity = Identity.generate()
    keyring = OnionKeyring.generate(now=time.time(), random_bytes=crypto.random_bytes)
    onion, next_onion = keyring.publics()
    now = int(time.time())
    return sign(
        NodeDescriptor(
            version=now,
            identity_key=ghost_identity.identity_public,
            link_key=ghost_identity.link_public,
            onion_key=onion,
            next_onion_key=next_onion,
            addresses=((HOST.format(99), 9),),
            roles=frozenset({DescriptorRole.RELAY, DescriptorRole.EXIT}),
            exit_policy=EXIT_POLICY,
            published_at=now,
            expires_at=now + 3600,
        ),
        ghost_identity,
    )


async def test_unreachable_first_hop_times_out(net: Net) -> None:
    ghost = ghost_descriptor()
    directory = Directory([*net.descriptors, ghost], now=time.time())
    manager = CircuitManager(
        net.client.link,
        node_id=net.client.node_id,
        directory=lambda: directory,
        config=CircuitConfig(allow_same_subnet=True, build_timeout_s=0.5, probe_interval_s=0),
    )
    # The ghost as the (one-hop) exit: no link, no retry can help (the exit was chosen).
    with pytest.raises(CircuitError, match=r"timed out at hop 1") as caught:
        await manager.build(hops=1, exit_node_id=ghost.node_id)
    assert caught.value.kind == "timeout"
    assert "after 3 attempts" in str(caught.value)
    health = manager.health.get(ghost.node_id)
    assert health is not None and health.consecutive_build_failures == 3


async def test_malformed_cells_are_counted(net: Net) -> None:
    relay = net.relays[0]
    sender = net.client.link
    await sender.connect(relay.identity.link_public, relay.link.local_addr, timeout=2.0)
    sender.send(relay.identity.link_public, KIND_CELL, b"short")
    sender.send(relay.identity.link_public, KIND_CELL, bytes(1422))  # circ_id 0
    await wait_until(lambda: relay.manager.stats["routing.drop.wrong_size"] == 1)
    await wait_until(lambda: relay.manager.stats["routing.drop.bad_type"] == 1)


async def test_client_drops_builds_it_cannot_relay(net: Net) -> None:
    # The client relays nothing: a BUILD sent to it is dropped and counted.
    relay = net.relays[0]
    client = net.client
    await relay.link.connect(client.identity.link_public, client.link.local_addr, timeout=2.0)
    cell = bytes([0, 0, 0, 7, 0x01]) + bytes(1422 - 5)
    relay.link.send(client.identity.link_public, KIND_CELL, cell)
    await wait_until(lambda: client.manager.stats["routing.drop.not_a_relay"] == 1)


async def test_unreachable_next_hop_is_named_by_the_hop_before(net: Net) -> None:
    # The entry relay cannot link to the ghost exit: after its link handshake gives up
    # (2 s here) it answers NEXT_HOP_UNREACHABLE, and the client names the ghost.
    ghost = ghost_descriptor()
    holder = [Directory([*net.descriptors, ghost], now=time.time())]
    config = CircuitConfig(
        allow_same_subnet=True, build_timeout_s=5.0, build_retries=0, probe_interval_s=0
    )
    client = await open_peer(51, holder, relay=False, config=config)
    manager = client.manager
    try:
        with pytest.raises(CircuitError) as caught:
            await manager.build(hops=2, exit_node_id=ghost.node_id)
    finally:
        await manager.close()
        client.link.close()
    assert caught.value.kind == "failed"
    message = str(caught.value)
    assert f"build failed at hop 2 ({b32encode(ghost.node_id)[:16]}): unreachable from hop 1" in (
        message
    )
    assert sum(p.manager.stats["relay.extend_failed"] for p in net.relays) == 1
    record = manager.health.get(ghost.node_id)
    assert record is not None and record.consecutive_build_failures == 1


async def test_close_ends_a_build_in_flight(net: Net) -> None:
    ghost = ghost_descriptor()  # the entry relay waits on it: the build hangs
    holder = [Directory([*net.descriptors, ghost], now=time.time())]
    config = CircuitConfig(allow_same_subnet=True, build_timeout_s=5.0, probe_interval_s=0)
    client = await open_peer(52, holder, relay=False, config=config)
    try:
        build = asyncio.create_task(client.manager.build(hops=2, exit_node_id=ghost.node_id))
        await wait_until(lambda: any(c.state == "building" for c in client.manager.circuits()))
        started = asyncio.get_running_loop().time()
        await client.manager.close()
        with pytest.raises(CircuitError, match="shutting down"):
            await build
        assert asyncio.get_running_loop().time() - started < 1.0
        (ended,) = client.manager.circuits()
        assert (ended.state, ended.reason) == ("closed", "the node is shutting down")
    finally:
        client.link.close()
