"""Per-peer link state: keypairs (current / previous / next) and the peer record.

Pure data plus small rules; the endpoint (endpoint.py) drives them. Mirrors WireGuard's
keypair.go/peer.go: the initiator uses a new keypair as soon as the response arrives; the
responder keeps it as ``next`` until the first transport datagram under it proves the
initiator has it (so a replayed initiation can never displace a working session).

Not here: message parsing, timers' scheduling, sockets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshnode.crypto import TransportCipher
from meshnode.identity import NodeId
from meshnode.link.cookie import CookieGenerator
from meshnode.link.events import Addr
from meshnode.link.noise import InitiatorHandshake
from meshnode.link.replay import ReplayWindow


class Keypair:
    """One session's transport keys, indices, send counter and replay window."""

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "peer",
        "receiver",
        "remote_index",
        "replay",
        "send_counter",
        "sender",
    )

    def __init__(
        self,
        *,
        peer: Peer,
        send_key: bytes,
        recv_key: bytes,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        created: float,
    ) -> None:
        self.peer = peer
        self.sender = TransportCipher(send_key)
        self.receiver = TransportCipher(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.is_initiator = is_initiator
        self.created = created
        self.send_counter = 0
        self.replay = ReplayWindow()


@dataclass(slots=True, kw_only=True)
class PendingHandshake:
    """A handshake we initiated and that is waiting for its response."""

    noise: InitiatorHandshake
    local_index: int
    sent_at: float


@dataclass(slots=True, kw_only=True, eq=False)
class Peer:
    """Everything the endpoint knows about one remote static key."""

    static_key: bytes
    addr: Addr
    cookies: CookieGenerator
    identity_key: bytes | None = None
    node_id: NodeId | None = None

    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None

    handshake: PendingHandshake | None = None
    attempt_started: float | None = None
    """When the current series of (re)tried initiations began; None when none is running."""
    retry_delay: float = 0.0
    next_retry: float = 0.0

    queue: deque[bytes] = field(default_factory=deque)
    """Plaintext frames (kind byte + payload) waiting for a session."""

    last_initiation_ts: int = 0
    """Greatest initiation timestamp accepted from this peer (replay protection)."""
    last_initiation_at: float = -1e18
    last_sent: float = -1e18
    last_received: float = -1e18
    last_data_received: float = -1e18
    owes_keepalive: bool = False
    """Data arrived and we have sent nothing since (WireGuard's passive keepalive)."""
    awaiting_reply_since: float | None = None
    """Set when we send data; cleared by any datagram back. Drives dead-peer detection."""

    pings: dict[int, float] = field(default_factory=dict)
    """Outstanding link pings: sequence number -> time sent."""

    def keypairs(self) -> tuple[Keypair, ...]:
        return tuple(k for k in (self.current, self.previous, self.next) if k is not None)

    @property
    def last_active(self) -> float:
        return max(self.last_sent, self.last_received)
