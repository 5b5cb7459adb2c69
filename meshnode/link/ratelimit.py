"""Token buckets for the handshake path: per-source limits and the responder's load detector.

Follows WireGuard's handshake rate limiting (whitepaper §5.3 and §5.4.7; wireguard-go's
``ratelimiter`` package): a responder that is under load demands cookies (cookie.py), and
initiations with a valid cookie are then limited per source address, so that one address
cannot monopolise the responder's Diffie-Hellman budget. Here both decisions are token
buckets, and the per-source table has a hard cap so spoofed floods cannot grow memory.

Sans-IO: time is a monotonic ``now`` in seconds passed to every call. A ``now`` smaller than
the previous one is treated as "no time passed" (never as a refill).
Not here: cookies or MACs (cookie.py), or what to do with a refused message (the endpoint).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["KeyedRateLimiter", "LoadDetector", "TokenBucket"]


def _check_rate(rate_per_s: float, burst: float) -> None:
    if not rate_per_s > 0:
        raise ValueError("rate_per_s must be greater than 0")
    if not burst > 0:
        raise ValueError("burst must be greater than 0")


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate_per_s``; starts full."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, *, rate_per_s: float, burst: float, now: float) -> None:
        _check_rate(rate_per_s, burst)
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``; changes nothing."""
        elapsed = now - self._last
        if elapsed <= 0:
            return self._tokens
        return min(self._burst, self._tokens + elapsed * self._rate)

    def is_full(self, now: float) -> bool:
        """True when the bucket has refilled completely (it is as good as a new one)."""
        return self.tokens(now) >= self._burst

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Remove ``cost`` tokens if that many are available; False (nothing taken) otherwise.

        A ``now`` earlier than the last call's refills nothing and becomes the new reference,
        so a clock that jumped back does not freeze the bucket until it catches up.
        """
        if cost < 0:
            raise ValueError("cost must not be negative")
        elapsed = now - self._last
        if elapsed > 0:
            tokens = self._tokens + elapsed * self._rate
            self._tokens = tokens if tokens < self._burst else self._burst
        self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate_per_s={self._rate}, burst={self._burst}, tokens={self._tokens:.3f})"
        )


class KeyedRateLimiter:
    """One token bucket per key (e.g. a source IP), at most ``max_entries`` of them.

    A key's bucket is created full on first sight. When the table is full, buckets that have
    refilled completely are dropped first (forgetting them loses nothing: a new bucket is
    full too); if none has, the least recently used key is dropped. The full-bucket sweep
    is O(n), so it runs at most once per refill time (``burst / rate_per_s``) of simulated
    time; between sweeps eviction is LRU and O(1).
    """

    __slots__ = (
        "_buckets",
        "_burst",
        "_last_sweep",
        "_max_entries",
        "_rate",
        "_refill_s",
    )

    def __init__(self, *, rate_per_s: float, burst: float, max_entries: int = 4096) -> None:
        _check_rate(rate_per_s, burst)
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._max_entries = max_entries
        self._refill_s = self._burst / self._rate
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._last_sweep: float | None = None

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def allow(self, key: Hashable, now: float) -> bool:
        """Take one token from ``key``'s bucket; False when it is empty."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._max_entries:
                self._make_room(now)
            bucket = TokenBucket(rate_per_s=self._rate, burst=self._burst, now=now)
            buckets[key] = bucket
        else:
            buckets.move_to_end(key)
        return bucket.take(now)

    def prune(self, now: float) -> int:
        """Drop every bucket that has refilled completely; returns how many were dropped."""
        full = [key for key, bucket in self._buckets.items() if bucket.is_full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)

    def _make_room(self, now: float) -> None:
        last = self._last_sweep
        if last is None or now - last >= self._refill_s or now < last:
            self._last_sweep = now
            self.prune(now)
        while len(self._buckets) >= self._max_entries:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __repr__(self) -> str:
        return (
            f"KeyedRateLimiter(rate_per_s={self._rate}, burst={self._burst}, "
            f"entries={len(self._buckets)}/{self._max_entries})"
        )


class LoadDetector:
    """Decides whether a responder is under load (and must demand cookies).

    Every handshake initiation takes a token from one global bucket. When the bucket runs
    out we are under load, and stay so until ``hold_s`` has passed since it last ran out,
    so the state does not flap at the rate limit.
    """

    __slots__ = ("_bucket", "_exhausted_at", "_hold_s")

    def __init__(self, *, rate_per_s: float, burst: float, hold_s: float = 1.0, now: float) -> None:
        if not hold_s >= 0:
            raise ValueError("hold_s must not be negative")
        self._bucket = TokenBucket(rate_per_s=rate_per_s, burst=burst, now=now)
        self._hold_s = float(hold_s)
        self._exhausted_at: float | None = None

    def record_and_check(self, now: float) -> bool:
        """Record one handshake initiation; True when we are under load."""
        if not self._bucket.take(now):
            self._exhausted_at = now
            return True
        exhausted_at = self._exhausted_at
        if exhausted_at is None:
            return False
        if now < exhausted_at:  # the clock went back: no time has passed since
            self._exhausted_at = exhausted_at = now
        return now - exhausted_at < self._hold_s

    def under_load(self, now: float) -> bool:
        """True when we are under load at ``now``; records nothing."""
        exhausted_at = self._exhausted_at
        if exhausted_at is None:
            return False
        return now - exhausted_at < self._hold_s

    def __repr__(self) -> str:
        return f"LoadDetector(hold_s={self._hold_s}, exhausted_at={self._exhausted_at})"
