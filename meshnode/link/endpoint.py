"""LinkEndpoint: the sans-IO link layer for one node — Noise IK sessions over datagrams.

Three inputs (user calls, received datagrams, timer expiry) and three outputs
(datagrams to send, one deadline, events), like aioquic's ``QuicConnection``:

- ``connect(static_key, addr, now)``, ``send(static_key, kind, payload, now)``,
  ``send_many(static_key, kind, payloads, now)``, ``ping(static_key, now)``,
  ``close(static_key)``, ``register_kind(kind)``;
- ``receive_datagram(data, addr, now)`` or, for a batch, ``receive_datagrams(batch, now)``;
- ``handle_timer(now)`` when ``get_timer()`` is due;
- then ``datagrams_to_send()`` and ``next_event()`` (or ``take_events()``, all at once).

Receive pipeline for a transport datagram (WireGuard's order, receive.go): length →
receiver index → key age → replay *check* → AEAD open → replay *update* → promote a
``next`` keypair → roam → deliver. Only authenticated datagrams change state; anything
else is dropped and counted in :attr:`LinkEndpoint.stats` under ``drop.<reason>``.

Data path cost: the batch calls do the per-call work once per batch, not per datagram.
``receive_datagrams`` runs the pipeline above inline for each transport datagram with
the lookups hoisted, counts and arms the keepalive timer once (``now`` is the same for
the whole batch); ``receive_datagram`` is a batch of one, so there is one pipeline.
``send_many`` decides the key-usability and rekey rules once per *run* of frames: ``now``
is fixed, so the time rules cannot change within a call, and the message rules depend
only on the send counter, so it computes how many frames can be sealed before the rekey
or reject message limit, seals that many, and hands the frame at the boundary to the
one-frame path (``send``), which applies every rule; the result is byte-for-byte what one
``send`` per frame gives (tests/meshnode/link/test_fastpath.py).

Handshake flood protection (WireGuard §5.4.7): an initiation without a valid mac1 (it
proves the sender knows our static key) is dropped before any DH. When initiations
arrive faster than ``handshake_rate_per_s`` we are *under load*: an initiation must then
carry a valid mac2 (a cookie bound to its source address, obtained from a cookie reply
that costs us one MAC and no DH), and each source address is rate-limited.

Not here: sockets, the clock, asyncio (udp.py); what frames mean (the layers above).
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from meshnode import crypto
from meshnode.errors import DecodeError, HandshakeError, LocalProtocolError
from meshnode.identity import Identity, node_id_for, verify_link_binding
from meshnode.link import constants as C
from meshnode.link import messages as M
from meshnode.link.config import LinkConfig
from meshnode.link.cookie import CookieChecker, CookieGenerator, parse_cookie_reply_index
from meshnode.link.events import (
    Addr,
    FrameReceived,
    LinkEvent,
    PeerRoamed,
    PeerUnreachable,
    PongReceived,
    SessionClosed,
    SessionEstablished,
)
from meshnode.link.noise import InitiatorHandshake, ResponderHandshake
from meshnode.link.ratelimit import KeyedRateLimiter, LoadDetector
from meshnode.link.session import Keypair, Peer, PendingHandshake

# A peer may not make us answer initiations more often than this (WireGuard's
# HandshakeInitationRate): each one costs us four DH operations.
MIN_INITIATION_INTERVAL_S = 0.05
MAX_OUTSTANDING_PINGS = 64
_HEADER_BYTES = C.TRANSPORT_HEADER_BYTES
_INDEX_COUNTER = struct.Struct(">IQ")
_HEADER = struct.Struct(">BIQ")
_TRANSPORT_MIN_BYTES = C.TRANSPORT_MIN_BYTES
_MAX_DATAGRAM_BYTES = C.MAX_DATAGRAM_BYTES
_MSG_TRANSPORT = C.MSG_TRANSPORT
_KIND_BYTE = tuple(bytes((kind,)) for kind in range(256))  # kind -> its one-byte prefix
_NOTHING: list[tuple[bytes, tuple[str, int]]] = []
# One FrameReceived per data datagram: allocating it and calling its dataclass __init__
# directly (keywords passed by vectorcall) costs ~130 ns against ~300 ns for
# `FrameReceived(...)`, whose type call builds a keyword dict for tp_init. Same object,
# same __init__.
_new_object = object.__new__
_init_frame = FrameReceived.__init__


class LinkEndpoint:
    """All link sessions of one node. Not thread-safe; call from one task."""

    def __init__(
        self,
        *,
        identity: Identity,
        now: float,
        wallclock_ns: Callable[[], int],
        config: LinkConfig | None = None,
        random_bytes: Callable[[int], bytes] = crypto.random_bytes,
    ) -> None:
        self.identity = identity
        self.config = config or LinkConfig()
        self._random = random_bytes
        self._wallclock_ns = wallclock_ns
        self._last_timestamp = 0
        self._cookie_checker = CookieChecker(identity.link_public, random_bytes)
        self._load = LoadDetector(
            rate_per_s=self.config.handshake_rate_per_s,
            burst=self.config.handshake_burst,
            now=now,
        )
        self._per_ip = KeyedRateLimiter(
            rate_per_s=self.config.per_ip_handshake_rate_per_s,
            burst=self.config.per_ip_handshake_burst,
        )
        self._peers: dict[bytes, Peer] = {}
        self._keypairs: dict[int, Keypair] = {}
        self._pending: dict[int, Peer] = {}
        self._kinds: set[int] = set()
        # Greatest initiation timestamp per initiator key, kept beyond the peer record so
        # a recorded initiation stays refused after its peer was forgotten (bounded LRU).
        self._seen_timestamps: OrderedDict[bytes, int] = OrderedDict()
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[LinkEvent] = deque()
        self._deadline: float | None = None
        self._ping_seq = 0
        self._stats: Counter[str] = Counter()
        # Per-datagram counters are plain ints (a Counter update costs 4x more);
        # `stats` folds them in.
        self._n_rx = 0
        self._n_rx_transport = 0
        self._n_tx_transport = 0

    # --- user calls ---------------------------------------------------------------------

    def register_kind(self, kind: int) -> None:
        """Accept frames of ``kind`` (1..255, not a reserved link kind); others are dropped."""
        if not 0 < kind < 256 or kind in C.RESERVED_KINDS:
            raise LocalProtocolError(f"frame kind {kind} is reserved or out of range")
        self._kinds.add(kind)

    def connect(self, static_key: bytes, addr: Addr, now: float) -> None:
        """Know ``static_key`` at ``addr`` and start a handshake unless a session exists."""
        if not crypto.x25519_public_is_usable(static_key):
            raise LocalProtocolError("static key is not a usable X25519 public key")
        if static_key == self.identity.link_public:
            raise LocalProtocolError("cannot connect to ourselves")
        peer = self._peers.get(static_key)
        if peer is None:
            peer = self._add_peer(static_key, addr, now)
        elif peer.current is None:
            peer.addr = addr
        if self._usable(peer.current, now) is None and peer.handshake is None:
            self._initiate(peer, now)

    def send(self, static_key: bytes, kind: int, payload: bytes, now: float) -> None:
        """Send one frame to a peer known through :meth:`connect` or an inbound handshake.

        Without a session the frame waits (at most ``max_queued_per_peer``) while a
        handshake runs; :class:`PeerUnreachable` reports frames that never left.
        """
        if kind not in self._kinds:
            raise LocalProtocolError(f"frame kind {kind} is not registered")
        self._send_frame(static_key, _KIND_BYTE[kind] + payload, now)

    def send_many(
        self, static_key: bytes, kind: int, payloads: Sequence[bytes], now: float
    ) -> None:
        """Send several frames of one kind to one peer, in order: as :meth:`send` on each.

        The datagrams, state and counters afterwards are the same as after one
        :meth:`send` per payload, but cheaper per frame. One difference: every payload's
        size is checked first, so a :class:`LocalProtocolError` leaves nothing sent.
        """
        if kind not in self._kinds:
            raise LocalProtocolError(f"frame kind {kind} is not registered")
        peer = self._peers.get(static_key)
        if peer is None:
            raise LocalProtocolError("unknown peer: call connect() first")
        n = len(payloads)
        if n == 0:
            return
        if max(map(len, payloads)) > C.MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(f"payload larger than {C.MAX_PAYLOAD_BYTES} bytes")
        prefix = _KIND_BYTE[kind]
        i = 0
        while i < n:
            kp = peer.current
            budget = self._fast_budget(peer, kp, now)
            if kp is None or budget <= 0:
                # At a boundary (no usable keys, or this frame starts a rekey): the
                # one-frame path applies every rule, then the budget is computed again.
                self._send_frame(static_key, prefix + payloads[i], now)
                i += 1
                continue
            stop = n if n - i <= budget else i + budget
            self._seal_run(peer, kp, prefix, payloads[i:stop] if i or stop < n else payloads, now)
            i = stop

    def ping(self, static_key: bytes, now: float) -> int:
        """Send a link-level ping; a :class:`PongReceived` with the returned ``seq`` answers it."""
        self._ping_seq += 1
        seq = self._ping_seq
        peer = self._peers.get(static_key)
        if peer is not None:
            if len(peer.pings) >= MAX_OUTSTANDING_PINGS:
                del peer.pings[next(iter(peer.pings))]
            peer.pings[seq] = now
        self._send_frame(static_key, bytes((C.KIND_PING,)) + seq.to_bytes(8, "big"), now)
        return seq

    def close(self, static_key: bytes) -> None:
        """Forget a peer: its keys, pending handshake and queued frames."""
        peer = self._peers.get(static_key)
        if peer is not None:
            self._remove_peer(peer)

    def has_session(self, static_key: bytes, now: float) -> bool:
        peer = self._peers.get(static_key)
        return peer is not None and self._usable(peer.current, now) is not None

    def peer_info(self, static_key: bytes) -> Peer | None:
        """The peer record (read-only use), or None."""
        return self._peers.get(static_key)

    @property
    def stats(self) -> Counter[str]:
        """Counters: ``rx.*``/``tx.*``, ``drop.<reason>``, ``handshake.*``, ``session.*``.

        The same Counter every time, so a driver may add its own (``error.*``) to it.
        """
        stats = self._stats
        for name, value in (
            ("rx.datagrams", self._n_rx),
            ("rx.transport", self._n_rx_transport),
            ("tx.transport", self._n_tx_transport),
        ):
            if value:
                stats[name] = value
        return stats

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    @property
    def pending_handshakes(self) -> int:
        return len(self._pending)

    # --- outputs ------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Datagrams produced since the last call, with their destinations."""
        out = self._out
        if not out:
            return _NOTHING
        self._out = []
        return out

    def next_event(self) -> LinkEvent | None:
        return self._events.popleft() if self._events else None

    def take_events(self) -> list[LinkEvent]:
        """Every pending event, oldest first (as repeated :meth:`next_event` calls would)."""
        events = self._events
        if not events:
            return []
        taken = list(events)
        events.clear()
        return taken

    def get_timer(self) -> float | None:
        """The time at which :meth:`handle_timer` should next run, or None."""
        return self._deadline

    # --- network input ------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one datagram from ``addr``. Never raises for anything the network sends."""
        self.receive_datagrams(((data, addr),), now)

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes, Addr]], now: float) -> None:
        """Process ``(data, addr)`` datagrams in order, all received at ``now``.

        The same as :meth:`receive_datagram` on each, with the per-call work done once.
        Transport datagrams take the pipeline below inline; other types go to their
        handlers one by one. Never raises for anything the network sends.
        """
        stats = self._stats
        keypairs = self._keypairs
        reject_after = self.config.reject_after_s
        kinds = self._kinds
        events = self._events
        unpack = _INDEX_COUNTER.unpack_from
        n_rx = 0
        n_transport = 0
        got_data = False
        try:
            for data, addr in datagrams:
                n_rx += 1
                size = len(data)
                if (
                    size < _TRANSPORT_MIN_BYTES
                    or size > _MAX_DATAGRAM_BYTES
                    or data[0] != _MSG_TRANSPORT
                ):
                    self._receive_other(data, addr, now)
                    continue
                # Transport: index -> key age -> replay check -> AEAD -> replay update.
                index, counter = unpack(data, 1)
                kp = keypairs.get(index)
                if kp is None:
                    stats["drop.unknown_index"] += 1
                    continue
                if now - kp.created >= reject_after:
                    stats["drop.expired_keys"] += 1
                    continue
                replay = kp.replay
                if not replay.check(counter):
                    stats["drop.replay"] += 1
                    continue
                plaintext = kp.receiver.open(counter, data[_HEADER_BYTES:], data[:_HEADER_BYTES])
                if plaintext is None:
                    stats["drop.bad_tag"] += 1
                    continue
                if not replay.update(counter):
                    stats["drop.replay"] += 1
                    continue
                # Authenticated: only now may the datagram change state.
                n_transport += 1
                peer = kp.peer
                peer.last_received = now
                peer.awaiting_reply_since = None
                if kp is peer.next:
                    self._promote_next(peer, now)
                if addr != peer.addr:
                    self._roam(peer, addr)
                if not plaintext:
                    stats["rx.keepalive"] += 1
                    continue
                peer.last_data_received = now
                peer.owes_keepalive = True
                got_data = True
                kind = plaintext[0]
                if kind in kinds:
                    node_id = peer.node_id
                    if node_id is None:  # pragma: no cover - keypairs come from verified handshakes
                        stats["drop.no_identity"] += 1
                        continue
                    event = _new_object(FrameReceived)
                    _init_frame(
                        event,
                        peer=peer.static_key,
                        node_id=node_id,
                        kind=kind,
                        payload=plaintext[1:],
                        addr=addr,
                    )
                    events.append(event)
                else:
                    self._receive_link_frame(peer, kind, plaintext, now)
        finally:
            self._n_rx += n_rx
            self._n_rx_transport += n_transport
            if got_data:
                self._schedule(now + self.config.keepalive_s)

    def _receive_other(self, data: bytes, addr: Addr, now: float) -> None:
        """Anything but a well-sized transport datagram: handshakes, cookies, bad sizes."""
        size = len(data)
        if size == 0 or size > C.MAX_DATAGRAM_BYTES:
            self._stats["drop.bad_length"] += 1
            return
        msg_type = data[0]
        if msg_type == C.MSG_TRANSPORT:  # shorter than a keepalive
            self._stats["drop.bad_length"] += 1
        elif msg_type == C.MSG_INITIATION:
            self._receive_initiation(data, addr, now)
        elif msg_type == C.MSG_RESPONSE:
            self._receive_response(data, addr, now)
        elif msg_type == C.MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        else:
            self._stats["drop.unknown_type"] += 1

    def _roam(self, peer: Peer, addr: Addr) -> None:
        self._events.append(PeerRoamed(peer=peer.static_key, old_addr=peer.addr, new_addr=addr))
        self._stats["session.roamed"] += 1
        peer.addr = addr

    def _receive_link_frame(self, peer: Peer, kind: int, plaintext: bytes, now: float) -> None:
        """An authenticated frame of a kind nobody registered: the link's own, or dropped."""
        stats = self._stats
        if kind == C.KIND_PING:
            if len(plaintext) != 9:
                stats["drop.bad_ping"] += 1
                return
            stats["rx.ping"] += 1
            self._send_frame(peer.static_key, bytes((C.KIND_PONG,)) + plaintext[1:], now)
        elif kind == C.KIND_PONG:
            sent = None
            if len(plaintext) == 9:
                sent = peer.pings.pop(int.from_bytes(plaintext[1:9], "big"), None)
            if sent is None:
                stats["drop.unexpected_pong"] += 1
                return
            self._events.append(
                PongReceived(
                    peer=peer.static_key, seq=int.from_bytes(plaintext[1:9], "big"), rtt=now - sent
                )
            )
        else:
            stats["drop.unknown_kind"] += 1

    def _receive_initiation(self, data: bytes, addr: Addr, now: float) -> None:
        stats = self.stats
        if len(data) != C.INITIATION_BYTES:
            stats["drop.bad_length"] += 1
            return
        if not self._cookie_checker.check_mac1(data):
            stats["drop.bad_mac1"] += 1
            return
        if self._load.record_and_check(now):
            if not self._cookie_checker.check_mac2(data, addr, now):
                stats["handshake.cookie_sent"] += 1
                sender = int.from_bytes(data[1:5], "big")
                self._out.append((self._cookie_checker.create_reply(data, sender, addr, now), addr))
                return
            if not self._per_ip.allow(addr[0], now):
                stats["drop.rate_limited"] += 1
                return
        try:
            msg = M.decode_initiation(data)
            noise = ResponderHandshake(local_static_private=self.identity.link_private)
            remote_static, raw_payload = noise.read_initiation(msg.noise)
            payload = M.InitiationPayload.decode(raw_payload)
        except (DecodeError, HandshakeError):
            stats["drop.bad_handshake"] += 1
            return
        if remote_static == self.identity.link_public:
            stats["drop.bad_handshake"] += 1
            return
        # Cheap checks before the signature: replays and floods cost no Ed25519 verify.
        if payload.timestamp_ns <= self._seen_timestamps.get(remote_static, 0):
            stats["drop.replayed_initiation"] += 1
            return
        peer = self._peers.get(remote_static)
        if peer is not None and now - peer.last_initiation_at < MIN_INITIATION_INTERVAL_S:
            stats["drop.initiation_flood"] += 1
            return
        if not verify_link_binding(payload.identity_key, remote_static, payload.link_signature):
            stats["drop.bad_identity"] += 1
            return
        self._remember_timestamp(remote_static, payload.timestamp_ns)
        if peer is None:
            peer = self._add_peer(remote_static, addr, now)
        peer.last_initiation_ts = payload.timestamp_ns
        peer.last_initiation_at = now
        self._set_identity(peer, payload.identity_key)
        local_index = self._new_index()
        reply = M.ResponsePayload(
            identity_key=self.identity.identity_public,
            link_signature=self.identity.link_signature,
        )
        noise_msg, keys = noise.write_response(reply.encode())
        body = M.encode_response_body(local_index, msg.sender_index, noise_msg)
        kp = Keypair(
            peer=peer,
            send_key=keys.send_key,
            recv_key=keys.recv_key,
            local_index=local_index,
            remote_index=msg.sender_index,
            is_initiator=False,
            created=now,
        )
        if peer.next is not None:
            self._keypairs.pop(peer.next.local_index, None)
        peer.next = kp
        self._keypairs[local_index] = kp
        peer.addr = addr
        peer.last_received = now
        stats["handshake.responded"] += 1
        self._transmit(peer, peer.cookies.add_macs(body, now), now)
        self._schedule(now + self.config.reject_after_s)

    def _receive_response(self, data: bytes, addr: Addr, now: float) -> None:
        stats = self.stats
        if len(data) != C.RESPONSE_BYTES:
            stats["drop.bad_length"] += 1
            return
        try:
            msg = M.decode_response(data)
        except DecodeError:
            stats["drop.bad_handshake"] += 1
            return
        peer = self._pending.get(msg.receiver_index)
        if peer is None or peer.handshake is None:
            stats["drop.unknown_index"] += 1
            return
        if not self._cookie_checker.check_mac1(data):
            stats["drop.bad_mac1"] += 1
            return
        pending = peer.handshake
        try:
            # A forged response leaves `pending` intact (noise.py rebuilds its state).
            raw_payload, keys = pending.noise.read_response(msg.noise)
        except HandshakeError:
            stats["drop.bad_handshake"] += 1
            return
        self._pending.pop(pending.local_index, None)
        peer.handshake = None
        try:
            payload = M.ResponsePayload.decode(raw_payload)
        except DecodeError:
            stats["drop.bad_handshake"] += 1
            return
        if not verify_link_binding(payload.identity_key, peer.static_key, payload.link_signature):
            stats["drop.bad_identity"] += 1
            return
        self._set_identity(peer, payload.identity_key)
        kp = Keypair(
            peer=peer,
            send_key=keys.send_key,
            recv_key=keys.recv_key,
            local_index=pending.local_index,
            remote_index=msg.sender_index,
            is_initiator=True,
            created=now,
        )
        rekey = peer.current is not None
        self._retire(peer.previous)
        self._retire(peer.next)
        peer.previous, peer.current, peer.next = peer.current, kp, None
        self._keypairs[kp.local_index] = kp
        peer.attempt_started = None
        peer.addr = addr
        peer.last_received = now
        peer.awaiting_reply_since = None
        stats["handshake.completed"] += 1
        self._established(peer, now, initiator=True, rekey=rekey, rtt=now - pending.sent_at)
        if peer.queue:
            self._flush_queue(peer, now)
        else:
            # Confirms the session to the responder, which holds it as `next` until then.
            self._seal(peer, kp, b"", now)
        self._schedule(now + self.config.reject_after_s)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        index = parse_cookie_reply_index(data)
        peer = self._pending.get(index) if index is not None else None
        if peer is None:
            self._stats["drop.unknown_index"] += 1
            return
        if peer.cookies.consume_reply(data, now):
            self._stats["handshake.cookie_received"] += 1
        else:
            self._stats["drop.bad_cookie"] += 1

    # --- timers ---------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run every rule that is due: retries, give-ups, keepalives, rekeys, expiry."""
        cfg = self.config
        deadline: float | None = None
        for peer in list(self._peers.values()):
            nxt = self._peer_timers(peer, now, cfg)
            if nxt is not None and (deadline is None or nxt < deadline):
                deadline = nxt
        self._deadline = deadline

    def _peer_timers(self, peer: Peer, now: float, cfg: LinkConfig) -> float | None:
        """Apply one peer's due rules; return its next deadline (None: nothing scheduled)."""
        # Handshake retries and giving up.
        if peer.attempt_started is not None and now >= peer.next_retry:
            if now - peer.attempt_started >= cfg.handshake_timeout_s:
                self._give_up(peer, now)
                if peer.static_key not in self._peers:
                    return None
            else:
                self._stats["handshake.retried"] += 1
                self._initiate(peer, now)
        # Key expiry.
        for slot in ("previous", "next", "current"):
            kp: Keypair | None = getattr(peer, slot)
            if kp is not None and now - kp.created >= cfg.reject_after_s:
                self._retire(kp)
                setattr(peer, slot, None)
                if slot == "current":
                    self._stats["session.expired"] += 1
        if peer.current is not None and now - peer.last_received >= cfg.idle_timeout_s:
            self._events.append(SessionClosed(peer=peer.static_key, reason="idle"))
            self._stats["session.idle_closed"] += 1
            self._remove_peer(peer)
            return None
        if peer.current is None and peer.next is None and peer.attempt_started is None:
            if peer.node_id is not None:
                self._events.append(SessionClosed(peer=peer.static_key, reason="keys expired"))
            self._remove_peer(peer)
            return None
        current = peer.current
        if current is not None:
            # Passive keepalive: they sent us data and we have said nothing since.
            if peer.owes_keepalive and now - peer.last_data_received >= cfg.keepalive_s:
                self._seal(peer, current, b"", now)
                self._stats["tx.keepalive"] += 1
            if cfg.persistent_keepalive_s and now - peer.last_sent >= cfg.persistent_keepalive_s:
                self._seal(peer, current, b"", now)
                self._stats["tx.keepalive"] += 1
            # Keepalives go through the same rekey rule as data (WireGuard's send path), so a
            # link kept up by keepalives alone does not die when its keys reach reject age.
            if (
                peer.attempt_started is None
                and peer.last_sent == now
                and self._wants_rekey(current, now)
            ):
                self._stats["handshake.rekey"] += 1
                self._initiate(peer, now)
            # Dead peer: we sent data and heard nothing back for keepalive + rekey timeout.
            if (
                peer.awaiting_reply_since is not None
                and now - peer.awaiting_reply_since >= cfg.keepalive_s + C.REKEY_TIMEOUT_S
                and peer.attempt_started is None
            ):
                peer.awaiting_reply_since = None
                self._stats["handshake.dead_peer"] += 1
                self._initiate(peer, now)
        return self._peer_deadline(peer, cfg)

    def _peer_deadline(self, peer: Peer, cfg: LinkConfig) -> float | None:
        times: list[float] = []
        if peer.attempt_started is not None:
            times.append(peer.next_retry)
        for kp in peer.keypairs():
            times.append(kp.created + cfg.reject_after_s)
        if peer.current is not None:
            times.append(peer.last_received + cfg.idle_timeout_s)
            if peer.owes_keepalive:
                times.append(peer.last_data_received + cfg.keepalive_s)
            if cfg.persistent_keepalive_s:
                times.append(peer.last_sent + cfg.persistent_keepalive_s)
            if peer.awaiting_reply_since is not None:
                times.append(peer.awaiting_reply_since + cfg.keepalive_s + C.REKEY_TIMEOUT_S)
        return min(times) if times else None

    def _schedule(self, when: float) -> None:
        if self._deadline is None or when < self._deadline:
            self._deadline = when

    # --- internals ------------------------------------------------------------------------

    def _usable(self, kp: Keypair | None, now: float) -> Keypair | None:
        if kp is None:
            return None
        if now - kp.created >= self.config.reject_after_s:
            return None
        if kp.send_counter >= C.REJECT_AFTER_MESSAGES:
            return None
        return kp

    def _send_frame(self, static_key: bytes, frame: bytes, now: float) -> None:
        peer = self._peers.get(static_key)
        if peer is None:
            raise LocalProtocolError("unknown peer: call connect() first")
        if len(frame) - 1 > C.MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(f"payload larger than {C.MAX_PAYLOAD_BYTES} bytes")
        kp = self._usable(peer.current, now)
        if kp is None:
            if len(peer.queue) >= self.config.max_queued_per_peer:
                peer.queue.popleft()
                self._stats["drop.queue_full"] += 1
            peer.queue.append(frame)
            if peer.attempt_started is None:
                self._initiate(peer, now)
            return
        self._seal(peer, kp, frame, now)
        if peer.awaiting_reply_since is None:
            peer.awaiting_reply_since = now
            self._schedule(now + self.config.keepalive_s + C.REKEY_TIMEOUT_S)
        if peer.attempt_started is None and self._wants_rekey(kp, now):
            self._stats["handshake.rekey"] += 1
            self._initiate(peer, now)

    def _wants_rekey(self, kp: Keypair, now: float) -> bool:
        if kp.send_counter >= self.config.rekey_after_messages:
            return True
        return self._rekey_age_reached(kp, now)

    def _rekey_age_reached(self, kp: Keypair, now: float) -> bool:
        cfg = self.config
        age = now - kp.created
        if kp.is_initiator:
            return age >= cfg.rekey_after_s
        # The responder rekeys later so both sides do not start at once.
        return age >= cfg.rekey_after_s + (cfg.reject_after_s - cfg.rekey_after_s) / 2

    def _fast_budget(self, peer: Peer, kp: Keypair | None, now: float) -> int:
        """How many frames in a row ``_send_frame`` would seal under ``kp`` doing nothing else.

        Nothing else means: no frame queued for want of usable keys, no rekey started.
        ``now`` is fixed for the run, so the time rules are decided once; the message
        rules depend only on the send counter, so the limit is counted ahead: a frame
        sealed with counter ``c`` leaves ``c + 1``, and ``_send_frame`` starts a rekey
        once that reaches ``rekey_after_messages``; ``_usable`` needs ``c`` below
        ``REJECT_AFTER_MESSAGES``. 0 or less: send the next frame the one-frame way.
        """
        if kp is None:
            return 0
        cfg = self.config
        if now - kp.created >= cfg.reject_after_s:
            return 0
        counter = kp.send_counter
        budget = C.REJECT_AFTER_MESSAGES - counter
        if peer.attempt_started is None:
            if self._rekey_age_reached(kp, now):
                return 0
            budget = min(budget, cfg.rekey_after_messages - 1 - counter)
        return budget

    def _seal_run(
        self, peer: Peer, kp: Keypair, prefix: bytes, payloads: Sequence[bytes], now: float
    ) -> None:
        """Seal ``prefix + payload`` for each payload under ``kp``, which the caller checked
        stays usable and below every rekey limit for all of them (``_fast_budget``)."""
        counter = kp.send_counter
        seal = kp.sender.seal
        pack = _HEADER.pack
        remote = kp.remote_index
        addr = peer.addr
        append = self._out.append
        for payload in payloads:
            header = pack(_MSG_TRANSPORT, remote, counter)
            append((header + seal(counter, prefix + payload, header), addr))
            counter += 1
        self._n_tx_transport += counter - kp.send_counter
        kp.send_counter = counter
        peer.last_sent = now
        peer.owes_keepalive = False
        if peer.awaiting_reply_since is None:
            peer.awaiting_reply_since = now
            self._schedule(now + self.config.keepalive_s + C.REKEY_TIMEOUT_S)

    def _seal(self, peer: Peer, kp: Keypair, plaintext: bytes, now: float) -> None:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        header = _HEADER.pack(C.MSG_TRANSPORT, kp.remote_index, counter)
        self._out.append((header + kp.sender.seal(counter, plaintext, header), peer.addr))
        peer.last_sent = now
        peer.owes_keepalive = False
        self._n_tx_transport += 1

    def _transmit(self, peer: Peer, datagram: bytes, now: float) -> None:
        self._out.append((datagram, peer.addr))
        peer.last_sent = now
        peer.owes_keepalive = False

    def _flush_queue(self, peer: Peer, now: float) -> None:
        kp = peer.current
        while peer.queue and kp is not None:
            self._seal(peer, kp, peer.queue.popleft(), now)
        if peer.awaiting_reply_since is None:
            peer.awaiting_reply_since = now

    def _timestamp(self) -> int:
        ts = max(self._wallclock_ns(), self._last_timestamp + 1)
        self._last_timestamp = ts
        return ts

    def _initiate(self, peer: Peer, now: float) -> None:
        cfg = self.config
        if peer.handshake is not None:
            self._pending.pop(peer.handshake.local_index, None)
            peer.handshake = None
        elif len(self._pending) >= cfg.max_pending_handshakes:
            self._stats["drop.too_many_pending"] += 1
            if peer.attempt_started is None:
                peer.attempt_started = now
                peer.retry_delay = cfg.handshake_retry_initial_s
            peer.next_retry = now + peer.retry_delay
            self._schedule(peer.next_retry)
            return
        noise = InitiatorHandshake(
            local_static_private=self.identity.link_private,
            remote_static_public=peer.static_key,
        )
        payload = M.InitiationPayload(
            timestamp_ns=self._timestamp(),
            identity_key=self.identity.identity_public,
            link_signature=self.identity.link_signature,
        )
        local_index = self._new_index()
        body = M.encode_initiation_body(local_index, noise.write_initiation(payload.encode()))
        peer.handshake = PendingHandshake(noise=noise, local_index=local_index, sent_at=now)
        self._pending[local_index] = peer
        if peer.attempt_started is None:
            peer.attempt_started = now
            peer.retry_delay = cfg.handshake_retry_initial_s
        jitter = int.from_bytes(self._random(2), "big") / 65536 * peer.retry_delay / 3
        give_up_at = peer.attempt_started + cfg.handshake_timeout_s
        peer.next_retry = min(now + peer.retry_delay + jitter, give_up_at)
        peer.retry_delay = min(peer.retry_delay * 2, cfg.handshake_retry_max_s)
        self._stats["handshake.initiated"] += 1
        self._transmit(peer, peer.cookies.add_macs(body, now), now)
        self._schedule(peer.next_retry)

    def _give_up(self, peer: Peer, now: float) -> None:
        if peer.handshake is not None:
            self._pending.pop(peer.handshake.local_index, None)
            peer.handshake = None
        peer.attempt_started = None
        dropped = len(peer.queue)
        peer.queue.clear()
        self._stats["handshake.timed_out"] += 1
        self._stats["drop.unreachable_queue"] += dropped
        self._events.append(
            PeerUnreachable(
                peer=peer.static_key,
                addr=peer.addr,
                dropped_frames=dropped,
                reason=f"no handshake response after {self.config.handshake_timeout_s:g}s",
            )
        )
        if peer.current is None and peer.next is None:
            self._remove_peer(peer)

    def _promote_next(self, peer: Peer, now: float) -> None:
        kp = peer.next
        if kp is None:  # pragma: no cover - caller checked
            return
        rekey = peer.current is not None
        self._retire(peer.previous)
        peer.previous, peer.current, peer.next = peer.current, kp, None
        self._stats["handshake.completed"] += 1
        self._established(peer, now, initiator=False, rekey=rekey, rtt=None)
        if peer.handshake is None:
            peer.attempt_started = None
        if peer.queue:
            self._flush_queue(peer, now)

    def _established(
        self, peer: Peer, now: float, *, initiator: bool, rekey: bool, rtt: float | None
    ) -> None:
        cfg = self.config
        first = min(cfg.idle_timeout_s, cfg.reject_after_s)
        if cfg.persistent_keepalive_s:
            first = min(first, cfg.persistent_keepalive_s)
        self._schedule(now + first)
        if peer.node_id is None or peer.identity_key is None:  # pragma: no cover
            return
        self._events.append(
            SessionEstablished(
                peer=peer.static_key,
                node_id=peer.node_id,
                identity_key=peer.identity_key,
                addr=peer.addr,
                initiator=initiator,
                rekey=rekey,
                handshake_rtt=rtt,
            )
        )

    def _remember_timestamp(self, static_key: bytes, timestamp_ns: int) -> None:
        seen = self._seen_timestamps
        seen[static_key] = timestamp_ns
        seen.move_to_end(static_key)
        while len(seen) > self.config.max_peers * 4:
            seen.popitem(last=False)

    def _set_identity(self, peer: Peer, identity_key: bytes) -> None:
        if peer.identity_key != identity_key:
            peer.identity_key = identity_key
            peer.node_id = node_id_for(identity_key)

    def _retire(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._keypairs.pop(kp.local_index, None)

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random(4), "big")
            if index and index not in self._keypairs and index not in self._pending:
                return index

    def _add_peer(self, static_key: bytes, addr: Addr, now: float) -> Peer:
        if len(self._peers) >= self.config.max_peers:
            victim = min(self._peers.values(), key=lambda p: p.last_active)
            self._stats["session.evicted"] += 1
            self._events.append(SessionClosed(peer=victim.static_key, reason="evicted"))
            self._remove_peer(victim)
        peer = Peer(static_key=static_key, addr=addr, cookies=CookieGenerator(static_key))
        self._peers[static_key] = peer
        return peer

    def _remove_peer(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._retire(kp)
        if peer.handshake is not None:
            self._pending.pop(peer.handshake.local_index, None)
        self._peers.pop(peer.static_key, None)
