"""Sans-IO tests of LinkEndpoint: two or more endpoints on an in-memory net, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import LocalProtocolError
from meshnode.link import constants as C
from meshnode.link.config import LinkConfig
from meshnode.link.events import (
    FrameReceived,
    PeerRoamed,
    PeerUnreachable,
    PongReceived,
    SessionClosed,
    SessionEstablished,
)
from tests.support.linknet import LinkNet

KIND = C.KIND_DHT


def pair(config: LinkConfig | None = None):
    net = LinkNet()
    a = net.add("alice", config=config)
    b = net.add("bob", config=config)
    for n in (a, b):
        n.endpoint.register_kind(KIND)
    return net, a, b


def connected(config: LinkConfig | None = None):
    net, a, b = pair(config)
    a.endpoint.connect(b.key, b.addr, net.now)
    net.run()
    return net, a, b


def frames(node):
    return [e.payload for e in node.events if isinstance(e, FrameReceived)]


def test_handshake_one_round_trip_then_confirmed():
    net, a, b = pair()
    a.endpoint.connect(b.key, b.addr, net.now)
    net.collect()
    assert [len(d) for d, _, _ in net.in_flight] == [C.INITIATION_BYTES]
    net.deliver_all()
    assert [len(d) for d, _, _ in net.in_flight] == [C.RESPONSE_BYTES]
    net.deliver_all()
    # The initiator has its session after one round trip and confirms it with a keepalive.
    [est] = net.events(a, SessionEstablished)
    assert est.initiator and not est.rekey and est.handshake_rtt == 0.0
    assert est.node_id == b.endpoint.identity.node_id
    assert [len(d) for d, _, _ in net.in_flight] == [C.TRANSPORT_MIN_BYTES]
    net.deliver_all()
    [est_b] = net.events(b, SessionEstablished)
    assert not est_b.initiator and est_b.node_id == a.endpoint.identity.node_id
    assert est_b.identity_key == a.endpoint.identity.identity_public
    assert a.endpoint.has_session(b.key, net.now) and b.endpoint.has_session(a.key, net.now)


def test_frames_both_ways_and_queued_before_handshake():
    net, a, b = pair()
    a.endpoint.connect(b.key, b.addr, net.now)
    a.endpoint.send(b.key, KIND, b"early-1", net.now)
    a.endpoint.send(b.key, KIND, b"early-2", net.now)
    net.run()
    assert frames(b) == [b"early-1", b"early-2"]
    b.endpoint.send(a.key, KIND, b"reply", net.now)
    net.run()
    assert frames(a) == [b"reply"]
    ev = next(e for e in b.events if isinstance(e, FrameReceived))
    assert ev.node_id == a.endpoint.identity.node_id and ev.addr == a.addr


def test_no_plaintext_on_the_wire():
    net, a, b = connected()
    secret = b"attack at dawn, the password is hunter2"
    a.endpoint.send(b.key, KIND, secret, net.now)
    net.run()
    assert frames(b) == [secret]
    assert all(secret not in d for d, _, _ in net.log)
    assert all(a.endpoint.identity.identity_public not in d for d, _, _ in net.log)


def test_replayed_datagram_dropped_and_counted():
    net, a, b = connected()
    a.endpoint.send(b.key, KIND, b"once", net.now)
    net.collect()
    [(data, src, _dst)] = net.in_flight
    net.deliver_all()
    b.endpoint.receive_datagram(data, src, net.now)
    assert frames(b) == [b"once"]
    assert b.endpoint.stats["drop.replay"] == 1


def test_reordering_within_window_delivers_all():
    net, a, b = connected()
    for i in range(50):
        a.endpoint.send(b.key, KIND, b"%d" % i, net.now)
    net.collect()
    net.deliver_all(reverse=True)
    assert sorted(frames(b), key=int) == [b"%d" % i for i in range(50)]
    assert b.endpoint.stats["drop.replay"] == 0


def test_lost_initiation_is_retried_with_backoff():
    net, a, b = pair()
    lost = {"n": 0}

    def drop_first_two(data, src, dst):
        if data[0] == C.MSG_INITIATION and lost["n"] < 2:
            lost["n"] += 1
            return True
        return False

    net.drop = drop_first_two
    a.endpoint.connect(b.key, b.addr, net.now)
    a.endpoint.send(b.key, KIND, b"hello", net.now)
    net.run()
    assert not net.events(a, SessionEstablished)
    net.advance(1.0, step=0.1)  # first retry after ~1 s (+ jitter up to 1/3)
    net.advance(0.4, step=0.1)
    assert a.endpoint.stats["handshake.retried"] >= 1
    net.advance(3.0, step=0.1)  # second retry after ~2 s more
    assert frames(b) == [b"hello"]
    assert a.endpoint.stats["handshake.retried"] == 2


def test_unreachable_peer_reported_and_queue_dropped():
    cfg = LinkConfig(handshake_timeout_s=6.0)
    net, a, b = pair(cfg)
    net.drop = lambda data, src, dst: dst == b.addr
    a.endpoint.connect(b.key, b.addr, net.now)
    a.endpoint.send(b.key, KIND, b"lost", net.now)
    net.advance(10.0)
    [ev] = net.events(a, PeerUnreachable)
    assert ev.dropped_frames == 1 and ev.addr == b.addr
    assert a.endpoint.peer_count == 0 and a.endpoint.pending_handshakes == 0
    assert a.endpoint.get_timer() is None


def test_wrong_key_gets_no_answer():
    net, a, b = pair()
    c = net.add("carol")
    # Alice thinks Bob's address has Carol's key: Bob cannot verify mac1, stays silent.
    a.endpoint.connect(c.key, b.addr, net.now)
    net.run()
    assert b.endpoint.stats["drop.bad_mac1"] == 1
    assert not net.in_flight and not net.events(a, SessionEstablished)


def test_rekey_after_time_keeps_traffic_flowing():
    cfg = LinkConfig(rekey_after_s=30.0, reject_after_s=45.0, idle_timeout_s=100.0)
    net, a, b = connected(cfg)
    for _ in range(8):
        net.advance(5.0)
        a.endpoint.send(b.key, KIND, b"tick", net.now)
        b.endpoint.send(a.key, KIND, b"tock", net.now)
        net.run()
    assert a.endpoint.stats["handshake.rekey"] >= 1
    rekeys = [e for e in net.events(a, SessionEstablished) if e.rekey]
    assert rekeys
    assert frames(b) == [b"tick"] * 8 and frames(a) == [b"tock"] * 8
    assert b.endpoint.stats["drop.bad_tag"] == 0


def test_old_keypair_still_accepted_during_rekey():
    cfg = LinkConfig(rekey_after_s=30.0, reject_after_s=45.0)
    net, a, b = connected(cfg)
    net.advance(31.0)
    b.endpoint.send(a.key, KIND, b"in-flight-old", net.now)
    net.collect()
    old = list(net.in_flight)
    net.in_flight.clear()
    a.endpoint.send(b.key, KIND, b"trigger", net.now)  # starts the rekey
    net.run()
    for data, src, _dst in old:
        a.endpoint.receive_datagram(data, src, net.now)
    net.collect()
    assert b"in-flight-old" in frames(a)


def test_keys_rejected_after_reject_time():
    cfg = LinkConfig(rekey_after_s=30.0, reject_after_s=45.0)
    net, a, b = connected(cfg)
    a.endpoint.send(b.key, KIND, b"x", net.now)
    net.collect()
    [(data, src, _dst)] = net.in_flight
    net.in_flight.clear()
    net.now += 46
    b.endpoint.receive_datagram(data, src, net.now)
    assert b.endpoint.stats["drop.expired_keys"] == 1


def test_roaming_after_authenticated_datagram_only():
    net, a, b = connected()
    new_addr = ("127.0.9.9", 4444)
    net.nodes[new_addr] = a
    # A forged datagram from a new address changes nothing.
    b.endpoint.receive_datagram(b"\x04" + bytes(40), ("127.6.6.6", 1), net.now)
    assert b.endpoint.peer_info(a.key).addr == a.addr
    a.addr = new_addr
    a.endpoint.send(b.key, KIND, b"from new addr", net.now)
    net.collect()
    batch = [(d, new_addr, dst) for d, _, dst in net.in_flight]
    net.in_flight = batch
    net.deliver_all()
    [ev] = net.events(b, PeerRoamed)
    assert ev.new_addr == new_addr
    b.endpoint.send(a.key, KIND, b"follows", net.now)
    net.collect()
    assert [dst for _, _, dst in net.in_flight] == [new_addr]


def test_idle_session_expires():
    cfg = LinkConfig(idle_timeout_s=60.0)
    net, a, b = connected(cfg)
    net.drop = lambda *args: True  # silence
    net.advance(70.0, step=5.0)
    assert any(e.reason == "idle" for e in net.events(a, SessionClosed))
    assert a.endpoint.peer_count == 0 and b.endpoint.peer_count == 0
    assert a.endpoint.get_timer() is None


def test_passive_keepalive_answers_data():
    net, a, b = connected()
    a.endpoint.send(b.key, KIND, b"data", net.now)
    net.run()
    before = b.endpoint.stats["tx.keepalive"]
    net.advance(C.KEEPALIVE_TIMEOUT_S + 1)
    assert b.endpoint.stats["tx.keepalive"] == before + 1
    # Dead-peer detection did not fire: the keepalive came back in time.
    assert a.endpoint.stats["handshake.dead_peer"] == 0


def test_dead_peer_triggers_new_handshake():
    net, a, b = connected()
    net.drop = lambda data, src, dst: src == b.addr
    a.endpoint.send(b.key, KIND, b"hello?", net.now)
    net.advance(C.KEEPALIVE_TIMEOUT_S + C.REKEY_TIMEOUT_S + 1)
    assert a.endpoint.stats["handshake.dead_peer"] == 1


def test_ping_pong_rtt():
    net, a, b = connected()
    seq = a.endpoint.ping(b.key, net.now)
    net.collect()
    net.deliver_all()
    net.now += 0.25
    net.deliver_all()
    [pong] = net.events(a, PongReceived)
    assert pong.seq == seq and pong.rtt == pytest.approx(0.25)


def test_replayed_initiation_refused():
    net, a, b = pair()
    a.endpoint.connect(b.key, b.addr, net.now)
    net.collect()
    [(init, src, _dst)] = net.in_flight
    net.run()
    net.now += 1
    b.endpoint.receive_datagram(init, src, net.now)
    assert b.endpoint.stats["drop.replayed_initiation"] == 1
    net.collect()
    assert not net.in_flight


def test_under_load_responder_demands_cookie_then_completes():
    cfg = LinkConfig(handshake_rate_per_s=1.0, handshake_burst=1)
    net, a, b = pair(cfg)
    burner = net.add("burner", config=cfg)
    burner.endpoint.connect(b.key, b.addr, net.now)  # uses up the burst
    net.run()
    a.endpoint.connect(b.key, b.addr, net.now)
    net.run()
    assert b.endpoint.stats["handshake.cookie_sent"] == 1
    assert a.endpoint.stats["handshake.cookie_received"] == 1
    assert not net.events(a, SessionEstablished)
    net.advance(2.0, step=0.1)  # the retry carries a valid mac2
    assert net.events(a, SessionEstablished)


def test_caps_peers_and_queue():
    cfg = LinkConfig(max_peers=3, max_queued_per_peer=4)
    net = LinkNet()
    a = net.add("alice", config=cfg)
    a.endpoint.register_kind(KIND)
    others = [net.add(f"n{i}") for i in range(5)]
    for o in others:
        a.endpoint.connect(o.key, o.addr, net.now)
        net.now += 0.01
    assert a.endpoint.peer_count == 3
    assert a.endpoint.stats["session.evicted"] == 2
    net.drop = lambda *args: True
    for i in range(10):
        a.endpoint.send(others[-1].key, KIND, b"%d" % i, net.now)
    assert a.endpoint.stats["drop.queue_full"] == 6
    assert len(a.endpoint.peer_info(others[-1].key).queue) == 4


def test_pending_handshake_cap():
    cfg = LinkConfig(max_pending_handshakes=2)
    net = LinkNet()
    a = net.add("alice", config=cfg)
    others = [net.add(f"n{i}") for i in range(4)]
    net.drop = lambda *args: True
    for o in others:
        a.endpoint.connect(o.key, o.addr, net.now)
    assert a.endpoint.pending_handshakes == 2
    assert a.endpoint.stats["drop.too_many_pending"] == 2


def test_api_misuse_raises_local_error():
    net, a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.endpoint.send(b.key, KIND, b"x", net.now)  # never connected
    with pytest.raises(LocalProtocolError):
        a.endpoint.register_kind(C.KIND_PING)
    with pytest.raises(LocalProtocolError):
        a.endpoint.connect(a.key, b.addr, net.now)
    a.endpoint.connect(b.key, b.addr, net.now)
    with pytest.raises(LocalProtocolError):
        a.endpoint.send(b.key, KIND, bytes(C.MAX_PAYLOAD_BYTES + 1), net.now)
    with pytest.raises(LocalProtocolError):
        a.endpoint.send(b.key, 0x77, b"x", net.now)  # unregistered kind


def test_unregistered_kind_from_peer_dropped():
    net, a, b = connected()
    a.endpoint.register_kind(0x30)
    a.endpoint.send(b.key, 0x30, b"x", net.now)
    net.run()
    assert b.endpoint.stats["drop.unknown_kind"] == 1 and not frames(b)


def test_max_size_payload_fits_datagram_limit():
    net, a, b = connected()
    a.endpoint.send(b.key, KIND, bytes(C.MAX_PAYLOAD_BYTES), net.now)
    net.collect()
    [(data, _, _)] = net.in_flight
    assert len(data) == C.MAX_DATAGRAM_BYTES
    net.deliver_all()
    assert frames(b) == [bytes(C.MAX_PAYLOAD_BYTES)]


def _snapshot(ep):
    peers = {}
    for key in list(ep._peers):
        p = ep.peer_info(key)
        peers[key] = (
            p.addr,
            p.identity_key,
            p.last_received,
            p.last_initiation_ts,
            tuple((k.local_index, k.send_counter) for k in p.keypairs()),
            len(p.queue),
        )
    return peers, ep.pending_handshakes, ep.get_timer()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=1600),
        st.builds(lambda t, rest: bytes([t]) + rest, st.integers(1, 4), st.binary(max_size=300)),
        st.sampled_from([C.INITIATION_BYTES, C.RESPONSE_BYTES, C.COOKIE_REPLY_BYTES]).flatmap(
            lambda n: st.builds(
                lambda t, rest: bytes([t]) + rest,
                st.integers(1, 4),
                st.binary(min_size=n - 1, max_size=n - 1),
            )
        ),
    )
)
def test_garbage_never_raises_and_changes_no_state(garbage):
    net, a, b = _GARBAGE_PAIR
    before = _snapshot(b.endpoint), _snapshot(a.endpoint)
    b.endpoint.receive_datagram(garbage, a.addr, net.now)
    a.endpoint.receive_datagram(garbage, ("127.66.0.1", 9), net.now)
    assert (_snapshot(b.endpoint), _snapshot(a.endpoint)) == before
    assert not b.endpoint.datagrams_to_send() and b.endpoint.next_event() is None


_GARBAGE_PAIR = connected()


def test_tampered_transport_counted_as_bad_tag():
    net, a, b = connected()
    a.endpoint.send(b.key, KIND, b"payload", net.now)
    net.collect()
    [(data, src, _dst)] = net.in_flight
    net.in_flight.clear()
    for i in range(C.TRANSPORT_HEADER_BYTES, len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        b.endpoint.receive_datagram(bytes(bad), src, net.now)
    assert b.endpoint.stats["drop.bad_tag"] == len(data) - C.TRANSPORT_HEADER_BYTES
    b.endpoint.receive_datagram(data, src, net.now)  # the genuine one still gets through
    net.collect()
    assert frames(b) == [b"payload"]


def test_low_order_static_key_refused_before_any_dh():
    from meshnode.errors import HandshakeError
    from meshnode.link.noise import InitiatorHandshake

    net, a, _ = pair()
    with pytest.raises(LocalProtocolError, match="usable X25519"):
        a.endpoint.connect(bytes(32), ("127.0.0.9", 1), net.now)
    noise = InitiatorHandshake(
        local_static_private=a.endpoint.identity.link_private, remote_static_public=bytes(32)
    )
    with pytest.raises(HandshakeError):
        noise.write_initiation(bytes(C.INITIATION_PAYLOAD_BYTES))


def test_forged_response_does_not_void_the_handshake():
    net, a, b = pair()
    a.endpoint.connect(b.key, b.addr, net.now)
    net.collect()
    [(init, _, _)] = net.in_flight
    sender_index = int.from_bytes(init[1:5], "big")
    # An on-path attacker who saw the initiation answers first with junk that passes
    # mac1 (it knows Alice's public key).
    from meshnode.link import messages as M

    body = M.encode_response_body(7, sender_index, bytes(C.NOISE_RESPONSE_BYTES))
    forged = a.endpoint.peer_info(b.key).cookies.__class__(a.key).add_macs(body, net.now)
    a.endpoint.receive_datagram(forged, b.addr, net.now)
    assert a.endpoint.stats["drop.bad_handshake"] == 1
    net.run()  # the genuine response still completes the handshake
    assert net.events(a, SessionEstablished)


def test_give_up_exactly_at_handshake_timeout():
    cfg = LinkConfig(handshake_timeout_s=7.0)
    net, a, b = pair(cfg)
    net.drop = lambda data, src, dst: dst == b.addr
    start = net.now
    a.endpoint.connect(b.key, b.addr, net.now)
    while not net.events(a, PeerUnreachable):
        net.advance(0.05, step=0.05)
    assert net.now - start == pytest.approx(7.0, abs=0.06)


def test_replayed_initiation_refused_after_peer_forgotten():
    cfg = LinkConfig(idle_timeout_s=30.0)
    net, a, b = pair(cfg)
    a.endpoint.connect(b.key, b.addr, net.now)
    net.collect()
    [(init, src, _)] = net.in_flight
    net.run()
    net.drop = lambda *args: True
    net.advance(40.0, step=5.0)
    assert b.endpoint.peer_count == 0
    b.endpoint.receive_datagram(init, src, net.now)
    assert b.endpoint.stats["drop.replayed_initiation"] == 1
    assert b.endpoint.peer_count == 0 and not b.endpoint.datagrams_to_send()


def test_persistent_keepalive_keeps_an_idle_link_alive_across_rekeys():
    cfg = LinkConfig(
        rekey_after_s=30.0, reject_after_s=45.0, idle_timeout_s=60.0, persistent_keepalive_s=5.0
    )
    net, a, b = connected(cfg)
    net.advance(200.0, step=1.0)  # no frames at all, only keepalives
    assert not net.events(a, SessionClosed) and not net.events(b, SessionClosed)
    assert a.endpoint.stats["handshake.rekey"] >= 3
    a.endpoint.send(b.key, KIND, b"still up", net.now)
    net.run()
    assert frames(b) == [b"still up"]
