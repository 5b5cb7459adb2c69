"""The batch calls against their one-at-a-time equivalents, on twin endpoints.

``send_many`` must leave exactly what one ``send`` per payload leaves (datagrams, counters,
timers, rekeys started, frames queued), also when a burst crosses the rekey or reject
message limit or a time limit; ``receive_datagrams`` must do exactly what one
``receive_datagram`` per datagram does; ``take_events`` what repeated ``next_event`` does.
Two nets built from the same names are byte-identical (deterministic keys, randomness
and clock), so one twin takes the batch path and the other the one-at-a-time path.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import LocalProtocolError
from meshnode.link import constants as C
from meshnode.link import endpoint as endpoint_module
from meshnode.link import noise
from meshnode.link.config import LinkConfig
from meshnode.link.endpoint import LinkEndpoint
from meshnode.link.events import FrameReceived, PeerRoamed, PongReceived
from meshnode.link.session import Keypair, Peer
from tests.support.linknet import LinkNet, Node

KIND = C.KIND_DHT
OTHER_KIND = C.KIND_CELL

# The noise library warns when a caller sets the ephemeral key, as the fixture does.
pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")


@pytest.fixture(autouse=True)
def deterministic_ephemerals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ephemeral keys drawn from the endpoint's own (deterministic) random_bytes, so twin
    endpoints make byte-identical handshakes, also for rekeys, whatever the call order."""

    def from_endpoint_random(cls: Any) -> Any:
        def make(**kwargs: Any) -> Any:
            endpoint = sys._getframe(1).f_locals["self"]  # the LinkEndpoint method calling
            assert isinstance(endpoint, LinkEndpoint)
            return cls(ephemeral_private=endpoint._random(32), **kwargs)

        return make

    monkeypatch.setattr(
        endpoint_module, "InitiatorHandshake", from_endpoint_random(noise.InitiatorHandshake)
    )
    monkeypatch.setattr(
        endpoint_module, "ResponderHandshake", from_endpoint_random(noise.ResponderHandshake)
    )


def connected(config: LinkConfig | None = None) -> tuple[LinkNet, Node, Node]:
    net = LinkNet()
    a = net.add("alice", config=config)
    b = net.add("bob", config=config)
    for n in (a, b):
        n.endpoint.register_kind(KIND)
    a.endpoint.connect(b.key, b.addr, net.now)
    net.run()
    return net, a, b


def twins(config: LinkConfig | None = None) -> tuple[tuple[LinkNet, Node, Node], ...]:
    return connected(config), connected(config)


def keypair_state(kp: Keypair | None) -> Any:
    if kp is None:
        return None
    return (kp.local_index, kp.remote_index, kp.send_counter, kp.replay.highest, kp.created)


def peer_state(peer: Peer | None) -> Any:
    if peer is None:
        return None
    return (
        keypair_state(peer.current),
        keypair_state(peer.previous),
        keypair_state(peer.next),
        None if peer.handshake is None else peer.handshake.local_index,
        peer.attempt_started,
        peer.next_retry,
        list(peer.queue),
        peer.addr,
        peer.last_sent,
        peer.last_received,
        peer.last_data_received,
        peer.owes_keepalive,
        peer.awaiting_reply_since,
        dict(peer.pings),
    )


def state(ep: LinkEndpoint, peer_key: bytes) -> Any:
    return (
        dict(ep.stats),
        ep.get_timer(),
        peer_state(ep.peer_info(peer_key)),
        ep.pending_handshakes,
    )


def drain_events(ep: LinkEndpoint) -> list[Any]:
    events = []
    while (event := ep.next_event()) is not None:
        events.append(event)
    return events


def payloads(count: int, size: int = 40) -> list[bytes]:
    return [bytes([i % 256]) * size for i in range(count)]


# --- send_many --------------------------------------------------------------------------


def send_both(one: Node, many: Node, peer_key: bytes, frames: list[bytes], now: float) -> None:
    for payload in frames:
        one.endpoint.send(peer_key, KIND, payload, now)
    many.endpoint.send_many(peer_key, KIND, frames, now)
    out_one, out_many = one.endpoint.datagrams_to_send(), many.endpoint.datagrams_to_send()
    assert out_many == out_one
    assert state(many.endpoint, peer_key) == state(one.endpoint, peer_key)
    assert drain_events(many.endpoint) == drain_events(one.endpoint)


def test_send_many_equals_send_on_a_session():
    (net1, a1, b1), (_net2, a2, b2) = twins()
    send_both(a1, a2, b1.key, payloads(10), net1.now)
    send_both(b1, b2, a1.key, payloads(3), net1.now)


def test_send_many_delivers_in_order():
    net, a, b = connected()
    frames = payloads(20)
    a.endpoint.send_many(b.key, KIND, frames, net.now)
    net.run()
    assert [e.payload for e in b.events if isinstance(e, FrameReceived)] == frames
    assert a.endpoint.stats["tx.transport"] == 1 + 20  # the confirming keepalive, then frames


@pytest.mark.parametrize("rekey_after", [1, 2, 3, 5, 8])
def test_send_many_crosses_the_rekey_message_limit_like_send(rekey_after):
    config = LinkConfig(rekey_after_messages=rekey_after)
    (net1, a1, b1), (net2, a2, b2) = twins(config)
    for burst in (1, 7, 3, 12):
        send_both(a1, a2, b1.key, payloads(burst), net1.now)
        # The responder's side too (it rekeys on count like the initiator).
        send_both(b1, b2, a1.key, payloads(burst), net1.now)
    assert a2.endpoint.stats["handshake.rekey"] >= 1
    # Let the rekeys complete on both twins, then the bursts go on under the new keys.
    for net in (net1, net2):
        net.run()
    send_both(a1, a2, b1.key, payloads(9), net1.now)


def test_send_many_at_rekey_age_starts_one_handshake_like_send():
    config = LinkConfig(rekey_after_s=10.0, reject_after_s=30.0)
    (net1, a1, b1), (_net2, a2, b2) = twins(config)
    now = net1.now + 10.0
    send_both(a1, a2, b1.key, payloads(6), now)
    assert a2.endpoint.stats["handshake.rekey"] == 1
    # The responder rekeys later (halfway between rekey and reject age).
    send_both(b1, b2, a1.key, payloads(4), now)
    assert b2.endpoint.stats["handshake.rekey"] == 0
    send_both(b1, b2, a1.key, payloads(4), net1.now + 20.0)
    assert b2.endpoint.stats["handshake.rekey"] == 1


def test_send_many_past_reject_age_queues_like_send():
    config = LinkConfig(rekey_after_s=10.0, reject_after_s=30.0, max_queued_per_peer=3)
    (net1, a1, b1), (_net2, a2, b2) = twins(config)
    send_both(a1, a2, b1.key, payloads(5), net1.now + 30.0)
    peer = a2.endpoint.peer_info(b2.key)
    assert peer is not None and len(peer.queue) == 3
    assert a2.endpoint.stats["drop.queue_full"] == 2


def test_send_many_at_the_reject_message_limit_like_send():
    (net1, a1, b1), (_net2, a2, b2) = twins()
    for a, b in ((a1, b1), (a2, b2)):
        peer = a.endpoint.peer_info(b.key)
        assert peer is not None and peer.current is not None
        peer.current.send_counter = C.REJECT_AFTER_MESSAGES - 3
    send_both(a1, a2, b1.key, payloads(6), net1.now)
    peer = a2.endpoint.peer_info(b2.key)
    assert peer is not None and peer.current is not None
    assert peer.current.send_counter == C.REJECT_AFTER_MESSAGES
    assert len(peer.queue) == 3  # the last three wait for the new session


def test_send_many_without_session_queues_and_handshakes_once():
    nets = []
    for _ in range(2):
        net = LinkNet()
        a = net.add("alice")
        b = net.add("bob")
        for n in (a, b):
            n.endpoint.register_kind(KIND)
        a.endpoint.connect(b.key, b.addr, net.now)
        net.collect()  # the initiation is in flight
        nets.append((net, a, b))
    (net1, a1, b1), (net2, a2, b2) = nets
    send_both(a1, a2, b1.key, payloads(4), net1.now)
    assert a2.endpoint.stats["handshake.initiated"] == 1
    net2.run()
    assert [e.payload for e in b2.events if isinstance(e, FrameReceived)] == payloads(4)


def test_send_many_checks_every_payload_first():
    net, a, b = connected()
    before = state(a.endpoint, b.key)
    too_big = [b"ok", bytes(C.MAX_PAYLOAD_BYTES + 1), b"ok"]
    with pytest.raises(LocalProtocolError):
        a.endpoint.send_many(b.key, KIND, too_big, net.now)
    assert a.endpoint.datagrams_to_send() == []
    assert state(a.endpoint, b.key) == before
    with pytest.raises(LocalProtocolError):
        a.endpoint.send_many(b.key, OTHER_KIND, [b"x"], net.now)
    with pytest.raises(LocalProtocolError):
        a.endpoint.send_many(bytes(32), KIND, [b"x"], net.now)
    a.endpoint.send_many(b.key, KIND, [], net.now)
    a.endpoint.send_many(b.key, KIND, [bytes(C.MAX_PAYLOAD_BYTES)], net.now)
    [(datagram, _)] = a.endpoint.datagrams_to_send()
    assert len(datagram) == C.MAX_DATAGRAM_BYTES


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rekey_after=st.integers(1, 12),
    steps=st.lists(
        st.tuples(
            st.integers(0, 9),  # burst size
            st.sampled_from([0.0, 0.0, 3.0, 11.0]),  # time step before it
            st.booleans(),  # deliver traffic after it
            st.booleans(),  # alice (True) or bob sends
        ),
        max_size=8,
    ),
)
def test_send_many_equals_send_property(rekey_after, steps):
    config = LinkConfig(rekey_after_messages=rekey_after, rekey_after_s=10.0, reject_after_s=25.0)
    (net1, a1, b1), (net2, a2, b2) = twins(config)
    for burst, dt, deliver, from_alice in steps:
        for net in (net1, net2):
            net.now += dt
        one, many, peer_key = (a1, a2, b1.key) if from_alice else (b1, b2, a1.key)
        if one.endpoint.peer_info(peer_key) is None:
            continue
        send_both(one, many, peer_key, payloads(burst, size=1 + burst), net1.now)
        if deliver:
            for net, a, b in ((net1, a1, b1), (net2, a2, b2)):
                net.in_flight.clear()
                net.run()
                a.events.clear()
                b.events.clear()
        assert state(a2.endpoint, b2.key) == state(a1.endpoint, b1.key)
        assert state(b2.endpoint, a2.key) == state(b1.endpoint, a1.key)


# --- receive_datagrams / take_events ------------------------------------------------------


def receive_both(
    one: Node, many: Node, batch: list[tuple[bytes, Any]], now: float
) -> tuple[list[Any], list[tuple[bytes, Any]]]:
    """Feed ``batch`` one by one to ``one`` and at once to ``many``; compare everything.

    Returns the events and the datagrams the batch produced.
    """
    for data, addr in batch:
        one.endpoint.receive_datagram(data, addr, now)
    many.endpoint.receive_datagrams(batch, now)
    out = many.endpoint.datagrams_to_send()
    assert out == one.endpoint.datagrams_to_send()
    events = many.endpoint.take_events()
    assert events == drain_events(one.endpoint)
    assert many.endpoint.take_events() == []
    return events, out


def outgoing(node: Node) -> list[bytes]:
    return [d for d, _ in node.endpoint.datagrams_to_send()]


def test_receive_datagrams_equals_receive_datagram_on_a_mixed_batch():
    (net1, a1, b1), (net2, a2, b2) = twins()
    for net in (net1, net2):
        net.in_flight.clear()
    b1.endpoint.register_kind(OTHER_KIND)
    b2.endpoint.register_kind(OTHER_KIND)
    ep = a1.endpoint  # a2 is its twin: a1's datagrams are valid for b1 and b2 alike
    ep.register_kind(OTHER_KIND)
    ep.send_many(b1.key, KIND, payloads(5), net1.now)
    ping_seq = ep.ping(b1.key, net1.now)
    ep.send(b1.key, OTHER_KIND, b"other kind", net1.now)
    frames = outgoing(a1)
    peer = ep.peer_info(b1.key)
    assert peer is not None and peer.current is not None
    # An authenticated frame of a kind bob did not register, sealed by hand.
    kp = peer.current
    counter = kp.send_counter
    kp.send_counter += 1
    header = bytes((C.MSG_TRANSPORT,)) + kp.remote_index.to_bytes(4, "big")
    header += counter.to_bytes(8, "big")
    unregistered = header + kp.sender.seal(counter, bytes((0x55,)) + b"?", header)
    tampered = bytearray(frames[1])
    tampered[-1] ^= 1
    roamed = ("127.9.9.9", 4242)
    batch = [
        (frames[0], a1.addr),
        (b"", a1.addr),
        (b"\x09garbage", a1.addr),
        (frames[0][: C.TRANSPORT_MIN_BYTES - 1], a1.addr),
        (bytes(tampered), a1.addr),
        (frames[1], a1.addr),
        (frames[1], a1.addr),  # replay
        (frames[3], roamed),  # reordered, from a new address
        (frames[2], roamed),
        (unregistered, roamed),
        (frames[4], roamed),
        (frames[5], roamed),  # the ping
        (frames[6], roamed),  # the other registered kind
        (b"\x04" + bytes(40), roamed),  # unknown index
        (bytes(C.MAX_DATAGRAM_BYTES + 1), roamed),
    ]
    events, out = receive_both(b1, b2, batch, net1.now)
    assert state(b2.endpoint, a2.key) == state(b1.endpoint, a1.key)
    assert [e.payload for e in events if isinstance(e, FrameReceived)] == [
        *payloads(5)[:1],
        payloads(5)[1],
        payloads(5)[3],
        payloads(5)[2],
        payloads(5)[4],
        b"other kind",
    ]
    assert sum(isinstance(e, PeerRoamed) for e in events) == 1
    stats = b2.endpoint.stats
    assert stats["drop.bad_tag"] == 1 and stats["drop.replay"] == 1
    assert stats["drop.unknown_kind"] == 1 and stats["rx.ping"] == 1
    assert stats["drop.bad_length"] == 3 and stats["drop.unknown_type"] == 1
    assert stats["drop.unknown_index"] == 1
    # The pong goes back to the roamed address and answers alice's ping.
    [(pong, dest)] = out
    assert dest == roamed
    ep.receive_datagram(pong, b1.addr, net1.now)
    assert [e.seq for e in drain_events(ep) if isinstance(e, PongReceived)] == [ping_seq]


def test_receive_datagrams_across_a_rekey_promotes_next_like_receive_datagram():
    config = LinkConfig(rekey_after_s=10.0, reject_after_s=30.0)
    (net1, a1, b1), (net2, a2, b2) = twins(config)
    for net in (net1, net2):
        net.in_flight.clear()
    now = net1.now + 10.0
    # Alice starts a rekey with her first frame past rekey age; both go out together.
    a1.endpoint.send_many(b1.key, KIND, payloads(3), now)
    a2.endpoint.send_many(b2.key, KIND, payloads(3), now)
    first = outgoing(a1)
    assert outgoing(a2) == first
    assert [d[0] for d in first] == [C.MSG_TRANSPORT, C.MSG_INITIATION] + [C.MSG_TRANSPORT] * 2
    _, out = receive_both(b1, b2, [(d, a1.addr) for d in first[:-1]], now)  # one held back
    [(response, _)] = out
    assert response[0] == C.MSG_RESPONSE
    for a in (a1, a2):
        a.endpoint.receive_datagram(response, b1.addr, now)
    keepalive = outgoing(a1)
    assert outgoing(a2) == keepalive
    a1.endpoint.send_many(b1.key, KIND, payloads(2), now)
    a2.endpoint.send_many(b2.key, KIND, payloads(2), now)
    second = outgoing(a1)
    assert outgoing(a2) == second
    # Old-key stragglers after the new keys' first datagram: both keypairs still open.
    batch = [*keepalive, *second[1:], first[-1]]
    events, _ = receive_both(b1, b2, [(d, a1.addr) for d in batch], now)
    assert [e.payload for e in events if isinstance(e, FrameReceived)] == [
        payloads(2)[1],
        payloads(3)[2],
    ]
    assert b2.endpoint.stats["handshake.completed"] == 2  # the first session, then the rekey
    assert state(b2.endpoint, a2.key) == state(b1.endpoint, a1.key)


def test_take_events_in_order_and_empty_after():
    net, a, b = connected()
    net.in_flight.clear()
    seq = a.endpoint.ping(b.key, net.now)
    a.endpoint.send_many(b.key, KIND, payloads(3), net.now)
    b.endpoint.receive_datagrams([(d, a.addr) for d in outgoing(a)], net.now)
    events = b.endpoint.take_events()
    assert [type(e) for e in events] == [FrameReceived] * 3
    assert b.endpoint.take_events() == [] and b.endpoint.next_event() is None
    a.endpoint.receive_datagrams([(d, b.addr) for d in outgoing(b)], net.now)
    [pong] = a.endpoint.take_events()
    assert isinstance(pong, PongReceived) and pong.seq == seq


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 11), st.sampled_from(["ok", "flip", "cut", "roam"])),
        max_size=24,
    )
)
def test_receive_datagrams_equals_receive_datagram_property(picks):
    (net1, a1, b1), (net2, a2, b2) = twins()
    for net in (net1, net2):
        net.in_flight.clear()
    a1.endpoint.send_many(b1.key, KIND, payloads(10), net1.now)
    a1.endpoint.ping(b1.key, net1.now)
    a1.endpoint.send(b1.key, KIND, b"", net1.now)
    pool = outgoing(a1)
    batch = []
    for index, how in picks:
        data = pool[index % len(pool)]
        addr = a1.addr
        if how == "flip":
            data = data[:-1] + bytes((data[-1] ^ 0x80,))
        elif how == "cut":
            data = data[: len(data) // 2]
        elif how == "roam":
            addr = ("127.77.0.1", 7000)
        batch.append((data, addr))
    receive_both(b1, b2, batch, net1.now)
    assert state(b2.endpoint, a2.key) == state(b1.endpoint, a1.key)
