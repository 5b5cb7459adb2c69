"""LinkConfig: the link layer's tunables, one frozen dataclass with a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass

from meshnode.link import constants as C


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """Tunables of one link endpoint. Defaults suit a public node."""

    max_peers: int = 4096
    """Most peers (with or without a session) kept at once; the least recently active is evicted."""

    max_pending_handshakes: int = 256
    """Most handshakes we initiated that are still waiting for a response."""

    max_queued_per_peer: int = 64
    """Frames kept per peer while its handshake is under way; older ones are dropped (counted)."""

    handshake_timeout_s: float = 20.0
    """Give up on a peer whose handshake has not completed after this long."""

    handshake_retry_initial_s: float = 1.0
    """First retransmission of an unanswered initiation; doubles each time (with jitter)."""

    handshake_retry_max_s: float = float(C.REKEY_TIMEOUT_S)
    """Longest wait between two initiations."""

    rekey_after_s: float = C.REKEY_AFTER_TIME_S
    """Start a new handshake when the session we initiated is this old."""

    reject_after_s: float = C.REJECT_AFTER_TIME_S
    """Never use a session's keys past this age."""

    rekey_after_messages: int = C.REKEY_AFTER_MESSAGES
    """Start a new handshake after sending this many datagrams on one session."""

    keepalive_s: float = C.KEEPALIVE_TIMEOUT_S
    """Send an empty keepalive when we received data but sent nothing for this long."""

    persistent_keepalive_s: float = 0.0
    """If > 0, send a keepalive at least this often to every peer with a session (NAT mappings)."""

    idle_timeout_s: float = C.REJECT_AFTER_TIME_S
    """Forget the keys of a peer from which nothing valid arrived for this long."""

    handshake_rate_per_s: float = 500.0
    """Initiations per second processed before the responder is 'under load' and demands cookies."""

    handshake_burst: int = 100
    """Initiations allowed in a burst before load is declared."""

    per_ip_handshake_rate_per_s: float = 20.0
    """Under load: initiations per second accepted from one source address (with a valid cookie)."""

    per_ip_handshake_burst: int = 5
    """Under load: burst of initiations from one source address."""

    def __post_init__(self) -> None:
        for name in (
            "max_peers",
            "max_pending_handshakes",
            "max_queued_per_peer",
            "handshake_burst",
            "per_ip_handshake_burst",
            "rekey_after_messages",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "handshake_timeout_s",
            "handshake_retry_initial_s",
            "handshake_retry_max_s",
            "rekey_after_s",
            "reject_after_s",
            "keepalive_s",
            "idle_timeout_s",
            "handshake_rate_per_s",
            "per_ip_handshake_rate_per_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.persistent_keepalive_s < 0:
            raise ValueError("persistent_keepalive_s must be 0 (off) or positive")
        if self.reject_after_s <= self.rekey_after_s:
            raise ValueError("reject_after_s must be greater than rekey_after_s")
